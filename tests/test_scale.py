"""At scale: the cache loads only a run's rows, warm runs read no image bytes, the head
trains on float16 features, and evaluation stays readable at many classes. Small data
only; the million-image figures come from benchmarks/scale.py."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from petal import backbones, tiny
from petal.cache import EmbeddingCache
from petal.embed import embed, feature_cache
from petal.hashmemo import HashMemo
from petal.progress import Reporter


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch) -> Path:
    """A cache with the test-only tiny backbone's graph; the backbone registered for this test only."""
    monkeypatch.setitem(backbones.REGISTRY, tiny.TINY.name, tiny.TINY)
    tiny.register(tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def images(tmp_path) -> list[str]:
    """24 tiny BMPs in 3 classes, last modified a minute ago (past hashmemo.RACY_SECONDS)."""
    root = tmp_path / "data"
    tiny.make_images(root, classes=3, first=0, count=24, per_class=8)
    uris = sorted(str(p) for p in root.rglob("*.bmp"))
    for u in uris:
        os.utime(u, (time.time() - 60, time.time() - 60))
    return uris


def test_get_reads_only_the_shards_holding_wanted_keys(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path, "b", 4)
    vecs = np.arange(24, dtype=np.float32).reshape(6, 4)
    for rows in ([0, 1], [2, 3], [4, 5]):  # three shards, as three datasets would leave
        with cache.writer() as w:
            w.add([f"k{i}" for i in rows], vecs[rows])
    fresh = EmbeddingCache(tmp_path, "b", 4)
    read = []
    real = fresh._vectors
    monkeypatch.setattr(fresh, "_vectors", lambda name: read.append(name) or real(name))
    X = fresh.get(["k5", "k0", "k4"], np.float16)
    assert X.dtype == np.float16 and X.flags.c_contiguous
    np.testing.assert_array_equal(X, vecs[[5, 0, 4]].astype(np.float16))
    shards = [p.name for p in fresh.shards()]
    assert sorted(read) == [shards[0], shards[2]]  # the middle shard's vectors were never read


def test_get_names_a_missing_key(tmp_path):
    from petal.errors import CacheError

    with pytest.raises(CacheError, match="no embedding for key 'nope'"):
        EmbeddingCache(tmp_path, "b", 4).get(["nope"])


def test_warm_run_reads_no_image_bytes(tiny_cache, images, monkeypatch):
    first, _ = embed(images, tiny.TINY, tiny_cache, source="data")
    assert (first.embedded, first.read) == (24, 24)

    import petal.loader

    def no_reading(uri, *a, **kw):
        raise AssertionError(f"{uri} was read")

    with monkeypatch.context() as m:
        m.setattr(petal.loader, "read_bytes", no_reading)
        warm, cache = embed(images, tiny.TINY, tiny_cache, source="data")
    assert (warm.cached, warm.read, warm.failed) == (24, 0, [])
    assert warm.keys == first.keys
    np.testing.assert_array_equal(cache.get(list(warm.keys.values())),
                                  feature_cache(tiny.TINY, tiny_cache).get(list(first.keys.values())))

    # a changed file (new bytes, new mtime) is read and embedded again; the others are not
    changed = images[3]
    Path(changed).write_bytes(Path(images[20]).read_bytes())  # a copy of another image
    os.utime(changed, (time.time() - 30, time.time() - 30))
    again, _ = embed(images, tiny.TINY, tiny_cache, source="data")
    assert again.read == 1 and again.keys[changed] == first.keys[images[20]]
    assert embed(images, tiny.TINY, tiny_cache, source="data", rehash=True)[0].read == 24


def test_memo_skips_files_modified_just_now(tiny_cache, images):
    os.utime(images[0])  # now: a second write in the same mtime tick would go unseen
    embed(images, tiny.TINY, tiny_cache, source="data")
    assert embed(images, tiny.TINY, tiny_cache, source="data")[0].read == 1


def test_concurrent_memo_saves_merge(tmp_path):
    a, b = HashMemo.open(tmp_path, "src"), HashMemo.open(tmp_path, "src")
    old = time.time_ns() - 10**11
    a.remember("/x/a.png", (1, old, 11, old), "a" * 64)
    b.remember("/x/b.png", (2, old, 12, old), "b" * 64)
    a.save()
    b.save()  # saw a's file change since it loaded: keeps a's entry
    memo = HashMemo.open(tmp_path, "src")
    assert memo.lookup("/x/a.png", (1, old, 11, old)) == "a" * 64
    assert memo.lookup("/x/b.png", (2, old, 12, old)) == "b" * 64
    assert memo.lookup("/x/b.png", (2, old + 1, 12, old)) is None  # touched since: hashed again


def test_damaged_memo_costs_a_rehash_not_the_run(tmp_path):
    memo = HashMemo.open(tmp_path, "src")
    memo.path.parent.mkdir(parents=True)
    memo.path.write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="unreadable"):
        again = HashMemo.open(tmp_path, "src")
    assert again.lookup("/x/a.png", (1, 2, 3, 4)) is None


