"""The steps a user runs, as library functions: embed, train, evaluate, export.

The CLI calls these and only formats what they return. Long work reports
through a `petal.progress.Reporter` (progress bars, messages); the default reports
nothing. The files of a run are written and read through `petal.run.Run`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from petal.backbones import DEFAULT_BACKBONE, BackboneConfig, get_backbone
from petal.data import EVAL, TRAIN, Dataset, Example, load_dataset
from petal.embed import embed, require_usable
from petal.errors import NothingUsableError
from petal.head import HeadClassifier
from petal.metrics import compute_metrics, write_report
from petal.progress import Reporter
from petal.run import (
    FINETUNE,
    HEAD,
    Run,
    RunSettings,
    data_warnings,
    epoch_tag,
    parity_uris,
    require_training_images,
)
from petal.storage import atomic_write_csv, check_output, default_cache_dir


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    metrics: dict
    embed: dict
    warnings: list[str] = field(default_factory=list)


def embed_dataset(ds: Dataset, backbone: str = DEFAULT_BACKBONE, cache_dir: Path | None = None,
                  reporter: Reporter | None = None, workers: int | None = None):
    """Embed every example; returns (EmbedResult, cache). Raises if nothing was usable."""
    reporter = reporter or Reporter()
    cfg = get_backbone(backbone)
    uris = [e.uri for e in ds.examples]
    with reporter.progress("embedding", len(uris)) as advance:
        result, cache = embed(uris, cfg, Path(cache_dir or default_cache_dir()),
                              on_progress=advance, on_message=reporter.message, workers=workers)
    require_usable(result, len(uris))
    return result, cache


def train(
    data: str | Path,
    out: str | Path,
    *,
    labels_file: str | Path | None = None,
    eval_data: str | Path | None = None,
    eval_percent: float = 10.0,
    backbone: str = DEFAULT_BACKBONE,
    cache_dir: str | Path | None = None,
    head: HeadClassifier | None = None,
    workers: int | None = None,
    export: bool = True,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> TrainResult:
    """embed -> train the head -> evaluate -> export, into the run folder `out`.
    A finished run already in `out` is replaced only with `overwrite=True`."""
    reporter = reporter or Reporter()
    head = head or HeadClassifier()
    cfg = get_backbone(backbone)
    cache_dir = Path(cache_dir or default_cache_dir())
    run = Run.create(out, data, overwrite)

    ds = load_dataset(data, labels_file=labels_file, eval_source=eval_data, eval_percent=eval_percent)
    reporter.dataset(ds)
    run.make()  # only once the data is known to be usable

    result, cache = embed_dataset(ds, backbone, cache_dir, reporter, workers)
    run.write_split(ds, result.keys, result.failed)
    warnings = data_warnings(ds, result.keys, reporter)
    usable = [e for e in ds.examples if e.uri in result.keys]
    tr = [e for e in usable if e.split == TRAIN]
    ev = [e for e in usable if e.split == EVAL]
    require_training_images(ds.classes, (e.label for e in tr))

    def xy(examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:  # (N, D) embeddings, (N,) class ids
        return (cache.get([result.keys[e.uri] for e in examples]),
                np.array([ds.label_id(e.label) for e in examples], dtype=np.int64))

    (Xtr, ytr), (Xev, yev) = xy(tr), xy(ev)
    run.write_settings(RunSettings(
        kind=HEAD, data=str(data), eval_data=str(eval_data) if eval_data else None,
        labels_file=str(labels_file) if labels_file else None, eval_percent=eval_percent,
        backbone=cfg.identity(), cache_dir=str(cache_dir), classes=ds.classes, params=head.get_params()))
    fit_head(run, head, (Xtr, ytr), (Xev, yev), len(ds.classes), reporter)
    metrics = run.write_metrics(ds.classes, [e.uri for e in ev], yev, lambda: head.predict_proba(Xev),
                                {"num_train": len(tr), "embed": result.summary()}, reporter)
    model_dir = None
    if export:
        parity = parity_uris([e.uri for e in ev], [e.uri for e in tr])
        reporter.message(f"exporting and checking parity on {len(parity)} images")
        model_dir = export_head(run, cfg, head, ds.classes, cache_dir, parity, metrics)
    return TrainResult(run.path, model_dir, metrics, {**result.summary(), "skipped": len(ds.skipped)}, warnings)


def fit_head(run: Run, head: HeadClassifier, train: tuple[np.ndarray, np.ndarray],
             eval_: tuple[np.ndarray, np.ndarray], num_classes: int, reporter: Reporter) -> None:
    """Train the head on (X (N, D), y (N,)) with TensorBoard curves, then save its weights."""
    with run.tensorboard() as log, reporter.progress("training head", head.epochs) as advance:
        def on_epoch(epoch: int, logs: dict) -> None:
            for k, v in logs.items():
                log(epoch_tag(k), v, epoch)
            advance(1)

        head.fit(*train, num_classes=num_classes, eval_set=eval_ if len(eval_[1]) else None, on_epoch=on_epoch)
    run.write_head(head)


def export_head(run: Run, cfg: BackboneConfig, head: HeadClassifier, classes: list[str], cache_dir: Path,
                parity: list[str], metrics: dict) -> Path:
    from petal.export import export_bundle

    return export_bundle(run.model_dir, cfg=cfg, head=head, classes=classes, cache_dir=cache_dir,
                         parity_uris=parity, metrics=metrics, name=run.name)


def export_run(run_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Re-export RUN/model from a finished run folder, head or fine-tuned, with the parity check."""
    run = Run.open(run_dir)
    settings = run.settings()
    cfg = get_backbone(settings.backbone["name"])
    cache = Path(cache_dir or settings.cache_dir)
    if settings.kind == FINETUNE:
        from petal.finetune.train import export_finetuned

        return export_finetuned(run, settings, cfg, cache)
    return export_head(run, cfg, run.head(settings), settings.classes, cache, run.parity_uris(), run.metrics())


