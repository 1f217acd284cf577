"""Options that several commands share: the data, the split, the cache, the run folder, the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.data import Columns
from petal.errors import PetalError
from petal.spec import DataSpec

Cache = Annotated[Optional[Path], typer.Option("--cache", help="Embedding cache folder "
                                               "(default: $PETAL_CACHE_DIR or the user cache dir).")]
Backbone = Annotated[str, typer.Option(help=(
    "A registered backbone (petal backbones), hf:HUB_ID_OR_FOLDER (the hub extra), onnx:FILE.onnx, "
    "or A+B (docs/backbones.md)."))]
# the preprocessing of an onnx: backbone (train, embed)
ImageSize = Annotated[Optional[int], typer.Option(min=1, help=(
    "onnx: backbones: the image side the graph takes (default: the graph's own)."))]
CropPct = Annotated[Optional[float], typer.Option(help="onnx: backbones: crop share of the resized image (0.875).")]
Mean = Annotated[Optional[str], typer.Option(help="onnx: backbones: channel means R,G,B on the 0..1 scale.")]
Std = Annotated[Optional[str], typer.Option(help="onnx: backbones: channel stds R,G,B on the 0..1 scale.")]
Workers = Annotated[Optional[int], typer.Option(min=1, help="Decode threads (default: all cores).")]
Rehash = Annotated[bool, typer.Option("--rehash", help=(
    "Read and hash every image again; by default a file whose size, mtime, inode and ctime are unchanged "
    "is only stat-ed, its hash taken from the memo in the cache."))]
Precision = Annotated[str, typer.Option(help=(
    "Backbone precision: fp32; bf16 (OpenVINO, needs a CPU with bf16: pip install 'petal[bf16]'); int8 "
    "(calibrated on the training images). Each precision's features are cached apart."))]
RunPrecision = Annotated[Optional[str], typer.Option(help=(
    "Run the bundle at this precision: bf16 runs an fp32 bundle on OpenVINO; int8 needs an int8 bundle "
    "(petal export RUN --precision int8). Default: the bundle's own."))]


# Options that `train` and `finetune` share: the data, the split, the cache, the run folder.
Data = Annotated[str, typer.Argument(help="Folder of class folders, or a CSV with image and label columns.")]
RunOut = Annotated[Path, typer.Option("--out", help="Run folder to write.")]
LabelsFile = Annotated[Optional[Path], typer.Option("--labels", help="dict.txt: one label per line, in id order.")]
UriColumn = Annotated[Optional[str], typer.Option(help=(
    "The CSV column holding the image paths (default: found by name: uri, path, filename, image, file)."))]
LabelColumn = Annotated[Optional[str], typer.Option(help=(
    "The CSV column holding the labels (default: found by name: label, class, category)."))]
SplitColumn = Annotated[Optional[str], typer.Option(help=(
    "The CSV column giving each image's split: train, val or test (default: found by name: split, subset, "
    "set, fold, partition, stage)."))]
EvalData = Annotated[Optional[str], typer.Option("--eval", help=(
    "Eval images (folder of class folders or CSV) instead of a share of DATA; --eval-percent is then unused."))]
EvalPercent = Annotated[float, typer.Option(help="Percent of images in the eval split.")]
Export = Annotated[bool, typer.Option(help="Write RUN/model at the end.")]
Exclude = Annotated[Optional[Path], typer.Option(help=(
    "Leave out the images listed in this CSV (a 'uri' column, e.g. a reviewed suspects.csv)."))]
Relabel = Annotated[Optional[Path], typer.Option(help=(
    "Give the images in this CSV its 'suggested' (or 'label') column as their label."))]
Labeled = Annotated[Optional[Path], typer.Option(help=(
    "Add the photos of this CSV of uri,label (RUN/labeled.csv of `petal review`) as training images."))]
Group = Annotated[Optional[str], typer.Option(help=(
    "Regex on file names; images sharing its capture (e.g. one shoot: '^(.*)_\\d+') stay on one side "
    "of the eval split."))]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a finished run already in --out.")]


def data_spec(data: str, *, labels: Path | None, uri_column: str | None, label_column: str | None,
              eval_data: str | None, eval_percent: float, group: str | None = None, exclude: Path | None = None,
              relabel: Path | None = None, labeled: Path | None = None, split_column: str | None = None) -> DataSpec:
    """The DataSpec of the data options that `train`, `finetune` and `audit` share."""
    return DataSpec(data, labels_file=labels, columns=Columns(uri_column, label_column, split_column),
                    eval_source=eval_data, eval_percent=eval_percent, group=group, exclude=exclude, relabel=relabel,
                    labeled=labeled)


RUNNER_HELP = "'local', or 'beam' to run as an Apache Beam pipeline; extra --options go to Beam."
BEAM_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def check_runner(runner: str, extra: list[str]) -> None:
    if runner not in ("local", "beam"):
        raise PetalError(f"runner: expected 'local' or 'beam', got {runner!r}")
    if runner == "local" and extra:
        raise PetalError(f"unknown options {' '.join(extra)} (pipeline options need --runner beam)")

