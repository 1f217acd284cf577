"""The steps a user runs, as library functions: embed, train, evaluate, export.

The CLI calls these and only formats what they return. Long work reports
through a `petal.progress.Reporter` (progress bars, messages); the default reports
nothing. The files of a run are written and read through `petal.run.Run`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from petal.audit import Audit, audit, write_audit
from petal.backbones import DEFAULT_BACKBONE, BackboneConfig, get_backbone
from petal.bundle import TRAIN_KEYS, in_train_keys
from petal.calibration import FOLDS, expected_calibration_error, reliability_diagram, softmax
from petal.data import EVAL, TEST, TRAIN, Columns, Dataset, load_dataset
from petal.embed import embed, require_usable
from petal.errors import NothingUsableError, PetalError
from petal.features import Features, load_features
from petal.head import HeadClassifier, auto_epochs
from petal.metrics import compute_metrics, write_report
from petal.onnx_graphs import check_backbone
from petal.params import Real, check_param
from petal.precision import FP32, INT8, Engine, check_precision
from petal.predictions import Scores
from petal.progress import Reporter
from petal.report import write_html_report
from petal.review import apply_review
from petal.reviewing.log import add_labeled
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
from petal.storage import absolute, atomic_write_csv, atomic_write_text, check_output, default_cache_dir
from petal.unknown import DEFAULT_KEEP, KnnUnknown, capped_sample, coverage_curve

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


def embed_dataset(ds: Dataset, backbone: str = DEFAULT_BACKBONE, cache_dir: Path | None = None,
                  reporter: Reporter | None = None, workers: int | None = None, source: str = "",
                  rehash: bool = False, precision: str = FP32):
    """Embed every example at `precision` (int8 calibrates on the training split); returns
    (EmbedResult, cache). Raises if nothing was usable. File hashes are memoized under `source`
    (the data's name) unless `rehash` (petal.hashmemo)."""
    reporter = reporter or Reporter()
    cfg = get_backbone(backbone)
    uris = [e.uri for e in ds.examples]
    with reporter.progress("hashing and embedding", len(uris)) as advance:
        result, cache = embed(uris, cfg, Path(cache_dir or default_cache_dir()), on_progress=advance,
                              on_message=reporter.message, workers=workers, source=source, rehash=rehash,
                              precision=precision, calibration_uris=[e.uri for e in ds.split(TRAIN)] or uris)
    require_usable(result, len(uris))
    return result, cache


def train(
    data: str | Path,
    out: str | Path,
    *,
    labels_file: str | Path | None = None,
    columns: Columns = Columns(),
    eval_data: str | Path | None = None,
    eval_percent: float = 10.0,
    backbone: str = DEFAULT_BACKBONE,
    cache_dir: str | Path | None = None,
    head: HeadClassifier | None = None,
    workers: int | None = None,
    export: bool = True,
    overwrite: bool = False,
    keep: float = DEFAULT_KEEP,
    exclude: str | Path | None = None,
    relabel: str | Path | None = None,
    labeled: str | Path | None = None,
    group: str | None = None,
    rehash: bool = False,
    feature_dtype: str | None = None,
    precision: str = FP32,
    reporter: Reporter | None = None,
) -> TrainResult:
    """embed -> audit the data -> train the head -> calibrate it, fit the unknown detector -> evaluate ->
    export, into the run folder `out`. `keep`: the share of known images the unknown threshold keeps;
    `exclude`/`relabel`: reviewed audit findings (petal.review); `labeled`: new labels (uri,label CSV);
    `group`: a regex whose capture keeps related images on one side of the split; `rehash`: read and
    hash every file, whatever the hash memo says; `feature_dtype`: "float32" or "float16" embeddings in
    memory (default: float16 only past petal.features.FLOAT16_BYTES); `precision`: the backbone's (an
    int8 one makes an int8 bundle). A finished run already in `out` is replaced only with `overwrite=True`."""
    check_param("keep", keep, Real(0.5, 1, high_open=True, what="a share in [0.5, 1)"))
    reporter, head, cfg = reporter or Reporter(), head or HeadClassifier(), get_backbone(backbone)
    check_precision(precision)
    cache_dir = Path(cache_dir or default_cache_dir())
    check_backbone(cfg, cache_dir)  # before the data scan: a missing weights package is said at once
    run = Run.create(out, data, overwrite)

    ds = load_reviewed(data, labels_file, eval_data, eval_percent, group, exclude, relabel, reporter, columns, labeled)
    run.make(clear=overwrite)  # only once the data is known to be usable

    result, cache = embed_dataset(ds, backbone, cache_dir, reporter, workers, absolute(data), rehash, precision)
    run.write_split(ds, result.keys, result.failed)
    warnings = data_warnings(ds, result.keys, reporter)
    feats = load_features(ds, result.keys, cache, reporter, feature_dtype)
    (tr, Xtr, ytr), (_, Xev, yev) = feats.split(TRAIN), feats.split(EVAL)
    require_training_images(ds.classes, (e.label for e in tr))
    head = head.for_data(len(ytr))  # the default epochs depend on how many images there are
    findings = audit_run(run, ds, feats, reporter)
    run.write_settings(RunSettings(
        kind=HEAD, data=absolute(data), eval_data=absolute(eval_data) if eval_data else None,
        labels_file=absolute(labels_file) if labels_file else None, eval_percent=eval_percent,
        backbone=cfg.identity(), cache_dir=str(cache_dir), classes=ds.classes, params=head.get_params(),
        extra={"keep": keep, "precision": precision}))
    fit_head(run, head, (Xtr, ytr), (Xev, yev), len(ds.classes), reporter)
    unknown = fit_trust(run, head, Xtr, ytr, keep, reporter)
    metrics = evaluate_head(run, ds.classes, feats, head, unknown, findings, result.summary(), reporter)
    model_dir = export_trained(run, cfg, head, ds.classes, feats, cache_dir, metrics, unknown, precision,
                               reporter) if export else None
    return TrainResult(run.path, model_dir, metrics, {**result.summary(), "skipped": len(ds.skipped)}, warnings)


def export_trained(run: Run, cfg: BackboneConfig, head: HeadClassifier, classes: list[str], feats: Features,
                   cache_dir: Path, metrics: dict, unknown: KnnUnknown | None, precision: str,
                   reporter: Reporter) -> Path:
    """RUN/model of a head just trained, its parity proved on a sample of the (readable) eval and
    train images."""
    (tr, _, _), (ev, _, _) = feats.split(TRAIN), feats.split(EVAL)
    parity = parity_uris([e.uri for e in ev], [e.uri for e in tr])
    reporter.message(f"exporting and checking parity on {len(parity)} images")
    return export_head(run, cfg, head, classes, cache_dir, parity, metrics, unknown, precision,
                       feats.keys[feats.bounds[TRAIN]])


def evaluate_head(run: Run, classes: list[str], feats: Features, head: HeadClassifier, unknown: KnnUnknown,
                  findings: Audit, embed_summary: dict, reporter: Reporter) -> dict:
    """The trained head on its own training split and on eval (calibration, unknown, metrics,
    report) and test, written into the run; returns metrics.json's content."""
    (tr, Xtr, ytr), (ev, Xev, yev) = feats.split(TRAIN), feats.split(EVAL)
    with reporter.progress("evaluating", 1) as advance:
        rows = capped_sample(ytr, TRAIN_ACCURACY_CAP, head.seed)  # an estimate past the cap: a million
        Xs, ys = (Xtr, ytr) if len(rows) == len(ytr) else (Xtr[rows], ytr[rows])  # predictions cost minutes
        logits = head.decision_function(Xev)  # (N, C) before calibration
        probs_ev = softmax(logits, head.temperature_)  # (N, C) calibrated, computed once: 400 MB at 100k x 1000
        extra = {"num_train": len(tr), "train_accuracy": float((head.predict(Xs) == ys).mean()),
                 "embed": embed_summary, **eval_trust(run, unknown, Xev, yev, logits, probs_ev, head.temperature_),
                 **test_metrics(run, classes, feats, head)}
        del logits
        metrics = run.write_metrics(classes, [e.uri for e in ev], yev, lambda: probs_ev, extra, reporter)
        write_run_report(run, metrics, classes, ([e.uri for e in ev], yev, probs_ev), findings)
        advance(1)
    return metrics


def load_reviewed(data: str | Path, labels_file: str | Path | None, eval_data: str | Path | None,
                  eval_percent: float, group: str | None, exclude: str | Path | None, relabel: str | Path | None,
                  reporter: Reporter, columns: Columns = Columns(), labeled: str | Path | None = None) -> Dataset:
    """The labeled data, split, with reviewed audit findings applied and newly labeled photos
    added for training; shown to the reporter."""
    ds = load_dataset(data, labels_file=labels_file, eval_source=eval_data, eval_percent=eval_percent, group=group,
                      columns=columns, reporter=reporter)
    ds = add_labeled(apply_review(ds, exclude, relabel, reporter), labeled, reporter)
    reporter.dataset(ds)
    return ds


def write_run_report(run: Run, metrics: dict, classes: list[str],
                     eval_set: tuple[list[str], np.ndarray, np.ndarray], findings: Audit | None) -> Path:
    """RUN/report.html: metrics, confusion matrix with its images, top losses, plots, audit."""
    return write_html_report(run.report_path, f"petal run {run.name}", metrics=metrics, classes=classes,
                             eval_set=eval_set, audit=findings, plots=[run.reliability_path, run.coverage_path])


def test_metrics(run: Run, classes: list[str], feats: Features, head: HeadClassifier) -> dict:
    """The test split the data gave (a test/ folder, a CSV split column), evaluated on its own
    into RUN/test/; {"test": summary} for metrics.json, or {} without one."""
    test, X, y = feats.split(TEST)
    if not test:
        return {}
    probs = head.predict_proba(X)
    m = compute_metrics(y, probs, classes)
    write_report(run.path / "test", m, classes, [e.uri for e in test], y, probs)
    return {"test": {k: m[k] for k in ("accuracy", "top5_accuracy", "num_eval", "macro_f1")}}


def audit_run(run: Run, ds: Dataset, feats: Features, reporter: Reporter) -> Audit:
    """The audit of a training run's data, written into the run and summed up in a line."""
    with reporter.progress("auditing", 1) as advance:
        write_audit(run.path, findings := audit_features(ds, feats))
        advance(1)
    reporter.message(findings.line() + f" (see {run.report_path})")
    return findings


def audit_features(ds: Dataset, feats: Features) -> Audit:
    """The audit of every embedded image of `ds`, train and eval alike."""
    ex = feats.examples
    return audit(feats.X, [e.label for e in ex], ds.classes, [e.uri for e in ex], [e.split for e in ex], feats.keys)


def audit_data(data: str | Path, out: str | Path, *, labels_file: str | Path | None = None,
               eval_data: str | Path | None = None, eval_percent: float = 10.0, backbone: str = DEFAULT_BACKBONE,
               cache_dir: str | Path | None = None, workers: int | None = None, exclude: str | Path | None = None,
               relabel: str | Path | None = None, group: str | None = None, columns: Columns = Columns(),
               rehash: bool = False,
               reporter: Reporter | None = None) -> Audit:
    """`petal audit`: embed (from the cache where it can), audit, and write the findings into `out`."""
    reporter = reporter or Reporter()
    out = check_output(out, "out", folder=True)
    ds = load_reviewed(data, labels_file, eval_data, eval_percent, group, exclude, relabel, reporter, columns)
    result, cache = embed_dataset(ds, backbone, cache_dir, reporter, workers, absolute(data), rehash)
    findings = audit_features(ds, load_features(ds, result.keys, cache, reporter))
    write_audit(out, findings)
    write_html_report(out / "report.html", f"petal audit of {data}", audit=findings)
    return findings


def fit_trust(run: Run, head: HeadClassifier, X: np.ndarray, y: np.ndarray, keep: float,
              reporter: Reporter) -> KnnUnknown:
    """Calibrate the head's temperature out of fold, then fit the unknown detector on the
    training embeddings X (N, D) with those held-out probabilities; both saved in the run.
    Past CALIBRATION_CAP images, on a stratified sample of that many: a temperature and a
    threshold are two numbers, and 5 more heads on a million images would take an hour."""
    rows = capped_sample(y, CALIBRATION_CAP, head.seed)
    Xs, ys = (X, y) if len(rows) == len(y) else (X[rows], y[rows])
    with reporter.progress("calibrating (out-of-fold heads)", FOLDS) as advance:
        head.calibrate(Xs, ys, folds=FOLDS, on_fold=advance)
    unknown = KnnUnknown.fit(Xs, ys, head.oof_proba_, keep=keep, seed=head.seed)
    run.write_head(head)  # now with its temperature
    run.write_unknown(unknown)
    return unknown


def eval_trust(run: Run, unknown: KnnUnknown, X: np.ndarray, y: np.ndarray, logits: np.ndarray,
               probs: np.ndarray, temperature: float) -> dict:
    """trust_metrics on the eval split's embeddings X (N, D), with the head's logits and
    calibrated probabilities (N, C) on them."""
    ood = unknown.score(X, probs)
    return trust_metrics(run, y, logits, Scores(probs, ood, ood > unknown.threshold), temperature, unknown.keep,
                         unknown.threshold)


def trust_metrics(run: Run, y: np.ndarray, logits: np.ndarray, scores: Scores, temperature: float,
                  keep: float | None, threshold: float | None = None) -> dict:
    """On the eval split (y: (N,) ids, logits before calibration, the calibrated Scores): ECE
    before and after calibration, with a reliability diagram in the run, and the share of
    images kept as known, with the accuracy on those."""
    if not len(y):
        return {}
    uncalibrated = softmax(logits)
    reliability_diagram(run.reliability_path, y, {"uncalibrated": uncalibrated, "calibrated": scores.probabilities})
    out = {"ece": expected_calibration_error(scores.probabilities, y),
           "ece_uncalibrated": expected_calibration_error(uncalibrated, y), "temperature": temperature}
    if scores.unknown is not None:
        kept, right = ~scores.unknown, scores.probabilities.argmax(1) == y
        coverage_curve(run.coverage_path, scores.ood_score, right, threshold)
        out["unknown"] = {"keep": keep, "kept_eval": float(kept.mean()),
                          "accuracy_kept": float(right[kept].mean()) if kept.any() else None}
    return out


def fit_head(run: Run, head: HeadClassifier, train: tuple[np.ndarray, np.ndarray],
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


def export_head(run: Run, cfg: BackboneConfig, head: HeadClassifier, classes: list[str], cache_dir: Path,
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


def export_run(run_dir: str | Path, cache_dir: str | Path | None = None, precision: str = FP32,
               force: bool = False, reporter: Reporter | None = None) -> Path:
    """Re-export RUN/model from a finished run folder, head or fine-tuned, with the parity check;
    `precision="int8"`: RUN/model-int8 behind the int8 parity gate (`force` writes it even if it fails)."""
    check_precision(precision, "--precision", (FP32, INT8))
    run = Run.open(run_dir)
    settings = run.settings()
    cfg = get_backbone(settings.backbone["name"])
    cache = Path(cache_dir or settings.cache_dir)
    if settings.kind == FINETUNE:
        if precision != FP32:
            raise PetalError("export --precision int8: only head runs (petal train) can be quantized for now")
        from petal.finetune.train import export_finetuned

        return export_finetuned(run, settings, cfg, cache)
    if precision == FP32:  # as trained: a run trained on int8 features gets its int8 bundle again
        return export_head(run, cfg, run.head(settings), settings.classes, cache, run.parity_uris(), run.metrics(),
                           run.unknown(), settings.extra.get("precision", FP32))
    if settings.extra.get("precision") == INT8:
        raise PetalError(f"export --precision int8: {run.path} was trained on int8 features, so {run.model_dir} "
                         "is int8 already; `petal export RUN` rebuilds it")
    from petal.export import export_int8

    rows = run.split_rows()
    ev = [r for r in rows if r["split"] == EVAL]
    labels = np.array([settings.classes.index(r["label"]) for r in ev])
    path, _ = export_int8(run.path / f"model-{INT8}", cfg=cfg, head=run.head(settings), cache_dir=cache,
                          train_uris=[r["uri"] for r in rows if r["split"] == TRAIN],
                          eval_uris=[r["uri"] for r in ev], eval_labels=labels, force=force,
                          on_message=(reporter or Reporter()).message, classes=settings.classes,
                          metrics=run.metrics(), name=run.name, unknown=run.unknown(), train_keys=run.train_keys())
    return path


def evaluate_model(model_dir: str | Path, data: str | Path, out: str | Path, *,
                   labels_file: str | Path | None = None, columns: Columns = Columns(),
                   unknown_data: str | None = None, reject_unknown: bool = True,
                   reporter: Reporter | None = None) -> dict:
    """Evaluate an exported bundle on every image of a labeled folder or CSV: metrics.json
    (with calibration and the share kept as known), confusion matrix, misclassified.csv.
    With `unknown_data` (images of none of the classes) also unknown.json and coverage.png."""
    from petal.bundle import Model

    reporter = reporter or Reporter()
    check_output(out, "out", folder=True)
    model = Model(model_dir, reject_unknown=reject_unknown)
    if unknown_data and "ood_score" not in model.outputs:
        raise PetalError(f"unknown: {model_dir} has no unknown detector: it was exported before petal had one "
                         "(export it again with `petal export RUN`), or fine-tuned with too few images set aside "
                         "to fit one (--calibration-percent)")
    ds = load_dataset(data, labels_file=labels_file, eval_percent=0.0, require_train=False, columns=columns)
    known = {c: i for i, c in enumerate(model.labels)}
    examples = [e for e in ds.examples if e.label in known]
    if len(examples) < len(ds.examples):
        other = Counter(e.label for e in ds.examples if e.label not in known)
        reporter.message(f"warning: {len(ds.examples) - len(examples)} image(s) have labels the model "
                         "does not know; skipped: " + ", ".join(f"{k!r} ({n})" for k, n in other.most_common()))
    uris, scores, failed, keys = score_images(model, [e.uri for e in examples], "evaluating", reporter)
    if not uris:
        raise NothingUsableError("no image could be evaluated")
    overlap = training_overlap(model, keys, reporter)
    label_of = {e.uri: e.label for e in examples}
    y = np.array([known[label_of[u]] for u in uris])
    metrics = {**compute_metrics(y, scores.probabilities, model.labels), "failed": len(failed),
               "ece": expected_calibration_error(scores.probabilities, y), **kept_metrics(scores, y), **overlap}
    out = Path(out)
    write_report(out, metrics, model.labels, uris, y, scores.probabilities)
    if unknown_data:
        metrics["unknown_data"] = evaluate_unknown(model, scores, y, unknown_data, out, reporter)
    atomic_write_csv(out / "errors.csv", ["uri", "reason"], ds.skipped + failed)
    return metrics


def score_images(model, uris: list[str], what: str, reporter: Reporter
                 ) -> tuple[list[str], Scores, list[tuple[str, str]], list[str]]:
    """The bundle's Scores for every readable image: (uris, Scores in their order,
    [(uri, reason)] failed, content keys in the uris' order)."""
    ok, rows, failed, keys = [], [], [], []
    with reporter.progress(what, len(uris)) as advance:
        for p in model.iter_predict(uris, top_k=1):
            advance(1)
            if p.error:
                failed.append((p.uri, p.error))
                continue
            ok.append(p.uri)
            keys.append(p.key)
            rows.append(Scores(p.probabilities, p.ood_score, p.unknown))
    return ok, Scores.stack(rows, len(model.labels)), failed, keys


def training_overlap(model, keys: list[str], reporter: Reporter) -> dict:
    """How many evaluated images the model was trained on (the same bytes): their figures
    are inflated. {"train_overlap": n} when the bundle knows its training images."""
    digest = model.info.training.get(TRAIN_KEYS)
    if not digest or not keys:
        return {}
    n = int(in_train_keys(digest, keys).sum())
    if n:
        reporter.message(f"warning: {n} of {len(keys)} images are images this model was trained on (the same "
                         "bytes): the figures below are inflated; evaluate on images it has not seen")
    return {"train_overlap": n}


def kept_metrics(scores: Scores, y: np.ndarray) -> dict:
    """The share of known images kept (not called unknown), and the accuracy on those."""
    if scores.ood_score is None:
        return {}
    kept = ~scores.unknown
    right = scores.probabilities.argmax(1) == y
    return {"unknown": {"kept": float(kept.mean()), "accuracy_kept": float(right[kept].mean()) if kept.any() else None}}


def evaluate_unknown(model, scores: Scores, y: np.ndarray, unknown_data: str, out: Path, reporter: Reporter) -> dict:
    """Known images (scores, y) against `unknown_data`: unknown.json and coverage.png in `out`."""
    from petal.data import expand_inputs
    from petal.unknown import auroc, coverage_curve, fpr_at_tpr

    uris, problems = expand_inputs([unknown_data])
    for problem in problems:
        reporter.message(f"warning: {problem}")
    _, other, failed, _ = score_images(model, uris, "scoring unknown images", reporter)
    if not len(other):
        raise NothingUsableError(f"unknown: none of the images in {unknown_data} could be read")
    threshold = model.info.unknown["threshold"]
    report = {"auroc": auroc(scores.ood_score, other.ood_score),
              "fpr_at_95_tpr": fpr_at_tpr(scores.ood_score, other.ood_score, 0.95),
              "kept_known": float((scores.ood_score <= threshold).mean()),
              "rejected_unknown": float((other.ood_score > threshold).mean()),
              "threshold": threshold, "known_images": len(y), "unknown_images": len(other), "failed": len(failed)}
    atomic_write_text(out / "unknown.json", json.dumps(report, indent=2) + "\n")
    coverage_curve(out / "coverage.png", scores.ood_score, scores.probabilities.argmax(1) == y, threshold)
    return report
