"""`petal export RUN`: a finished run folder's bundle again, head or fine-tuned (by the run's
kind), with the parity check; or its int8 bundle behind the int8 parity gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from petal.backbones import get_backbone
from petal.data import EVAL, TRAIN
from petal.errors import PetalError
from petal.precision import FP32, INT8, check_precision
from petal.progress import Reporter
from petal.run import FINETUNE, Run
from petal.runs.finetune.train import export_finetuned
from petal.runs.head import export_head


def export_run(run_dir: str | Path, cache_dir: str | Path | None = None, *, precision: str = FP32,
               force: bool = False, reporter: Reporter | None = None) -> Path:
    """Re-export RUN/model from a finished run folder, head or fine-tuned, with the parity check;
    `precision="int8"`: RUN/model-int8 behind the int8 parity gate (`force` writes it even if it fails).
    `cache_dir`: where the backbone's features are cached, if not where the run had them."""
    check_precision(precision, "--precision", (FP32, INT8))
    run = Run.open(run_dir)
    settings = run.settings()
    spec = settings.spec
    cache = Path(cache_dir or spec.cache_dir)
    if settings.kind == FINETUNE:
        if precision != FP32:
            raise PetalError("export --precision int8: only head runs (petal train) can be quantized for now")
        return export_finetuned(run, settings)
    cfg, head = get_backbone(spec.backbone), run.head(settings)
    if precision == FP32:  # as trained: a run trained on int8 features gets its int8 bundle again
        return export_head(run, cfg=cfg, head=head, classes=settings.classes, cache_dir=cache,
                           parity=run.parity_uris(), metrics=run.metrics(), unknown=run.unknown(),
                           precision=spec.precision)
    if spec.precision == INT8:
        raise PetalError(f"export --precision int8: {run.path} was trained on int8 features, so {run.model_dir} "
                         "is int8 already; `petal export RUN` rebuilds it")
    from petal.export import export_int8

    rows = run.split_rows()
    ev = [r for r in rows if r["split"] == EVAL]
    labels = np.array([settings.classes.index(r["label"]) for r in ev])
    path, _ = export_int8(run.path / f"model-{INT8}", cfg=cfg, head=head, cache_dir=cache,
                          train_uris=[r["uri"] for r in rows if r["split"] == TRAIN],
                          eval_uris=[r["uri"] for r in ev], eval_labels=labels, force=force,
                          on_message=(reporter or Reporter()).message, classes=settings.classes,
                          metrics=run.metrics(), name=run.name, unknown=run.unknown(), train_keys=run.train_keys())
    return path
