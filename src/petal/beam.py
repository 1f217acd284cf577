"""Embedding and batch prediction as Apache Beam pipelines (`--runner beam`).

The same steps as the local path, for when one machine is not enough: locally
on the DirectRunner, at scale on Dataflow, Flink or Spark. Nothing here
re-implements a step: images are read, hashed and decoded by
`petal.loader.iter_items` (so `petal.storage.read_bytes` and
`petal.images.load_pixels`), the ONNX graphs are the local ones, loaded by
`petal.runtime.make_session` inside Beam's RunInference ONNX handler.

    launcher                               workers
    --------                               -------
    export the backbone ONNX (torch)
    read the cache index -> known.txt
    uris -> uris.jsonl  (all in WORK)  ->  read, sha256, skip known, decode
                                           RunInference (ONNX, batches of 32)
                                           dedupe by content key
                                           -> WORK/embeddings/*.parquet, index, dead letter
    copy the shards into the cache,
    atomically, named shard_name("beam")

WORK is a fresh folder under `--work_dir`, else `--temp_location`, else a
local temp folder; it is deleted at the end. Workers write only there, so a
cluster runner needs it on storage every worker reaches (gs://, s3://,
hdfs://). The launcher then pulls the shards into its own cache, where a local
`petal embed`/`petal train` finds them. See docs/beam.md.

Apache Beam is an optional dependency (`pip install 'petal[beam]'`); only
this module imports it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from petal.backbones import BackboneConfig, get_backbone
from petal.bundle import Model, prediction
from petal.cache import EmbeddingCache, arrow_schema, shard_name
from petal.embed import EmbedResult
from petal.errors import NothingUsableError, PetalError
from petal.images import quiet_pillow_warnings
from petal.loader import iter_items
from petal.predict_io import CSV_HEADER, csv_row
from petal.runtime import make_session
from petal.storage import atomic_write_bytes, default_cache_dir, is_local, local_path

try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
except ImportError:  # the CLI prints this as a one-line error
    raise PetalError("--runner beam needs Apache Beam: pip install 'petal[beam]'") from None

if TYPE_CHECKING:
    import argparse

    import onnxruntime as ort
    import pyarrow as pa
    from apache_beam.runners.runner import PipelineResult

    from petal.data import Dataset

_LOG = logging.getLogger(__name__)
METRICS = "petal"  # namespace of the Beam counters below
DEAD_LETTER_HEADER = "uri,reason"
PREDICTION_HEADER = ",".join(CSV_HEADER)  # the columns of petal.predict_io's CSV
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner", "PrismRunner", "InteractiveRunner")


class PetalOptions(PipelineOptions):
    """petal's own pipeline options; every other --option is Beam's."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--beam_runner", default=None,
                            help="Beam's --runner (DataflowRunner, FlinkRunner, SparkRunner...): "
                                 "`petal ... --runner` is petal's own 'local'/'beam' switch.")
        parser.add_argument("--work_dir", default=None,
                            help="Where workers write before the launcher collects the results "
                                 "[default: --temp_location, else a local temp folder].")
        parser.add_argument("--dead_letter", default=None,
                            help="Prefix of the sharded CSV (uri,reason) of images that failed "
                                 "[embed: none, they are in the summary and --errors; "
                                 "predict: OUTPUT.dead-letter].")
        parser.add_argument("--inference_batch_size", type=int, default=32,
                            help="Most images per ONNX Runtime call.")
        parser.add_argument("--ort_threads", type=int, default=0,
                            help="ONNX Runtime threads per model copy (0: its default, all cores).")
        parser.add_argument("--decode_threads", type=int, default=0,
                            help="Read/decode threads per worker process (0: petal's default).")


# --------------------------------------------------------------------------- worker side

def _count(name: str, n: int = 1) -> None:
    beam.metrics.Metrics.counter(METRICS, name).inc(n)


