"""Does calibration ever make things worse? The default head, calibrated as `petal train`
calibrates it, on every real labeled data set at hand, ECE on eval before and after.

    python benchmarks/calibration_datasets.py [--flowers FOLDER]

Data sets (real images or measurements; nothing downloaded):
- flowers: tf_flowers with petal's own split (Lite0 embeddings from the cache);
- digits: scikit-learn's 1797 handwritten digits, 10 classes (Lite0 embeddings of the upscaled scans);
- lfw: scikit-image's lfw_subset, 200 images, face or not (Lite0 embeddings);
- breast_cancer, wine: scikit-learn's tabular sets (standardised measurements as the features).
The non-flower sets are split 80/20, stratified, seed 0. Prints one JSON record per set.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from foreign_sets import digits_labeled, lfw_labeled

from petal.backbones import get_backbone
from petal.calibration import calibration_figures, softmax
from petal.data import EVAL, TRAIN, load_dataset
from petal.embed import embed
from petal.head import HeadClassifier
from petal.runs.common import embed_dataset
from petal.storage import default_cache_dir

FLOWERS = str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos")


def embedded(paths: list[str]) -> np.ndarray:
    res, cache = embed(paths, get_backbone("efficientnet_lite0"), default_cache_dir())
    return np.asarray(cache.get([res.keys[p] for p in paths]), np.float32)


def split(X: np.ndarray, y: np.ndarray) -> tuple:
    from sklearn.model_selection import train_test_split

    Xtr, Xev, ytr, yev = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    return (Xtr, ytr), (Xev, yev)


def flowers(folder: str) -> tuple:
    ds = load_dataset(folder)
    result, cache = embed_dataset(ds)
    usable = [e for e in ds.examples if e.uri in result.keys]

    def xy(which: str):
        ex = [e for e in usable if e.split == which]
        return np.asarray(cache.get([result.keys[e.uri] for e in ex]), np.float32), \
            np.array([ds.label_id(e.label) for e in ex])

    return xy(TRAIN), xy(EVAL)


def tabular(name: str) -> tuple:
    import sklearn.datasets

    d = getattr(sklearn.datasets, f"load_{name}")()
    X = (d.data - d.data.mean(0)) / np.maximum(d.data.std(0), 1e-9)
    return split(X.astype(np.float32), d.target)


def calibrated(train: tuple, ev: tuple) -> dict:
    (Xtr, ytr), (Xev, yev) = train, ev
    head = HeadClassifier().fit(Xtr, ytr, num_classes=int(ytr.max()) + 1).calibrate(Xtr, ytr)
    logits = head.decision_function(Xev)
    figures = calibration_figures(softmax(logits, head.temperature_), softmax(logits), yev)
    return {"train": len(ytr), "eval": len(yev), "accuracy": round(float((logits.argmax(1) == yev).mean()), 4),
            "method": head.calibration_["method"], "temperature": round(head.temperature_, 4),
            **{k: np.round(v, 4).tolist() for k, v in figures.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flowers", default=FLOWERS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        digits_paths, digits_y = digits_labeled(Path(tmp))
        lfw_paths, lfw_y = lfw_labeled(Path(tmp))
        sets = {"flowers": flowers(args.flowers), "digits": split(embedded(digits_paths), digits_y),
                "lfw": split(embedded(lfw_paths), lfw_y)}
    sets.update({name: tabular(name) for name in ("breast_cancer", "wine")})
    for name, (train, ev) in sets.items():
        print(json.dumps({"data": name, **calibrated(train, ev)}), flush=True)


if __name__ == "__main__":
    main()
