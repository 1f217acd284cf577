"""Crash safety: kill -9 `petal embed` at random moments and resume; two runs sharing
one cache; atomic file and folder writes; every file `petal train` writes is atomic.

The values check is exact (np.array_equal): ONNX Runtime on CPU gives the same
features for an image whatever batch it is in, so a resumed run must reproduce an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from petal.backbones import get_backbone
from petal.cache import arrow_schema
from petal.embed import embed, feature_cache
from petal.storage import atomic_dir, atomic_path

CFG = get_backbone("efficientnet_lite0")
N_IMAGES = 192  # 48 shards: ten kills of a few shards each cannot finish the run
KILLS = 10
# one shard per backbone batch of 4: many small shards, so kills land between them
SMALL_SHARDS = {"PETAL_SHARD_ROWS": "4", "PETAL_EMBED_BATCH": "4"}


def shard_dir(cache: Path) -> Path:
    return feature_cache(CFG, cache).dir


def private_cache(tmp_path: Path, cache_dir: Path, name: str) -> Path:
    own = tmp_path / name
    shutil.copytree(cache_dir / "models", own / "models")  # the exported backbone, not re-exported
    return own


def read_rows(cache: Path) -> list[tuple[str, np.ndarray]]:
    """Every (key, embedding) row of every shard. Fails if any shard is unreadable."""
    d = shard_dir(cache)
    assert not list(d.glob("*.corrupt")), "a shard was found unreadable and set aside"
    rows = []
    for shard in sorted(d.glob("shard-*.parquet")):
        table = pq.read_table(shard)
        assert table.schema == arrow_schema(CFG.feature_dim), shard
        vecs = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        rows += zip(table.column("key").to_pylist(), vecs)
    return rows


def check_cache(cache: Path, reference: dict[str, np.ndarray]) -> set[str]:
    """The cache is valid: readable shards, each key once, values equal to the reference."""
    rows = read_rows(cache)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicate row(s) across shards"
    for k, v in rows:
        assert k in reference, f"unknown key {k}"
        assert np.array_equal(v, reference[k]), f"embedding of {k} differs from the uninterrupted run"
    # whatever temp files a kill left behind are hidden from readers
    names = {p.name for p in shard_dir(cache).iterdir()} if shard_dir(cache).exists() else set()
    assert all(re.fullmatch(r"shard-.*\.parquet|\.shard-.*\.tmp", n) for n in names), names
    return set(keys)


def petal_embed(data: Path, cache: Path) -> tuple[list[str], dict]:
    """The `petal embed` command line and environment, with small shards."""
    env = {**os.environ, **SMALL_SHARDS, "PETAL_CACHE_DIR": str(cache)}
    return [sys.executable, "-m", "petal.cli", "embed", str(data), "--cache", str(cache), "--json"], env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """N_IMAGES distinct small PNGs in two class folders."""
    root = tmp_path_factory.mktemp("killdata") / "data"
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        d = root / ("left" if i % 2 else "right")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def reference(corpus, cache_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    """key -> embedding from one uninterrupted in-process run into a separate cache."""
    own = private_cache(tmp_path_factory.mktemp("ref"), cache_dir, "cache")
    uris = sorted(str(p) for p in corpus.rglob("*.png"))
    result, cache = embed(uris, CFG, own, batch_size=32)
    assert result.embedded == N_IMAGES and not result.failed
    keys = list(cache.load())
    return dict(zip(keys, cache.get(keys)))


def wait_for_a_random_moment(p: subprocess.Popen, d: Path, rng: random.Random) -> int:
    """Block until a random moment of a `petal embed` run: during start-up or the first
    batch (0), or just after its first or second new shard (1, 2), and return which.

    The moments are tied to shards appearing, not to wall-clock time, so a faster
    machine cannot finish the run before the kill lands.
    """
    before = len(list(d.glob("shard-*.parquet")))
    want = rng.choice([0, 1, 2])

    def new_shards() -> int:
        return len(list(d.glob("shard-*.parquet"))) - before

    t0 = time.monotonic()
    deadline = t0 + (rng.uniform(0.2, 1.5) if want == 0 else 60)
    while new_shards() < max(want, 1) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if want:
        time.sleep(rng.uniform(0.0, 0.03))  # somewhere in the next batch, or mid-write
    return want


def test_kill_9_ten_times_then_resume(tmp_path, corpus, cache_dir, reference):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    cache = private_cache(tmp_path, cache_dir, "cache")
    d = shard_dir(cache)
    log = []  # (shards wanted before the kill, shards after, keys after, temp files left)
    for _ in range(KILLS):
        cmd, env = petal_embed(corpus, cache)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        want = wait_for_a_random_moment(p, d, rng)
        assert p.poll() is None, f"seed {seed}: the run finished before it could be killed; log {log}"
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
        keys = check_cache(cache, reference)  # valid after every single kill
        log.append((want, len(list(d.glob("shard-*.parquet"))), len(keys), len(list(d.glob(".shard-*.tmp")))))

    kept = len(check_cache(cache, reference))
    assert 0 < kept < N_IMAGES, f"seed {seed}: kills should land mid-run; log {log}"
    cmd, env = petal_embed(corpus, cache)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["cached"], summary["embedded"], summary["failed"]) == (kept, N_IMAGES - kept, 0)
    keys = check_cache(cache, reference)
    assert keys == set(reference)  # every image, exactly once (check_cache), identical values
    print(f"\nkill-and-resume (seed {seed}): {KILLS} kills, (wanted, shards, keys, temps) per kill: {log}; "
          f"kept {kept}/{N_IMAGES} before the final run")


def test_two_runs_sharing_one_cache(tmp_path, corpus, cache_dir, reference):
    cache = private_cache(tmp_path, cache_dir, "cache")
    # the same 40 images in both runs: the worst case for duplicate work
    uris = sorted(str(p) for p in corpus.rglob("*.png"))[:40]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("uri,label\n" + "".join(f"{u},{Path(u).parent.name}\n" for u in uris))
    cmd, env = petal_embed(csv_path, cache)
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in runs]
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["embedded"] + summary["cached"] == 40 and summary["failed"] == 0
    keys = check_cache(cache, reference)  # the lock makes each key appear once
    assert len(keys) == 40
    # and a third run finds everything
    again = feature_cache(CFG, cache).load()
    assert set(again) == keys


def test_unreadable_shard_is_set_aside_and_re_embedded(tmp_path, corpus, cache_dir, reference, monkeypatch):
    monkeypatch.setenv("PETAL_SHARD_ROWS", "4")
    cache = private_cache(tmp_path, cache_dir, "cache")
    uris = sorted(str(p) for p in corpus.rglob("*.png"))[:8]
    embed(uris, CFG, cache, batch_size=4)  # two shards of 4
    first = sorted(shard_dir(cache).glob("shard-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:100])  # damaged outside petal (half-copied)
    with pytest.warns(UserWarning, match="unreadable shard .* set aside as .corrupt"):
        result, c = embed(uris, CFG, cache, batch_size=4)
    assert (result.embedded, result.cached) == (4, 4)
    assert len(c.problems) == 1 and first.name in c.problems[0]
    corrupt = shard_dir(cache) / (first.name + ".corrupt")
    assert corrupt.exists()
    corrupt.unlink()
    assert len(check_cache(cache, reference)) == 8


# --------------------------------------------------------------------------- atomic writes

SELF_KILL = """
import os, signal, sys
from pathlib import Path
from petal.storage import atomic_dir, atomic_path
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "file":
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new, half writ")
        os.kill(os.getpid(), signal.SIGKILL)
