"""Dynamic micro-batching: concurrent requests share ONNX Runtime calls.

One worker thread owns the model. Each request submits its decoded images,
(n, S, S, 3) uint8, and awaits their (n, C) probabilities. The worker takes
whatever is queued, up to `max_batch` images, runs them in one call and hands
each request its rows. Under load it waits up to `max_wait_ms` for a batch to
fill; when requests come one at a time (the last batch held a single request)
it does not wait at all, so a lone request pays no batching delay.

ONNX Runtime releases the GIL while it runs, so the event loop and the decode
threads keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("petal.serve")


@dataclass
class _Job:
    pixels: np.ndarray  # (n, S, S, 3) uint8
    future: Future  # -> (n, C) float32


class Batcher:
    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = 8,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int, float], None] | None = None,
                 name: str = "model") -> None:
        self.predict = predict  # (N, S, S, 3) uint8 -> (N, C); N <= max_batch, or one bigger request
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch or (lambda images, seconds: None)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: _Job | None = None  # a job that did not fit in the last batch
        self._last_jobs = 1
        self._thread = threading.Thread(target=self._run, name=f"petal-infer-{name}", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        """Queue (n, S, S, 3) pixels; the future gets their (n, C) probabilities."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        job = _Job(pixels, Future())
        self._queue.put(job)
        return job.future

    async def run(self, pixels: np.ndarray) -> np.ndarray:
        """Await the probabilities. Cancelling (a timeout) drops the job if not yet started."""
        return await asyncio.wrap_future(self.submit(pixels))

    def close(self) -> None:
        """Finish every job already queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _next_batch(self) -> list[_Job] | None:
        """Block for one job, then gather more up to max_batch images. None: closed."""
        first = self._held or self._queue.get()
        self._held = None
        if first is None:
            return None
        jobs, images = [first], len(first.pixels)
        wait = self.max_wait if self._last_jobs > 1 else 0.0
        deadline = time.monotonic() + wait
        while images < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # closing: run what we have, stop next time
                self._queue.put(None)
                break
            if images + len(job.pixels) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            images += len(job.pixels)
        self._last_jobs = len(jobs)
        return jobs

    @property
    def alive(self) -> bool:
        """The worker thread is running (or was never needed: closed on purpose)."""
        return self._thread.is_alive() or self._closed

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            # A cancelled future (its request timed out) is skipped, not computed.
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._serve(jobs)

    def _serve(self, jobs: list[_Job]) -> None:
        """Run one batch; whatever fails (a bug, a broken model, a metrics callback), these
        requests get the error and the worker goes on with the next batch."""
        try:
            start = time.perf_counter()
            probs = self.predict(np.concatenate([j.pixels for j in jobs]))
            self.on_batch(len(probs), time.perf_counter() - start)
            at = 0
            for j in jobs:
                j.future.set_result(probs[at:at + len(j.pixels)])
                at += len(j.pixels)
        except Exception as e:  # noqa: BLE001 - fail these requests only, never the worker
            log.exception("inference failed")
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
