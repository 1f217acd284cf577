"""Calibration and unknown detection on a labeled folder (default: tf_flowers).

    python benchmarks/trust_flowers.py [FOLDER] [--keep 0.95] [--near]

Uses petal's embedding cache ($PETAL_CACHE_DIR; embeds what is missing) and the
default head, split and settings of `petal train`. Prints:
- ECE on the eval split (15 equal-width and 15 equal-mass bins, the latter's bootstrap
  interval and noise floor), uncalibrated and calibrated; the out-of-fold figures the
  calibrator was chosen on (identity, temperature, vector scaling);
- the unknown detector with the audit's outliers and strong label suspects left out of its
  bank ("clean", as `petal train` does) and with every training image in it ("all"): the
  share of eval images kept, and for each foreign set (benchmarks/foreign_sets.py) AUROC and
  the share rejected at the shipped threshold; also per-class thresholds against the global one;
- the int8 bundle's reduced bank (ReducedBank): unknown answers changed on eval and foreign
  images against the full bank, per number of principal axes;
- with --near: each class held out from training in turn, AUROC of its images against the
  eval images of the other classes, with the clean and the full bank.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from foreign_sets import foreign_sets

from petal.audit import bank_leave_out
from petal.backbones import get_backbone
from petal.calibration import calibration_figures, softmax
from petal.data import EVAL, TRAIN, load_dataset
from petal.embed import embed
from petal.features import load_features
from petal.head import HeadClassifier
from petal.progress import Reporter
from petal.runs.common import audit_features, embed_dataset
from petal.storage import default_cache_dir
from petal.unknown import DEFAULT_KEEP, KnnUnknown, auroc

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def split_arrays(folder: str):
    """classes, (X, y) of train and eval, and the (N_train,) bool of what the bank leaves out."""
    ds = load_dataset(folder)
    result, cache = embed_dataset(ds)
    feats = load_features(ds, result.keys, cache, Reporter())
    (tr, Xtr, ytr), (_, Xev, yev) = feats.split(TRAIN), feats.split(EVAL)
    leave_out = bank_leave_out(audit_features(ds.classes, feats), [e.uri for e in tr])
    return ds.classes, (np.asarray(Xtr, np.float32), ytr), (np.asarray(Xev, np.float32), yev), leave_out


def fit_trust(X, y, num_classes, keep, leave_out=None):
    """The head, calibrated, and the unknown detector, as `petal train` fits them."""
    head = HeadClassifier().fit(X, y, num_classes=num_classes).calibrate(X, y)
    return head, KnnUnknown.fit(X, y, head.oof_proba_, keep=keep, leave_out=leave_out)


def embed_paths(paths: list[str]) -> np.ndarray:
    res, cache = embed(paths, get_backbone("efficientnet_lite0"), default_cache_dir())
    return np.asarray(cache.get([res.keys[p] for p in paths]), np.float32)


def per_class_thresholds(u: KnnUnknown, head, X, y, keep) -> tuple[np.ndarray, np.ndarray]:
    """(C,) thresholds: the `keep` quantile of held-out scores of training images predicted c,
    and the held-out scores' predicted classes. Leave-one-out kNN as in KnnUnknown.fit."""
    from petal.unknown import kth_similarity, normalize

    knn = 1 - kth_similarity(normalize(X), u.bank, u.k + 1)  # each bank row finds itself first
    scores, pred = u.combine(knn, head.oof_proba_), head.oof_proba_.argmax(1)
    return np.array([np.quantile(scores[pred == c], keep) if (pred == c).any() else u.threshold
                     for c in range(head.oof_proba_.shape[1])]), pred


def unknown_report(head, u: KnnUnknown, X: tuple, foreign: dict, keep: float) -> dict:
    """Kept eval share and, per foreign set, AUROC and rejected share; global and per-class thresholds."""
    (Xtr, ytr), (Xev, yev) = X
    pev = head.predict_proba(Xev)
    sev = u.score(Xev, pev)
    per_class, _ = per_class_thresholds(u, head, Xtr, ytr, keep)
    out = {"bank": len(u.bank), "left_out": u.left_out, "threshold": round(u.threshold, 4),
           "kept_eval": round(float((sev <= u.threshold).mean()), 4),
           "kept_eval_per_class_thresholds": round(float((sev <= per_class[pev.argmax(1)]).mean()), 4)}
    for name, Xf in foreign.items():
        pf = head.predict_proba(Xf)
        sf = u.score(Xf, pf)
        out[name] = {"images": len(Xf), "auroc": round(auroc(sev, sf), 4),
                     "rejected": round(float((sf > u.threshold).mean()), 4),
                     "rejected_per_class_thresholds": round(float((sf > per_class[pf.argmax(1)]).mean()), 4)}
    return out


