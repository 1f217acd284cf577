"""The embedding cache: Parquet shards keyed by image content hash.

Layout: `<cache>/embeddings/<backbone>-p<PREPROCESS_VERSION>-<fingerprint>/shard-*.parquet`,
each shard a table of `key` (sha256 of the image bytes) and `embedding`
(fixed-size list of float32). Keys are content hashes, so a renamed or copied
image is found again.

Provenance: a feature is the product of a graph, petal's preprocessing and the
libraries that decode and run it. `provenance(graph)` records them (the graph's
sha256, PREPROCESS_VERSION, Pillow and its libjpeg, ONNX Runtime, NumPy); their hash,
the fingerprint, names the folder, so features of different producers never mix,
and each shard carries the record in its Parquet metadata (`petal cache info`).
When a write finds a key already stored, the two values are compared and a
difference beyond FEATURE_RTOL is a warning: two producers disagree.

Shards are only ever added, each written whole to a temp file and renamed
(`petal.storage.atomic_path`): a killed run loses at most the shard it was
filling, and two runs sharing one cache never write the same file. Writers
hold a lock (flock on `.<folder>.lock`, beside the shard folder) while they
write, and first drop the keys already on disk, which another run may have
written since they loaded the cache: each key is stored once. (Where flock is
missing, e.g. Windows, a key two runs embed at once may appear twice, with
equal values; readers keep one.)

A shard that cannot be read (damaged outside petal: a half-copied cache, a bad
disk) is renamed to `*.parquet.corrupt` with a warning; its images are simply
embedded again. Temp files left by a killed writer are removed after an hour.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from petal.errors import CacheError
from petal.params import env_int
from petal.storage import atomic_path

if TYPE_CHECKING:
    import pyarrow as pa

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module docstring
    fcntl = None

PREPROCESS_VERSION = 1  # bump when petal.images changes what pixels come out
FEATURE_RTOL = 1e-3  # |a - b| / |b| beyond this: two producers of one key's feature disagree
PROVENANCE_KEY = b"petal.provenance"  # the shard metadata entry holding the producer's record
DEFAULT_SHARD_ROWS = 512
STALE_TEMP_SECONDS = 3600  # a writer's temp file older than this was left by a killed run


def arrow_schema(feature_dim: int) -> pa.Schema:
    """The shard schema; every writer (local or Beam) uses exactly this."""
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), feature_dim))])


def shard_table(keys: list[str], vecs: np.ndarray, dim: int) -> pa.Table:
    """keys and (N, D) float32 -> a table in exactly the shard schema (ShardWriter, Beam's workers)."""
    import pyarrow as pa

    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)],
        schema=arrow_schema(dim),
    )


def table_rows(table: pa.Table, dim: int) -> tuple[list[str], np.ndarray]:
    """A shard's table -> (keys, (N, D) float32): what ShardWriter.add takes."""
    keys = table.column("key").to_pylist()
    flat = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)
    return keys, flat.reshape(len(keys), dim).astype(np.float32, copy=False)


def provenance(graph: Path) -> dict:
    """What produces a feature: the graph, petal's preprocessing, the decoder and the runtime."""
    import hashlib

    import onnxruntime
    import PIL
    from PIL import features

    return {"graph_sha256": hashlib.sha256(Path(graph).read_bytes()).hexdigest(),
            "preprocess_version": PREPROCESS_VERSION, "pillow": PIL.__version__,
            "libjpeg": features.version("libjpeg_turbo") or features.version("jpg"),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def fingerprint(record: dict) -> str:
    """A short hash of a provenance record: the cache folder of its features."""
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def relative_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) and (N, D) -> (N,) |a - b| / |b|: how far two producers' features of one image are apart."""
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def shard_name(tag: str = "") -> str:
    """A shard file name no other writer will pick (time, pid, random)."""
    return f"shard-{time.time_ns():020d}-{tag or os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


