"""What every run does, whichever its trainer: open it from its spec, record it, finish it.

    run, ds = open_run(spec, reporter)        # the folder checked, the data loaded, reviewed, shown
    warnings = record(run, spec, ds, keys=keys, failed=failed, reporter=reporter)  # split.csv, settings.json
    ... the trainer trains, and scores its eval and test images ...
    metrics = finish(run, classes, Ending(...), reporter)      # audit, trust, metrics, test, report

`petal train` (petal.runs.head) and `petal finetune` (petal.runs.finetune) both end
through `finish`, so both runs have the same files: audit.json, suspects.csv, the report's
audit section, metrics.json with the calibration and unknown figures, and test/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petal.audit import Audit, audit, write_audit
from petal.backbones import DEFAULT_BACKBONE, get_backbone
from petal.calibration import calibration_figures, reliability_diagram, softmax
from petal.data import TRAIN, Dataset
from petal.embed import embed, require_usable
from petal.features import Features
from petal.metrics import compute_metrics, plot_learning_curve, write_report
from petal.precision import FP32
from petal.predictions import Scores
from petal.progress import Reporter
from petal.report import write_html_report
from petal.run import Run, RunSettings, data_warnings, parity_uris
from petal.spec import RunSpec
from petal.storage import cache_folder
from petal.unknown import coverage_curve


def open_run(spec: RunSpec, reporter: Reporter, *, resume: bool = False,
             calibration_percent: float = 0.0) -> tuple[Run, Dataset]:
    """The run folder to write (checked, not yet made) and the data, loaded and shown.
    Resuming may write into a folder that holds a finished run (it re-exports it)."""
    run = Run.create(spec.out, data=spec.data.source, overwrite=spec.overwrite or resume)
    return run, spec.data.load(reporter, calibration_percent=calibration_percent)


def record(run: Run, spec: RunSpec, ds: Dataset, *, keys: dict[str, str], failed: list[tuple[str, str]],
           reporter: Reporter, extra: dict | None = None) -> list[str]:
    """split.csv and errors.csv (`keys`: uri -> content key of each readable image), settings.json
    (the whole spec); returns the data's warnings, duplicates found now included."""
    run.write_split(ds, keys, failed)
    warnings = data_warnings(ds, keys, reporter)
    run.write_settings(RunSettings(spec, get_backbone(spec.backbone).identity(), ds.classes, extra or {}))
    return warnings


def embed_dataset(ds: Dataset, *, backbone: str = DEFAULT_BACKBONE, cache_dir: str | Path | None = None,
                  reporter: Reporter | None = None, workers: int | None = None, source: str = "",
                  rehash: bool = False, precision: str = FP32):
    """Embed every example at `precision` (int8 calibrates on the training split); returns
    (EmbedResult, cache). Raises if nothing was usable. File hashes are memoized under `source`
    (the data's name) unless `rehash` (petal.hashmemo)."""
    reporter = reporter or Reporter()
    uris = [e.uri for e in ds.examples]
    with reporter.progress("hashing and embedding", len(uris)) as advance:
        result, cache = embed(uris, get_backbone(backbone), cache_folder(cache_dir),
                              on_progress=advance, on_message=reporter.message, workers=workers, source=source,
                              rehash=rehash, precision=precision,
                              calibration_uris=[e.uri for e in ds.split(TRAIN)] or uris)
    require_usable(result, len(uris))
    return result, cache


def embed_spec(ds: Dataset, spec: RunSpec, reporter: Reporter, *, workers: int | None = None, rehash: bool = False):
    """embed_dataset as the spec says (its backbone, cache, precision; hashes memoized under its data)."""
    return embed_dataset(ds, backbone=spec.backbone, cache_dir=spec.cache, reporter=reporter, workers=workers,
                         source=spec.data.source, rehash=rehash, precision=spec.precision)


def audit_features(classes: list[str], feats: Features) -> Audit:
    """The audit of every embedded image, train and eval alike (X: a backbone's or a fine-tuned
    model's features)."""
    ex = feats.examples
    return audit(feats.X, [e.label for e in ex], classes, [e.uri for e in ex], [e.split for e in ex], feats.keys)


def audit_run(run: Run, classes: list[str], feats: Features, reporter: Reporter) -> Audit:
    """The audit of a training run's data, written into the run and summed up in a line."""
    with reporter.progress("auditing", 1) as advance:
        write_audit(run.path, findings := audit_features(classes, feats))
        advance(1)
    reporter.message(findings.line() + f" (see {run.report_path})")
    for advice in findings.advice:  # e.g. a class of 2 images beside classes of 60
        reporter.message(f"warning: {advice}")
    return findings


