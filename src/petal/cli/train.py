"""`petal train`, `petal finetune` and `petal retrain`."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer
from typer.core import TyperOption

from petal.backbones import DEFAULT_BACKBONE, with_options
from petal.cli.command import Command
from petal.cli.options import (
    Backbone,
    Cache,
    CropPct,
    Data,
    EvalData,
    EvalPercent,
    Exclude,
    Export,
    Group,
    ImageSize,
    LabelColumn,
    Labeled,
    LabelsFile,
    Mean,
    Overwrite,
    Precision,
    Rehash,
    Relabel,
    RunOut,
    SplitColumn,
    Std,
    UriColumn,
    Workers,
    data_spec,
)
from petal.cli.render import RichReporter, print_finetune_result, print_train_result
from petal.errors import PetalError
from petal.head import HeadClassifier
from petal.runs.finetune.config import AugmentConfig, FinetuneConfig
from petal.spec import FINETUNE as FINETUNE_KIND
from petal.spec import RunSpec
from petal.unknown import DEFAULT_KEEP

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app


HEAD = HeadClassifier()  # the defaults of the head options
FTC = FinetuneConfig()  # the defaults of the fine-tuning options

AUG = "augmentation"
Epochs = Annotated[int, typer.Option(help="Passes over the training images.")]
Dropout = Annotated[float, typer.Option(help="Dropout before the classifier's last layer.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
LabelSmoothing = Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")]
Seed = Annotated[int, typer.Option(help="Random seed: the same seed and data give the same model.")]


class ClassWeight(str, Enum):
    balanced = "balanced"


# `petal finetune`'s own options, declared here so that its signature reads as a list
Unfreeze = Annotated[Optional[int], typer.Option(help=(
    f"Backbone blocks trained, from the top; 0: head only; -1: all (default {FTC.unfreeze}; "
    "with --no-pretrained: -1)."))]
BackboneLrMult = Annotated[float, typer.Option(help="Backbone learning rate = --lr times this.")]
WarmupEpochs = Annotated[float, typer.Option(help="Linear warmup, then cosine decay.")]
Pretrained = Annotated[bool, typer.Option(help="Start from the ImageNet weights; --no-pretrained trains from scratch.")]
Augment = Annotated[bool, typer.Option(rich_help_panel=AUG, help="Augment training images.")]
Flip = Annotated[bool, typer.Option(rich_help_panel=AUG, help="Random left-right flips.")]
RandomScale = Annotated[float, typer.Option(rich_help_panel=AUG, help="Zoom in/out by up to this percent.")]
RandomCrop = Annotated[float, typer.Option(rich_help_panel=AUG, help="Move the crop up to this percent of the image.")]
RandomBrightness = Annotated[float, typer.Option(rich_help_panel=AUG, help="Scale brightness by up to +-this percent.")]
RandomColor = Annotated[float, typer.Option(rich_help_panel=AUG, help="Scale saturation by up to +-this percent.")]
LoaderWorkers = Annotated[Optional[int], typer.Option(help=(
    "DataLoader worker processes (default: half the cores with --trunk-runtime onnx, else 1; "
    "on a GPU, the cores less one, up to 8)."))]
TrunkRuntime = Annotated[str, typer.Option(help="Frozen layers in 'onnx' (fast on a CPU), 'torch', or 'auto'.")]
Resume = Annotated[Optional[Path], typer.Option(metavar="RUN", help=(
    "Continue the fine-tuning run RUN from its last checkpoint, with its own settings (RUN/settings.json): "
    "give no DATA and no options but --stop-after, --nproc and --no-export."))]
RESUME_WITH = ("resume", "stop_after", "nproc", "export")  # what --resume RUN may be given with
StopAfter = Annotated[Optional[int], typer.Option(help="End after this epoch; --resume continues.")]
Nproc = Annotated[int, typer.Option(help="Data-parallel processes on this machine, started through torchrun.")]
CalibrationPercent = Annotated[float, typer.Option(help=(
    "Percent of the training images set aside, never trained on, to calibrate confidences and the "
    "'unknown' threshold; 0: neither."))]
FinetuneOverwrite = Annotated[bool, typer.Option("--overwrite", help=(
    "Start afresh in an --out that holds a finished run or a checkpoint."))]


@commands.command(cls=Command, short_help=(
    'Embed, train a head, calibrate, evaluate and export a model that says "unknown" when unsure.'))
def train(
    data: Data,
    *,
    out_dir: RunOut,
    labels: LabelsFile = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    split_column: SplitColumn = None,
    eval_data: EvalData = None,
    eval_percent: EvalPercent = 10.0,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=(
        "Passes over the training images (default: 15; fewer past 166k images, so that a run sees "
        "about 2.5M examples)."))] = HEAD.epochs,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle schedule, AdamW).")] = HEAD.lr,
    batch_size: Annotated[int, typer.Option(help="Embeddings per training step.")] = HEAD.batch_size,
    hidden: Annotated[int, typer.Option(help="Hidden units; 0 for a linear head.")] = HEAD.hidden,
    dropout: Dropout = HEAD.dropout,
    weight_decay: WeightDecay = HEAD.weight_decay,
    label_smoothing: LabelSmoothing = HEAD.label_smoothing,
    class_weight: Annotated[Optional[ClassWeight], typer.Option(help="Weigh classes by their inverse frequency.")
                            ] = None,
    seed: Seed = HEAD.seed,
    workers: Workers = None,
    keep: Annotated[float, typer.Option(help=(
        "Share of images of the known classes to keep (in [0.5, 1)); images scoring beyond "
        "that threshold are answered 'unknown'."))] = DEFAULT_KEEP,
    exclude: Exclude = None,
    relabel: Relabel = None,
    labeled: Labeled = None,
    group: Group = None,
    export: Export = True,
    overwrite: Overwrite = False,
    rehash: Rehash = False,
    precision: Precision = "fp32",
    image_size: ImageSize = None, crop_pct: CropPct = None, mean: Mean = None, std: Std = None,
) -> None:
    """Embed, train a head, calibrate it, evaluate and export: a folder of labeled images in,
    a model out that says "unknown" for images unlike every class. (To train backbone layers
    too: `petal finetune`.)"""
    from petal.runs.head import train as run_train

    backbone = with_options(backbone, image_size=image_size, crop_pct=crop_pct, mean=mean, std=std)
    head = HeadClassifier(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size,
                          weight_decay=weight_decay, label_smoothing=label_smoothing,
                          class_weight=class_weight.value if class_weight else None, seed=seed)
    data_ = data_spec(data, labels=labels, uri_column=uri_column, label_column=label_column,
                      split_column=split_column, eval_data=eval_data, eval_percent=eval_percent, group=group,
                      exclude=exclude, relabel=relabel, labeled=labeled)
    spec = RunSpec(data_, out_dir, backbone=backbone, precision=precision, cache_dir=cache, overwrite=overwrite,
                   keep=keep, trainer=head)
    print_train_result(run_train(spec, workers=workers, rehash=rehash, export=export, reporter=RichReporter()))


@commands.command(cls=Command, short_help=(
    "Fine-tune the top backbone blocks and a new classifier: slower than train, usually more accurate."))
def finetune(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(help=(
        "Folder of class folders, or a CSV with image and label columns (not with --resume)."))] = None,
    *,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder to write.")] = None,
    labels: LabelsFile = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    split_column: SplitColumn = None,
    eval_data: EvalData = None,
    eval_percent: EvalPercent = 10.0,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    epochs: Epochs = FTC.epochs,
    lr: Annotated[float, typer.Option(help="The classifier's peak learning rate.")] = FTC.lr,
    batch_size: Annotated[int, typer.Option(help="Global batch, split across --nproc.")] = FTC.batch_size,
    dropout: Dropout = FTC.dropout,
    weight_decay: WeightDecay = FTC.weight_decay,
    label_smoothing: LabelSmoothing = FTC.label_smoothing,
    seed: Seed = FTC.seed,
    unfreeze: Unfreeze = None,
    backbone_lr_mult: BackboneLrMult = FTC.backbone_lr_mult,
    warmup_epochs: WarmupEpochs = FTC.warmup_epochs,
    pretrained: Pretrained = FTC.pretrained,
    augment: Augment = True,
    flip: Flip = FTC.augment.flip,
    random_scale: RandomScale = FTC.augment.random_scale,
    random_crop: RandomCrop = FTC.augment.random_crop,
    random_brightness: RandomBrightness = FTC.augment.random_brightness,
    random_color: RandomColor = FTC.augment.random_color,
    workers: Workers = None,
    loader_workers: LoaderWorkers = None,
    trunk_runtime: TrunkRuntime = FTC.trunk_runtime,
    resume: Resume = None,
    stop_after: StopAfter = None,
    nproc: Nproc = 1,
    calibration_percent: CalibrationPercent = FTC.calibration_percent,
    keep: Annotated[float, typer.Option(help="Share of known images the 'unknown' threshold keeps.")] = DEFAULT_KEEP,
    exclude: Exclude = None,
    relabel: Relabel = None,
    group: Group = None,
    export: Export = True,
    overwrite: FinetuneOverwrite = False,
) -> None:
    """Fine-tune the top backbone blocks and a new classifier on augmented images (docs/finetune.md)."""
    from petal.runs.finetune.distributed import launch
    from petal.runs.finetune.train import finetune as run_finetune

    spec = resumed_spec(ctx, resume) if resume is not None else finetune_spec(SimpleNamespace(**ctx.params))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet a worker: start the workers
        sys.exit(launch(nproc, sys.argv[1:]))
    r = run_finetune(spec, resume=resume is not None, export=export, stop_after=stop_after, reporter=RichReporter())
    if r is not None:  # None: a worker process other than the first
        print_finetune_result(r)


def finetune_spec(o: SimpleNamespace) -> RunSpec:
    """The spec of `petal finetune DATA --out RUN [options]`, from the command's options `o`."""
    if o.data is None or o.out_dir is None:
        raise PetalError("finetune: give DATA and --out, or --resume RUN to continue a run")
    config = FinetuneConfig(
        epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
        warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay, label_smoothing=o.label_smoothing,
        dropout=o.dropout, unfreeze=o.unfreeze, pretrained=o.pretrained, seed=o.seed, trunk_runtime=o.trunk_runtime,
        loader_workers=o.loader_workers, decode_workers=o.workers, calibration_percent=o.calibration_percent,
        augment=AugmentConfig(enabled=o.augment, flip=o.flip, random_scale=o.random_scale, random_crop=o.random_crop,
                              random_brightness=o.random_brightness, random_color=o.random_color))
    data = data_spec(o.data, labels=o.labels, uri_column=o.uri_column, label_column=o.label_column,
                     split_column=o.split_column, eval_data=o.eval_data, eval_percent=o.eval_percent, group=o.group,
                     exclude=o.exclude, relabel=o.relabel)
    return RunSpec(data, o.out_dir, backbone=with_options(o.backbone), cache_dir=o.cache, overwrite=o.overwrite,
                   keep=o.keep, trainer=config)