class DecodeImages(beam.DoFn):
    """A batch of URIs -> ((content key, uri), (S, S, 3) uint8 pixels) per image to run.

    Side outputs: "cached" (uri, key) for keys in `known_uri`'s list, "failed"
    (uri, reason) for anything read_bytes/load_pixels refused. Decoding is
    petal.loader.iter_items on a thread pool: the exact local code path.
    """

    def __init__(self, cfg: BackboneConfig, known_uri: str | None, threads: int) -> None:
        self.cfg, self.known_uri, self.threads = cfg, known_uri, threads

    def setup(self) -> None:
        quiet_pillow_warnings()  # a Beam worker is petal's process
        self.known = frozenset(_read_lines(self.known_uri)) if self.known_uri else frozenset()

    def process(self, uris: Sequence[str]) -> Iterator:
        for item in iter_items(uris, self.cfg, skip=self.known.__contains__, workers=self.threads or None):
            if item.error is not None:
                _count("images_failed")
                yield beam.pvalue.TaggedOutput("failed", (item.uri, item.error))
            elif item.pixels is None:  # skipped: its key is in the cache already
                _count("images_cached")
                yield beam.pvalue.TaggedOutput("cached", (item.uri, item.key))
            else:
                yield (item.key, item.uri), item.pixels


def _run_output(session: ort.InferenceSession, batch: Sequence[np.ndarray],
                inference_args: dict[str, Any] | None = None, *, output: str) -> np.ndarray:
    """RunInference's inference_fn: B x (S, S, 3) uint8 -> (B, D) of the named output."""
    (out,) = session.run([output], {"images": np.stack(batch)})
    return out


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


def _to_table(rows: Sequence[tuple[str, np.ndarray]], dim: int) -> pa.Table:
    """[(key, (D,) float32)] -> a pyarrow Table with exactly the cache's shard schema."""
    import pyarrow as pa

    vecs = np.stack([v for _, v in rows]).astype(np.float32, copy=False)  # (N, D)
    return pa.Table.from_arrays(
        [pa.array([k for k, _ in rows], pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)],
        schema=arrow_schema(dim),
    )


class FormatPrediction(beam.DoFn):
    """((key, uri), PredictionResult) -> one output line, as `petal predict --output` writes it."""

    def __init__(self, labels: list[str], top_k: int, kind: str) -> None:
        self.labels, self.top_k, self.kind = labels, top_k, kind

    def process(self, element: tuple[tuple[str, str], Any]) -> Iterator[str]:
        (_, uri), result = element
        p = prediction(self.labels, uri, result.inference, self.top_k)  # (C,) probabilities -> top-k
        _count("images_predicted")
        if self.kind == ".jsonl":
            yield json.dumps(p.to_dict())
        else:  # the row petal.predict_io.write_predictions writes
            yield _csv_line(csv_row(p))


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


# --------------------------------------------------------------------------- pipeline pieces

def _read_images(p: beam.Pipeline, uris_file: str, cfg: BackboneConfig, known_file: str | None,
                 threads: int) -> beam.pvalue.DoOutputsTuple:
    """URIs file -> DecodeImages outputs (main, "cached", "failed")."""
    return (
        p
        | "ReadURIs" >> beam.io.ReadFromText(uris_file)
        | "ParseURIs" >> beam.Map(json.loads)
        | "Spread" >> beam.Reshuffle()  # a small file is one split: spread the work over workers
        | "DecodeBatches" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
        | "Decode" >> beam.ParDo(DecodeImages(cfg, known_file, threads)).with_outputs("cached", "failed",
                                                                                   main="pixels")
    )


def _write_dead_letter(failed: beam.PCollection, prefix: str, label: str = "DeadLetter") -> None:
    """(uri, reason) -> PREFIX-SSSSS-of-NNNNN.csv with a header in each shard."""
    _ = (failed
         | f"{label}CSV" >> beam.Map(_csv_line)
         | f"Write{label}" >> beam.io.WriteToText(prefix, ".csv", header=DEAD_LETTER_HEADER))


def _run(p: beam.Pipeline) -> PipelineResult:
    """Run to the end; a failed pipeline raises (bad images never fail it, bugs do)."""
    result = p.run()
    result.wait_until_finish()
    return result


