"""`petal review RUN`: the review page (issue 25). `petal retrain` is in petal.cli.train.

Thin: parse options, call petal.reviewing. FastAPI and uvicorn are imported only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.cli.command import Command
from petal.cli.render import RichReporter

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app


@commands.command(cls=Command, short_help=(
    "Review a run's suspects and label new photos in a local page; decisions saved for petal retrain."))
def review(
    run: Annotated[Path, typer.Argument(help="A finished `petal train` run folder.")],
    *,
    unlabeled: Annotated[Optional[str], typer.Option(help=(
        "A folder of new photos to label too (queued by what a label would teach the model); "
        "labels go to RUN/labeled.csv."))] = None,
    copy_to: Annotated[Optional[Path], typer.Option(help=(
        "When the review ends, copy the labeled photos into class folders here (never moved)."))] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0: any free one.")] = 8765,
    feature_map: Annotated[bool, typer.Option("--map/--no-map", help="Compute the feature map.")] = True,
    cache: Annotated[Optional[Path], typer.Option(help="Embedding cache (default: the run's).")] = None,
) -> None:
    """Review a run's audit findings (and new photos) in a local page: every decision is saved
    at once into RUN/review.csv (RUN/labeled.csv), which `petal retrain RUN` applies."""
    from petal.cli.serve import require_serving_packages
    from petal.reviewing.log import LABELED_FILE, copy_labeled
    from petal.reviewing.server import serve_review
    from petal.reviewing.workbench import open_review

    require_serving_packages()
    wb = open_review(run, unlabeled=unlabeled, cache_dir=cache, with_map=feature_map, reporter=RichReporter())
    p = wb.session.progress()
    typer.echo(f"{len(wb.session.cards)} cards ({p['reviewed']} reviewed); decisions go to {run / 'review.csv'}")
    try:
        serve_review(wb, host, port, on_url=lambda url: typer.echo(f"open {url}   (Ctrl-C ends the review)"))
    finally:
        if copy_to and (run / LABELED_FILE).exists():
            typer.echo(f"copied {len(copy_labeled(run / LABELED_FILE, copy_to))} labeled photo(s) into {copy_to}")