@dataclass
class Scored:
    """A split as the trained model scores it."""

    uris: list[str]
    y: np.ndarray  # (N,) class ids
    scores: Scores  # calibrated probabilities (N, C), and the unknown detector's answers where there is one
    logits: np.ndarray | None = None  # (N, C) before calibration: the calibration figures need them (eval)


@dataclass
class Ending:
    """What a trainer hands to `finish`: its features for the audit, its scored eval and test
    splits, its calibration and unknown threshold, and figures of its own for metrics.json."""

    feats: Features  # every usable image's features, for the audit
    eval: Scored
    test: Scored | None
    temperature: float
    keep: float | None  # the unknown detector's; None without one
    threshold: float | None
    extra: dict  # e.g. {"num_train": ..., "best_epoch": ...}
    no_eval_note: str = ""  # said after "no eval images; metrics are not computed"
    findings: Audit | None = None  # the audit, where the trainer ran it already (a head run: before its unknown bank)
    bank_left_out: int = 0  # training images the unknown detector's bank left out


def finish(run: Run, classes: list[str], end: Ending, reporter: Reporter) -> dict:
    """The audit, the trust figures (with their plots), metrics.json and its report, the test
    split in RUN/test/, and report.html (with a fine-tuned run's learning curve); returns
    metrics.json's content."""
    findings = end.findings if end.findings is not None else audit_run(run, classes, end.feats, reporter)
    ev = end.eval
    extra = {**end.extra, **trust_metrics(run, ev, temperature=end.temperature, keep=end.keep,
                                          threshold=end.threshold, left_out=end.bank_left_out),
             **test_metrics(run, classes, end.test)}
    metrics = run.write_metrics(classes, eval_uris=ev.uris, y_eval=ev.y, predict_proba=lambda: ev.scores.probabilities,
                                extra=extra, reporter=reporter, no_eval_note=end.no_eval_note)
    curve = plot_learning_curve(run.history_path, run.path / "learning_curve.png")  # fine-tuned runs have one
    write_html_report(run.report_path, f"petal run {run.name}", metrics=metrics, classes=classes,
                      eval_set=(ev.uris, ev.y, ev.scores.probabilities), audit=findings,
                      plots=[run.reliability_path, run.coverage_path, *([curve] if curve else [])])
    return metrics


def trust_metrics(run: Run, ev: Scored, *, temperature: float, keep: float | None,
                  threshold: float | None, left_out: int = 0) -> dict:
    """On the eval split: ECE before and after calibration, with a reliability diagram in the run,
    and the share of images kept as known, with the accuracy on those."""
    y, scores = ev.y, ev.scores
    if not len(y):
        return {}
    uncalibrated = softmax(ev.logits)
    reliability_diagram(run.reliability_path, y, {"uncalibrated": uncalibrated, "calibrated": scores.probabilities})
    out = {**calibration_figures(scores.probabilities, uncalibrated, y), "temperature": temperature}
    if scores.unknown is not None:
        kept, right = ~scores.unknown, scores.probabilities.argmax(1) == y
        coverage_curve(run.coverage_path, scores.ood_score, right, threshold)
        out["unknown"] = {"keep": keep, "kept_eval": float(kept.mean()), "bank_left_out": left_out,
                          "accuracy_kept": float(right[kept].mean()) if kept.any() else None}
    return out


def test_metrics(run: Run, classes: list[str], test: Scored | None) -> dict:
    """The test split the data gave (a test/ folder, a CSV split column), evaluated on its own
    into RUN/test/; {"test": summary} for metrics.json, or {} without one."""
    if test is None or not len(test.y):
        return {}
    m = compute_metrics(test.y, test.scores.probabilities, classes)
    write_report(run.path / "test", m, classes, test.uris, test.y, test.scores.probabilities)
    return {"test": {k: m[k] for k in ("accuracy", "top5_accuracy", "num_eval", "macro_f1")}}


def parity_images(*, eval_uris: list[str], train_uris: list[str], reporter: Reporter, what: str = "") -> list[str]:
    """The images the export's parity check runs on, said to the reporter: "exporting `what` ..."."""
    parity = parity_uris(eval_uris=eval_uris, train_uris=train_uris)
    reporter.message(f"exporting{what} and checking parity on {len(parity)} images")
    return parity

