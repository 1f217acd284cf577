"""`petal predict` and `petal classify`."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.backbones import DEFAULT_BACKBONE
from petal.cli.command import Command
from petal.cli.options import (
    BEAM_ARGS,
    RUNNER_HELP,
    Backbone,
    Cache,
    RunPrecision,
    Workers,
    check_runner,
)
from petal.cli.render import (
    RichReporter,
    err,
    out,
    print_failures,
    print_predictions,
)
from petal.errors import PetalError
from petal.progress import Reporter
from petal.storage import atomic_write_csv, check_output

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app


class RowFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


PROGRESS_FROM = 64  # inputs from which `petal predict` shows a progress bar


@commands.command(cls=Command, context_settings=BEAM_ARGS, short_help=(
    "Predict labels for images with an exported model (or a served one, with --url)."))
def predict(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help=(
        "Exported model folder (RUN/model). Not given with --url: then every argument is an input."))] = None,
    *,
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
    uri_column: Annotated[Optional[str], typer.Option(help=(
        "In CSV inputs, the column holding the image paths (default: found by name: uri, path, filename, "
        "image, file; without a header, the first column)."))] = None,
) -> None:
    """Predict labels for images with an exported model (or a served one, with --url).
    On a terminal: a table; in a pipe, or with --format: CSV or JSON rows."""
    check_runner(runner, ctx.args)
    if errors:
        check_output(errors, "errors")
    fmt = fmt.value if fmt else None
    uris = predict_inputs(model, inputs or [], url, uri_column)
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


def predict_inputs(model: str | None, inputs: list[str], url: str | None, uri_column: str | None = None
                   ) -> list[str]:
    """MODEL and INPUTS -> the image URIs; with --url, MODEL is an input too."""
    from petal.data import expand_inputs

    if url:
        if model and (Path(model) / "petal.json").is_file():
            raise PetalError(f"predict: give a model bundle or --url, not both ({model} is a bundle)")
        inputs = [model, *inputs] if model else inputs
    elif model is None:
        raise PetalError("predict: give a model folder (RUN/model), or --url of a running `petal serve`")
    elif not (Path(model) / "petal.json").is_file():
        refuse_non_bundle(model)
    uris, problems = expand_inputs(inputs, uri_column)
    for p in problems:
        err.print(f"warning: {p}", style="yellow", markup=False)
    if not uris:
        raise PetalError("predict: no input images")
    return uris


def refuse_non_bundle(model: str) -> None:
    """`petal predict newphotos` (the model forgotten): say the first argument must be a bundle."""
    path = Path(model)
    if not path.exists():
        why = f"{model} does not exist"
    elif (path / "model" / "petal.json").is_file():
        why = f"{model} is not a petal model bundle (no petal.json); did you mean {path / 'model'}?"
    else:
        why = (f"{model} is not a petal model bundle (no petal.json); if it holds the images, give the model "
               f"first: petal predict RUN/model {model}")
    raise PetalError(f"predict: the first argument must be a model bundle (a RUN/model folder); {why}")


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


@commands.command(cls=Command)
def classify(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    *,
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
        out.print(p.uri, style="bold", highlight=False)
        for name, score in p.top:
            out.print(f"  {score:6.3f}  {name}", markup=False, highlight=False)
    if not ok:
        raise PetalError("classify: no image could be read")

