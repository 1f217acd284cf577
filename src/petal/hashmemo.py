"""The content-hash memo: a local file's (path, size, mtime_ns, inode, ctime_ns) -> sha256 of its bytes.

The embedding cache is keyed by content hashes, so every run must know each image's
hash. Reading a million files to hash them again costs a warm run about 100 GB of I/O;
with the memo, a warm run over unchanged files only stats them. A file whose size,
mtime, inode or ctime changed is read and hashed again (ctime: `cp --preserve=timestamps`
over a file keeps its size, mtime and inode, but the kernel sets its ctime); `--rehash` (memo.rehash) hashes every
file whatever the memo says. Remote URIs (gs://, s3://, http) are always read.

Format (MEMO_VERSION 2): one Parquet table per data source,
`<cache>/hashes/v2/<sha256 of the source>[:16].parquet`, columns uri (string), size,
mtime_ns, inode, ctime_ns (int64) and key (string, sha256 hex); version 1 had no ctime_ns.
A memo of another version, or one that cannot be read, is ignored (every file is hashed again) and replaced on save.

Safe under concurrent runs: a memo is replaced whole (written to a temp file and renamed),
under an flock on `<memo>.lock`, after merging what another run saved since this one
loaded it. An entry is a hint checked against the file's stat, never trusted blindly:
losing one costs a re-hash. A file modified within `RACY_SECONDS` of being hashed is not
memoized: a second write in the same mtime tick would go unseen (git's "racy clean" case).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np

from petal.storage import atomic_path, is_local, local_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent saves may drop entries (costs a re-hash)
    fcntl = None

MEMO_VERSION = 2
RACY_SECONDS = 2.0
Stat = tuple[int, int, int, int]  # (size, mtime_ns, inode, ctime_ns)
STAT_COLUMNS = ("size", "mtime_ns", "inode", "ctime_ns")


def file_stat(uri: str) -> Stat | None:
    """(size, mtime_ns, inode, ctime_ns) of a local file; None for a remote URI or a file that cannot be stat-ed."""
    if not is_local(uri):
        return None
    try:
        st = os.stat(local_path(uri))
    except OSError:
        return None  # the read that follows reports why
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


class HashMemo:
    """uri -> (Stat, key) for one data source. Threads may look up and remember at once."""

    def __init__(self, path: Path, rehash: bool = False) -> None:
        self.path, self.rehash = path, rehash
        self._row: dict[str, int] = {}  # uri -> row of the arrays below, as loaded
        self._stats = np.zeros((0, len(STAT_COLUMNS)), np.int64)  # (rows, 4) STAT_COLUMNS
        self._keys = np.zeros(0, "S64")
        self._new: dict[str, tuple[Stat, str]] = {}  # hashed in this run
        self._loaded_as: os.stat_result | None = None
        self.hits = 0  # files whose hash came from the memo (read only if they must be decoded)

    @classmethod
    def open(cls, cache_dir: Path, source: str, rehash: bool = False) -> HashMemo:
        """The memo of `source` (the data folder or CSV a run reads) in the cache folder."""
        digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
        memo = cls(Path(cache_dir) / "hashes" / f"v{MEMO_VERSION}" / f"{digest}.parquet", rehash)
        memo._row, memo._stats, memo._keys, memo._loaded_as = memo._read()
        return memo

    def _read(self) -> tuple[dict[str, int], np.ndarray, np.ndarray, os.stat_result | None]:
        """The memo on disk; empty if there is none or it is unreadable (then it is rebuilt)."""
        import pyarrow.parquet as pq

        try:
            st = os.stat(self.path)
            table = pq.read_table(self.path)
            uris = table.column("uri").to_pylist()
            stats = np.stack([table.column(c).to_numpy() for c in STAT_COLUMNS], axis=1)
            keys = table.column("key").to_numpy(zero_copy_only=False).astype("S64")
        except FileNotFoundError:
            return {}, self._stats, self._keys, None
        except Exception as e:  # noqa: BLE001 - a damaged memo costs a re-hash, never the run
            warnings.warn(f"hash memo {self.path} unreadable ({type(e).__name__}: {e}); files are hashed again",
                          stacklevel=3)
            return {}, self._stats, self._keys, None
        return {u: i for i, u in enumerate(uris)}, stats.astype(np.int64), keys, st

    def lookup(self, uri: str, stat: Stat | None) -> str | None:
        """The memoized hash of `uri` if the file is unchanged since, else None."""
        if stat is None or self.rehash:
            return None
        row = self._row.get(uri)
        if row is None or tuple(self._stats[row]) != stat:
            return None
        self.hits += 1
        return self._keys[row].decode()

    def remember(self, uri: str, stat: Stat | None, key: str) -> None:
        """`key` hashed just now from the bytes of `uri`, read after `stat` was taken."""
        if stat is not None and stat[1] < (time.time() - RACY_SECONDS) * 1e9 and _storable(uri):
            self._new[uri] = (stat, key)

    def save(self) -> None:
        """Write the memo with this run's hashes, merged with what another run saved meanwhile."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if not _same_file(os.stat(self.path), self._loaded_as):
                    self._row, self._stats, self._keys, _ = self._read()  # another run saved: keep its entries
            self._write()

    def _write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        kept = np.ones(len(self._keys), bool)
        kept[[self._row[u] for u in self._new if u in self._row]] = False
        old = sorted((i, u) for u, i in self._row.items() if kept[i])
        rows = [i for i, _ in old]
        new_stats = np.array([s for s, _ in self._new.values()], np.int64).reshape(-1, len(STAT_COLUMNS))
        stats = np.concatenate([self._stats[rows], new_stats])
        table = pa.table({
            "uri": [u for _, u in old] + list(self._new),
            **{name: stats[:, i] for i, name in enumerate(STAT_COLUMNS)},
            "key": pa.array(np.concatenate([self._keys[rows], np.array([k for _, k in self._new.values()], "S64")])
                            .astype(str)),
        })
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)


def _storable(uri: str) -> bool:
    """A name the memo's string column can hold: a file name that is not UTF-8 (surrogates from
    os.fsdecode) is hashed every run instead."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _same_file(a: os.stat_result, b: os.stat_result | None) -> bool:
    return b is not None and (a.st_ino, a.st_mtime_ns, a.st_size) == (b.st_ino, b.st_mtime_ns, b.st_size)