# --------------------------------------------------------------------------- launcher side

def _fix_uri(uri: str) -> str:
    """Undo pathlib's 'gs://b/x' -> 'gs:/b/x' (the CLI types --output as a Path)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", r"\1://", uri)


def _options(pipeline_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(list(pipeline_args))
    if options.view_as(PetalOptions).beam_runner:
        options.view_as(StandardOptions).runner = options.view_as(PetalOptions).beam_runner
    return options


def _pipeline(options: PipelineOptions) -> beam.Pipeline:
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner"):
        # The DirectRunner first tries Prism, which downloads a binary at run time, and
        # falls back to the FnApiRunner. Use that batch engine directly: it needs no
        # network and honours --direct_num_workers / --direct_running_mode.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


class _WorkDir:
    """A fresh folder for one run, local or remote; deleted at the end."""

    def __init__(self, options: PipelineOptions) -> None:
        ours = options.view_as(PetalOptions).work_dir or options.view_as(GoogleCloudOptions).temp_location
        runner = options.view_as(StandardOptions).runner
        if not ours and runner not in LOCAL_RUNNERS:
            raise PetalError(f"--runner {runner} needs --work_dir or --temp_location on storage every "
                             "worker can reach (gs://, s3://, hdfs://)")
        run = f"petal-beam-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.uri = (FileSystems.join(_fix_uri(ours), run) if ours
                    else tempfile.mkdtemp(prefix=f"{run}-"))
        self.local = is_local(self.uri)

    def path(self, name: str) -> str:
        return FileSystems.join(self.uri, name)

    def write_lines(self, name: str, lines: Iterable[str]) -> str:
        uri = self.path(name)
        if self.local:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with FileSystems.create(uri) as f:
            for line in lines:
                f.write(line.encode("utf-8") + b"\n")
        return uri

    def stage(self, local_file: Path, name: str) -> str:
        """A URI of `local_file` the workers can read: itself, or an upload into WORK."""
        if self.local:
            return str(local_file)
        uri = self.path(name)
        with open(local_file, "rb") as src, FileSystems.create(uri) as out:
            shutil.copyfileobj(src, out)
        return uri

    def delete(self) -> None:
        try:
            if self.local:
                shutil.rmtree(self.uri, ignore_errors=True)
            else:
                FileSystems.delete([self.uri.rstrip("/") + "/"])
        except Exception as e:  # noqa: BLE001 - leftovers in a temp folder must not fail the run
            _LOG.warning("could not delete %s: %s", self.uri, e)


def _matching(pattern: str) -> list[str]:
    (match,) = FileSystems.match([pattern])
    return sorted(m.path for m in match.metadata_list)


def _read_lines(pattern: str, header: bool = False) -> Iterator[str]:
    """The lines of every file matching `pattern` (local or remote), less each file's header."""
    for path in _matching(pattern):
        with FileSystems.open(path) as f:
            lines = io.TextIOWrapper(f, encoding="utf-8", newline="")
            if header:
                next(lines, None)
            for raw in lines:
                if raw := raw.rstrip("\r\n"):
                    yield raw


def _read_dead_letter(prefix: str) -> list[tuple[str, str]]:
    return [(uri, reason) for uri, reason in csv.reader(_read_lines(f"{prefix}-*.csv", header=True))]


def _copy_into_cache(pattern: str, cache: EmbeddingCache) -> int:
    """Shards written by the workers -> the cache folder, each atomically (temp + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    copied = 0
    with cache.lock():  # as local writers do: concurrent runs never interleave shard writes
        for src in _matching(pattern):
            with FileSystems.open(src) as f:
                data = f.read()  # at most 512 rows: a few MB
            if pq.read_metadata(pa.BufferReader(data)).num_rows:  # Beam writes an empty one if nothing is new
                atomic_write_bytes(cache.dir / shard_name("beam"), data)
                copied += 1
    return copied


def _counters(result: PipelineResult) -> dict[str, int]:
    """This run's petal counters, or {} where the runner reports none."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        found = result.metrics().query(MetricsFilter().with_namespace(METRICS))["counters"]
    except Exception:  # noqa: BLE001 - some runners have no metrics API
        return {}
    return {c.key.metric.name: c.committed if c.committed is not None else c.attempted for c in found}