else:
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_kill_inside_an_atomic_write_keeps_the_old_version(tmp_path, kind):
    target = tmp_path / ("out.bin" if kind == "file" else "model")
    if kind == "file":
        target.write_bytes(b"old")
    else:
        target.mkdir()
        (target / "a.txt").write_text("old")
    r = subprocess.run([sys.executable, "-c", SELF_KILL, kind, str(target)])
    assert r.returncode == -signal.SIGKILL
    old = target.read_bytes() if kind == "file" else (target / "a.txt").read_bytes()
    assert old == b"old"
    # the leftover temp is hidden (dot name), never the target name
    assert {p.name for p in tmp_path.iterdir()} - {target.name} <= {
        p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")}


READER = """
import sys, time
from pathlib import Path
f = Path(sys.argv[1]) / "a.txt"
bad, end = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        if f.read_text() not in ("v0", "v1"):
            bad += 1
    except FileNotFoundError:
        bad += 1
print(bad)
"""


def test_replacing_a_folder_never_shows_a_gap(tmp_path):
    """A reader in another process polls the folder while it is replaced 300 times."""
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v0")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), "2.0"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # let the reader start
    for i in range(300):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text(f"v{i % 2}")
    assert int(reader.communicate(timeout=30)[0]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


AUDIT_TRAIN = """
import json, os, sys
from pathlib import Path
run = os.path.abspath(sys.argv[2])
written = []

def hook(event, args):
    if event != "open" or isinstance(args[0], int):
        return
    path, mode, flags = args
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
    path = os.path.abspath(os.fsdecode(path))
    if writes and path.startswith(run + os.sep):
        written.append(os.path.relpath(path, run))

sys.addaudithook(hook)
from petal.head import HeadClassifier
from petal.runs.head import train
from petal.spec import DataSpec, RunSpec
train(RunSpec(DataSpec(sys.argv[1], eval_percent=25.0), run, cache_dir=sys.argv[3],
              trainer=HeadClassifier(epochs=2, hidden=0)))
print(json.dumps(written))
"""


def test_train_writes_every_file_atomically(tmp_path, dataset, cache_dir):
    """Audit every file `train` opens for writing in the run folder: each must be a temp
    name that is renamed into place (atomic_path / atomic_dir). TensorBoard's event logs
    are the one exception: append-only, and a reader tolerates a cut-off last record."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(AUDIT_TRAIN), str(dataset), str(run), str(cache_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"metrics.json", "model"} <= {p.name for p in run.iterdir()}  # the audit saw a full run
    temp = re.compile(r"\..+\.tmp")
    direct = [w for w in written
              if not any(temp.fullmatch(part) for part in Path(w).parts) and Path(w).parts[0] != "tensorboard"]
    assert direct == []
