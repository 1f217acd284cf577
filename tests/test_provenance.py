"""The embedding cache knows where every feature came from: producers never mix, a disagreeing
second producer is a warning, `petal cache verify` recomputes and compares, and export checks
the cached features its head was trained on. Real Lite0 features of small synthetic images."""

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from petal import cache as cache_module
from petal.backbones import get_backbone
from petal.cache import PROVENANCE_KEY, shard_table
from petal.cache_check import cache_info, verify
from petal.embed import embed, feature_cache
from test_cli import petal

CFG = get_backbone("efficientnet_lite0")


@pytest.fixture()
def own_cache(tmp_path, cache_dir, dataset) -> Path:
    """A cache of its own (the exported backbone copied in), filled from `dataset`."""
    own = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", own / "models")
    embed(sorted(str(p) for p in dataset.rglob("*.*")), CFG, own)
    return own


def tamper(cache: Path, factor: float = 1.5) -> str:
    """Rewrite the first shard with its features scaled (same producer, wrong values): its name."""
    shard = sorted(feature_cache(CFG, cache).dir.glob("shard-*.parquet"))[0]
    table = pq.read_table(shard)
    vecs = np.asarray(table.column("embedding").to_pylist(), np.float32) * factor
    bad = shard_table(table.column("key").to_pylist(), vecs, CFG.feature_dim)
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), shard)
    return shard.name


def test_producers_never_mix_and_shards_carry_their_provenance(own_cache, monkeypatch):
    cache = feature_cache(CFG, own_cache)
    shard = next(cache.dir.glob("shard-*.parquet"))
    record = json.loads(pq.read_schema(shard).metadata[PROVENANCE_KEY])
    assert record == cache.producer and len(record["graph_sha256"]) == 64
    assert {"preprocess_version", "pillow", "libjpeg", "onnxruntime"} <= set(record)
    monkeypatch.setattr(cache_module, "PREPROCESS_VERSION", 99)  # another producer: another folder, empty
    other = feature_cache(CFG, own_cache)
    assert other.dir != cache.dir and other.load() == {}
    info = {Path(f["folder"]).name: f for f in cache_info(own_cache)}
    assert info[cache.dir.name]["rows"] == len(cache.index()) and info[cache.dir.name]["provenance"] == record


def test_a_key_written_again_with_another_value_is_a_warning(own_cache):
    cache = feature_cache(CFG, own_cache)
    key = next(iter(cache.index()))
    stored = cache.get([key])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cache.writer() as w:
            w.add([key], stored)  # the same value: silent
        assert not caught
        with cache.writer() as w:
            w.add([key], stored * 1.1)  # 10% apart: two producers disagree
    assert len(caught) == 1 and "1 of 1 features written again differ from the stored ones by up to 10" \
        in str(caught[0].message)
    np.testing.assert_array_equal(cache.get([key]), stored)  # the first value stays


def test_cache_verify_recomputes_and_names_the_shard(own_cache, dataset):
    clean = verify(str(dataset), CFG, own_cache, sample=None)
    assert clean["checked"] == 48 and clean["over_tolerance"] == 0 and clean["max_rel_diff"] < 1e-5
    name = tamper(own_cache)
    r = petal("cache", "verify", dataset, "--cache", own_cache, "--sample", "0", check=False)
    assert r.returncode == 2 and "cache verify:" in r.stderr and "differ from this machine's" in r.stderr
    assert f"{name}:" in r.stdout and "largest difference 3.33e-01" in r.stdout  # |v - 1.5 v| / |1.5 v|


def test_export_checks_the_cached_features_its_head_was_trained_on(tmp_path, own_cache, dataset):
    run = tmp_path / "run"
    petal("train", dataset, "--out", run, "--cache", own_cache, "--epochs", "2", "--hidden", "0",
          "--eval-percent", "25")
    parity = json.loads((run / "model" / "petal.json").read_text())["parity"]
    assert parity["cached_features_checked"] > 0 and parity["cached_features_max_rel_diff"] < 1e-5
    for shard in feature_cache(CFG, own_cache).dir.glob("shard-*.parquet"):  # every feature off by 50%
        table = pq.read_table(shard)
        vecs = np.asarray(table.column("embedding").to_pylist(), np.float32) * 1.5
        pq.write_table(shard_table(table.column("key").to_pylist(), vecs, CFG.feature_dim), shard)
    r = petal("export", run, "--cache", own_cache, check=False)
    assert r.returncode == 2 and "the cached features the head was trained on differ" in r.stderr


def test_cache_info_shows_models_and_the_hash_memo_and_how_to_free_space(tmp_path, cache_dir, dataset):
    """Issue 22 item 17: `petal cache info` showed only the embeddings."""
    from petal.cache_check import cache_parts

    own = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", own / "models")
    data = shutil.copytree(dataset, tmp_path / "data")
    for image in data.rglob("*.*"):  # an hour old: the memo keeps no hash of a file written just now
        os.utime(image, (image.stat().st_atime - 3600, image.stat().st_mtime - 3600))
    petal("embed", data, "--cache", own)
    parts = cache_parts(own)
    assert [Path(p["folder"]).name for p in parts] == ["embeddings", "hashes", "models"]
    assert all(p["bytes"] > 0 and p["files"] >= 1 for p in parts)
    text = " ".join(petal("cache", "info", "--cache", own).stdout.split())
    models = sum(1 for f in (own / "models").rglob("*") if f.is_file())  # the session's graphs, however many
    assert f"{own / 'models'}: {models:,} files" in text and f"{own / 'hashes'}:" in text and "hash memo" in text
    assert f"in {own}; to free space, delete it" in text