def _add_embed_steps(p: beam.Pipeline, work: _WorkDir, cfg: BackboneConfig, known_file: str | None, model_uri: str,
                     ours: PetalOptions) -> None:
    """URIs in WORK -> WORK/embeddings/part-*.parquet, WORK/index-*.jsonl, WORK/dead-letter-*.csv."""
    images = _read_images(p, work.path("uris.jsonl"), cfg, known_file, ours.decode_threads)
    handler = PetalOnnxHandler(model_uri, "features", ours.inference_batch_size, ours.ort_threads)
    kept = (
        images.pixels
        | "Embed" >> RunInference(KeyedModelHandler(handler))  # ((key, uri), PredictionResult)
        | "ByContentKey" >> beam.MapTuple(lambda k, r: (k[0], (k[1], r.inference)))  # r.inference: (D,)
        | "GroupCopies" >> beam.GroupByKey()
        | "KeepOne" >> beam.ParDo(KeepOnePerKey()).with_outputs("index", main="rows")
    )
    _ = (
        kept.rows
        | "ShardRows" >> beam.BatchElements(min_batch_size=64, max_batch_size=512)  # rows per shard
        | "ToArrow" >> beam.Map(_to_table, cfg.feature_dim)
        | "WriteShards" >> beam.io.WriteToParquetBatched(work.path("embeddings/part"),
                                                         schema=arrow_schema(cfg.feature_dim),
                                                         file_name_suffix=".parquet")
    )
    _ = (
        (images.cached | "MarkCached" >> beam.MapTuple(lambda uri, key: (uri, key, "cached")), kept.index)
        | "Index" >> beam.Flatten()
        | "IndexJSON" >> beam.Map(json.dumps)
        | "WriteIndex" >> beam.io.WriteToText(work.path("index"), ".jsonl")
    )
    _write_dead_letter(images.failed, work.path("dead-letter"))  # read back by _collect_embed
    if ours.dead_letter:  # and kept where the user asked
        _write_dead_letter(images.failed, _fix_uri(ours.dead_letter), "KeptDeadLetter")


def _collect_embed(work: _WorkDir, uris: list[str], cache: EmbeddingCache) -> EmbedResult:
    """The workers' output -> new shards in the cache, and the EmbedResult the local path returns."""
    _copy_into_cache(work.path("embeddings/part*.parquet"), cache)
    result = EmbedResult()
    found, status = {}, Counter()
    for line in _read_lines(work.path("index*.jsonl")):
        uri, key, what = json.loads(line)  # what: "embedded" or "cached"
        found[uri] = key
        status[what] += 1
    result.embedded, result.cached = status["embedded"], status["cached"]
    result.keys = {u: found[u] for u in uris if u in found}  # in input order, as locally
    order = {u: i for i, u in enumerate(uris)}
    result.failed = sorted(_read_dead_letter(work.path("dead-letter")), key=lambda f: order.get(f[0], -1))
    return result


def beam_embed(ds: Dataset, backbone: str, cache_dir: Path | None, pipeline_args: list[str]
               ) -> tuple[EmbedResult, EmbeddingCache]:
    """`petal embed --runner beam`: embed every image of `ds` not cached yet, on Beam.

    Returns what the local `petal.embed.embed` returns, with the same counts;
    the new shards are in the cache folder when it returns.
    """
    from petal.onnx_graphs import backbone_onnx_path

    start = time.perf_counter()
    cfg = get_backbone(backbone)
    cache_dir = Path(cache_dir or default_cache_dir())
    cache = EmbeddingCache(cache_dir, cfg.name, cfg.feature_dim)
    options = _options(pipeline_args)
    uris = [e.uri for e in ds.examples]
    known = cache.stored_keys()  # the key column only: the vectors can be GBs
    model_file = backbone_onnx_path(cfg, cache_dir)  # exported here: workers need no torch

    work = _WorkDir(options)
    try:
        work.write_lines("uris.jsonl", map(json.dumps, uris))
        known_file = work.write_lines("known.txt", known) if known else None
        model_uri = work.stage(model_file, "backbone.onnx")
        p = _pipeline(options)
        _add_embed_steps(p, work, cfg, known_file, model_uri, options.view_as(PetalOptions))
        _run(p)
        result = _collect_embed(work, uris, cache)
    finally:
        work.delete()
    result.seconds = time.perf_counter() - start
    if uris and not result.keys:  # as petal.workflow.embed_dataset
        raise NothingUsableError(f"none of the {len(uris)} images could be read; first error: "
                                 f"{result.failed[0][0]}: {result.failed[0][1]}")
    return result, cache


