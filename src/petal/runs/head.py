"""`petal train`: embed -> train a head on the cached features -> calibrate it, fit the unknown
detector -> evaluate, audit, report (petal.runs.common) -> export.

    from petal.runs.head import train
    from petal.spec import DataSpec, RunSpec
    result = train(RunSpec(DataSpec("flower_photos"), "runs/flowers"))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from petal.audit import bank_leave_out
from petal.backbones import BackboneConfig, get_backbone
from petal.calibration import FOLDS, softmax
from petal.data import EVAL, TEST, TRAIN
from petal.errors import PetalError
from petal.features import Features, load_features
from petal.head import HeadClassifier, auto_epochs
from petal.onnx_graphs import check_backbone
from petal.precision import FP32, INT8, Engine
from petal.predictions import Scores
from petal.progress import Reporter
from petal.run import HEAD, Run, epoch_tag, require_training_images
from petal.runs.common import Ending, Scored, audit_run, embed_spec, finish, open_run, parity_images, record
from petal.spec import RunSpec
from petal.unknown import KnnUnknown, capped_sample

CALIBRATION_CAP = 50_000  # training images calibrated on, at most (a stratified sample)
TRAIN_ACCURACY_CAP = 100_000  # training images the train accuracy is measured on, at most
EPOCH_NEWS_SECONDS = 10.0


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    metrics: dict
    embed: dict
    warnings: list[str] = field(default_factory=list)


def train(spec: RunSpec, *, workers: int | None = None, rehash: bool = False, export: bool = True,
          feature_dtype: str | None = None, reporter: Reporter | None = None) -> TrainResult:
    """Train the spec's head into the run folder `spec.out`. `workers`: decode threads; `rehash`:
    read and hash every file, whatever the hash memo says; `export`: write RUN/model;
    `feature_dtype`: "float32" or "float16" embeddings in memory (default: float16 only past
    petal.features.FLOAT16_BYTES). A finished run in `out` is replaced only with `spec.overwrite`."""
    if spec.kind != HEAD:
        raise PetalError("trainer: petal.runs.head.train trains a HeadClassifier; a FinetuneConfig goes to "
                         "petal.runs.finetune.finetune")
    reporter, cfg = reporter or Reporter(), get_backbone(spec.backbone)
    check_backbone(cfg, spec.cache)  # before the data scan: a missing weights package is said at once
    run, ds = open_run(spec, reporter)
    run.make(clear=spec.overwrite)  # only once the data is known to be usable

    result, cache = embed_spec(ds, spec, reporter, workers=workers, rehash=rehash)
    feats = load_features(ds, result.keys, cache, reporter, feature_dtype)
    (tr, Xtr, ytr), (_, Xev, yev) = feats.split(TRAIN), feats.split(EVAL)
    require_training_images(ds.classes, (e.label for e in tr))
    head = replace(spec.trainer).for_data(len(ytr))  # a copy to fit; the default epochs depend on the data
    warnings = record(run, replace(spec, trainer=head), ds, keys=result.keys, failed=result.failed, reporter=reporter)
    fit_head(run, head, train=(Xtr, ytr), eval_=(Xev, yev), num_classes=len(ds.classes), reporter=reporter)
    findings = audit_run(run, ds.classes, feats, reporter)  # before the unknown bank, which leaves out what it flags
    unknown = fit_trust(run, head, (Xtr, ytr), keep=spec.keep, reporter=reporter,
                        leave_out=bank_leave_out(findings, [e.uri for e in tr]))
    ending = score_head(feats, head, unknown, result.summary(), reporter)
    metrics = finish(run, ds.classes, replace(ending, findings=findings), reporter)
    model_dir = export_trained(run, spec, head=head, classes=ds.classes, feats=feats, metrics=metrics, unknown=unknown,
                               reporter=reporter) if export else None
    return TrainResult(run.path, model_dir, metrics, {**result.summary(), "skipped": len(ds.skipped)}, warnings)


def export_trained(run: Run, spec: RunSpec, *, head: HeadClassifier, classes: list[str], feats: Features, metrics: dict,
                   unknown: KnnUnknown | None, reporter: Reporter) -> Path:
    """RUN/model of a head just trained, its parity proved on a sample of the (readable) eval and
    train images."""
    (tr, _, _), (ev, _, _) = feats.split(TRAIN), feats.split(EVAL)
    parity = parity_images(eval_uris=[e.uri for e in ev], train_uris=[e.uri for e in tr], reporter=reporter)
    return export_head(run, cfg=get_backbone(spec.backbone), head=head, classes=classes,
                       cache_dir=spec.cache, parity=parity, metrics=metrics, unknown=unknown,
                       precision=spec.precision, train_keys=feats.keys[feats.bounds[TRAIN]])


def score_head(feats: Features, head: HeadClassifier, unknown: KnnUnknown, embed_summary: dict,
               reporter: Reporter) -> Ending:
    """The trained head on its own training split (accuracy), on eval (calibrated, with the
    unknown detector) and on test: what `finish` writes up."""
    (tr, Xtr, ytr), (ev, Xev, yev), (test, Xt, yt) = feats.split(TRAIN), feats.split(EVAL), feats.split(TEST)
    with reporter.progress("evaluating", 1) as advance:
        rows = capped_sample(ytr, TRAIN_ACCURACY_CAP, head.seed)  # an estimate past the cap: a million
        Xs, ys = (Xtr, ytr) if len(rows) == len(ytr) else (Xtr[rows], ytr[rows])  # predictions cost minutes
        logits = head.decision_function(Xev)  # (N, C) before calibration
        probs = softmax(logits, head.temperature_)  # (N, C) calibrated, computed once: 400 MB at 100k x 1000
        ood = unknown.score(Xev, probs)
        scored = Scored([e.uri for e in ev], yev, Scores(probs, ood, ood > unknown.threshold), logits)
        tested = Scored([e.uri for e in test], yt, Scores(head.predict_proba(Xt))) if test else None
        extra = {"num_train": len(tr), "train_accuracy": float((head.predict(Xs) == ys).mean()),
                 "embed": embed_summary, "calibrator": head.calibration_}
        advance(1)
    return Ending(feats, scored, tested, temperature=head.temperature_, keep=unknown.keep,
                  threshold=unknown.threshold, extra=extra, bank_left_out=unknown.left_out)


def fit_trust(run: Run, head: HeadClassifier, train: tuple[np.ndarray, np.ndarray], *, keep: float,
              reporter: Reporter, leave_out: np.ndarray | None = None) -> KnnUnknown:
    """Calibrate the head's temperature out of fold, then fit the unknown detector on the
    training embeddings X (N, D) with those held-out probabilities, but for the (N,) bool
    `leave_out` (the audit's outliers and strong label suspects); both saved in the run.
    Past CALIBRATION_CAP images, on a stratified sample of that many: a temperature and a
    threshold are two numbers, and 5 more heads on a million images would take an hour."""
    X, y = train
    rows = capped_sample(y, CALIBRATION_CAP, head.seed)
    Xs, ys = (X, y) if len(rows) == len(y) else (X[rows], y[rows])
    leave_out = None if leave_out is None else leave_out[rows]
    with reporter.progress("calibrating (out-of-fold heads)", FOLDS) as advance:
        head.calibrate(Xs, ys, folds=FOLDS, on_fold=advance)
    unknown = KnnUnknown.fit(Xs, ys, head.oof_proba_, keep=keep, seed=head.seed, leave_out=leave_out)
    if unknown.left_out:
        reporter.message(f"unknown detector: {unknown.left_out} audit outliers and strong label suspects left out "
                         "of its bank")
    run.write_head(head)  # now with its temperature
    run.write_unknown(unknown)
    return unknown


def fit_head(run: Run, head: HeadClassifier, *, train: tuple[np.ndarray, np.ndarray],
             eval_: tuple[np.ndarray, np.ndarray], num_classes: int, reporter: Reporter) -> None:
    """Train the head on (X (N, D), y (N,)) with TensorBoard curves, then save its weights.
    The bar counts training examples (its ETA covers every epoch); an epoch slower than
    EPOCH_NEWS_SECONDS is summed up in a line as it ends."""
    n = len(train[1])
    epochs = head.epochs or auto_epochs(n)
    with (run.tensorboard() as log,
          reporter.progress(f"training head ({epochs} epochs)", epochs * n) as advance):
        def on_epoch(epoch: int, logs: dict) -> None:
            for k, v in logs.items():
                log(epoch_tag(k), v, epoch)
            if logs["seconds"] >= EPOCH_NEWS_SECONDS:
                reporter.message(f"epoch {epoch}/{epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in logs.items() if k != "seconds") + f" ({logs['seconds']:.0f} s)")

        head.fit(*train, num_classes=num_classes, eval_set=eval_ if len(eval_[1]) else None, on_epoch=on_epoch,
                 on_batch=advance)
    run.write_head(head)


def export_head(run: Run, *, cfg: BackboneConfig, head: HeadClassifier, classes: list[str], cache_dir: Path,
                parity: list[str], metrics: dict, unknown: KnnUnknown | None, precision: str = FP32,
                train_keys: list[str] | None = None) -> Path:
    """RUN/model; a head trained on int8 features gets the very int8 backbone they came from.
    `train_keys` (content keys of the training images) are read from split.csv when not given
    (a million rows of it cost 600 MB as dicts)."""
    from petal.export import export_bundle

    calibration = [r["uri"] for r in run.split_rows() if r["split"] == TRAIN] if precision == INT8 else []
    engine = Engine.make(cfg, precision, calibration)
    quantization = {**engine.record(), "trained_on": f"{INT8} features"} if precision == INT8 else None
    return export_bundle(run.model_dir, cfg=cfg, head=head, classes=classes, cache_dir=cache_dir,
                         parity_uris=parity, metrics=metrics, name=run.name, unknown=unknown,
                         train_keys=run.train_keys() if train_keys is None else train_keys, engine=engine,
                         quantization=quantization)

