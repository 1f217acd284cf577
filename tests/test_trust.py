"""Calibrated confidences and the "unknown" answer (petal.calibration, petal.unknown), on the
synthetic shapes with the real Lite0, scikit-image's sample photos as foreign images."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from petal.backbones import get_backbone
from petal.bundle import BundleInfo, load, write_bundle
from petal.calibration import expected_calibration_error, fit_temperature, softmax
from petal.head import HeadClassifier
from petal.onnx_graphs import backbone_onnx_path, bundle_graph
from petal.run import Run
from petal.runs.evaluate import evaluate_model
from petal.runs.head import train
from petal.runtime import make_session
from petal.spec import DataSpec, RunSpec
from petal.synthetic import foreign_photos, make_dataset
from petal.unknown import KnnUnknown, auroc
from test_cli import petal

CFG = get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    return foreign_photos(tmp_path_factory.mktemp("foreign"))


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 5))
    true_t = 2.0  # labels drawn from softmax(logits / 2): the logits are overconfident by 2x
    p = softmax(logits, true_t).astype(np.float64)
    y = np.array([rng.choice(5, p=row / row.sum()) for row in p])
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.1)
    assert expected_calibration_error(softmax(logits, t), y) < expected_calibration_error(softmax(logits), y) / 3


def test_unknown_threshold_keeps_the_asked_share_of_held_out_knowns():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 64))
    X = np.concatenate([c + 0.3 * rng.normal(size=(300, 64)) for c in centres])
    y = np.repeat(np.arange(3), 300)
    u = KnnUnknown.fit(X[::2], y[::2], keep=0.9)  # threshold from leave-one-out, half the data
    held_out_kept = (u.score(X[1::2]) <= u.threshold).mean()
    assert 0.85 <= held_out_kept <= 0.95
    far = rng.normal(size=(50, 64)) * 3
    assert (u.score(far) > u.threshold).all() and auroc(u.score(X[1::2]), u.score(far)) > 0.99
    again = KnnUnknown.from_state(dict(u.state()))
    np.testing.assert_allclose(again.score(far), u.score(far), rtol=1e-6)


def test_bank_is_capped_per_class():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(1000, 8)), np.r_[np.zeros(900, int), np.ones(100, int)]
    u = KnnUnknown.fit(X, y, cap=100)
    assert len(u.bank) == 100  # 90 + 10: each class keeps its share


def test_a_trained_run_is_calibrated_and_knows_foreign_photos(trained_run, foreign, dataset):
    m = trained_run.metrics
    assert 0 <= m["ece"] <= 1 and "ece_uncalibrated" in m and m["temperature"] > 0
    assert m["unknown"]["kept_eval"] >= 0.8
    assert (trained_run.run_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    model = load(trained_run.model_dir)
    assert model.info.unknown["threshold"] == Run(trained_run.run_dir).unknown().threshold
    preds = model.predict(foreign)
    assert sum(p.unknown for p in preds) >= 0.9 * len(preds), [(p.uri, p.ood_score) for p in preds]
    knowns = model.predict(sorted(str(p) for p in dataset.rglob("*.png")))
    assert sum(not p.unknown for p in knowns) >= 0.8 * len(knowns)
    assert min(p.ood_score for p in preds) > np.median([p.ood_score for p in knowns])
    off = load(trained_run.model_dir, reject_unknown=False).predict(foreign[:3])
    assert [p.unknown for p in off] == [False] * 3 and [p.ood_score for p in off] == [p.ood_score for p in preds[:3]]


def test_the_graph_computes_what_python_computes(trained_run, dataset, foreign, cache_dir):
    """ood_score and unknown from the ONNX bundle equal the head + numpy kNN on the same pixels."""
    run = Run(trained_run.run_dir)
    head, u = run.head(run.settings()), run.unknown()
    model = load(trained_run.model_dir)
    uris = sorted(str(p) for p in dataset.rglob("*.jpg"))[:8] + foreign[:8]
    from petal.loader import iter_items

    pixels = np.stack([it.pixels for it in iter_items(uris, CFG.preprocess)])
    features = make_session(backbone_onnx_path(CFG, cache_dir)).run(["features"], {"images": pixels})[0]
    probs = head.predict_proba(features)
    got = model.scores(pixels)
    np.testing.assert_allclose(got.probabilities, probs, atol=1e-5)
    np.testing.assert_allclose(got.ood_score, u.score(features, probs), atol=1e-3)
    assert (got.unknown == (u.score(features, probs) > u.threshold)).all()


def test_a_held_out_class_scores_as_more_unknown(tmp_path, cache_dir):
    data = make_dataset(tmp_path / "four", per_class=16, seed=5, classes=4)
    novel = sorted(str(p) for p in (data / "stripes").iterdir())
    shutil.move(str(data / "stripes"), tmp_path / "stripes")
    r = train(RunSpec(DataSpec(data, eval_percent=25.0), tmp_path / "run", cache_dir=cache_dir,
                      trainer=HeadClassifier(epochs=10)))
    model = load(r.model_dir)
    knowns = model.predict(sorted(str(p) for p in data.rglob("*.*")))
    strangers = model.predict([str(tmp_path / "stripes" / p.rsplit("/", 1)[1]) for p in novel])
    assert auroc(np.array([p.ood_score for p in knowns]), np.array([p.ood_score for p in strangers])) > 0.9


def test_a_bundle_without_unknown_detection_still_predicts(tmp_path, trained_run, dataset, cache_dir):
    run = Run(trained_run.run_dir)
    head = run.head(run.settings())
    graph = bundle_graph(backbone_onnx_path(CFG, cache_dir), head.to_onnx())  # as petal 0.1 built it
    info = BundleInfo.from_dict(json.loads((trained_run.model_dir / "petal.json").read_text()))
    info.unknown = None
    old = write_bundle(tmp_path / "old", graph.SerializeToString(), info)
    p = load(old).predict([next(str(p) for p in dataset.rglob("*.png"))])[0]
    assert p.error is None and p.unknown is False and p.ood_score is None


def test_predict_shows_unknown_and_writes_its_columns(tmp_path, model_dir, foreign, dataset):
    one_known = next(str(p) for p in dataset.rglob("*.png"))
    terminal = {"TTY_COMPATIBLE": "1", "NO_COLOR": "1"}  # stdout as a terminal: the table
    r = petal("predict", model_dir, foreign[0], one_known, env=terminal)
    assert "unknown (nearest:" in r.stdout
    petal("predict", model_dir, foreign[0], one_known, "--output", tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [row["unknown"] for row in rows] == [True, False] and all("ood_score" in row for row in rows)
    # a script reading "label" is never told a class for an unknown image; "nearest" keeps it
    assert rows[0]["label"] == "unknown" and rows[0]["nearest"] in ("circles", "squares", "triangles")
    assert rows[1]["label"] == rows[1]["nearest"] == Path(one_known).parent.name
    petal("predict", model_dir, foreign[0], "--output", tmp_path / "p.csv", "--no-unknown")
    header, row = (tmp_path / "p.csv").read_text().splitlines()
    assert header == "uri,label,score,top,unknown,ood_score,nearest" and ",false," in row
    assert row.split(",")[1] == row.split(",")[-1]  # not unknown: the label is the nearest class


def test_evaluate_with_unknown_images(tmp_path, model_dir, dataset, foreign):
    m = evaluate_model(model_dir, dataset, tmp_path / "report", unknown_data=str(Path(foreign[0]).parent))
    report = json.loads((tmp_path / "report" / "unknown.json").read_text())
    assert report == m["unknown_data"] and report["unknown_images"] == len(foreign)
    assert report["auroc"] > 0.9 and report["rejected_unknown"] >= 0.9 and report["kept_known"] >= 0.8
    assert 0 <= report["fpr_at_95_tpr"] <= 1
    assert (tmp_path / "report" / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= m["ece"] <= 1 and m["unknown"]["kept"] == report["kept_known"]
    r = petal("evaluate", model_dir, dataset, "--out", tmp_path / "cli", "--unknown", Path(foreign[0]).parent)
    assert "unknown images rejected" in r.stdout and (tmp_path / "cli" / "unknown.json").exists()
    r = petal("evaluate", model_dir, dataset, "--out", tmp_path / "off", "--no-unknown")
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["unknown"]["kept"] == 1.0


def test_head_trains_with_exactly_ten_steps():
    """10 epochs of one batch: torch's one-cycle schedule must not divide by zero."""
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(12, 8)).astype(np.float32), np.arange(12) % 2
    assert HeadClassifier(hidden=4, epochs=10, batch_size=64).fit(X, y).predict_proba(X).shape == (12, 2)


def test_tiny_data_calibrates_and_scores_without_crashing():
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(3, 8)).astype(np.float32), np.arange(3)
    head = HeadClassifier(hidden=4, epochs=2).fit(X, y).calibrate(X, y)  # one image per class: nothing to fit
    assert head.temperature_ == 1.0 and head.oof_proba_ is None
    centres = rng.normal(size=(2, 16)) * 5
    X = np.concatenate([c + rng.normal(size=(3, 16)) for c in centres])  # a bank of 6 rows, k = 5
    u = KnnUnknown.fit(X, np.repeat([0, 1], 3))
    assert u.k == 5 and (u.score(X) <= u.threshold).mean() >= 0.8  # not a fifth called unknown by construction
