"""The served models and the prediction path, without HTTP.

    body bytes --(decode pool)--> instances --(decode pool, one task per image)--> (S, S, 3) pixels
          --(batcher: one inference thread, shared batches)--> (C,) probabilities --> rows

JSON parsing, base64 and image decoding run on a thread pool, never on the event
loop (Pillow and base64 release the GIL). Inference runs in each model's batcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from petal.bundle import Model
from petal.errors import ImageError, PetalError
from petal.images import decode_pixels
from petal.predictions import Prediction, Scores
from petal.preprocess import Preprocess
from petal.serve import protocol, v2
from petal.serve.batcher import Batcher
from petal.serve.config import ServeConfig
from petal.serve.limits import REQUEST_DEADLINE

if TYPE_CHECKING:
    from petal.serve.metrics import Metrics

log = logging.getLogger("petal.serve")
INLINE_PARSE_BYTES = 256 * 1024  # bodies up to this are parsed on the event loop (~0.3 ms)
T = TypeVar("T")


class ModelNotFound(PetalError):
    pass


def instance_datas(instances: list) -> list[bytes | str]:
    """Row-format instances -> each one's encoded image bytes, or why it has none."""
    out: list[bytes | str] = []
    for inst in instances:
        try:
            out.append(protocol.instance_bytes(inst))
        except protocol.InstanceError as e:
            out.append(str(e))
    return out


def request_pixels(datas: list[bytes | str], pre: Preprocess) -> int:
    """All pixels a request's images would decode, from their headers (JPEGs at their draft scale)."""
    return sum(decode_pixels(d, pre) for d in datas if isinstance(d, bytes))


def check_runs(name: str, model: Model) -> None:
    """One inference on a blank image before the server says it is ready: a bundle that loads
    but cannot answer (a graph at odds with its petal.json) stops the start, never a request."""
    s = model.preprocess.input_size
    try:
        probabilities = model.scores(np.zeros((1, s, s, 3), np.uint8)).probabilities
    except Exception as e:  # noqa: BLE001 - whatever ONNX Runtime raises, the bundle is unusable
        raise PetalError(f"model {name!r}: {model.path} loads but cannot predict ({type(e).__name__}: "
                         f"{str(e)[:300]}); export it again") from None
    if probabilities.shape != (1, len(model.labels)):
        raise PetalError(f"model {name!r}: {model.path} gives scores of shape {list(probabilities.shape)} for "
                         f"one image, expected [1, {len(model.labels)}]; export it again")


@dataclass
class ServedModel:
    name: str
    path: Path
    model: Model
    batcher: Batcher
    version: str = "1"  # a bundle is immutable; TF Serving's shape wants a version

    def prediction(self, uri: str, scores: Scores, top_k: int, reject_unknown: bool) -> Prediction:
        p = self.model.prediction(uri, scores, top_k)
        p.unknown = p.unknown and reject_unknown  # ?unknown=false: never unknown, ood_score still given
        return p

    def metadata(self) -> dict:
        info = self.model.info
        return {"labels": self.model.labels, "backbone": info.backbone.get("name"),
                "input_size": info.preprocess.input_size, "created": info.created,
                "metrics": {k: info.metrics.get(k) for k in ("accuracy", "top5_accuracy")}}