class EmbeddingCache:
    """Reads go in two steps, so that memory follows the dataset, not the cache: `index()`
    reads the key column of each shard (64 bytes a row, not D x 4), and `get(keys)` then
    reads the embeddings of only the shards that hold a wanted key, into one (N, D) array.
    Shards of other datasets cost their keys, never their vectors."""

    def __init__(self, root: Path, backbone: str, feature_dim: int, producer: dict | None = None) -> None:
        """`producer`: the `provenance()` of what makes the features (None: a bare folder, for tests)."""
        name = f"{backbone}-p{PREPROCESS_VERSION}" + (f"-{fingerprint(producer)}" if producer else "")
        self.dir = Path(root) / "embeddings" / name
        self.producer = producer
        self.feature_dim = feature_dim
        self._where: dict[str, int] = {}  # key -> shard number << 32 | row (any run's shards)
        self._names: list[str] = []  # shard number -> file name
        self._seen: set[str] = set()  # names of the shards whose keys are in _where
        self.problems: list[str] = []  # shards set aside as unreadable, with the reason

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.parquet"))

    def _read_shard(self, shard: Path, columns: list[str] | None = None) -> pa.Table | None:
        """The shard's table (those columns), or None if it is damaged (then it is set aside)."""
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(shard, columns=columns)
            expected = arrow_schema(self.feature_dim)
            for name in columns or expected.names:
                if table.schema.field(name) != expected.field(name):
                    raise ValueError(f"expected schema {expected}, got {table.schema}")
                if table.column(name).null_count:
                    raise ValueError("null values")
            if columns is None and table.schema != expected:
                raise ValueError(f"expected schema {expected}, got {table.schema}")
            return table
        except FileNotFoundError:
            return None  # set aside by another reader meanwhile
        except OSError as e:
            if e.errno is not None:  # EIO, EMFILE, EACCES...: the machine's trouble, not a damaged shard
                raise
            self._set_aside(shard, e)
        except MemoryError:
            raise  # neither: setting the shard aside would lose good features for everyone
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types on a damaged file
            self._set_aside(shard, e)
        return None

    def _set_aside(self, shard: Path, e: BaseException) -> None:
        """A shard whose format is damaged: renamed *.corrupt, its images embedded again."""
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        with contextlib.suppress(OSError):
            os.replace(shard, shard.with_name(shard.name + ".corrupt"))
        msg = f"embedding cache: unreadable shard {shard} set aside as .corrupt ({reason}); " \
              "its images will be embedded again"
        self.problems.append(msg)
        warnings.warn(msg, stacklevel=4)

    def load(self) -> dict[str, int]:
        """Clear a killed writer's old temp files, then `index()`."""
        self._remove_stale_temps()
        return self.index()

    def index(self) -> dict[str, int]:
        """key -> where its row is, for every key on disk: the keys of shards not read yet
        (other runs may have added some since the last call) are read, their key column only."""
        for shard in self.shards():
            if shard.name not in self._seen:
                table = self._read_shard(shard, columns=["key"])
                if table is not None:
                    self._add_shard(shard.name, table.column("key").to_pylist())
        return self._where

    stored_keys = index  # every key on disk, for a writer deciding what is new

    def shard_of(self, key: str) -> str:
        """The name of the shard holding `key` (indexed)."""
        return self._names[self.index()[key] >> 32]

    def _add_shard(self, name: str, keys: list[str]) -> None:
        n = len(self._names) << 32
        self._names.append(name)
        self._seen.add(name)
        self._where.update(zip(keys, range(n, n + len(keys))))

    def get(self, keys: list[str], dtype: np.dtype | type = np.float32,
            on_rows: Callable[[int], None] = lambda n: None) -> np.ndarray:
        """(N, D) embeddings of `keys` (all on disk), in their order, as `dtype`. Reads only
        the shards that hold one of them; peak memory is the result plus one shard.
        `on_rows(n)` after each shard's n rows."""
        where = self.index()
        try:
            loc = np.fromiter((where[k] for k in keys), np.int64, len(keys))
        except KeyError as e:
            raise CacheError(f"embedding cache: no embedding for key {e} in {self.dir}") from None
        out = np.empty((len(keys), self.feature_dim), dtype)
        shard_no, row = loc >> 32, loc & 0xFFFFFFFF
        order = np.argsort(shard_no, kind="stable")  # the wanted rows, shard by shard
        for group in np.split(order, np.flatnonzero(np.diff(shard_no[order])) + 1):
            if len(group):
                out[group] = self._vectors(self._names[shard_no[group[0]]])[row[group]]
                on_rows(len(group))
        return out

    def _vectors(self, name: str) -> np.ndarray:
        """(rows, D) float32 of one indexed shard; CacheError if it went bad since it was indexed."""
        table = self._read_shard(self.dir / name, columns=["embedding"])
        if table is None:
            raise CacheError(f"embedding cache: shard {self.dir / name} became unreadable during this run "
                             "(set aside); run again to embed its images again")
        flat = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)
        return flat.reshape(-1, self.feature_dim)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive among writers of this cache folder; released by the OS if the process dies."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # beside the shard folder, not in it: that folder holds shards only
        with open(self.dir.with_name(f".{self.dir.name}.lock"), "a") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.dir.glob(".shard-*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def writer(self, rows_per_shard: int | None = None, seconds_per_shard: float = 30.0,
               tag: str = "") -> ShardWriter:
        # $PETAL_SHARD_ROWS: small shards make a kill test land between them
        return ShardWriter(self, rows_per_shard or env_int("PETAL_SHARD_ROWS", DEFAULT_SHARD_ROWS),
                           seconds_per_shard, tag)


