"""The embedding cache: Parquet shards keyed by image content hash.

Layout: `<cache>/embeddings/<backbone>-p<PREPROCESS_VERSION>/shard-*.parquet`,
each shard a table of `key` (sha256 of the image bytes) and `embedding`
(fixed-size list of float32). Keys are content hashes, so a renamed or copied
image is found again, and the folder name carries the backbone id.

Shards are only ever added, each written whole to a temp file and renamed
(`petal.storage.atomic_path`): a killed run loses at most the shard it was
filling, and two runs sharing one cache never write the same file. A key that
two runs both embedded appears twice with equal values; readers keep one.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from petal.storage import atomic_path

PREPROCESS_VERSION = 1  # bump when petal.images changes what pixels come out


def arrow_schema(feature_dim: int):
    """The shard schema; every writer (local or Beam) uses exactly this."""
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), feature_dim))])


def shard_name(tag: str = "") -> str:
    """A shard file name no other writer will pick (time, pid, random)."""
    return f"shard-{time.time_ns():020d}-{tag or os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


class EmbeddingCache:
    def __init__(self, root: Path, backbone: str, feature_dim: int):
        self.dir = Path(root) / "embeddings" / f"{backbone}-p{PREPROCESS_VERSION}"
        self.feature_dim = feature_dim
        self._index: dict[str, np.ndarray] | None = None

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.parquet"))

    def load(self) -> dict[str, np.ndarray]:
        """key -> (D,) float32, from every shard on disk."""
        import pyarrow.parquet as pq

        index: dict[str, np.ndarray] = {}
        for shard in self.shards():
            table = pq.read_table(shard)
            keys = table.column("key").to_pylist()
            flat = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)
            vecs = flat.reshape(len(keys), self.feature_dim).astype(np.float32, copy=False)
            index.update(zip(keys, vecs))
        self._index = index
        return index

    def get(self, keys: list[str]) -> np.ndarray:
        """(N, D) for keys all known to be in the cache."""
        index = self._index if self._index is not None else self.load()
        return np.stack([index[k] for k in keys]) if keys else np.zeros((0, self.feature_dim), np.float32)

    def writer(self, rows_per_shard: int = 512, seconds_per_shard: float = 30.0) -> ShardWriter:
        return ShardWriter(self, rows_per_shard, seconds_per_shard)


class ShardWriter:
    """Buffers new embeddings and writes a shard every N rows or T seconds."""

    def __init__(self, cache: EmbeddingCache, rows: int, seconds: float):
        self.cache, self.rows, self.seconds = cache, rows, seconds
        self.keys: list[str] = []
        self.vecs: list[np.ndarray] = []
        self.last = time.monotonic()

    def add(self, keys: list[str], vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32)
        self.keys += keys
        self.vecs.append(vecs)
        if self.cache._index is not None:  # visible to this run at once
            self.cache._index.update(zip(keys, vecs))
        if len(self.keys) >= self.rows or time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.keys:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        vecs = np.concatenate(self.vecs)
        dim = self.cache.feature_dim
        table = pa.Table.from_arrays(
            [pa.array(self.keys, pa.string()),
             pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)],
            schema=arrow_schema(dim),
        )
        with atomic_path(self.cache.dir / shard_name()) as tmp:
            pq.write_table(table, tmp)
        self.keys, self.vecs = [], []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # also on error: what was embedded is kept