class Service:
    """Models by name, the decode pool, and the two prediction entry points."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics  # petal.serve.metrics.Metrics, or None
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.pool: ThreadPoolExecutor | None = None

    # -- lifecycle (called from the app's lifespan) --

    def load(self) -> None:
        """Load every bundle and start its inference thread. Blocking: run it in a thread."""
        workers = self.config.decode_workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="petal-decode")
        for name, path in self.config.models.items():
            # Every core, but no spin-waiting: a server decodes while it infers, and spinning
            # ONNX Runtime threads would steal the decode threads' CPU. (Measured on 2 cores:
            # all cores without spinning beat half the cores, at every concurrency.)
            model = Model(path, threads=self.config.threads, spin=False, reject_unknown=self.config.reject_unknown,
                          precision=self.config.precision)
            check_runs(name, model)
            on_batch = self.metrics.batch_callback(name) if self.metrics else None
            max_batch = self.config.batching.max_batch
            predict = partial(model.scores, batch_size=max_batch)  # a big request: in chunks
            batcher = Batcher(predict, max_batch, self.config.batching.max_wait_ms, on_batch, name)
            self.models[name] = ServedModel(name, path, model, batcher)
            log.info("model %s loaded from %s: %d classes", name, path, len(model.labels))
        self.ready = True

    def close(self) -> None:
        """Finish queued work, then stop the threads."""
        self.ready = False
        for served in self.models.values():
            served.batcher.close()
        if self.pool:
            self.pool.shutdown(wait=True)

    def get(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} not found; serving: {', '.join(self.models) or 'none'}")
        return self.models[name]

    # -- prediction --

    async def predict_json(self, served: ServedModel, body: bytes, reject_unknown: bool = True) -> dict:
        """A row-format request body -> {"predictions": [...]}. Raises RequestError if malformed."""
        loop = asyncio.get_running_loop()
        instances = await self._parse(protocol.parse_request, body, self.limits.max_images)
        del body
        keys = [protocol.instance_key(inst) for inst in instances]
        datas = await loop.run_in_executor(self.pool, instance_datas, instances)
        del instances
        pixels = await self._decode_all(served, datas)
        results = await self._infer(served, pixels)
        return {"predictions": [protocol.error_row(k, r) if isinstance(r, str) else
                                protocol.prediction_row(k, served.prediction("", r, 1, reject_unknown))
                                for k, r in zip(keys, results, strict=True)]}

    async def predict_files(self, served: ServedModel, files: list[tuple[str, bytes]],
                            top_k: int, reject_unknown: bool = True) -> list[dict]:
        """[(filename, encoded bytes)] -> [{"filename", "label", "score", "top"} or {"filename", "error"}]."""
        pixels = await self._decode_all(served, [data for _, data in files])
        results = await self._infer(served, pixels)
        rows = []
        for (filename, _), r in zip(files, results, strict=True):
            d = ({"uri": filename, "error": r} if isinstance(r, str) else
                 served.prediction(filename, r, top_k, reject_unknown).to_dict())
            rows.append({"filename": d.pop("uri"), **d})
        return rows

    async def infer_v2(self, served: ServedModel, body: bytes, header_length: str | None,
                       reject_unknown: bool = True) -> dict:
        """An Open Inference Protocol request body -> its response document (`reject_unknown=False`,
        ?unknown=false: labels are the nearest classes). Raises RequestError for a malformed
        request, or naming the first image that cannot be used."""
        model = served.model
        spec = v2.ModelInputs(self.limits.max_images, model.preprocess.input_size,
                         v2.output_names("ood_score" in model.outputs))
        request, images = await self._parse(v2.parse_infer, body, header_length, spec)
        del body
        if images.pixels is not None:
            pixels: list[np.ndarray | str] = list(images.pixels)
        else:
            pixels = await self._decode_all(served, list(images.files))
        for i, p in enumerate(pixels):
            if isinstance(p, str):
                raise protocol.RequestError(f"images[{i}]: {p}")
        scores = Scores.stack(await self._infer(served, pixels), len(model.labels))
        return v2.infer_response(served.name, served.version, request, scores, model.labels,
                                 reject_unknown=reject_unknown and model.reject_unknown)

    async def _parse(self, parse: Callable[..., T], body: bytes, *args: object) -> T:
        """parse(body, *args), on the decode pool unless the body is small. Its size is bounded
        first (from byte counts, in the parser), so the GIL-holding JSON parser never runs long."""
        if len(body) <= INLINE_PARSE_BYTES:  # well under a millisecond: not worth a thread hop
            return parse(body, *args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, parse, body, *args)

    async def _decode_all(self, served: ServedModel, datas: list[bytes | str]) -> list[np.ndarray | str]:
        """Encoded images (or the reason an instance has none) -> (S, S, 3) uint8 each, or the reason.
        The request's pixels are counted from the headers first, and refused (413) past the
        budget; a decode that would start after the request's deadline is skipped."""
        loop = asyncio.get_running_loop()
        total = await loop.run_in_executor(self.pool, request_pixels, datas, served.model.preprocess)
        if total > self.limits.max_request_pixels:
            raise protocol.RequestError(f"request too large: its images need {total:,} pixels decoded, over "
                                        f"the {self.limits.max_request_pixels:,} a request may; send fewer or "
                                        "smaller images", status=413)
        deadline = REQUEST_DEADLINE.get()
        return list(await asyncio.gather(*(loop.run_in_executor(self.pool, self._decode, d, served, deadline)
                                           for d in datas)))

    def _decode(self, data: bytes | str, served: ServedModel, deadline: float | None) -> np.ndarray | str:
        """Encoded image -> (S, S, 3) uint8, or the reason it cannot be used."""
        if isinstance(data, str):
            return data
        if deadline is not None and time.monotonic() > deadline:
            return "not decoded: the request's time ran out"  # its answer is a 503 already
        try:
            return served.model.pixels_from_bytes(data, self.limits.max_pixels)
        except ImageError as e:
            return str(e)

    async def _infer(self, served: ServedModel, pixels: list[np.ndarray | str]) -> list[Scores | str]:
        """Decoded images (or error strings) -> each image's Scores (or the same error strings)."""
        good = [i for i, p in enumerate(pixels) if not isinstance(p, str)]
        out: list[Scores | str] = list(pixels)
        if good:
            scores = await served.batcher.run(np.stack([pixels[i] for i in good]))
            for j, i in enumerate(good):
                out[i] = scores[j]
        if self.metrics:
            self.metrics.images(served.name, len(good), len(pixels) - len(good))
        return out
