"""The worker side of petal's Beam pipelines: DoFns, the ONNX model handler, counters.

Everything here runs on Beam's workers (pickled by the launcher, unpickled in
each worker process); nothing here builds or launches a pipeline, that is
`petal.beam.jobs`. Nothing re-implements a local step: images are read,
hashed and decoded by `petal.loader.iter_items`, the ONNX sessions are built
by `petal.runtime.make_session`, prediction rows by `petal.predictions.scored_prediction`
and `petal.predictions.csv_row`, and shard tables by `petal.cache.shard_table`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

from petal.bundle import OUTPUTS
from petal.cache import shard_table
from petal.images import quiet_pillow_warnings
from petal.loader import iter_items
from petal.predictions import Scores, csv_row, scored_prediction
from petal.preprocess import Preprocess
from petal.runtime import make_session
from petal.storage import is_local, local_path

if TYPE_CHECKING:
    import onnxruntime as ort
    import pyarrow as pa

METRICS = "petal"  # namespace of the Beam counters below


def _count(name: str, n: int = 1) -> None:
    beam.metrics.Metrics.counter(METRICS, name).inc(n)


class DecodeImages(beam.DoFn):
    """A batch of URIs -> ((content key, uri), (S, S, 3) uint8 pixels) per image to run.

    Side outputs: "cached" (uri, key) for keys in `known_uri`'s list, "failed"
    (uri, reason) for anything read_bytes/load_pixels refused. Decoding is
    petal.loader.iter_items on a thread pool: the exact local code path.
    """

    def __init__(self, pre: Preprocess, known_uri: str | None, threads: int) -> None:
        self.pre, self.known_uri, self.threads = pre, known_uri, threads

    def setup(self) -> None:
        quiet_pillow_warnings()  # a Beam worker is petal's process
        self.known = frozenset(read_lines(self.known_uri)) if self.known_uri else frozenset()

    def process(self, uris: Sequence[str]) -> Iterator:
        for item in iter_items(uris, self.pre, skip=self.known.__contains__, workers=self.threads or None):
            if item.error is not None:
                _count("images_failed")
                yield beam.pvalue.TaggedOutput("failed", (item.uri, item.error))
            elif item.pixels is None:  # skipped: its key is in the cache already
                _count("images_cached")
                yield beam.pvalue.TaggedOutput("cached", (item.uri, item.key))
            else:
                yield (item.key, item.uri), item.pixels


def _run_output(session: ort.InferenceSession, batch: Sequence[np.ndarray],
                inference_args: dict[str, Any] | None = None, *, output: str) -> np.ndarray | list[Scores]:
    """RunInference's inference_fn: B x (S, S, 3) uint8 -> (B, D) of the named output, or for
    "scores" each image's Scores (probabilities, and ood_score/unknown where the bundle has them)."""
    if output != "scores":
        (out,) = session.run([output], {"images": np.stack(batch)})
        return out
    names = {o.name for o in session.get_outputs()}
    scores = Scores(*session.run([n for n in OUTPUTS if n in names], {"images": np.stack(batch)}))
    return [scores[i] for i in range(len(scores))]


class PetalOnnxHandler(OnnxModelHandlerNumpy):
    """Beam's ONNX model handler, with the session built as every petal caller builds it.

    `model_uri` may be remote (gs://...): each worker process then copies it to
    a temp file once and loads it from there (ONNX Runtime reads local files).
    """

    def __init__(self, model_uri: str, output: str, batch_size: int, threads: int) -> None:
        super().__init__(model_uri, inference_fn=functools.partial(_run_output, output=output),
                         max_batch_size=batch_size)
        self._threads = threads

    def load_model(self) -> ort.InferenceSession:
        threads = self._threads or None
        if is_local(self._model_uri):
            return make_session(local_path(self._model_uri), threads)
        with tempfile.TemporaryDirectory() as tmp:  # the session keeps the graph in memory
            path = Path(tmp) / "model.onnx"
            with FileSystems.open(self._model_uri) as src, open(path, "wb") as out:
                shutil.copyfileobj(src, out)
            return make_session(path, threads)


class KeepOnePerKey(beam.DoFn):
    """(content key, [(uri, features), ...]) -> one (key, features) row for the cache.

    Byte-identical images under several URIs were all embedded, on whichever
    workers; one row is kept and the other URIs count as cached, as in the local
    path. Every URI goes to the "index" output as (uri, key, status).
    """

    def process(self, element: tuple[str, Iterable[tuple[str, np.ndarray]]]) -> Iterator:
        key, hits = element
        hits = sorted(hits, key=lambda h: h[0])  # deterministic: the first URI "embedded" it
        _count("images_embedded")
        _count("images_cached", len(hits) - 1)
        for i, (uri, _) in enumerate(hits):
            yield beam.pvalue.TaggedOutput("index", (uri, key, "cached" if i else "embedded"))
        yield key, hits[0][1]


def rows_to_table(rows: Sequence[tuple[str, np.ndarray]], dim: int) -> pa.Table:
    """[(key, (D,) float32)] -> a table the cache's own writer would write (one Parquet batch)."""
    vecs = np.stack([v for _, v in rows]).astype(np.float32, copy=False)  # (N, D)
    return shard_table([k for k, _ in rows], vecs, dim)


class FormatPrediction(beam.DoFn):
    """((key, uri), PredictionResult) -> one output line, as `petal predict --output` writes it."""

    def __init__(self, labels: list[str], top_k: int, kind: str, reject_unknown: bool = True) -> None:
        self.labels, self.top_k, self.kind, self.reject_unknown = labels, top_k, kind, reject_unknown

    def process(self, element: tuple[tuple[str, str], Any]) -> Iterator[str]:
        (_, uri), result = element  # result.inference: this image's Scores
        p = scored_prediction(self.labels, uri, result.inference, self.top_k, self.reject_unknown)
        _count("images_predicted")
        if self.kind == ".jsonl":
            yield json.dumps(p.to_dict())
        else:  # the row petal.predictions.write_predictions writes
            yield csv_line(csv_row(p))


def csv_line(cells: Sequence[str]) -> str:
    """One CSV row without its line end: WriteToText adds that."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


# Reading files through Beam's FileSystems (local, gs://, s3://, hdfs://): the
# workers read the launcher's list of known keys, the launcher reads back what
# the workers wrote.

def matching(pattern: str) -> list[str]:
    (match,) = FileSystems.match([pattern])
    return sorted(m.path for m in match.metadata_list)


def read_lines(pattern: str, header: bool = False) -> Iterator[str]:
    """The lines of every file matching `pattern` (local or remote), less each file's header."""
    for path in matching(pattern):
        with FileSystems.open(path) as f:
            lines = io.TextIOWrapper(f, encoding="utf-8", newline="")
            if header:
                next(lines, None)
            for raw in lines:
                if raw := raw.rstrip("\r\n"):
                    yield raw
