"""A dataset's embeddings in one contiguous array, split by split.

    f = load_features(ds, keys, cache, reporter)      # reads only this dataset's rows
    examples, X, y = f.split(TRAIN)                     # X: (n, D), a view, not a copy

Rows are grouped by split (train, then eval, then test...), so each split is a slice of
one (N, D) array: a million 1280-D embeddings are loaded once, never copied per split.
Past `FLOAT16_BYTES` of float32 they are stored as float16 (half the memory; the head
computes in float32 batch by batch): on flowers, training on float16-stored embeddings
gives the same eval accuracy (benchmarks/scale.py --flowers).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from petal.cache import EmbeddingCache
from petal.data import EVAL, TEST, TRAIN, Dataset, Example
from petal.progress import Reporter

FLOAT16_BYTES = 2 << 30  # float32 embeddings beyond 2 GiB are stored as float16
SPLIT_ORDER = (TRAIN, EVAL, TEST)


@dataclass
class Features:
    examples: list[Example]  # the usable examples, grouped by split in SPLIT_ORDER
    X: np.ndarray  # (N, D) float32 or float16, row i the embedding of examples[i]
    y: np.ndarray  # (N,) int64 class ids
    keys: list[str]  # content keys, row by row
    bounds: dict[str, slice]  # split -> its rows

    def split(self, name: str) -> tuple[list[Example], np.ndarray, np.ndarray]:
        """(examples, (n, D) view of X, (n,) class ids) of one split."""
        rows = self.bounds.get(name, slice(0, 0))
        return self.examples[rows], self.X[rows], self.y[rows]


def feature_dtype(rows: int, dim: int, dtype: str | None = None) -> np.dtype:
    """`dtype` ("float32", "float16") if given, else float16 past FLOAT16_BYTES of float32."""
    if dtype is not None:
        return np.dtype(dtype)
    return np.dtype(np.float16 if rows * dim * 4 > FLOAT16_BYTES else np.float32)


def load_features(ds: Dataset, keys: dict[str, str], cache: EmbeddingCache, reporter: Reporter,
                  dtype: str | None = None) -> Features:
    """The embeddings of every example of `ds` that has a key (was readable), from the cache."""
    ids = {c: i for i, c in enumerate(ds.classes)}
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    # a stable sort: within a split the data's order, which the head's shuffling starts from
    usable = sorted((e for e in ds.examples if e.uri in keys), key=lambda e: (order.get(e.split, len(order)), e.split))
    bounds, start = {}, 0
    for name, group in itertools.groupby(usable, key=lambda e: e.split):
        n = sum(1 for _ in group)
        bounds[name], start = slice(start, start + n), start + n
    row_keys = [keys[e.uri] for e in usable]
    with reporter.progress("loading cached embeddings", len(usable)) as advance:
        X = cache.get(row_keys, feature_dtype(len(usable), cache.feature_dim, dtype), on_rows=advance)
    y = np.fromiter((ids[e.label] for e in usable), np.int64, len(usable))
    return Features(usable, X, y, row_keys, bounds)
