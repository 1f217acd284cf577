"""`petal evaluate` and `petal export`: what a trained run gives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.cli.command import Command
from petal.cli.options import Cache, LabelColumn, UriColumn
from petal.cli.render import RichReporter, out, print_metrics, print_quantized, print_trust
from petal.data import Columns

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app


@commands.command(cls=Command)
def evaluate(
    model: Annotated[Path, typer.Argument(help="Exported model folder (RUN/model).")],
    *,
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
    from petal.runs.evaluate import evaluate_model

    metrics = evaluate_model(model, data, out_dir, labels_file=labels, columns=Columns(uri_column, label_column),
                             unknown_data=unknown_data,
                             reject_unknown=not no_unknown, reporter=RichReporter())
    print_metrics(metrics)
    print_trust(metrics)
    out.print(f"report: {out_dir / 'report.html'}", markup=False, highlight=False)


@commands.command(cls=Command)
def export(
    run: Annotated[Path, typer.Argument(help="A run folder written by `petal train` (with --web: or a bundle).")],
    *,
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
    name: Annotated[Optional[str], typer.Option(help=(
        "The model's name, stored in petal.json: `petal serve` serves it under this name (REST and KServe v2) "
        "and the web page shows it as its title (default: the run folder's name)."))] = None,
) -> None:
    """(Re-)export RUN/model from a run folder, with the parity check; or, with --web, a web page."""
    if web is not None:
        from petal.webpage import export_web

        summary = export_web(run, web, ort_dir).summary()
        if name is not None:  # the page's copy of petal.json: its title
            from petal.bundle import rename

            rename(web, name)
        out.print(summary, markup=False)
        return
    from petal.runs.reexport import export_run

    path = export_run(run, cache, precision=precision, force=force, reporter=RichReporter())
    if name is not None:
        from petal.bundle import rename

        rename(path, name)
    out.print(f"model: {path}" + (f" (named {name!r})" if name is not None else ""), markup=False)
    if precision == "int8":
        print_quantized(path)