def evaluate_model(model_dir: str | Path, data: str | Path, out: str | Path, *,
                   labels_file: str | Path | None = None, reporter: Reporter | None = None) -> dict:
    """Evaluate an exported bundle on every image of a labeled folder or CSV."""
    from petal.bundle import Model

    reporter = reporter or Reporter()
    check_output(out, "out", folder=True)
    model = Model(model_dir)
    ds = load_dataset(data, labels_file=labels_file, eval_percent=0.0, require_train=False)
    known = {c: i for i, c in enumerate(model.labels)}
    examples = [e for e in ds.examples if e.label in known]
    if len(examples) < len(ds.examples):
        unknown = Counter(e.label for e in ds.examples if e.label not in known)
        reporter.message(f"warning: {len(ds.examples) - len(examples)} image(s) have labels the model "
                         "does not know; skipped: " + ", ".join(f"{k!r} ({n})" for k, n in unknown.most_common()))
    uris, y, probs, failed = [], [], [], []
    with reporter.progress("evaluating", len(examples)) as advance:
        label_of = {e.uri: e.label for e in examples}
        for p in model.iter_predict([e.uri for e in examples]):
            advance(1)
            if p.error:
                failed.append((p.uri, p.error))
                continue
            uris.append(p.uri)
            y.append(known[label_of[p.uri]])
            probs.append(p.probabilities)
    if not uris:
        raise NothingUsableError("no image could be evaluated")
    out = Path(out)
    y_arr, probs_arr = np.array(y), np.stack(probs)
    metrics = compute_metrics(y_arr, probs_arr, model.labels)
    metrics["failed"] = len(failed)
    write_report(out, metrics, model.labels, uris, y_arr, probs_arr)
    atomic_write_csv(out / "errors.csv", ["uri", "reason"], ds.skipped + failed)
    return metrics
