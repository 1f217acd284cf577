"""Read, hash and decode images on a thread pool, in order, with bounded memory.

Pillow and hashlib release the GIL while they decode, resize and hash, so
threads use every core without pickling pixels between processes. At most
`prefetch` images are in flight, so memory stays bounded on any input size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from petal.errors import ImageError
from petal.hashmemo import HashMemo, file_stat
from petal.images import DEFAULT_MAX_PIXELS, load_pixels
from petal.preprocess import Preprocess
from petal.storage import read_bytes

YIELD_NICE = 10  # how much lower `yield_cpu` decode threads run


@dataclass
class Item:
    uri: str
    key: str | None = None  # sha256 of the file's bytes
    pixels: np.ndarray | None = None  # (S, S, 3) uint8, None if skipped or failed
    error: str | None = None
    read: bool = False  # its bytes were read (to hash or to decode), not only stat-ed


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def iter_items(
    uris: Iterable[str],
    pre: Preprocess,
    *,
    skip: Callable[[str], bool] = lambda key: False,
    workers: int | None = None,
    prefetch: int = 128,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    memo: HashMemo | None = None,
    yield_cpu: bool = False,
) -> Iterator[Item]:
    """Yield one Item per URI, in input order. `skip(key)` True -> not decoded. With a
    `memo`, an unchanged local file whose hash it knows is only stat-ed: if that key is
    skipped, not a byte of the file is read. `yield_cpu`: the decode threads run at a lower
    priority, so that they fill the gaps ONNX Runtime leaves rather than preempt its threads
    mid-batch (measured embedding on 2 cores: 5% more images/s)."""

    def work(uri: str) -> Item:
        item = Item(uri)
        try:
            stat = file_stat(uri) if memo else None
            item.key = memo.lookup(uri, stat) if memo else None
            if item.key is not None and skip(item.key):
                return item
            data = read_bytes(uri)
            item.read = True
            item.key = hashlib.sha256(data).hexdigest()
            if memo:
                memo.remember(uri, stat, item.key)
            if not skip(item.key):
                item.pixels = load_pixels(data, pre, max_pixels)
        except ImageError as e:
            item.error = str(e)
        return item

    with ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="petal-decode",
                            initializer=lower_priority if yield_cpu else None) as pool:
        pending: deque = deque()
        for uri in uris:
            pending.append(pool.submit(work, uri))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def lower_priority() -> None:
    """Lower this thread's scheduling priority (Linux: nice is per thread); a no-op elsewhere."""
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), YIELD_NICE)


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
