"""The run folder: what every training run (head or fine-tuning) checks and writes.

    RUN/
      settings.json   what was asked: data, split, backbone, training settings
      split.csv       uri, label, split, content key of every image used
      errors.csv      uri, reason of every image skipped or failed
      metrics.json    + confusion_matrix.png, misclassified.csv (petal.metrics)
      tensorboard/    training curves
      model/          the exported bundle

Both `petal.workflow.train` and `petal.finetune.train` go through these functions,
so the two flows cannot drift apart. Every file but the TensorBoard logs is written
atomically.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from petal.data import Dataset, Example
from petal.errors import NothingUsableError, PetalError
from petal.metrics import compute_metrics, write_report
from petal.storage import atomic_write_text, check_output

PARITY_LIMIT = 2000  # images checked at export: the eval split, up to this many
PARITY_FALLBACK = 256  # train images checked instead when there is no eval split


class Messages(Protocol):
    def message(self, text: str) -> None: ...


def check_run_folder(out: str | Path, data: str | Path, overwrite: bool) -> Path:
    """Refuse a run folder that would overwrite a finished run, or land inside the data."""
    run = check_output(out, "out", folder=True)
    if not overwrite and ((run / "metrics.json").exists() or (run / "model").exists()):
        raise PetalError(f"out: {run} already holds a finished run; pass --overwrite to replace it, "
                         "or choose another --out")
    data_dir = Path(data).resolve()
    if data_dir.is_dir() and run.resolve().is_relative_to(data_dir):
        raise PetalError(f"out: {run} is inside the data folder {data}; its files would be read as data")
    return run


def require_training_images(classes: list[str], train_labels: Iterable[str]) -> None:
    """Every class still has a training image once unreadable ones are gone."""
    missing = sorted(set(classes) - set(train_labels))
    if missing:
        raise NothingUsableError("after skipping unreadable images, these classes have no training "
                                 "image: " + ", ".join(map(repr, missing)))


def duplicate_warnings(examples: list[Example], keys: dict[str, str]) -> list[str]:
    """The same bytes under two labels, or in both train and eval."""
    by_key = defaultdict(list)
    for e in examples:
        if e.uri in keys:
            by_key[keys[e.uri]].append(e)
    out = []
    for group in by_key.values():
        if len({e.label for e in group}) > 1:
            out.append("same image in classes " + ", ".join(f"{e.label!r} ({e.uri})" for e in group))
        elif len({e.split for e in group}) > 1:
            out.append("same image in both train and eval: " + ", ".join(e.uri for e in group))
    return out


def data_warnings(ds: Dataset, keys: dict[str, str], reporter: Messages) -> list[str]:
    """The data's own warnings (already shown with the data) plus duplicates, reported now."""
    found = duplicate_warnings(ds.examples, keys)
    for w in found:
        reporter.message(f"warning: {w}")
    return list(ds.warnings) + found


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_split_files(run: Path, ds: Dataset, keys: dict[str, str], failed: list[tuple[str, str]]) -> None:
    """errors.csv (skipped rows and failed images) and split.csv (every image used)."""
    write_csv(run / "errors.csv", ["uri", "reason"], ds.skipped + failed)
    write_csv(run / "split.csv", ["uri", "label", "split", "key"],
              [(e.uri, e.label, e.split, keys[e.uri]) for e in ds.examples if e.uri in keys])


def write_settings(run: Path, *, data: str | Path, eval_data: str | Path | None, labels_file: str | Path | None,
                   eval_percent: float, backbone: dict, cache_dir: Path, classes: list[str], **training: Any
                   ) -> None:
    """settings.json: enough to re-export the run (`petal export RUN`) and to see what it was."""
    settings = {
        "data": str(data), "eval_data": str(eval_data) if eval_data else None,
        "labels_file": str(labels_file) if labels_file else None, "eval_percent": eval_percent,
        "backbone": backbone, "cache_dir": str(cache_dir), **training, "classes": classes,
    }
    atomic_write_text(run / "settings.json", json.dumps(settings, indent=2) + "\n")


def write_metrics(run: Path, classes: list[str], eval_uris: list[str], y_eval: np.ndarray,
                  predict_proba: Callable[[], np.ndarray], extra: dict, reporter: Messages,
                  no_eval_note: str = "") -> dict:
    """Evaluate on the eval split and write metrics.json and its report; with no eval
    images, metrics.json says so (accuracy None) and nothing is predicted."""
    if len(y_eval):
        probs = predict_proba()  # (N, C)
        metrics = {**compute_metrics(y_eval, probs, classes), **extra}
        write_report(run, metrics, classes, eval_uris, y_eval, probs)
    else:
        reporter.message("warning: no eval images; metrics are not computed" + no_eval_note)
        metrics = {"accuracy": None, "top5_accuracy": None, "num_eval": 0, **extra}
        atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def parity_uris(eval_uris: list[str], train_uris: list[str]) -> list[str]:
    """The images the export's parity check runs on."""
    return (eval_uris or train_uris[:PARITY_FALLBACK])[:PARITY_LIMIT]


@contextmanager
def tensorboard(logdir: Path) -> Iterator[Callable[[str, float, int], None]]:
    """yield log(tag, value, step); TensorBoard event files in `logdir` (append-only)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    try:
        yield lambda tag, value, step: writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def epoch_tag(key: str) -> str:
    """history key -> TensorBoard tag: train_loss -> loss/train, lr_head -> lr/head."""
    if "_" not in key:
        return f"epoch/{key}"
    first, rest = key.split("_", 1)
    return f"{rest}/{first}" if first in ("train", "eval") else f"{first}/{rest}"
