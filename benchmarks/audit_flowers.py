"""`petal audit` on a labeled folder (default: tf_flowers), with planted label errors.

    python benchmarks/audit_flowers.py [FOLDER] [--flip 5] [--seeds 3]

Needs a warm embedding cache for the best timing ($PETAL_CACHE_DIR; embeds what is
missing). Prints, in one run:
- the wall time of the audit of FOLDER as it is, and its summary;
- its top 20 label suspects (to look at) and every exact-duplicate pair;
- with FLIP% of the labels flipped on purpose (a CSV of uri,label with those labels
  changed: the same as moving the files to another class folder), per draw:
  precision of the top k suspects (k = the number flipped), and the recall and
  precision of the flips among everything flagged as a label suspect.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from petal.data import load_dataset
from petal.runs.audit import audit_data
from petal.spec import DataSpec

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def planted(folder: str, percent: float, seed: int, tmp: Path) -> dict:
    ds = load_dataset(folder, eval_percent=10.0)
    rng = np.random.default_rng(seed)
    flip = set(rng.choice(len(ds.examples), size=int(len(ds.examples) * percent / 100), replace=False).tolist())
    path = tmp / f"flipped-{seed}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label"])
        for i, e in enumerate(ds.examples):
            label = rng.choice([c for c in ds.classes if c != e.label]) if i in flip else e.label
            w.writerow([str(Path(e.uri).resolve()), label])
    flipped = {str(Path(ds.examples[i].uri).resolve()) for i in flip}
    found = audit_data(DataSpec(str(path)), tmp / f"audit-{seed}")
    ranked = [s.uri for s in found.suspects if s.reason == "label"]
    k = len(flipped)
    return {"flipped": k, "precision_at_k": round(sum(u in flipped for u in ranked[:k]) / k, 3),
            "flagged": len(ranked), "recall_flagged": round(sum(u in flipped for u in ranked) / k, 3),
            "precision_flagged": round(sum(u in flipped for u in ranked) / max(len(ranked), 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--flip", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        audit_data(DataSpec(args.folder), Path(tmp) / "warmup")  # fills the cache if it is cold
        t0 = time.perf_counter()
        found = audit_data(DataSpec(args.folder), Path(tmp) / "audit")
        seconds = time.perf_counter() - t0
        draws = [planted(args.folder, args.flip, seed, Path(tmp)) for seed in range(args.seeds)]
    report = {"seconds": round(seconds, 1), "summary": found.summary(),
              "top_20_label_suspects": [(s.uri, s.label, s.suggested, round(s.score, 3))
                                        for s in found.suspects if s.reason == "label"][:20],
              "outliers": [s.uri for s in found.suspects if s.reason == "outlier"][:20],
              "exact_duplicates": [(d.uri_a, d.uri_b, d.crosses) for d in found.duplicates if d.kind == "exact"],
              "planted_flips": draws,
              "mean_precision_at_k": round(float(np.mean([d["precision_at_k"] for d in draws])), 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
