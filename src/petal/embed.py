"""Embed images with a backbone, through the content-keyed cache.

Images whose bytes are already in the cache cost a read and a hash; the rest
are decoded on a thread pool while ONNX Runtime runs the backbone on batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from petal.backbones import BackboneConfig
from petal.cache import EmbeddingCache
from petal.errors import NothingUsableError
from petal.loader import Item, batches, iter_items
from petal.params import env_int
from petal.precision import FP32, Engine

DEFAULT_BATCH = 32  # images per backbone run; $PETAL_EMBED_BATCH overrides it


@dataclass
class EmbedResult:
    keys: dict[str, str] = field(default_factory=dict)  # uri -> content key, readable images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    embedded: int = 0  # went through the backbone in this run
    cached: int = 0  # found in the cache (or a byte-identical copy seen earlier in this run)
    seconds: float = 0.0

    def summary(self) -> dict:
        done = self.embedded + self.cached
        return {
            "embedded": self.embedded,
            "cached": self.cached,
            "failed": len(self.failed),
            "total": done + len(self.failed),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.embedded / self.seconds, 1) if self.seconds else None,
        }


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
    precision: str = FP32,
    calibration_uris: Sequence[str] | None = None,
) -> tuple[EmbedResult, EmbeddingCache]:
    """Make sure every readable image in `uris` has an embedding in the cache, at `precision`
    (petal.precision; int8 calibrates on a sample of `calibration_uris`, default `uris`).
    `on_progress(n)` after each batch of n images; `on_message(text)` for news
    such as the one-off backbone export."""
    start = time.perf_counter()
    batch_size = batch_size or env_int("PETAL_EMBED_BATCH", DEFAULT_BATCH)
    engine = Engine.make(cfg, precision, uris if calibration_uris is None else calibration_uris)
    cache = EmbeddingCache(cache_dir, engine.cache_tag, cfg.feature_dim)
    known = cache.load()
    result = EmbedResult()
    session = None  # built on the first batch that needs it: a warm run never exports

    with cache.writer() as writer:
        items = iter_items(uris, cfg.preprocess, skip=known.__contains__, workers=workers, yield_cpu=True)
        for batch in batches(items, batch_size):
            todo: list[Item] = []
            for item in batch:
                if item.error is not None:
                    result.failed.append((item.uri, item.error))
                    continue
                result.keys[item.uri] = item.key
                if item.pixels is None or item.key in known or any(t.key == item.key for t in todo):
                    result.cached += 1
                else:
                    todo.append(item)
            if todo:
                if session is None:
                    # no spin-waiting: the decode threads need the cores between ONNX Runtime's
                    # parallel sections (measured on 2 cores: 16 instead of 19-22 CPU ms an image)
                    session = engine.session(cache_dir, on_message, spin=False)
                pixels = np.stack([t.pixels for t in todo])  # (B, S, S, 3) uint8
                (features,) = session.run(["features"], {"images": pixels})  # (B, D)
                writer.add([t.key for t in todo], np.array(features))  # own the memory
                result.embedded += len(todo)
            if on_progress:
                on_progress(len(batch))
    result.seconds = time.perf_counter() - start
    return result, cache
