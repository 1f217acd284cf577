"""Reduced precision (issue 14): int8 and bf16 features cached apart from fp32, the int8
export's parity gate, and int8/bf16 bundles predicting through petal.load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from petal.backbones import get_backbone
from petal.bundle import load
from petal.data import expand_inputs
from petal.embed import embed
from petal.errors import PetalError
from petal.export import ExportRefused
from petal.precision import Engine, calibration_order

CFG = get_backbone("efficientnet_lite0")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def int8_run(trained_run, cache_dir):
    """The synthetic run's int8 bundle, exported by the CLI through the gate's real thresholds."""
    args = ["export", str(trained_run.run_dir), "--precision", "int8", "--cache", str(cache_dir)]
    r = subprocess.run([sys.executable, "-m", "petal.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert re.search(r"top-1 agreement 100\.00%.*img/s; model\.onnx [0-9.]+ MB \(0\.\d+ of fp32\)", r.stdout)
    return trained_run.run_dir / "model-int8"


def test_int8_features_are_cached_apart_and_close_to_fp32(dataset, cache_dir):
    uris, _ = expand_inputs([str(dataset)])
    fp32, fp32_cache = embed(uris, CFG, cache_dir)
    int8, int8_cache = embed(uris, CFG, cache_dir, precision="int8")
    assert int8_cache.dir != fp32_cache.dir and "int8" in int8_cache.dir.name
    assert int8.keys == fp32.keys and int8.embedded + int8.cached == len(uris)
    keys = sorted(set(fp32.keys.values()))
    a, b = fp32_cache.get(keys), int8_cache.get(keys)
    assert not np.array_equal(a, b)  # the int8 graph really ran
    assert cosine(a, b).mean() > 0.95  # synthetic shapes; 0.993 on flowers
    again, again_cache = embed(list(reversed(uris)), CFG, cache_dir, precision="int8")  # same calibration sample
    assert again_cache.dir == int8_cache.dir and again.embedded == 0
    assert np.array_equal(embed(uris, CFG, cache_dir)[1].get(keys), a)  # fp32 untouched


def test_calibration_sample_does_not_depend_on_order():
    uris = [f"/data/{i}.jpg" for i in range(300)]
    assert calibration_order(uris) == calibration_order(uris[::-1])
    assert Engine(CFG).cache_tag == CFG.name  # fp32 keeps the caches made before precisions existed


def test_int8_export_passes_the_gate_and_predicts(int8_run, trained_run, dataset):
    info = json.loads((int8_run / "petal.json").read_text())
    q = info["quantization"]
    assert q["precision"] == "int8" and q["calibration"]["images"] > 0
    gate = q["gate"]
    assert gate["passed"] and not gate["forced"] and gate["agreement"] >= 0.99 and gate["images"] > 0
    assert gate["unknown_agreement"] >= 0.9  # the int8 bank and scores say "unknown" where fp32's do
    assert (int8_run / "model.onnx").stat().st_size < 0.5 * (trained_run.model_dir / "model.onnx").stat().st_size
    uris, _ = expand_inputs([str(dataset)])
    int8 = load(int8_run).predict(uris[:12])  # the lean path: petal.load, onnxruntime only
    fp32 = load(trained_run.model_dir).predict(uris[:12])
    assert load(int8_run).precision == "int8"
    assert sum(p.label == q.label for p, q in zip(int8, fp32)) >= 11


def test_the_gate_refuses_with_figures_and_force_records_them(trained_run, cache_dir, tmp_path):
    from petal.export import export_int8
    from petal.run import Run

    run = Run.open(trained_run.run_dir)
    settings = run.settings()
    rows = run.split_rows()
    ev = [r for r in rows if r["split"] == "eval"]
    args = dict(cfg=CFG, head=run.head(settings), cache_dir=cache_dir,
                train_uris=[r["uri"] for r in rows if r["split"] == "train"], eval_uris=[r["uri"] for r in ev],
                eval_labels=np.array([settings.classes.index(r["label"]) for r in ev]),
                min_agreement=1.01, classes=settings.classes, unknown=run.unknown())  # no model can pass
    with pytest.raises(ExportRefused, match=r"refused.*top-1 agreement .* < 101%.*--force") as refused:
        export_int8(tmp_path / "m", **args)
    assert not (tmp_path / "m").exists() and not refused.value.figures["passed"]
    path, figures = export_int8(tmp_path / "m", force=True, **args)
    gate = json.loads((path / "petal.json").read_text())["quantization"]["gate"]
    assert gate["forced"] and not gate["passed"] and gate["agreement"] == figures["agreement"]
    assert len(load(path).predict(args["eval_uris"])) == len(ev)


def test_precision_mismatch_is_named(trained_run, int8_run):
    with pytest.raises(PetalError, match="fp32 bundle.*export RUN --precision int8"):
        load(trained_run.model_dir, precision="int8")
    with pytest.raises(PetalError, match="int8 bundle"):
        load(int8_run, precision="bf16")
    with pytest.raises(PetalError, match="--precision: expected one of fp32, bf16, int8, got 'fp16'"):
        load(trained_run.model_dir, precision="fp16")


def bf16_available() -> bool:
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.skipif(not bf16_available(), reason="needs openvino (petal[bf16]) and a CPU with bf16")
def test_bf16_runs_the_fp32_bundle_on_openvino(trained_run, dataset):
    uris, _ = expand_inputs([str(dataset)])
    fp32, bf16 = load(trained_run.model_dir), load(trained_run.model_dir, precision="bf16")
    assert bf16.precision == "bf16" and type(bf16.session).__name__ == "OpenVinoSession"
    px = np.stack([fp32.pixels_from_bytes(open(u, "rb").read()) for u in uris[:16]])
    a, b = fp32.predict_pixels(px), bf16.predict_pixels(px)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9 and np.abs(a - b).max() < 0.2


def test_int8_weights_store_large_matrices_as_int8_within_half_a_step():
    from onnx import numpy_helper

    from petal.onnx_graphs import head_graph, int8_weights
    from petal.runtime import make_session

    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(512, 256)).astype(np.float32), rng.normal(size=256).astype(np.float32)),
              (rng.normal(size=(256, 3)).astype(np.float32), np.zeros(3, np.float32))]  # the second stays float
    graph = head_graph(layers, 512)
    x = rng.normal(size=(8, 512)).astype(np.float32)
    data = graph.SerializeToString()
    before = make_session(data).run(["probabilities"], {"features": x})[0]
    small = int8_weights(graph)
    kinds = {t.name: numpy_helper.to_array(t).dtype for t in small.graph.initializer}
    assert kinds["head_w0_int8"] == np.int8 and kinds["head_w1"] == np.float32 and "head_w0" not in kinds
    after = make_session(small.SerializeToString()).run(["probabilities"], {"features": x})[0]
    assert np.array_equal(before.argmax(1), after.argmax(1)) and np.abs(before - after).max() < 0.05
    assert len(small.SerializeToString()) < 0.3 * len(data)


@pytest.mark.slow
def test_train_on_int8_features_exports_the_int8_backbone_they_came_from(dataset, cache_dir, tmp_path):
    from petal.head import HeadClassifier
    from petal.runs.head import train
    from petal.runs.reexport import export_run
    from petal.spec import DataSpec, RunSpec

    r = train(RunSpec(DataSpec(dataset, eval_percent=25.0), tmp_path / "run", cache_dir=cache_dir, precision="int8",
                      trainer=HeadClassifier(epochs=5, seed=0)))
    q = json.loads((r.model_dir / "petal.json").read_text())["quantization"]
    assert q["precision"] == "int8" and q["trained_on"] == "int8 features"
    assert r.embed["cached"] + r.embed["embedded"] == 48
    again = export_run(r.run_dir)  # a plain re-export keeps the run's precision, and its parity check
    assert json.loads((again / "petal.json").read_text())["quantization"]["calibration"] == q["calibration"]


def test_bf16_says_why_not_without_openvino_or_without_bf16(model_dir, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(PetalError, match=r"OpenVINO, which is not installed: pip install 'petal\[bf16\]'"):
        load(model_dir, precision="bf16")

    class Core:  # an OpenVINO on a CPU without bf16 instructions
        def get_property(self, device: str, name: str) -> list[str]:
            return ["FP32", "INT8"]

    monkeypatch.setitem(sys.modules, "openvino", types.SimpleNamespace(Core=Core))
    with pytest.raises(PetalError, match="this CPU has no bf16 instructions.*use --precision fp32 or int8"):
        load(model_dir, precision="bf16")


def narrowed_ranges(engine: Engine, cache_dir, factor: float = 8.0) -> Engine:
    """`engine` under another digest, its int8 graph with every activation range `factor` times
    too narrow (the scales of its QuantizeLinear nodes divided): a broken calibration."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(engine.graph_path(cache_dir)))
    broken = dataclasses.replace(engine, digest=engine.digest + "-narrow")
    scales = {n.input[1] for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    for init in graph.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / factor, init.name))
    path = broken.graph_path(cache_dir)  # quantized afresh under the new digest, then overwritten
    onnx.save(graph, str(path))
    return broken


def test_a_truly_worse_int8_model_is_refused(trained_run, cache_dir, tmp_path):
    """An int8 backbone with broken calibration ranges really is worse, and the gate says so
    beyond chance."""
    from petal.export import export_int8
    from petal.run import Run

    run = Run.open(trained_run.run_dir)
    settings = run.settings()
    rows = run.split_rows()
    ev = [r for r in rows if r["split"] == "eval"]
    train_uris = [r["uri"] for r in rows if r["split"] == "train"]
    broken = narrowed_ranges(Engine.make(CFG, "int8", train_uris), cache_dir)
    with pytest.raises(ExportRefused, match="worse beyond chance") as refused:
        export_int8(tmp_path / "m", cfg=CFG, head=run.head(settings), cache_dir=cache_dir, train_uris=train_uris,
                    eval_uris=[r["uri"] for r in ev], engine=broken, classes=settings.classes,
                    eval_labels=np.array([settings.classes.index(r["label"]) for r in ev]), unknown=run.unknown())
    g = refused.value.figures
    assert g["lost"] > g["gained"] and g["mcnemar_p"] < 0.05 and g["agreement"] < 0.99 and not g["passed"]
    assert not (tmp_path / "m").exists()
