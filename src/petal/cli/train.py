"""`petal train` and `petal finetune`."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from petal.backbones import DEFAULT_BACKBONE
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
    LabelsFile,
    Mean,
    Overwrite,
    Precision,
    Rehash,
    Relabel,
    RunOut,
    Std,
    UriColumn,
    Workers,
)
from petal.cli.render import (
    RichReporter,
    out,
    print_finetune_result,
    print_metrics,
    print_run_end,
    print_trust,
)
from petal.data import Columns
from petal.finetune.config import AugmentConfig, FinetuneConfig
from petal.head import HeadClassifier
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
Resume = Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")]
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
    out_dir: RunOut,
    labels: LabelsFile = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
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
    from petal.backbones import with_options
    from petal.workflow import train as run_train

    backbone = with_options(backbone, image_size=image_size, crop_pct=crop_pct, mean=mean, std=std)
    head = HeadClassifier(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size,
                          weight_decay=weight_decay, label_smoothing=label_smoothing,
                          class_weight=class_weight.value if class_weight else None, seed=seed)
    r = run_train(data, out_dir, labels_file=labels, columns=Columns(uri_column, label_column),
                  eval_data=eval_data, eval_percent=eval_percent,
                  backbone=backbone, cache_dir=cache, head=head, workers=workers, export=export,
                  overwrite=overwrite, keep=keep, exclude=exclude, relabel=relabel, group=group, rehash=rehash,
                  precision=precision, reporter=RichReporter())
    e = r.embed
    out.print(f"images: {e['embedded']} embedded, {e['cached']} cached, {e['failed']} failed"
              + (f" (see {r.run_dir / 'errors.csv'})" if e["failed"] or e["skipped"] else ""))
    if r.metrics.get("accuracy") is not None:
        print_metrics(r.metrics)
        print_trust(r.metrics)
    print_run_end(r.run_dir, r.model_dir)


@commands.command(cls=Command, short_help=(
    "Fine-tune the top backbone blocks and a new classifier: slower than train, usually more accurate."))
def finetune(
    data: Data,
    out_dir: RunOut,
    labels: LabelsFile = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
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
    resume: Resume = False,
    stop_after: StopAfter = None,
    nproc: Nproc = 1,
    calibration_percent: CalibrationPercent = FTC.calibration_percent,
    keep: Annotated[float, typer.Option(help="Share of known images the 'unknown' threshold keeps.")] = FTC.keep,
    exclude: Exclude = None,
    relabel: Relabel = None,
    group: Group = None,
    export: Export = True,
    overwrite: FinetuneOverwrite = False,
) -> None:
    """Fine-tune the top backbone blocks and a new classifier on augmented images (docs/finetune.md)."""
    from petal.finetune.distributed import launch
    from petal.finetune.train import finetune as run_finetune

    config = FinetuneConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr_mult=backbone_lr_mult,
        warmup_epochs=warmup_epochs, weight_decay=weight_decay, label_smoothing=label_smoothing,
        dropout=dropout, unfreeze=unfreeze, pretrained=pretrained, seed=seed, trunk_runtime=trunk_runtime,
        workers=loader_workers, decode_workers=workers, calibration_percent=calibration_percent, keep=keep,
        augment=AugmentConfig(enabled=augment, flip=flip, random_scale=random_scale, random_crop=random_crop,
                              random_brightness=random_brightness, random_color=random_color))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet a worker: start the workers
        sys.exit(launch(nproc, sys.argv[1:]))
    r = run_finetune(data, out_dir, config=config, labels_file=labels, columns=Columns(uri_column, label_column),
                     eval_data=eval_data, eval_percent=eval_percent, backbone=backbone, cache_dir=cache,
                     resume=resume, overwrite=overwrite, export=export, stop_after=stop_after, exclude=exclude,
                     relabel=relabel, group=group, reporter=RichReporter())
    if r is not None:  # None: a worker process other than the first
        print_finetune_result(r)

