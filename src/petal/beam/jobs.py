"""The launcher side of petal's Beam pipelines: `beam_embed`, `beam_predict`, `run`.

The same steps as the local path, for when one machine is not enough: locally
on the DirectRunner, at scale on Dataflow, Flink or Spark. This module parses
the options, prepares a work folder, assembles the pipeline from the DoFns of
`petal.beam.transforms` (the worker side), runs it and collects the results;
the new embeddings reach the cache through the cache's own `ShardWriter`.

    launcher                               workers
    --------                               -------
    export the backbone ONNX (torch)
    read the cache index -> known.txt
    uris -> uris.jsonl  (all in WORK)  ->  read, sha256, skip known, decode
                                           RunInference (ONNX, batches of 32)
                                           dedupe by content key
                                           -> WORK/embeddings/*.parquet, index, dead letter
    add the new rows to the cache with
    its ShardWriter, tag "beam"

WORK is a fresh folder under `--work_dir`, else `--temp_location`, else a
local temp folder; it is deleted at the end. Workers write only there, so a
cluster runner needs it on storage every worker reaches (gs://, s3://,
hdfs://). The launcher then pulls the shards into its own cache, where a local
`petal embed`/`petal train` finds them. See docs/beam.md.

As in Beam's examples, `run(argv)` is the entry point of both jobs
(`python -m petal.beam.jobs embed DATA ...` or `... predict MODEL INPUT...
--output PREFIX`), and a test can hand it a TestPipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from petal.backbones import DEFAULT_BACKBONE, BackboneConfig, get_backbone
from petal.beam.transforms import (
    METRICS,
    DecodeImages,
    FormatPrediction,
    KeepOnePerKey,
    PetalOnnxHandler,
    csv_line,
    matching,
    read_lines,
    rows_to_table,
)
from petal.bundle import Model
from petal.cache import EmbeddingCache, arrow_schema, table_rows
from petal.embed import EmbedResult, feature_cache, require_usable
from petal.errors import PetalError
from petal.predictions import CSV_HEADER
from petal.preprocess import Preprocess
from petal.storage import cache_folder, is_local, local_path

if TYPE_CHECKING:
    from apache_beam.runners.runner import PipelineResult

    from petal.data import Dataset

_LOG = logging.getLogger(__name__)
DEAD_LETTER_HEADER = "uri,reason"
PREDICTION_HEADER = ",".join(CSV_HEADER)  # the columns of petal.predictions' CSV
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


# --------------------------------------------------------------------------- pipeline pieces
# (built here on the launcher; the DoFns they wrap run on the workers)

def _read_images(p: beam.Pipeline, uris_file: str, pre: Preprocess, known_file: str | None,
                 threads: int) -> beam.pvalue.DoOutputsTuple:
    """URIs file -> DecodeImages outputs (main, "cached", "failed")."""
    return (
        p
        | "ReadURIs" >> beam.io.ReadFromText(uris_file)
        | "ParseURIs" >> beam.Map(json.loads)
        | "Spread" >> beam.Reshuffle()  # a small file is one split: spread the work over workers
        | "DecodeBatches" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
        | "Decode" >> beam.ParDo(DecodeImages(pre, known_file, threads)).with_outputs("cached", "failed",
                                                                                   main="pixels")
    )


def _write_dead_letter(failed: beam.PCollection, prefix: str, label: str = "DeadLetter") -> None:
    """(uri, reason) -> PREFIX-SSSSS-of-NNNNN.csv with a header in each shard."""
    _ = (failed
         | f"{label}CSV" >> beam.Map(csv_line)
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


def check_worker_inputs(options: PipelineOptions, uris: list[str]) -> None:
    """On a cluster runner, refuse local paths at launch: its workers cannot read this machine's
    disk, and must not read their own (a CSV naming /etc/... would run with the workers' rights)."""
    runner = options.view_as(StandardOptions).runner
    local = [u for u in uris if is_local(u)]
    if runner not in LOCAL_RUNNERS and local:
        raise PetalError(f"--beam_runner {runner}: {len(local)} of {len(uris)} input(s) are local paths "
                         f"(e.g. {local[0]}), which its workers cannot read; put the images on storage the "
                         "workers reach (gs://, s3://, hdfs://), or run on the DirectRunner")


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


def _read_dead_letter(prefix: str) -> list[tuple[str, str]]:
    return [(uri, reason) for uri, reason in csv.reader(read_lines(f"{prefix}-*.csv", header=True))]


def _copy_into_cache(pattern: str, cache: EmbeddingCache) -> int:
    """Shards written by the workers -> rows added to the cache; returns how many were read.

    Written by the cache's own ShardWriter, as the local path writes them:
    under the cache's lock, less any key another run stored meanwhile, each
    shard whole and renamed into place, named shard_name("beam").
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    with cache.writer(tag="beam") as writer:
        for src in matching(pattern):
            with FileSystems.open(src) as f:
                table = pq.read_table(pa.BufferReader(f.read()))
            if table.num_rows:  # Beam writes an empty file if nothing is new
                writer.add(*table_rows(table, cache.feature_dim))
                rows += table.num_rows
    return rows


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
    images = _read_images(p, work.path("uris.jsonl"), cfg.preprocess, known_file, ours.decode_threads)
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
        | "ToArrow" >> beam.Map(rows_to_table, cfg.feature_dim)
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
    for line in read_lines(work.path("index*.jsonl")):
        uri, key, what = json.loads(line)  # what: "embedded" or "cached"
        found[uri] = key
        status[what] += 1
    result.embedded, result.cached = status["embedded"], status["cached"]
    result.keys = {u: found[u] for u in uris if u in found}  # in input order, as locally
    order = {u: i for i, u in enumerate(uris)}
    result.failed = sorted(_read_dead_letter(work.path("dead-letter")), key=lambda f: order.get(f[0], -1))
    return result


def beam_embed(ds: Dataset, backbone: str, cache_dir: Path | None, pipeline_args: list[str], *,
               pipeline: beam.Pipeline | None = None) -> tuple[EmbedResult, EmbeddingCache]:
    """`petal embed --runner beam`: embed every image of `ds` not cached yet, on Beam.

    Returns what the local `petal.embed.embed` returns, with the same counts;
    the new shards are in the cache folder when it returns. `pipeline` (e.g. a
    TestPipeline) replaces the one built from `pipeline_args`.
    """
    from petal.onnx_graphs import backbone_onnx_path

    start = time.perf_counter()
    cfg = get_backbone(backbone)
    cache_dir = cache_folder(cache_dir)
    cache = feature_cache(cfg, cache_dir)  # the launcher's producer; see docs/beam.md on the workers
    options = _options(pipeline_args)
    uris = [e.uri for e in ds.examples]
    check_worker_inputs(options, uris)
    known = cache.stored_keys()  # the key column only: the vectors can be GBs
    model_file = backbone_onnx_path(cfg, cache_dir)  # exported here: workers need no torch

    work = _WorkDir(options)
    try:
        work.write_lines("uris.jsonl", map(json.dumps, uris))
        known_file = work.write_lines("known.txt", known) if known else None
        model_uri = work.stage(model_file, "backbone.onnx")
        p = pipeline if pipeline is not None else _pipeline(options)
        _add_embed_steps(p, work, cfg, known_file, model_uri, options.view_as(PetalOptions))
        _run(p)
        result = _collect_embed(work, uris, cache)
    finally:
        work.delete()
    result.seconds = time.perf_counter() - start
    require_usable(result, len(uris))  # as petal.workflow.embed_dataset
    return result, cache


def _output_kind(prefix: str) -> tuple[str, str]:
    """'gs://b/preds.jsonl' -> ('gs://b/preds', '.jsonl'); no known suffix -> CSV."""
    for kind in (".csv", ".jsonl"):
        if prefix.lower().endswith(kind):
            return prefix[: -len(kind)], kind
    return prefix, ".csv"


def _add_predict_steps(p: beam.Pipeline, work: _WorkDir, model: Model, *, model_uri: str, top_k: int, prefix: str,
                       kind: str, dead_letter: str, ours: PetalOptions) -> None:
    """URIs in WORK -> PREFIX-SSSSS-of-NNNNN.csv|.jsonl, and the dead letter."""
    images = _read_images(p, work.path("uris.jsonl"), model.preprocess, None, ours.decode_threads)
    handler = PetalOnnxHandler(model_uri, "scores", ours.inference_batch_size, ours.ort_threads)
    _ = (
        images.pixels
        | "Predict" >> RunInference(KeyedModelHandler(handler))  # ((key, uri), PredictionResult)
        | "Format" >> beam.ParDo(FormatPrediction(model.labels, top_k, kind, model.reject_unknown))
        | "WritePredictions" >> beam.io.WriteToText(prefix, kind,
                                                    header=PREDICTION_HEADER if kind == ".csv" else None)
    )
    _write_dead_letter(images.failed, dead_letter)


def beam_predict(model_dir: Path, uris: list[str], output_prefix: str, pipeline_args: list[str],
                 top_k: int = 5, *, reject_unknown: bool = True, pipeline: beam.Pipeline | None = None) -> dict:
    """`petal predict --runner beam`: predictions into sharded PREFIX-SSSSS-of-NNNNN.csv|.jsonl.

    Rows are those `petal predict --output x.csv|x.jsonl` writes (each CSV shard
    has the header); unreadable images go to the dead-letter CSV instead.
    `pipeline` (e.g. a TestPipeline) replaces the one built from `pipeline_args`.
    """
    start = time.perf_counter()
    model = Model(model_dir, reject_unknown=reject_unknown)  # checks the bundle; labels, preprocessing
    options = _options(pipeline_args)
    check_worker_inputs(options, uris)
    ours = options.view_as(PetalOptions)
    prefix, kind = _output_kind(_fix_uri(output_prefix))
    dead_letter = _fix_uri(ours.dead_letter) if ours.dead_letter else f"{prefix}.dead-letter"
    if is_local(prefix):
        Path(local_path(prefix)).parent.mkdir(parents=True, exist_ok=True)

    work = _WorkDir(options)
    try:
        work.write_lines("uris.jsonl", map(json.dumps, uris))
        model_uri = work.stage(model.path / "model.onnx", "model.onnx")
        p = pipeline if pipeline is not None else _pipeline(options)
        _add_predict_steps(p, work, model, model_uri=model_uri, top_k=top_k, prefix=prefix, kind=kind,
                           dead_letter=dead_letter, ours=ours)
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


# --------------------------------------------------------------------------- entry point, as in Beam's examples

def _job_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """argv -> (the job and its arguments, everything else: Beam's and petal's pipeline options)."""
    # allow_abbrev=False: an unknown --option is Beam's, never an abbreviation of ours
    parser = argparse.ArgumentParser(prog="python -m petal.beam.jobs", allow_abbrev=False,
                                     description="petal's Beam jobs; options after the job's own go to Beam.")
    jobs = parser.add_subparsers(dest="job", required=True)
    embed = jobs.add_parser("embed", allow_abbrev=False, help="Embed the images of DATA not cached yet.")
    embed.add_argument("data", help="Folder of class folders, or CSV of uri,label rows.")
    embed.add_argument("--labels", default=None, help="dict.txt for a CSV.")
    embed.add_argument("--backbone", default=DEFAULT_BACKBONE)
    embed.add_argument("--cache", type=Path, default=None,
                       help="Embedding cache [default: $PETAL_CACHE_DIR, else the user cache folder].")
    predict = jobs.add_parser("predict", allow_abbrev=False, help="Batch prediction into sharded files.")
    predict.add_argument("model", type=Path, help="Exported model folder (RUN/model).")
    predict.add_argument("inputs", nargs="+", help="Image files, folders, CSVs or globs.")
    predict.add_argument("--output", required=True, help="Sharded output prefix; ends in .jsonl for JSON lines.")
    predict.add_argument("--top_k", "--top-k", type=int, default=5)
    return parser.parse_known_args(argv)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """`embed DATA [options]` or `predict MODEL INPUT... --output PREFIX [options]`, on Beam.

    Returns the job's summary: `EmbedResult.summary()`, or beam_predict's.
    `test_pipeline` (a TestPipeline) runs the job instead of a pipeline built
    from argv; petal's options (--work_dir, ...) still come from argv.
    """
    from petal.data import expand_inputs, load_dataset

    args, pipeline_args = _job_args(argv)
    if args.job == "embed":
        ds = load_dataset(args.data, labels_file=args.labels, eval_percent=0.0, require_train=False)
        result, _ = beam_embed(ds, args.backbone, args.cache, pipeline_args, pipeline=test_pipeline)
        return result.summary()
    uris, problems = expand_inputs(args.inputs)
    for problem in problems:
        _LOG.warning("%s", problem)
    if not uris:
        raise PetalError("predict: no input images")
    return beam_predict(args.model, uris, args.output, pipeline_args, top_k=args.top_k, pipeline=test_pipeline)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)  # as Beam's examples: show the runner's progress
    print(json.dumps(run()))
