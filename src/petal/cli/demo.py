"""`petal demo`: synthetic data through the whole flow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from petal.calibration import format_score
from petal.cli.command import Command
from petal.cli.options import Cache
from petal.cli.render import RichReporter, out, print_metrics

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app


@commands.command(cls=Command)
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the demo data and run.")] = Path("petal-demo"),
    cache: Cache = None,
) -> None:
    """Make a small synthetic labeled image set and run the whole flow on it."""
    from petal.bundle import load
    from petal.run import Run
    from petal.runs.head import train as run_train
    from petal.spec import DataSpec, RunSpec
    from petal.synthetic import make_dataset

    data = make_dataset(out_dir / "data", per_class=24)
    out.print(f"1. synthetic data in {data}", style="bold")
    spec = RunSpec(DataSpec(data, eval_percent=25.0), out_dir / "run", cache_dir=cache, overwrite=True)
    r = run_train(spec, reporter=RichReporter())
    print_metrics(r.metrics)
    out.print("2. predictions from the exported bundle, on eval images it was not trained on", style="bold")
    m = load(out_dir / "run" / "model")
    samples = [row["uri"] for row in Run.open(r.run_dir).split_rows() if row["split"] == "eval"][:6]
    for p in m.predict(samples, top_k=2):
        out.print(f"  {p.uri}: {p.label} ({format_score(p.score)})", markup=False)
    out.print(f"done: try `petal predict {out_dir / 'run' / 'model'} IMAGE`")

