"""End to end on synthetic images with the real Lite0: embed -> train -> evaluate -> export -> predict."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from petal.backbones import get_backbone
from petal.bundle import load
from petal.embed import embed, feature_cache
from petal.head import HeadClassifier
from petal.runs.evaluate import evaluate_model
from petal.runs.reexport import export_run

CFG = get_backbone("efficientnet_lite0")


def images(root):
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".jpg", ".png"))


def test_cache_hits_incremental_and_corrupt(tmp_path, dataset, cache_dir):
    own = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", own / "models")  # reuse the exported graph
    uris = images(dataset)[:20]
    first, cache = embed(uris[:12], CFG, own)
    assert (first.embedded, first.cached, first.failed) == (12, 0, [])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    second, cache = embed(uris + [str(tmp_path / "bad.jpg")], CFG, own)
    assert (second.embedded, second.cached) == (8, 12)  # only the new ones
    assert second.failed == [(str(tmp_path / "bad.jpg"), second.failed[0][1])]
    assert "not an image" in second.failed[0][1] or "decode" in second.failed[0][1]
    # the cache values equal a direct run of the backbone on the same pixels
    from petal.images import load_pixels
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    px = np.stack([load_pixels(open(u, "rb").read(), CFG.preprocess) for u in uris[:4]])
    direct = make_session(backbone_onnx_path(CFG, own)).run(["features"], {"images": px})[0]
    cached = feature_cache(CFG, own).get([second.keys[u] for u in uris[:4]])
    np.testing.assert_allclose(cached, direct, atol=1e-5)
    # shards are complete Parquet files named shard-*.parquet; no temp files left behind
    assert all(p.name.startswith("shard-") for p in cache.dir.iterdir())


def test_byte_identical_copy_is_embedded_once(tmp_path, dataset, cache_dir):
    own = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", own / "models")
    src = images(dataset)[0]
    copy = tmp_path / "copy.png"
    shutil.copy(src, copy)
    result, _ = embed([src, str(copy)], CFG, own)
    assert (result.embedded, result.cached) == (1, 1)
    assert result.keys[src] == result.keys[str(copy)]


def test_train_writes_a_complete_run(trained_run):
    run = trained_run.run_dir
    m = json.loads((run / "metrics.json").read_text())
    assert m["accuracy"] >= 0.9 and m["top5_accuracy"] == 1.0  # shapes are easy for Lite0
    assert m["num_train"] + m["num_eval"] == 48 and m["num_eval"] > 0
    assert set(m["per_class"]) == {"circles", "squares", "triangles"}
    assert set(m["per_class"]["circles"]) == {"precision", "recall", "f1", "support"}
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    with open(run / "misclassified.csv") as f:
        assert next(csv.reader(f)) == ["uri", "true_label", "predicted_label", "confidence"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    settings = json.loads((run / "settings.json").read_text())
    assert settings["backbone"]["name"] == "efficientnet_lite0" and settings["spec"]["head"]["epochs"] == 20
    bundle = trained_run.model_dir
    assert {p.name for p in bundle.iterdir()} == {"model.onnx", "labels.txt", "petal.json"}
    umask = os.umask(0)
    os.umask(umask)
    assert bundle.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: others can serve it
    meta = json.loads((bundle / "petal.json").read_text())
    assert meta["labels"] == ["circles", "squares", "triangles"]
    assert meta["format"] == 2 and meta["preprocess"]["input_size"] == 224 and "onnxruntime" in meta["versions"]
    assert meta["backbone"] == {"name": "efficientnet_lite0", "feature_dim": 1280}  # no pip package names
    assert meta["training"]["kind"] == "head" and meta["training"]["head"]["epochs"] == 20


def test_tensorboard_has_train_and_eval_curves(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_run.run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "accuracy/train", "loss/eval", "accuracy/eval"} <= tags
    assert len(acc.Scalars("loss/train")) == 20


def test_head_is_deterministic_and_validates_params():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 16)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    a = HeadClassifier(hidden=8, epochs=3, batch_size=16).fit(X, y).predict_proba(X)
    b = HeadClassifier(hidden=8, epochs=3, batch_size=16).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\), got 1.5"):
        HeadClassifier(dropout=1.5).fit(X, y)
    with pytest.raises(ValueError, match="not fitted"):
        HeadClassifier().predict(X)


def test_bundle_predicts_like_the_trained_head(trained_run, dataset):
    model = load(trained_run.model_dir)
    uris = images(dataset)
    preds = model.predict(uris, top_k=3)
    assert len(preds) == len(uris) and all(p.error is None for p in preds)
    truth = [u.split("/")[-2] for u in uris]
    assert np.mean([p.label == t for p, t in zip(preds, truth)]) >= 0.9
    assert len(preds[0].top) == 3 and abs(preds[0].probabilities.sum() - 1) < 1e-5


def test_predict_never_imports_torch_or_onnx(model_dir, dataset):
    code = ("import sys, petal; m = petal.load(sys.argv[1]); p = m.predict([sys.argv[2]]); "
            "assert p[0].error is None; heavy = {'torch', 'onnx', 'sklearn', 'matplotlib'} & set(sys.modules); "
            "assert not heavy, f'{heavy} imported'; print(p[0].label)")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir), images(dataset)[0]],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"circles", "squares", "triangles"}


def test_evaluate_exported_model(trained_run, dataset, tmp_path):
    m = evaluate_model(trained_run.model_dir, dataset, tmp_path / "report")
    assert m["num_eval"] == 48 and m["accuracy"] >= 0.9
    assert (tmp_path / "report" / "metrics.json").exists()
    assert (tmp_path / "report" / "confusion_matrix.png").exists()
    # issue 22 item 16: `petal evaluate --out X` said "report: X" but wrote no report.html
    page = (tmp_path / "report" / "report.html").read_text()
    assert '<b id="num-eval">48</b>' in page and "Confusion matrix" in page and "calibration error (ECE)" in page


def test_reexport_passes_parity_and_replaces_atomically(trained_run):
    before = (trained_run.model_dir / "model.onnx").read_bytes()
    path = export_run(trained_run.run_dir)
    assert (path / "model.onnx").read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".model")]


def test_parity_failure_refuses_to_write(trained_run, tmp_path, cache_dir):
    from petal.errors import PetalError
    from petal.export import export_bundle

    class Skewed:  # the "trained model" disagrees with what the bundle computes
        def __init__(self, head):
            self.head = head

        def __getattr__(self, name):
            return getattr(self.head, name)

        def predict_proba(self, X):
            return self.head.predict_proba(X)[:, ::-1]

    state = dict(np.load(trained_run.run_dir / "head.npz"))
    head = HeadClassifier.from_state(HeadClassifier(epochs=20).get_params(), state)
    uris = [r.split(",")[0] for r in (trained_run.run_dir / "split.csv").read_text().splitlines()[1:5]]
    with pytest.raises(PetalError, match="parity check failed"):
        export_bundle(tmp_path / "m", cfg=CFG, head=Skewed(head), classes=["a", "b", "c"],
                      cache_dir=cache_dir, parity_uris=uris)
    assert not (tmp_path / "m").exists()


def test_evaluate_warns_about_training_images(trained_run, dataset, tmp_path):
    """The bundle carries a digest of its training images: evaluating on them says so."""
    class Messages:
        lines: list = []

        def message(self, text):
            self.lines.append(text)

        def dataset(self, ds):
            pass

        def progress(self, description, total):
            import contextlib

            return contextlib.nullcontext(lambda n: None)

    reporter = Messages()
    m = evaluate_model(trained_run.model_dir, dataset, tmp_path / "report", reporter=reporter)
    assert m["train_overlap"] == m["num_eval"] - 12  # all but the 12 eval images were trained on
    assert any("images this model was trained on" in line for line in reporter.lines)
