"""`--runner beam`: the Beam pipelines give what the local path gives.

Runs on the DirectRunner (its FnApiRunner engine), in memory and in its
multi-process mode, over a tiny synthetic set with a duplicate and two bad files.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("apache_beam")

from petal.backbones import DEFAULT_BACKBONE, get_backbone  # noqa: E402
from petal.beam import beam_embed, beam_predict, run  # noqa: E402
from petal.beam.jobs import _fix_uri, _output_kind  # noqa: E402
from petal.bundle import load  # noqa: E402
from petal.cache import arrow_schema  # noqa: E402
from petal.data import load_dataset  # noqa: E402
from petal.embed import embed  # noqa: E402
from petal.errors import PetalError  # noqa: E402
from petal.onnx_graphs import backbone_onnx_path  # noqa: E402
from petal.predictions import write_predictions  # noqa: E402
from petal.synthetic import make_dataset  # noqa: E402

MULTI = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
CFG = get_backbone(DEFAULT_BACKBONE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes x 4 images, plus a byte-identical copy, a non-image and a truncated JPEG."""
    root = make_dataset(tmp_path_factory.mktemp("beamdata") / "shapes", per_class=4, seed=7, size=64)
    shutil.copy(root / "circles" / "circles_001.jpg", root / "squares" / "copy_of_circle.jpg")
    (root / "circles" / "not_an_image.jpg").write_bytes(b"hello")
    whole = (root / "squares" / "squares_001.jpg").read_bytes()
    (root / "triangles" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.fixture(scope="module")
def dataset_(images):
    return load_dataset(str(images), eval_percent=0.0, require_train=False)


def fresh_cache(path: Path, cache_dir: Path) -> Path:
    """An empty embedding cache that shares the session's exported backbone graph."""
    backbone_onnx_path(CFG, cache_dir)  # export once per session
    path.mkdir(parents=True)
    (path / "models").symlink_to(cache_dir / "models", target_is_directory=True)
    return path


@pytest.fixture(scope="module")
def local(dataset_, cache_dir, tmp_path_factory):
    """The local path's result and cache over the same images: the reference."""
    root = fresh_cache(tmp_path_factory.mktemp("local") / "cache", cache_dir)
    return embed([e.uri for e in dataset_.examples], CFG, root)


@pytest.mark.parametrize("args", [[], MULTI], ids=["in_memory", "multi_processing"])
def test_embed_matches_local(args, dataset_, local, cache_dir, tmp_path):
    local_result, local_cache = local
    root = fresh_cache(tmp_path / "cache", cache_dir)
    result, cache = beam_embed(dataset_, DEFAULT_BACKBONE, root, args)

    assert result.summary().keys() == local_result.summary().keys()
    assert (result.embedded, result.cached) == (local_result.embedded, local_result.cached) == (12, 1)
    assert result.failed == local_result.failed  # same reasons, in input order
    assert {Path(u).name for u, _ in result.failed} == {"not_an_image.jpg", "truncated.jpg"}
    assert result.keys == local_result.keys

    shards = cache.shards()
    assert shards and all("-beam-" in s.name for s in shards)
    assert not list(cache.dir.glob("*.tmp")) and not list(cache.dir.glob(".*"))
    for s in shards:
        assert pq.read_schema(s).equals(arrow_schema(CFG.feature_dim))
    keys = sorted(set(result.keys.values()))
    assert sum(pq.read_metadata(s).num_rows for s in shards) == len(keys)  # one row per image
    np.testing.assert_allclose(cache.get(keys), local_cache.get(keys), rtol=1e-4, atol=1e-5)

    # a local run over the same images finds every one in the cache
    again, _ = embed([e.uri for e in dataset_.examples], CFG, root)
    assert (again.embedded, again.cached) == (0, 13)

    if not args:  # and so does a Beam re-run, which writes nothing (once is enough: it is slow)
        rerun, _ = beam_embed(dataset_, DEFAULT_BACKBONE, root, args)
        assert (rerun.embedded, rerun.cached, rerun.failed) == (0, 13, result.failed)
        assert cache.shards() == shards


def read_csv_shards(pattern_dir: Path, glob: str) -> list[dict]:
    rows = []
    for f in sorted(pattern_dir.glob(glob)):
        with open(f, newline="", encoding="utf-8") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def test_cli_embed_json_and_dead_letter(images, cache_dir, tmp_path):
    """`petal embed --runner beam --json` prints the local summary's keys; bad images in the dead letter."""
    from typer.testing import CliRunner

    from petal.cli import app

    runner = CliRunner()
    summaries = {}
    for mode, extra in {"local": [], "beam": ["--runner", "beam", "--dead_letter",
                                                str(tmp_path / "dead" / "failed")]}.items():
        root = fresh_cache(tmp_path / mode, cache_dir)
        res = runner.invoke(app, ["embed", str(images), "--cache", str(root), "--json", *extra])
        assert res.exit_code == 0, res.output
        summaries[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert summaries["beam"].keys() == summaries["local"].keys()
    for k in ("embedded", "cached", "failed", "total", "skipped"):
        assert summaries["beam"][k] == summaries["local"][k]
    dead = read_csv_shards(tmp_path / "dead", "failed-*-of-*.csv")
    assert {Path(r["uri"]).name for r in dead} == {"not_an_image.jpg", "truncated.jpg"}
    assert all(r["reason"] for r in dead)


def predict_uris(images: Path) -> list[str]:
    return sorted(str(p) for p in images.rglob("*.*"))


@pytest.mark.parametrize("suffix,args", [(".csv", MULTI), (".jsonl", [])],
                         ids=["csv-multi_processing", "jsonl-in_memory"])
def test_predict_matches_local(suffix, args, model_dir, images, tmp_path):
    uris = predict_uris(images)
    local_file = tmp_path / f"local{suffix}"
    n, failed = write_predictions(local_file, load(model_dir).iter_predict(uris, top_k=3))

    summary = beam_predict(model_dir, uris, str(tmp_path / "beam" / f"preds{suffix}"), args, top_k=3)
    assert (summary["predicted"], summary["failed"], summary["total"]) == (n, len(failed), len(uris))

    if suffix == ".csv":
        def parse(rows):
            return {r["uri"]: (r["label"], float(r["score"]), {t["label"]: t["score"] for t in json.loads(r["top"])},
                               r["unknown"] == "true", float(r["ood_score"])) for r in rows}
        want = parse(read_csv_shards(tmp_path, local_file.name))
        got = parse(read_csv_shards(tmp_path / "beam", "preds-*-of-*.csv"))
    else:
        def parse(lines):
            return {d["uri"]: (d["label"], d["score"], {t["label"]: t["score"] for t in d["top"]}, d["unknown"],
                               d["ood_score"]) for d in map(json.loads, lines)}
        want = parse(local_file.read_text().splitlines())
        got = parse(line for f in sorted((tmp_path / "beam").glob("preds-*-of-*.jsonl"))
                    for line in f.read_text().splitlines())
    assert got.keys() == want.keys() and len(got) == n
    for uri, (label, score, top, unknown, ood) in want.items():
        assert got[uri][0] == label and got[uri][3] == unknown  # the unknown answer, as local
        assert got[uri][4] == pytest.approx(ood, abs=1e-4)
        assert got[uri][1] == pytest.approx(score, abs=1e-5)
        assert list(got[uri][2]) == list(top)  # same labels, same order
        assert list(got[uri][2].values()) == pytest.approx(list(top.values()), abs=1e-5)

    dead = read_csv_shards(tmp_path / "beam", "preds.dead-letter-*-of-*.csv")
    assert sorted((r["uri"], r["reason"]) for r in dead) == sorted(failed)


def test_predict_through_remote_style_work_dir(model_dir, images, tmp_path, monkeypatch):
    """The Dataflow code path: graph uploaded to --work_dir, fetched by the workers, WORK deleted.

    Beam's FileSystems API is the same for gs:// and local paths, so treating a
    local folder as remote runs every line the remote case runs.
    """
    from petal.beam import jobs, transforms

    for module in (jobs, transforms):  # the launcher's WORK and the workers' model download
        monkeypatch.setattr(module, "is_local", lambda uri: False)
    uris = predict_uris(images)
    summary = beam_predict(model_dir, uris, str(tmp_path / "out" / "preds"), ["--work_dir", str(tmp_path / "work")])
    assert (summary["predicted"], summary["failed"]) == (len(uris) - 2, 2)
    assert len(read_csv_shards(tmp_path / "out", "preds-*-of-*.csv")) == len(uris) - 2
    # this run's files are deleted (a local folder keeps its empty directories; object stores have none)
    assert not [f for f in (tmp_path / "work").rglob("*") if f.is_file()]


def test_run_entry_point_with_test_pipeline(model_dir, images, tmp_path):
    """`run(argv, test_pipeline)`, as in Beam's examples: the job runs on the pipeline it is given."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.test_pipeline import TestPipeline

    uris = predict_uris(images)
    summary = run(["predict", str(model_dir), *uris, "--output", str(tmp_path / "preds.jsonl"), "--top_k", "2"],
                  test_pipeline=TestPipeline(runner=FnApiRunner()))  # FnApiRunner: no Prism download
    assert (summary["predicted"], summary["failed"], summary["total"]) == (len(uris) - 2, 2, len(uris))
    lines = [json.loads(line) for f in tmp_path.glob("preds-*-of-*.jsonl") for line in f.read_text().splitlines()]
    assert len(lines) == len(uris) - 2 and all(len(d["top"]) == 2 for d in lines)


def test_cluster_runner_needs_shared_work_dir(model_dir, tmp_path):
    with pytest.raises(PetalError, match="--work_dir or --temp_location"):
        beam_predict(model_dir, ["gs://b/x.jpg"], str(tmp_path / "p"), ["--beam_runner", "FlinkRunner"])


def test_cluster_runner_refuses_local_inputs_at_launch(model_dir, tmp_path):
    args = ["--beam_runner", "FlinkRunner", "--work_dir", "gs://b/work"]
    with pytest.raises(PetalError, match=r"FlinkRunner: 1 of 2 input\(s\) are local paths \(e.g. /etc/passwd\)"):
        beam_predict(model_dir, ["gs://b/x.jpg", "/etc/passwd"], "gs://b/p", args)


def test_output_names():
    assert _fix_uri("gs:/bucket/preds") == "gs://bucket/preds"  # what pathlib leaves of gs://
    assert _fix_uri("s3://b/x") == "s3://b/x" and _fix_uri("/tmp/x") == "/tmp/x"
    assert _output_kind("gs://b/preds.jsonl") == ("gs://b/preds", ".jsonl")
    assert _output_kind("out/preds") == ("out/preds", ".csv")