class Recorder(Reporter):
    def __init__(self) -> None:
        self.tasks: dict[str, list[int]] = {}

    @contextmanager
    def progress(self, description: str, total: int):
        done = self.tasks.setdefault(description.split()[0], [total, 0])
        yield lambda n: done.__setitem__(1, done[1] + n)


def test_listing_shows_progress_per_class_folder(tmp_path):
    from petal.data import load_dataset

    tiny.make_images(tmp_path / "d", classes=4, first=0, count=8, per_class=2)
    rec = Recorder()
    ds = load_dataset(tmp_path / "d", eval_percent=25, require_train=False, reporter=rec)
    assert len(ds.examples) == 8 and rec.tasks["listing"] == [4, 4]


def test_head_trains_on_float16_features_batch_by_batch():
    from petal.head import HeadClassifier

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    X = (rng.normal(size=(4, 32))[y] * 3 + rng.normal(size=(400, 32))).astype(np.float32)
    steps = []
    h16 = HeadClassifier(hidden=0, epochs=10, batch_size=64, seed=0).fit(X.astype(np.float16), y, on_batch=steps.append)
    h32 = HeadClassifier(hidden=0, epochs=10, batch_size=64, seed=0).fit(X.astype(np.float16).astype(np.float32), y)
    assert sum(steps) == 10 * 400 and max(steps) == 64
    np.testing.assert_allclose(h16.decision_function(X.astype(np.float16)),
                               h32.decision_function(X.astype(np.float16).astype(np.float32)), atol=1e-5)
    assert (h16.predict(X) == y).mean() > 0.9
    assert all("seconds" in logs for logs in h16.history_)


def test_metrics_readable_at_many_classes(tmp_path):
    from petal.metrics import INLINE_CLASSES, PLOT_CLASSES, compute_metrics, write_report

    c = INLINE_CLASSES + 20
    classes = [f"c{i:03d}" for i in range(c)]
    y = np.repeat(np.arange(c), 4)
    pred = y.copy()
    pred[y == 7] = 9  # class 7 always taken for 9: the most confused pair, the worst class
    pred[(y == 3) & (np.arange(len(y)) % 4 == 0)] = 5
    probs = np.full((len(y), c), 0.1 / c)
    probs[np.arange(len(y)), pred] = 0.9
    probs[np.arange(len(y)), y] += 0.05  # the true class second: top-5 always right
    m = compute_metrics(y, probs, classes)
    assert "confusion_matrix" not in m  # too big for metrics.json: in confusion_matrix.csv
    assert m["precision_at_1"] == m["accuracy"] == pytest.approx(1 - 5 / len(y))
    assert m["recall_at_5"] == m["top5_accuracy"] == 1.0
    assert list(m["per_class"])[0] == "c007"  # worst first
    assert m["most_confused"][:2] == [{"true": "c007", "predicted": "c009", "count": 4},
                                      {"true": "c003", "predicted": "c005", "count": 1}]
    write_report(tmp_path, m, classes, [f"u{i}" for i in range(len(y))], y, probs)
    rows = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == c + 1 and rows[8].split(",")[10] == "4"  # row c007, column c009
    assert json.loads((tmp_path / "metrics.json").read_text())["num_eval"] == len(y)
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0 and PLOT_CLASSES < c