def resumed_spec(ctx: typer.Context, run: Path) -> RunSpec:
    """RUN's own spec, for --resume RUN. An option given beside it (but RESUME_WITH) is refused by
    name: the run goes on with the settings it started with."""
    from petal.runs.retrain import stored_spec

    given = [(p.opts[0] if isinstance(p, TyperOption) else p.name.upper()) for p in ctx.command.params
             if p.name not in RESUME_WITH and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") != "DEFAULT"]
    if given:
        raise PetalError(f"resume: --resume RUN goes on with the settings in RUN/settings.json; leave out "
                         f"{', '.join(given)}")
    return replace(stored_spec(run, kind=FINETUNE_KIND), overwrite=False)


@commands.command(cls=Command, short_help=(
    "Train a run again with its own settings on the data as it is now (after fixing labels, say)."))
def retrain(
    run: Annotated[Path, typer.Argument(help="A run folder of `petal train` or `petal finetune`.")],
    *,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help=(
        "The new run folder (default: RUN itself, replaced)."))] = None,
    workers: Workers = None,
    export: Export = True,
    overwrite: Overwrite = False,
    rehash: Rehash = False,
) -> None:
    """Train RUN again as its settings.json says, on the data as it is now: the reviewed CSVs
    (--exclude, --relabel) are read again, RUN/review.csv and RUN/labeled.csv of `petal review`
    applied, and only new images are embedded; then old vs new metrics."""
    from petal.cli.render import print_comparison
    from petal.runs.finetune.train import FinetuneResult
    from petal.runs.retrain import retrain as run_retrain

    r = run_retrain(run, out_dir, overwrite=overwrite, workers=workers, rehash=rehash, export=export,
                    reporter=RichReporter())
    if isinstance(r, FinetuneResult):
        print_finetune_result(r)
    else:
        print_train_result(r)
    print_comparison(r.run_dir)
