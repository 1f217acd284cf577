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


def labels_from(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    p = softmax(logits, temperature).astype(np.float64)
    return np.array([rng.choice(p.shape[1], p=row / row.sum()) for row in p])


def test_the_calibrator_chosen_out_of_fold_never_does_worse_than_the_identity_there():
    from petal.calibration import choose_temperature

    rng = np.random.default_rng(3)
    chosen = []
    for true_t in (1.0, 1.0, 1.0, 1.0, 0.5, 2.0):  # calibrated as they are, then under- and overconfident
        logits = rng.normal(0, 2, size=(600, 4))
        t, record = choose_temperature(logits, labels_from(logits, true_t, rng))
        f = record["out_of_fold"]
        pick = f[record["method"]]
        assert pick["nll"] <= f["identity"]["nll"] and pick["ece_adaptive"] <= f["identity"]["ece_adaptive"]
        assert (t == 1.0) == (record["method"] == "identity") and "vector" in f
        chosen.append(record["method"])
    assert chosen[-2:] == ["temperature", "temperature"]  # a real miscalibration is fixed
    assert "identity" in chosen[:4]  # and well-calibrated logits are left alone at least sometimes


def test_separable_data_stops_at_the_laplace_bound_not_at_one_hot():
    from petal.calibration import confidence_ceiling, format_score, mean_confidence

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, size=(200, 3))
    logits[np.arange(200), y] += 6  # every answer right: the NLL falls without end as T -> 0
    t = fit_temperature(logits, y)
    assert mean_confidence(logits, t) == pytest.approx(confidence_ceiling(200, 200), abs=1e-4)  # 201/202
    top = softmax(logits, t).max(1)
    assert (top < 1).all() and not any(format_score(float(p)) == "1.000" for p in top)
    assert format_score(0.9996) == "0.9996" and format_score(0.5) == "0.500" and format_score(1.0) == "1.000"
    assert format_score(0.0004) == "0.0004"


def test_adaptive_ece_has_an_interval_and_a_noise_floor():
    from petal.calibration import adaptive_ece, calibration_figures, ece_floor, ece_interval, ece_line

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, size=(3000, 5))
    y = labels_from(logits, 1.0, rng)
    good, bad = softmax(logits), softmax(logits, 0.4)  # calibrated, and overconfident
    lo, hi = ece_interval(good, y)
    assert lo <= adaptive_ece(good, y) <= hi and hi < 0.06
    assert adaptive_ece(bad, y) > hi  # a real miscalibration stands out of the noise
    assert ece_floor(good) < 0.04
    m = calibration_figures(good, bad, y)
    assert m["ece_adaptive_uncalibrated"] > m["ece_adaptive"] and len(m["ece_adaptive_interval"]) == 2
    assert "equal-mass" in ece_line(m) and "noise floor" in ece_line(m)


def test_left_out_images_leave_the_bank_and_stop_accepting_their_look_alikes():
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(3, 64))
    X = np.concatenate([c + 0.3 * rng.normal(size=(200, 64)) for c in centres])
    y = np.repeat(np.arange(3), 200)
    sign = rng.normal(size=64) * 2  # a few shop signs filed under class 0
    X[:8] = sign + 0.1 * rng.normal(size=(8, 64))
    leave_out = np.zeros(len(y), bool)
    leave_out[:8] = True
    look_alikes = sign + 0.1 * rng.normal(size=(20, 64))
    dirty, clean = KnnUnknown.fit(X, y), KnnUnknown.fit(X, y, leave_out=leave_out)
    assert (dirty.score(look_alikes) <= dirty.threshold).all()  # accepted as known
    assert (clean.score(look_alikes) > clean.threshold).all() and len(clean.bank) == len(y) - 8
    assert clean.left_out == 8 and clean.to_dict()["left_out"] == 8
    assert KnnUnknown.from_state(dict(clean.state())).left_out == 8


def test_the_reduced_bank_keeps_the_scores_and_its_graph_computes_them():
    import onnx
    from onnx import TensorProto, helper

    from petal.onnx_graphs import similarity_nodes
    from petal.unknown import normalize

    rng = np.random.default_rng(7)
    basis = rng.normal(size=(40, 512))  # features in a 40-dimensional subspace, as a backbone's mostly are
    X = rng.normal(size=(3000, 40)) @ basis + 0.05 * rng.normal(size=(3000, 512))
    u = KnnUnknown.fit(X, np.arange(3000) % 3)
    r = u.reduce(64)
    assert r.reduced is not None and r.reduced.coords.size + r.reduced.basis.size < u.bank.size / 4
    q = rng.normal(size=(300, 40)) @ basis + 0.05 * rng.normal(size=(300, 512))
    changed = ((r.score(q) > u.threshold) != (u.score(q) > u.threshold)).mean()
    assert changed <= 0.01 and np.abs(r.score(q) - u.score(q)).max() < 0.5
    nodes, inits = similarity_nodes(r)
    unit_in = helper.make_tensor_value_info("ood_unit", TensorProto.FLOAT, [None, 512])
    graph = helper.make_graph(nodes, "sims", [unit_in],
                              [helper.make_tensor_value_info("ood_sims", TensorProto.FLOAT, [None, None])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    unit = normalize(q)
    got = make_session(model.SerializeToString()).run(["ood_sims"], {"ood_unit": unit})[0]
    np.testing.assert_allclose(got, r.reduced.similarities(unit), atol=1e-4)
    assert u.reduce(64) is not u and KnnUnknown.fit(X[:50], np.arange(50) % 2).reduce(64).reduced is None
    onnx.checker.check_model(model)
