"""`petal retrain RUN`: the same run on today's data plus its review and its new labels, and
how the new model compares with the old one.

    r = retrain("runs/flowers")                 # -> runs/flowers-2 (or out=...)
    r.rows                                      # [(what, old, new)]: accuracy, ECE, kept share, per class

The review (RUN/review.csv: relabel and exclude) and the new labels (RUN/labeled.csv, as
training images) are applied to the data; the embedding cache makes it embed only new photos.
Both files are copied into the new run, so that reviewing it goes on from the decisions made.
The settings come from RUN/settings.json (data, eval split, backbone, head parameters,
keep, precision). Note: the old run's metrics are on its eval split; relabelled or excluded
eval images change the new one's, so the per-class rows say what each was measured on.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from petal.errors import PetalError
from petal.head import HeadClassifier
from petal.progress import Reporter
from petal.report import insert_section
from petal.reviewing.log import LABELED_FILE, REVIEW_FILE
from petal.run import HEAD, Run
from petal.storage import atomic_write_text
from petal.workflow import train

COMPARISON_FILE = "retrain.json"


@dataclass
class RetrainResult:
    old: Path
    new: Path
    rows: list[tuple[str, float | None, float | None]]  # (what, old, new)
    old_metrics: dict
    new_metrics: dict


def next_out(run: Run) -> Path:
    """RUN-2, RUN-3, ...: the first that does not exist, beside RUN."""
    n = 2
    while (run.path.parent / f"{run.name}-{n}").exists():
        n += 1
    return run.path.parent / f"{run.name}-{n}"


def compare(old: dict, new: dict) -> list[tuple[str, float | None, float | None]]:
    """metrics.json of two runs -> rows (what, old, new): accuracy, ECE, the share of eval kept
    as known and the accuracy on it, then each class's F1 and recall."""
    def kept(m: dict, key: str) -> float | None:
        return (m.get("unknown") or {}).get(key)

    rows = [("accuracy", old.get("accuracy"), new.get("accuracy")), ("ECE", old.get("ece"), new.get("ece")),
            ("kept share", kept(old, "kept_eval"), kept(new, "kept_eval")),
            ("accuracy kept", kept(old, "accuracy_kept"), kept(new, "accuracy_kept")),
            ("eval images", old.get("num_eval"), new.get("num_eval")),
            ("train images", old.get("num_train"), new.get("num_train"))]
    po, pn = old.get("per_class", {}), new.get("per_class", {})
    for c in list(po) + [c for c in pn if c not in po]:
        for what in ("f1", "recall"):
            rows.append((f"{c} {what}", (po.get(c) or {}).get(what), (pn.get(c) or {}).get(what)))
    return rows


def comparison_html(rows: list[tuple[str, float | None, float | None]], old: str) -> str:
    def cell(v: float | None) -> str:
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    def delta(a: float | None, b: float | None) -> str:
        return f"{b - a:+.4f}" if isinstance(a, float) and isinstance(b, float) else ""

    body = "".join(f"<tr><td>{html.escape(w)}</td><td>{cell(a)}</td><td>{cell(b)}</td><td>{delta(a, b)}</td></tr>"
                   for w, a, b in rows)
    return (f'<h2>Retrained: old ({html.escape(old)}) vs new</h2><table id="retrain"><tr><th>metric</th>'
            f"<th>old</th><th>new</th><th>change</th></tr>{body}</table>")


def retrain(run_dir: str | Path, out: str | Path | None = None, *, cache_dir: str | Path | None = None,
            export: bool = True, overwrite: bool = False, reporter: Reporter | None = None) -> RetrainResult:
    """Train RUN again, with RUN/review.csv and RUN/labeled.csv applied, into `out` (default
    RUN-2, RUN-3...); the comparison goes into NEW/retrain.json and NEW/report.html."""
    reporter = reporter or Reporter()
    run = Run.open(run_dir)
    s = run.settings()
    if s.kind != HEAD:
        raise PetalError(f"retrain: {run.path} is a {s.kind} run; only `petal train` runs are retrained for now")
    review, labeled = run.path / REVIEW_FILE, run.path / LABELED_FILE
    new = Path(out) if out else next_out(run)
    reporter.message(f"retraining {run.path} into {new}" + "".join(
        f"; with {p.name}" for p in (review, labeled) if p.exists()))
    result = train(s.data, new, labels_file=s.labels_file, eval_data=s.eval_data, eval_percent=s.eval_percent,
                   backbone=s.backbone["name"], cache_dir=cache_dir or s.cache_dir,
                   head=HeadClassifier(**s.params), keep=s.extra.get("keep", 0.95), overwrite=overwrite,
                   exclude=review if review.exists() else None, relabel=review if review.exists() else None,
                   labeled=labeled if labeled.exists() else None, precision=s.extra.get("precision", "fp32"),
                   export=export, reporter=reporter)
    for path in (review, labeled):  # the new run's review goes on from these decisions
        if path.exists():
            shutil.copyfile(path, new / path.name)
    rows = compare(run.metrics(), result.metrics)
    atomic_write_text(new / COMPARISON_FILE, json.dumps({"old": str(run.path), "rows": rows}, indent=1) + "\n")
    if (new / "report.html").exists():
        insert_section(new / "report.html", "retrain", comparison_html(rows, str(run.path)), at_top=True)
    return RetrainResult(run.path, new, rows, run.metrics(), result.metrics)
