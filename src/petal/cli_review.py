"""CLI commands of the review loop: `petal review RUN` and `petal retrain RUN` (issue 25).

Thin: parse options, call petal.reviewing. FastAPI and uvicorn are imported only when
`petal review` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.progress import Reporter

RunDir = Annotated[Path, typer.Argument(help="A finished `petal train` run folder.")]


def review_command(reporter: type[Reporter]):  # noqa: ANN201 - a typer command
    def review(
        run: RunDir,
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
        from petal.cli_serve import require_serving_packages
        from petal.reviewing.log import LABELED_FILE, copy_labeled
        from petal.reviewing.server import serve_review
        from petal.reviewing.workbench import open_review

        require_serving_packages()
        wb = open_review(run, unlabeled=unlabeled, cache_dir=cache, with_map=feature_map, reporter=reporter())
        p = wb.session.progress()
        typer.echo(f"{len(wb.session.cards)} cards ({p['reviewed']} reviewed); decisions go to {run / 'review.csv'}")
        try:
            serve_review(wb, host, port, on_url=lambda url: typer.echo(f"open {url}   (Ctrl-C ends the review)"))
        finally:
            if copy_to and (run / LABELED_FILE).exists():
                typer.echo(f"copied {len(copy_labeled(run / LABELED_FILE, copy_to))} labeled photo(s) into {copy_to}")
    return review


def retrain_command(reporter: type[Reporter]):  # noqa: ANN201 - a typer command
    def retrain(
        run: RunDir,
        out: Annotated[Optional[Path], typer.Option(help="The new run folder (default: RUN-2, RUN-3, ...).")] = None,
        cache: Annotated[Optional[Path], typer.Option(help="Embedding cache (default: the run's).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in --out.")] = False,
        export: Annotated[bool, typer.Option(help="Write NEW/model at the end.")] = True,
    ) -> None:
        """Train RUN again on today's data with its review (RUN/review.csv) and new labels
        (RUN/labeled.csv), then compare the old and new metrics."""
        from petal.reviewing.retrain import retrain as run_retrain

        r = run_retrain(run, out, cache_dir=cache, overwrite=overwrite, export=export, reporter=reporter())
        typer.echo(f"{'':22}{'old':>10}{'new':>10}{'change':>10}")
        for what, a, b in r.rows:
            def cell(v: float | None) -> str:
                return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
            change = f"{b - a:+.4f}" if isinstance(a, float) and isinstance(b, float) else ""
            typer.echo(f"{what:22}{cell(a):>10}{cell(b):>10}{change:>10}")
        typer.echo(f"new run: {r.new} (report: {r.new / 'report.html'})")
    return retrain


def register(app: typer.Typer, cls: type, reporter: type[Reporter]) -> None:
    """Add `review` and `retrain` to the main app, as `cls` commands reporting through `reporter`."""
    app.command("review", cls=cls)(review_command(reporter))
    app.command("retrain", cls=cls)(retrain_command(reporter))
