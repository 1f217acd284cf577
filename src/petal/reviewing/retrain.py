"""What `petal retrain RUN` (petal.runs.retrain) takes from a review, and what it says after:

    spec = with_review(stored_spec, run)     # + RUN/review.csv (relabel, exclude) and RUN/labeled.csv
    rows = record_comparison(run.path, old_metrics, new_dir, new_metrics)   # [(what, old, new)]

The review's files go into the spec's data (DataSpec.review, DataSpec.labeled), so the new run's
settings.json names them; when the new run is another folder they are copied there, so that
reviewing it goes on from these decisions. The comparison (accuracy, ECE, the share of eval kept
as known and the accuracy on it, each class's F1 and recall) goes into NEW/retrain.json and at
the top of NEW/report.html. The eval split is the same images, with the review's relabels and
exclusions applied: a relabelled eval image is scored against its corrected label.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import replace
from pathlib import Path

from petal.report import insert_section
from petal.reviewing.log import LABELED_FILE, REVIEW_FILE
from petal.run import Run
from petal.spec import RunSpec
from petal.storage import atomic_write_text

COMPARISON_FILE = "retrain.json"


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


def with_review(spec: RunSpec, run: Run) -> RunSpec:
    """`spec` with RUN/review.csv and RUN/labeled.csv (where `petal review` wrote them) in its data."""
    review, labeled = run.path / REVIEW_FILE, run.path / LABELED_FILE
    data = replace(spec.data, review=str(review) if review.exists() else spec.data.review,
                   labeled=str(labeled) if labeled.exists() else spec.data.labeled)
    return replace(spec, data=data)


def record_comparison(old: Path, old_metrics: dict, new: Path, new_metrics: dict) -> list:
    """Old vs new into NEW/retrain.json and NEW/report.html; the review's files copied into NEW."""
    if Path(new).resolve() != Path(old).resolve():
        for name in (REVIEW_FILE, LABELED_FILE):
            if (Path(old) / name).exists():
                shutil.copyfile(Path(old) / name, Path(new) / name)
    rows = compare(old_metrics, new_metrics)
    atomic_write_text(Path(new) / COMPARISON_FILE, json.dumps({"old": str(old), "rows": rows}, indent=1) + "\n")
    if (Path(new) / "report.html").exists():
        insert_section(Path(new) / "report.html", "retrain", comparison_html(rows, str(old)), at_top=True)
    return rows


def comparison_rows(run_dir: str | Path) -> list[tuple[str, float | None, float | None]]:
    """The rows RUN/retrain.json holds ([] for a run that was not retrained)."""
    path = Path(run_dir) / COMPARISON_FILE
    return [tuple(r) for r in json.loads(path.read_text("utf-8"))["rows"]] if path.exists() else []
