"""Calibration and unknown detection on a labeled folder (default: tf_flowers).

    python benchmarks/trust_flowers.py [FOLDER] [--keep 0.95]

Uses petal's embedding cache ($PETAL_CACHE_DIR; embeds what is missing) and the
default head, split and settings of `petal train`. Prints:
- ECE (15 bins) on the eval split, uncalibrated and with the out-of-fold temperature;
- the share of eval images kept at the shipped threshold, and accuracy on them vs all;
- the share of scikit-image's sample photos (petal.synthetic.FOREIGN) rejected, and
  AUROC of the kNN score vs the max-softmax baseline on them;
- near unknowns: each class held out from training in turn, AUROC of its images
  against the eval images of the other classes (kNN score and max-softmax).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from petal.backbones import get_backbone
from petal.calibration import expected_calibration_error, softmax
from petal.data import EVAL, TRAIN, load_dataset
from petal.embed import embed
from petal.head import HeadClassifier
from petal.runs.common import embed_dataset
from petal.storage import default_cache_dir
from petal.synthetic import foreign_photos
from petal.unknown import DEFAULT_KEEP, MSP_WEIGHT, K, KnnUnknown, auroc

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def split_arrays(folder: str):
    ds = load_dataset(folder)
    result, cache = embed_dataset(ds)
    usable = [e for e in ds.examples if e.uri in result.keys]

    def xy(split: str):
        ex = [e for e in usable if e.split == split]
        return cache.get([result.keys[e.uri] for e in ex]), np.array([ds.label_id(e.label) for e in ex])

    return ds.classes, xy(TRAIN), xy(EVAL)


def fit_trust(X, y, num_classes, keep, k, w):
    """The head, calibrated, and the unknown detector, as `petal train` fits them."""
    head = HeadClassifier().fit(X, y, num_classes=num_classes).calibrate(X, y)
    return head, KnnUnknown.fit(X, y, head.oof_proba_, keep=keep, k=k, msp_weight=w)


def held_out_classes(classes, Xtr, ytr, Xev, yev, args) -> dict:
    """Each class in turn left out of training: AUROC of its images vs the others' eval images."""
    out = {}
    for c, name in enumerate(classes):
        keep_tr, keep_ev = ytr != c, yev != c
        remap = np.cumsum(np.arange(len(classes)) != c) - 1  # old id -> id without c
        head, u = fit_trust(Xtr[keep_tr], remap[ytr[keep_tr]], len(classes) - 1, args.keep, args.k, args.msp_weight)
        known, novel = Xev[keep_ev], np.r_[Xtr[~keep_tr], Xev[~keep_ev]]
        pk, pn = head.predict_proba(known), head.predict_proba(novel)
        out[name] = {"score": round(auroc(u.score(known, pk), u.score(novel, pn)), 4),
                     "knn_only": round(auroc(u.score(known), u.score(novel)), 4),
                     "max_softmax": round(auroc(1 - pk.max(1), 1 - pn.max(1)), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--keep", type=float, default=DEFAULT_KEEP)
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--msp-weight", type=float, default=MSP_WEIGHT)
    args = ap.parse_args()
    classes, (Xtr, ytr), (Xev, yev) = split_arrays(args.folder)

    t0 = time.perf_counter()
    head, u = fit_trust(Xtr, ytr, len(classes), args.keep, args.k, args.msp_weight)
    seconds_calibrate = time.perf_counter() - t0
    logits = head.decision_function(Xev)
    probs = softmax(logits, head.temperature_)
    acc = float((probs.argmax(1) == yev).mean())
    kept = u.score(Xev, probs) <= u.threshold
    with tempfile.TemporaryDirectory() as tmp:
        photos = foreign_photos(Path(tmp))
        res, cache = embed(photos, get_backbone("efficientnet_lite0"), default_cache_dir())
        Xf = cache.get([res.keys[p] for p in photos])
    pf = head.predict_proba(Xf)
    rejected = u.score(Xf, pf) > u.threshold
    report = {
        "train": len(ytr), "eval": len(yev), "temperature": round(head.temperature_, 4),
        "seconds_fit_and_calibrate": round(seconds_calibrate, 1),
        "ece_uncalibrated": round(expected_calibration_error(softmax(logits), yev), 4),
        "ece": round(expected_calibration_error(probs, yev), 4),
        "keep": args.keep, "k": args.k, "msp_weight": args.msp_weight, "threshold": round(u.threshold, 4),
        "bank_size": len(u.bank),
        "kept_eval": round(float(kept.mean()), 4), "accuracy": round(acc, 4),
        "accuracy_kept": round(float((probs.argmax(1) == yev)[kept].mean()), 4),
        "foreign_rejected": f"{int(rejected.sum())}/{len(rejected)}",
        "foreign_accepted": [Path(p).stem for p, r in zip(photos, rejected) if not r],
        "foreign_auroc": {"score": round(auroc(u.score(Xev, probs), u.score(Xf, pf)), 4),
                          "knn_only": round(auroc(u.score(Xev), u.score(Xf)), 4),
                          "max_softmax": round(auroc(1 - probs.max(1), 1 - pf.max(1)), 4)},
        "held_out_class_auroc": held_out_classes(classes, Xtr, ytr, Xev, yev, args),
    }
    h = report["held_out_class_auroc"]
    report["held_out_mean"] = {k: round(float(np.mean([v[k] for v in h.values()])), 4)
                               for k in ("score", "knn_only", "max_softmax")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
