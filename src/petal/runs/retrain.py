"""`petal retrain RUN` and `petal finetune --resume RUN`: a run again from the spec its folder
keeps (settings.json), with nothing else to repeat.

Retraining re-reads the data and the reviewed CSVs (--exclude, --relabel) as they are today,
adds what `petal review` saved in RUN (review.csv, labeled.csv), so after fixing labels it is
one command; the feature cache embeds only the new images. Old vs new metrics go into the new
run (petal.reviewing.retrain).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from petal.errors import PetalError
from petal.progress import Reporter
from petal.reviewing.retrain import record_comparison, with_review
from petal.run import FINETUNE, HEAD, Run
from petal.runs.finetune.train import FinetuneResult, finetune
from petal.runs.head import TrainResult, train
from petal.spec import RunSpec


def stored_spec(run_dir: str | Path, *, kind: str | None = None) -> RunSpec:
    """The spec RUN/settings.json keeps (its `out`: RUN as it is now); with `kind`, refused by name
    when the run is of the other kind."""
    run = Run.open(run_dir)
    spec = run.settings().spec
    if kind is not None and spec.kind != kind:
        raise PetalError(f"run: {run.path} is a {spec.kind} run (petal {'train' if spec.kind == HEAD else 'finetune'})"
                         f"; expected a {kind} run")
    return spec


def retrain(run_dir: str | Path, out: str | Path | None = None, *, overwrite: bool = False,
            workers: int | None = None, rehash: bool = False, export: bool = True,
            reporter: Reporter | None = None) -> TrainResult | FinetuneResult | None:
    """RUN's spec on today's data, into `out` (a new run folder; `overwrite` replaces a finished
    run there), or, without `out`, into RUN itself, replacing it. Head runs take `workers` and
    `rehash` as `petal train` does; a fine-tuning run decodes as its settings say."""
    old = Run.open(run_dir)
    old_metrics = old.metrics()  # read before a retrain in place replaces them
    spec = with_review(stored_spec(run_dir), old)  # + RUN/review.csv, RUN/labeled.csv of `petal review`
    spec = replace(spec, out=str(out if out is not None else spec.out), overwrite=overwrite or out is None)
    if spec.kind == FINETUNE:
        result = finetune(spec, export=export, reporter=reporter)
    else:
        result = train(spec, workers=workers, rehash=rehash, export=export, reporter=reporter)
    if result is not None and result.metrics:
        record_comparison(old.path, old_metrics, result.run_dir, result.metrics)
    return result
