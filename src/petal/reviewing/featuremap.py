"""The feature map: a run's embeddings in two dimensions, for the page and the report.

    xy, method = project(X)          # (N, D) -> (N, 2) float32, "tsne" or "pca"
    fm = run_map(run, extra=(uris, X))   # cached in RUN/featuremap.npz

How it is chosen (benchmarks/review_loop.py --map, tf_flowers, 3670 images): class separation
as the accuracy of a 5-nearest-neighbour vote in 2-D (leave-one-out): t-SNE 0.91, PCA 0.68
(in 1280-D: 0.92); so t-SNE, initialised by PCA, on the first 50 principal components.
t-SNE costs about 25 s per 3670 points on 2 cores and grows faster than N, so past TSNE_CAP
points PCA draws the map (seconds at any size). UMAP (umap-learn) was not installed: it could
not separate much more than t-SNE's 0.91 of a ceiling of 0.92, and brings numba and llvmlite.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petal.backbones import get_backbone
from petal.embed import feature_cache
from petal.precision import Engine
from petal.run import Run
from petal.storage import absolute, atomic_path
from petal.unknown import normalize

TSNE_CAP = 10_000  # more points: PCA (t-SNE's cost grows faster than N)
PCA_DIMS = 50  # t-SNE runs on these principal components
MAP_FILE = "featuremap.npz"


@dataclass
class FeatureMap:
    uris: list[str]
    labels: list[str]  # "" for an unlabeled photo
    xy: np.ndarray  # (N, 2) float32, scaled into [0, 1]
    method: str


def project(X: np.ndarray, method: str | None = None, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) embeddings -> ((N, 2) float32 in [0, 1], method): t-SNE up to TSNE_CAP points, else PCA."""
    from sklearn.decomposition import PCA

    method = method or ("tsne" if len(X) <= TSNE_CAP else "pca")
    Xn = normalize(np.asarray(X, np.float32))
    if len(Xn) < 3:
        return np.full((len(Xn), 2), 0.5, np.float32), method
    pcs = PCA(min(PCA_DIMS, *Xn.shape), random_state=seed).fit_transform(Xn)
    if method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(2, init="pca", perplexity=min(30.0, (len(Xn) - 1) / 3), random_state=seed).fit_transform(pcs)
    else:
        xy = pcs[:, :2]
    lo, hi = xy.min(0), xy.max(0)
    return ((xy - lo) / np.maximum(hi - lo, 1e-9)).astype(np.float32), method


def run_embeddings(run: Run) -> tuple[list[dict[str, str]], np.ndarray]:
    """Every image of a finished run (split.csv's rows) and its (N, D) embedding from the cache."""
    settings = run.settings()
    rows = run.split_rows()
    cfg = get_backbone(settings.backbone["name"])
    precision = settings.spec.precision
    engine = Engine.make(cfg, precision, [r["uri"] for r in rows if r["split"] == "train"])
    cache = feature_cache(cfg, Path(settings.cache_dir), engine=engine)
    cache.load()
    return rows, cache.get([r["key"] for r in rows])


def run_map(run: Run, extra: tuple[list[str], np.ndarray] | None = None, method: str | None = None) -> FeatureMap:
    """The map of a run's images and of `extra` (uris, (M, D) embeddings of unlabeled photos),
    from RUN/featuremap.npz when it holds these very images, else computed and saved there."""
    rows, X = run_embeddings(run)
    uris = [absolute(r["uri"]) for r in rows] + [absolute(u) for u in (extra[0] if extra else [])]
    labels = [r["label"] for r in rows] + ([""] * len(extra[0]) if extra else [])
    digest = hashlib.sha256("\n".join(uris + labels + [method or ""]).encode("utf-8", "surrogateescape")).hexdigest()
    path = run.path / MAP_FILE
    if path.exists():
        with np.load(path) as saved:
            if str(saved["digest"]) == digest:
                return FeatureMap(uris, labels, saved["xy"], str(saved["method"]))
    if extra:
        X = np.concatenate([X, np.asarray(extra[1], X.dtype)])
    xy, used = project(X, method)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, xy=xy, method=used, digest=digest)
    return FeatureMap(uris, labels, xy, used)
