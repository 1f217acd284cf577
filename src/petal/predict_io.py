"""Writing many predictions to .csv or .jsonl, atomically."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from petal.bundle import Prediction
from petal.errors import PetalError
from petal.storage import atomic_path, check_output

CSV_HEADER = ["uri", "label", "score", "top"]


def csv_row(p: Prediction) -> list[str]:
    """One prediction as the CSV row every writer (local or Beam) uses."""
    return [p.uri, p.label, f"{p.score:.6f}", json.dumps(dict(p.top))]


def write_predictions(path: Path, preds: Iterable[Prediction]) -> tuple[int, list[tuple[str, str]]]:
    """Returns (rows written, [(uri, reason) failed]). Failed images are not rows."""
    kind = Path(path).suffix.lower()
    if kind not in (".csv", ".jsonl"):
        raise PetalError(f"output: expected a .csv or .jsonl file name, got {str(path)!r}")
    check_output(path, "output")
    n, failed = 0, []
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        w = csv.writer(f) if kind == ".csv" else None
        if w:
            w.writerow(CSV_HEADER)
        for p in preds:
            if p.error:
                failed.append((p.uri, p.error))
                continue
            n += 1
            if w:
                w.writerow(csv_row(p))
            else:
                f.write(json.dumps(p.to_dict()) + "\n")
    return n, failed