class ShardWriter:
    """Buffers new embeddings and writes a shard every N rows or T seconds."""

    def __init__(self, cache: EmbeddingCache, rows: int, seconds: float, tag: str = "") -> None:
        self.cache, self.rows, self.seconds = cache, rows, seconds
        self.tag = tag  # in the shard names (shard_name): "beam" marks what a Beam run added
        self.keys: list[str] = []
        self.vecs: list[np.ndarray] = []
        self.last = time.monotonic()

    def add(self, keys: list[str], vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32)
        self.keys += keys
        self.vecs.append(vecs)
        if len(self.keys) >= self.rows or time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.keys:
            return
        import pyarrow.parquet as pq

        keys, vecs = self.keys, np.concatenate(self.vecs)
        dim = self.cache.feature_dim
        with self.cache.lock():
            # Each key once in the cache: drop the keys already on disk (another run
            # may have written them since we loaded) and any key repeated in this
            # buffer. Under the lock, two writers never both decide a key is new.
            stored = self.cache.stored_keys()
            rows, new, again = [], set(), []
            for i, k in enumerate(keys):
                if k in stored:
                    again.append(i)
                elif k not in new:
                    new.add(k)
                    rows.append(i)
            self.compare([keys[i] for i in again], vecs[again])
            if rows:
                table = shard_table([keys[i] for i in rows], vecs[rows], dim)
                if self.cache.producer:
                    table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(self.cache.producer)})
                name = shard_name(self.tag)
                try:
                    with atomic_path(self.cache.dir / name) as tmp:
                        pq.write_table(table, tmp)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    raise CacheError(f"embedding cache: no space left on the disk of {self.cache.dir}; the "
                                     "features written before are kept: free some space (or give --cache on "
                                     "another disk) and run again to go on") from None
                self.cache._add_shard(name, table.column("key").to_pylist())
        self.keys, self.vecs = [], []

    def compare(self, keys: list[str], vecs: np.ndarray) -> None:
        """Keys written again (another run, a Beam copy-in): their new features against the stored
        ones; a warning names how many differ beyond FEATURE_RTOL, and by how much."""
        if not keys:
            return
        diff = relative_diff(vecs, self.cache.get(keys))
        if (bad := diff > FEATURE_RTOL).any():
            msg = (f"embedding cache: {int(bad.sum())} of {len(keys)} features written again differ from the "
                   f"stored ones by up to {diff.max():.2%} (e.g. key {keys[int(diff.argmax())]}): two producers "
                   f"disagree in {self.cache.dir}; `petal cache verify DATA` checks the cache against this machine")
            self.cache.problems.append(msg)
            warnings.warn(msg, stacklevel=3)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()  # also on error: what was embedded is kept
