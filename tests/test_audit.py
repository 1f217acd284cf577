"""The data audit (petal.audit), acting on it (petal.review) and the HTML report
(petal.report), on synthetic shapes with planted problems and the real Lite0."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from petal.audit import audit, nearest
from petal.runs.audit import audit_data
from petal.runs.head import train
from petal.spec import DataSpec, RunSpec
from petal.synthetic import foreign_photos, make_dataset
from test_cli import petal


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """4 classes x 20 shapes with planted problems: 3 flipped labels (files moved to another
    class), one file copied into another class, one photo that is no shape at all."""
    root = make_dataset(tmp_path_factory.mktemp("dirty") / "shapes", per_class=20, seed=7, classes=4)
    moves = {"circles/circles_005.jpg": "squares", "squares/squares_007.jpg": "triangles",
             "triangles/triangles_009.png": "circles"}
    flipped = []
    for rel, to in moves.items():
        dest = root / to / rel.split("/")[1]
        shutil.move(root / rel, dest)
        flipped.append(str(dest))
    shutil.copy(root / "stripes" / "stripes_001.jpg", root / "circles" / "copy_of_stripes_001.jpg")
    cat = foreign_photos(root / "squares", ("chelsea",))[0]
    return {"root": root, "flipped": flipped, "cat": cat}


def test_nearest_excludes_itself_and_orders_by_similarity():
    X = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]] + 0.01 * np.arange(4)[:, None]
    ids, sims = nearest(X / np.linalg.norm(X, axis=1, keepdims=True), 2)
    assert ids[0, 0] == 1 and ids[1, 0] == 0 and all(ids[i, 0] != i for i in range(4))
    assert (sims[:, 0] >= sims[:, 1]).all()


def test_audit_finds_planted_problems(dirty, tmp_path, cache_dir):
    found = audit_data(DataSpec(dirty["root"]), tmp_path / "audit", cache_dir=cache_dir)
    labels = [s.uri for s in found.suspects if s.reason == "label"]
    assert set(dirty["flipped"]) <= set(labels[:6]), labels[:6]  # the flips are at the very top
    moved = {s.uri: s for s in found.suspects if s.uri in dirty["flipped"]}
    assert all(s.suggested == s.uri.split("/")[-1].split("_")[0] for s in moved.values())  # their true class
    assert any(s.uri == dirty["cat"] for s in found.suspects)  # a cat among shapes: suspect or outlier
    cross = [d for d in found.duplicates if d.kind == "exact"]
    assert len(cross) == 1 and cross[0].crosses.startswith("classes") and cross[0].similarity == 1.0
    with open(tmp_path / "audit" / "suspects.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["uri", "label", "suggested", "score", "reason"]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    assert (tmp_path / "audit" / "duplicates.csv").read_text().startswith("uri_a,uri_b,similarity,kind,crosses")
    assert (tmp_path / "audit" / "report.html").stat().st_size > 1000


def test_imbalance_gets_advice():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(44, 8)).astype(np.float32)
    labels = ["a"] * 40 + ["b"] * 4
    a = audit(X, labels, ["a", "b"], [f"{i}.jpg" for i in range(44)], ["train"] * 44, [str(i) for i in range(44)])
    assert a.advice and "--class-weight balanced" in a.advice[0] and a.counts == {"a": 40, "b": 4}


def test_cli_audit_json_and_acting_on_it(dirty, tmp_path, cache_dir):
    r = petal("audit", dirty["root"], "--out", tmp_path / "a", "--json")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["label_suspects"] >= 3 and summary["cross_class_duplicates"] == 1
    # review: drop the cat, relabel the flips to what the audit suggests; files stay where they are
    with open(tmp_path / "a" / "suspects.csv") as f:
        rows = list(csv.DictReader(f))
    (tmp_path / "drop.csv").write_text(f"uri\n{dirty['cat']}\n")
    with open(tmp_path / "fix.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["uri", "label", "suggested", "score", "reason"])
        w.writeheader()
        w.writerows(r for r in rows if r["uri"] in dirty["flipped"])
    data = DataSpec(dirty["root"], eval_percent=25.0, exclude=tmp_path / "drop.csv", relabel=tmp_path / "fix.csv")
    r = train(RunSpec(data, tmp_path / "run", cache_dir=cache_dir))
    with open(tmp_path / "run" / "split.csv") as f:
        split = {row["uri"]: row["label"] for row in csv.DictReader(f)}
    assert dirty["cat"] not in split and os.path.exists(dirty["cat"])
    assert all(split[u] == u.split("/")[-1].split("_")[0] for u in dirty["flipped"])
    assert {"suspects.csv", "duplicates.csv", "audit.json", "report.html"} <= {p.name for p in r.run_dir.iterdir()}
    bad = tmp_path / "bad.csv"
    bad.write_text("uri,suggested\nx.jpg,hexagons\n")
    r = petal("train", dirty["root"], "--out", tmp_path / "r2", "--relabel", bad, check=False)
    assert r.returncode == 2 and "'hexagons' is not one of the classes" in r.stderr


def test_split_folders_train_with_a_test_split_and_leaks_are_named(tmp_path, cache_dir):
    root = tmp_path / "layout"
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        make_dataset(root / split, per_class=12 if split == "train" else 4, seed=seed)
    leak = root / "test" / "circles" / "leaked.jpg"
    shutil.copy(root / "train" / "circles" / "circles_001.jpg", leak)
    r = train(RunSpec(DataSpec(root), tmp_path / "run", cache_dir=cache_dir))
    assert r.metrics["num_eval"] == 12 and r.metrics["test"]["num_eval"] == 13
    assert json.loads((r.run_dir / "test" / "metrics.json").read_text())["num_eval"] == 13
    with open(r.run_dir / "duplicates.csv") as f:
        leaks = [row for row in csv.DictReader(f) if row["kind"] == "exact"]
    assert len(leaks) == 1 and leaks[0]["crosses"] == "train/test"


def test_audit_of_a_single_image_and_clearing_a_run(tmp_path):
    a = audit(np.ones((1, 4), np.float32), ["a"], ["a"], ["one.jpg"], ["train"], ["k"])
    assert a.suspects == [] and a.duplicates == []
    from petal.run import Run

    run = Run(tmp_path / "run").make()
    for name in ("metrics.json", "coverage.png", "unknown.npz", "calibration.json", "report.html"):
        (run.path / name).write_text("old")
    (run.path / "test").mkdir()
    (run.model_dir).mkdir()
    run.clear()
    assert sorted(p.name for p in run.path.iterdir()) == ["model"]  # the bundle is replaced at export only


def test_audit_files_name_absolute_paths(tmp_path, dirty, cache_dir, monkeypatch):
    """suspects.csv works with --exclude from any folder: its paths do not depend on the cwd."""
    monkeypatch.chdir(dirty["root"].parent)
    audit_data(DataSpec(dirty["root"].name), tmp_path / "a", cache_dir=cache_dir)
    with open(tmp_path / "a" / "suspects.csv") as f:
        uris = [row["uri"] for row in csv.DictReader(f)]
    assert uris and all(os.path.isabs(u) and os.path.exists(u) for u in uris)