def test_audit_of_many_images_runs_on_a_sample():
    from petal.audit import audit

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    X = (rng.normal(size=(3, 16))[y] * 4 + rng.normal(size=(120, 16))).astype(np.float32)
    labels = [f"c{i}" for i in y]
    a = audit(X, labels, ["c0", "c1", "c2"], [f"u{i}" for i in range(120)], ["train"] * 120,
              [f"k{i}" for i in range(120)], cap=60)
    assert a.sampled == 60 and a.counts == {"c0": 40, "c1": 40, "c2": 40}
    assert "sample of 60 images" in a.line()


def test_head_trains_with_bfloat16_products_on_large_data_only():
    from petal.head import PARALLEL_ROWS, HeadClassifier

    head = HeadClassifier()
    assert (head.compute_dtype(PARALLEL_ROWS - 1), head.compute_dtype(PARALLEL_ROWS)) == ("float32", "bfloat16")
    assert HeadClassifier(compute="float32").compute_dtype(10**6) == "float32"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    X = (rng.normal(size=(4, 32))[y] * 3 + rng.normal(size=(400, 32))).astype(np.float32)
    bf16 = HeadClassifier(hidden=16, epochs=10, batch_size=64, compute="bfloat16", seed=0).fit(X, y)
    assert (bf16.predict(X) == y).mean() > 0.9 and bf16.decision_function(X).dtype == np.float32


def test_default_epochs_shrink_for_large_data_only():
    from petal.head import HeadClassifier, auto_epochs

    assert [auto_epochs(n) for n in (10, 3_289, 160_000, 500_000, 1_000_000, 10_000_000)] == [15, 15, 15, 5, 2, 2]
    assert HeadClassifier().for_data(1_000_000).epochs == 2
    assert HeadClassifier(epochs=7).for_data(1_000_000).epochs == 7  # given: kept


def test_memo_sees_a_file_replaced_with_its_timestamps_kept(tmp_path):
    """`cp --preserve=timestamps` over a file keeps its size, mtime and inode: only ctime tells."""
    from petal.hashmemo import file_stat

    path = tmp_path / "a.png"
    path.write_bytes(b"A" * 100)
    old = time.time() - 60
    os.utime(path, (old, old))
    memo = HashMemo.open(tmp_path, "src")
    memo.remember(str(path), file_stat(str(path)), "a" * 64)
    memo.save()
    assert HashMemo.open(tmp_path, "src").lookup(str(path), file_stat(str(path))) == "a" * 64
    time.sleep(0.05)  # past the kernel's timestamp tick
    with open(path, "r+b") as f:  # new bytes, same size, same inode ...
        f.write(b"B" * 100)
    os.utime(path, (old, old))  # ... and the old times, as cp --preserve=timestamps leaves them
    assert HashMemo.open(tmp_path, "src").lookup(str(path), file_stat(str(path))) is None


def test_memo_saves_with_a_file_name_that_is_not_utf8(tmp_path):
    memo = HashMemo.open(tmp_path, "src")
    old = time.time_ns() - 10**11
    memo.remember("/x/caf\udce9.png", (1, old, 11, old), "a" * 64)  # os.fsdecode of b"caf\xe9.png"
    memo.remember("/x/b.png", (2, old, 12, old), "b" * 64)
    memo.save()
    again = HashMemo.open(tmp_path, "src")
    assert again.lookup("/x/b.png", (2, old, 12, old)) == "b" * 64
    assert again.lookup("/x/caf\udce9.png", (1, old, 11, old)) is None  # hashed again each run
