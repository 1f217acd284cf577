"""`petal evaluate`: an exported bundle on labeled data, as a user would run it (no run folder
needed): metrics.json, confusion matrix, misclassified.csv, report.html, and with images of none of the
classes, how well they are told apart."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from petal.bundle import TRAIN_KEYS, in_train_keys
from petal.calibration import expected_calibration_error
from petal.data import Columns, load_dataset
from petal.errors import NothingUsableError, PetalError
from petal.metrics import EVALUATION_OUTPUT, compute_metrics, write_report
from petal.predictions import Scores
from petal.progress import Reporter
from petal.report import write_html_report
from petal.storage import atomic_write_csv, atomic_write_text, check_output


def evaluate_model(model_dir: str | Path, data: str | Path, out: str | Path, *,
                   labels_file: str | Path | None = None, columns: Columns = Columns(),
                   unknown_data: str | None = None, reject_unknown: bool = True,
                   reporter: Reporter | None = None) -> dict:
    """Evaluate an exported bundle on every image of a labeled folder or CSV: metrics.json
    (with calibration and the share kept as known), confusion matrix, misclassified.csv.
    With `unknown_data` (images of none of the classes) also unknown.json and coverage.png."""
    from petal.bundle import Model

    reporter = reporter or Reporter()
    check_output(out, "out", folder=True, owned=EVALUATION_OUTPUT)  # not over the user's own files
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
    write_html_report(out / "report.html", f"petal evaluate {model.name} on {data}", metrics=metrics,
                      classes=model.labels, eval_set=(uris, y, scores.probabilities), plots=[out / "coverage.png"])
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