def _output_kind(prefix: str) -> tuple[str, str]:
    """'gs://b/preds.jsonl' -> ('gs://b/preds', '.jsonl'); no known suffix -> CSV."""
    for kind in (".csv", ".jsonl"):
        if prefix.lower().endswith(kind):
            return prefix[: -len(kind)], kind
    return prefix, ".csv"


def _add_predict_steps(p: beam.Pipeline, work: _WorkDir, model: Model, model_uri: str, top_k: int, prefix: str,
                       kind: str, dead_letter: str, ours: PetalOptions) -> None:
    """URIs in WORK -> PREFIX-SSSSS-of-NNNNN.csv|.jsonl, and the dead letter."""
    images = _read_images(p, work.path("uris.jsonl"), model.config, None, ours.decode_threads)
    handler = PetalOnnxHandler(model_uri, "probabilities", ours.inference_batch_size, ours.ort_threads)
    _ = (
        images.pixels
        | "Predict" >> RunInference(KeyedModelHandler(handler))  # ((key, uri), PredictionResult)
        | "Format" >> beam.ParDo(FormatPrediction(model.labels, top_k, kind))
        | "WritePredictions" >> beam.io.WriteToText(prefix, kind,
                                                    header=PREDICTION_HEADER if kind == ".csv" else None)
    )
    _write_dead_letter(images.failed, dead_letter)


def beam_predict(model_dir: Path, uris: list[str], output_prefix: str, pipeline_args: list[str],
                 top_k: int = 5) -> dict:
    """`petal predict --runner beam`: predictions into sharded PREFIX-SSSSS-of-NNNNN.csv|.jsonl.

    Rows are those `petal predict --output x.csv|x.jsonl` writes (each CSV shard
    has the header); unreadable images go to the dead-letter CSV instead.
    """
    start = time.perf_counter()
    model = Model(model_dir)  # checks the bundle; labels and preprocessing come from it
    options = _options(pipeline_args)
    ours = options.view_as(PetalOptions)
    prefix, kind = _output_kind(_fix_uri(output_prefix))
    dead_letter = _fix_uri(ours.dead_letter) if ours.dead_letter else f"{prefix}.dead-letter"
    if is_local(prefix):
        Path(local_path(prefix)).parent.mkdir(parents=True, exist_ok=True)

    work = _WorkDir(options)
    try:
        work.write_lines("uris.jsonl", map(json.dumps, uris))
        model_uri = work.stage(model.path / "model.onnx", "model.onnx")
        p = _pipeline(options)
        _add_predict_steps(p, work, model, model_uri, top_k, prefix, kind, dead_letter, ours)
        counts = _counters(_run(p))
    finally:
        work.delete()
    seconds = time.perf_counter() - start
    predicted = counts.get("images_predicted", 0)
    return {
        "predicted": predicted if counts else None,  # None: this runner reports no counters
        "failed": counts.get("images_failed", 0) if counts else None,
        "total": len(uris),
        "seconds": round(seconds, 3),
        "images_per_second": round(predicted / seconds, 1) if counts and seconds else None,
        "output": f"{prefix}-*-of-*{kind}",
        "dead_letter": f"{dead_letter}-*-of-*.csv",
    }