def reduced_bank_report(head, u: KnnUnknown, Xev, foreign: dict) -> dict:
    """Unknown answers changed by the reduced bank, per number of principal axes."""
    sets = {"eval": Xev, **foreign}
    full = {k: u.score(X, head.predict_proba(X)) > u.threshold for k, X in sets.items()}
    out = {}
    for dims in (64, 128, 256, 512):
        r = u.reduce(dims)
        out[dims] = {k: round(float(((r.score(X, head.predict_proba(X)) > u.threshold) != full[k]).mean()), 4)
                     for k, X in sets.items()}
        out[dims]["bank_numbers"] = int(r.reduced.coords.size + r.reduced.basis.size)
    out["full_bank_numbers"] = int(u.bank.size)
    return out


def held_out_classes(classes, Xtr, ytr, Xev, yev, keep, leave_out) -> dict:
    """Each class in turn left out of training: AUROC of its images vs the others' eval images."""
    out = {}
    for c, name in enumerate(classes):
        keep_tr, keep_ev = ytr != c, yev != c
        remap = np.cumsum(np.arange(len(classes)) != c) - 1  # old id -> id without c
        head, u = fit_trust(Xtr[keep_tr], remap[ytr[keep_tr]], len(classes) - 1, keep)
        clean = KnnUnknown.fit(Xtr[keep_tr], remap[ytr[keep_tr]], head.oof_proba_, keep=keep,
                               leave_out=leave_out[keep_tr])
        known, novel = Xev[keep_ev], np.r_[Xtr[~keep_tr], Xev[~keep_ev]]
        pk, pn = head.predict_proba(known), head.predict_proba(novel)
        out[name] = {"all": round(auroc(u.score(known, pk), u.score(novel, pn)), 4),
                     "clean": round(auroc(clean.score(known, pk), clean.score(novel, pn)), 4),
                     "max_softmax": round(auroc(1 - pk.max(1), 1 - pn.max(1)), 4)}
    out["mean"] = {k: round(float(np.mean([v[k] for v in out.values()])), 4) for k in ("all", "clean", "max_softmax")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--keep", type=float, default=DEFAULT_KEEP)
    ap.add_argument("--near", action="store_true", help="also hold each class out (5 more calibrated heads each)")
    args = ap.parse_args()
    classes, (Xtr, ytr), (Xev, yev), leave_out = split_arrays(args.folder)
    t0 = time.perf_counter()
    head, clean = fit_trust(Xtr, ytr, len(classes), args.keep, leave_out)
    seconds = time.perf_counter() - t0
    full = KnnUnknown.fit(Xtr, ytr, head.oof_proba_, keep=args.keep)
    logits = head.decision_function(Xev)
    probs = softmax(logits, head.temperature_)
    with tempfile.TemporaryDirectory() as tmp:
        foreign = {k: embed_paths(v) for k, v in foreign_sets(Path(tmp)).items()}
    report = {"train": len(ytr), "eval": len(yev), "seconds_fit_and_calibrate": round(seconds, 1),
              "accuracy": round(float((probs.argmax(1) == yev).mean()), 4), "calibrator": head.calibration_,
              **{k: np.round(v, 4).tolist() for k, v in calibration_figures(probs, softmax(logits), yev).items()},
              "unknown_clean_bank": unknown_report(head, clean, ((Xtr, ytr), (Xev, yev)), foreign, args.keep),
              "unknown_all_in_bank": unknown_report(head, full, ((Xtr, ytr), (Xev, yev)), foreign, args.keep),
              "reduced_bank_changed": reduced_bank_report(head, clean, Xev, foreign)}
    if args.near:
        report["held_out_class_auroc"] = held_out_classes(classes, Xtr, ytr, Xev, yev, args.keep, leave_out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
