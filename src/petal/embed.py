"""Embed images with a backbone, through the content-keyed cache.

Images whose bytes are already in the cache cost a read and a hash; the rest
are decoded on a thread pool while ONNX Runtime runs the backbone on batches.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from petal.backbones import BackboneConfig
from petal.cache import EmbeddingCache, provenance
from petal.errors import NothingUsableError
from petal.hashmemo import HashMemo
from petal.loader import Item, batches, iter_items
from petal.params import env_int
from petal.precision import BF16, FP32, Engine
from petal.progress import rate

DEFAULT_BATCH = 32  # images per backbone run; $PETAL_EMBED_BATCH overrides it


@dataclass
class EmbedResult:
    keys: dict[str, str] = field(default_factory=dict)  # uri -> content key, readable images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    embedded: int = 0  # went through the backbone in this run
    cached: int = 0  # found in the cache (or a byte-identical copy seen earlier in this run)
    read: int = 0  # files whose bytes were read, to hash or to decode (the others were only stat-ed)
    seconds: float = 0.0

    def sort(self, batch: list[Item], is_known: Callable[[str], bool]) -> list[Item]:
        """Count a batch of read items (failed, cached) and return those to embed: each new key once."""
        todo: list[Item] = []
        self.read += sum(item.read for item in batch)  # bytes read, to hash or to decode
        for item in batch:
            if item.error is not None:
                self.failed.append((item.uri, item.error))
                continue
            self.keys[item.uri] = item.key
            if item.pixels is None or is_known(item.key) or any(t.key == item.key for t in todo):
                self.cached += 1
            else:
                todo.append(item)
        return todo

    def summary(self) -> dict:
        total = self.embedded + self.cached + len(self.failed)
        return {
            "embedded": self.embedded,
            "cached": self.cached,
            "failed": len(self.failed),
            "read": self.read,
            "total": total,
            "seconds": round(self.seconds, 3),
            # every image handled, over the whole step: the rate its progress bar ends on
            "images_per_second": rate(total, self.seconds),
        }


def feature_cache(cfg: BackboneConfig, cache_dir: Path, on_message: Callable[[str], None] | None = None,
                  engine: Engine | None = None) -> EmbeddingCache:
    """The cache folder of the features this machine makes with `cfg` at `engine`'s precision
    (default fp32): named by the provenance of the graph (exported first if need be), the
    precision, the decoder and the runtime."""
    engine = engine or Engine(cfg)
    producer = {**provenance(engine.graph_path(cache_dir, on_message)), **engine.record(), **cfg.weights.record()}
    if engine.precision == BF16:  # OpenVINO runs it, not ONNX Runtime
        from importlib.metadata import PackageNotFoundError, version

        with contextlib.suppress(PackageNotFoundError):  # if missing, the bf16 session says what to install
            producer["openvino"] = version("openvino")
    return EmbeddingCache(cache_dir, engine.cache_tag, cfg.feature_dim, producer)


def require_usable(result: EmbedResult, total: int) -> None:
    """Raise if `total` images went in and none could be read: the local and the Beam path say it alike."""
    if total and not result.keys:
        raise NothingUsableError(f"none of the {total} images could be read; first error: "
                                 f"{result.failed[0][0]}: {result.failed[0][1]}")


def embed(
    uris: Sequence[str],
    cfg: BackboneConfig,
    cache_dir: Path,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    source: str = "",
    rehash: bool = False,
    precision: str = FP32,
    calibration_uris: Sequence[str] | None = None,
) -> tuple[EmbedResult, EmbeddingCache]:
    """Make sure every readable image in `uris` has an embedding in the cache, at `precision`
    (petal.precision; int8 calibrates on a sample of `calibration_uris`, default `uris`).
    `on_progress(n)` after each batch of n images; `on_message(text)` for news
    such as the one-off backbone export. The hashes of the files are memoized per
    `source` (petal.hashmemo): unchanged files are not read again, unless `rehash`."""
    start = time.perf_counter()
    batch_size = batch_size or env_int("PETAL_EMBED_BATCH", DEFAULT_BATCH)
    engine = Engine.make(cfg, precision, uris if calibration_uris is None else calibration_uris)
    cache = feature_cache(cfg, cache_dir, on_message, engine)
    known = cache.load()  # key -> where; the vectors stay on disk
    added: set[str] = set()  # keys embedded in this run (a later byte-identical copy is cached)
    memo = HashMemo.open(cache_dir, source, rehash)
    result = EmbedResult()
    session = None  # built on the first batch that needs it: a warm run never exports

    def is_known(key: str) -> bool:
        return key in known or key in added

    with cache.writer() as writer:
        items = iter_items(uris, cfg.preprocess, skip=is_known, workers=workers, memo=memo, yield_cpu=True)
        for batch in batches(items, batch_size):
            todo = result.sort(batch, is_known)
            if todo:
                if session is None:
                    # no spin-waiting: the decode threads need the cores between ONNX Runtime's
                    # parallel sections (measured on 2 cores: 16 instead of 19-22 CPU ms an image)
                    session = engine.session(cache_dir, on_message, spin=False)
                pixels = np.stack([t.pixels for t in todo])  # (B, S, S, 3) uint8
                (features,) = session.run(["features"], {"images": pixels})  # (B, D)
                writer.add([t.key for t in todo], np.array(features))  # own the memory
                added.update(t.key for t in todo)
                result.embedded += len(todo)
            if on_progress:
                on_progress(len(batch))
    memo.save()
    result.seconds = time.perf_counter() - start
    return result, cache
