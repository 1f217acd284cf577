"""`--backbone onnx:PATH` (issue 23): a user's ONNX feature extractor behind petal's front end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from petal.backbones import get_backbone, with_options
from petal.errors import PetalError

onnx = pytest.importorskip("onnx")
SIDE = 16


def extractor(path: Path, *, layout: str = "NCHW", pooled: bool = False, side: int | None = SIDE) -> Path:
    """A small conv feature extractor: float images -> (N, 8, 7, 7) maps, or (N, 8) with `pooled`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b")]
    nodes, x = [], "pixels"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["conv"], strides=[2, 2]),
              helper.make_node("Relu", ["conv"], ["fmap"])]
    out = helper.make_tensor_value_info("fmap", TensorProto.FLOAT, ["n", 8, 7, 7])
    if pooled:
        nodes += [helper.make_node("GlobalAveragePool", ["fmap"], ["gap"]),
                  helper.make_node("Flatten", ["gap"], ["embedding"])]
        out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 8])
    shape = ["n", 3, side, side] if layout == "NCHW" else ["n", side, side, 3]
    graph = helper.make_graph(nodes, "user", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
                              [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def user_features(path: Path, pixels: np.ndarray, mean: list[float], std: list[float], layout: str) -> np.ndarray:
    """The user's graph run by hand on pixels preprocessed by hand, maps averaged: what petal must give."""
    import onnxruntime as ort

    x = (pixels.astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
    x = x.transpose(0, 3, 1, 2) if layout == "NCHW" else x
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixels": x})[0]
    return out.mean(axis=(2, 3)) if out.ndim == 4 else out


@pytest.mark.parametrize("layout,pooled", [("NCHW", False), ("NHWC", True)])
def test_front_end_gives_the_users_graph_its_pixels(tmp_path, layout, pooled):
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    path = extractor(tmp_path / "m.onnx", layout=layout, pooled=pooled)
    name = with_options(f"onnx:{path}", mean="0.4,0.5,0.6", std="0.2,0.25,0.3")  # the size comes from the graph
    cfg = get_backbone(name)
    assert name == f"onnx:{path}" and cfg.feature_dim == 8 and cfg.input_size == SIDE
    assert cfg.preprocess.mean == pytest.approx((102.0, 127.5, 153.0)) and cfg.preprocess.crop_pct == 0.875
    pixels = np.random.default_rng(1).integers(0, 256, (4, SIDE, SIDE, 3), dtype=np.uint8)
    (got,) = make_session(backbone_onnx_path(cfg, tmp_path / "cache")).run(["features"], {"images": pixels})
    want = user_features(path, pixels, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], layout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_preprocessing_from_the_json_beside_it_and_what_is_missing(tmp_path):
    path = extractor(tmp_path / "m.onnx", side=None)  # the graph does not fix its side
    with pytest.raises(PetalError, match="preprocessing is not known: give --image-size, --mean and --std"):
        get_backbone(f"onnx:{path}")
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                            "resample": "bilinear"}))
    cfg = get_backbone(f"onnx:{path}")
    assert (cfg.input_size, cfg.preprocess.resample, cfg.preprocess.std) == (32, "bilinear", (127.5,) * 3)
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"image_size": 32, "mean": [0.5] * 3}))
    with pytest.raises(PetalError, match="m.preprocess.json: give --std"):
        get_backbone(f"onnx:{path}")
    with pytest.raises(PetalError, match="--mean: expected three numbers R,G,B"):
        with_options(f"onnx:{path}", image_size=32, mean="0.5,0.5", std="1,1,1")
    with pytest.raises(PetalError, match="graph takes 16 px images, but the image size given is 32"):
        with_options(f"onnx:{extractor(tmp_path / 'f.onnx')}", image_size=32, mean="0,0,0", std="1,1,1")
    with pytest.raises(PetalError, match="give the preprocessing of an onnx:PATH backbone"):
        with_options("efficientnet_lite0", image_size=224)


def test_external_data_and_bad_graphs_are_refused(tmp_path):
    path = extractor(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    assert (tmp_path / "ext.data").is_file()
    with pytest.raises(PetalError, match="external data.*refused"):
        with_options(f"onnx:{tmp_path / 'ext.onnx'}", mean="0,0,0", std="1,1,1")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph at all")
    with pytest.raises(PetalError, match="not an ONNX graph"):
        get_backbone(f"onnx:{tmp_path / 'junk.onnx'}")
    with pytest.raises(PetalError, match="no such file"):
        get_backbone(f"onnx:{tmp_path / 'nowhere.onnx'}")


def test_cli_train_with_options_then_predict(tmp_path, dataset, cache_dir):
    """`petal train DATA --backbone onnx:model.onnx --image-size ... --mean ... --std ...`, then predict."""
    path = extractor(tmp_path / "model.onnx", side=None)
    env = {**os.environ, "COLUMNS": "200"}

    def petal(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "petal.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    petal("train", str(dataset), "--backbone", f"onnx:{path.name}", "--image-size", "24", "--mean", "0.5,0.5,0.5",
          "--std", "0.25,0.25,0.25", "--out", "R", "--epochs", "5", "--cache", str(cache_dir))
    info = json.loads((tmp_path / "R" / "model" / "petal.json").read_text())
    assert info["backbone"] == {"name": f"onnx:{path}", "feature_dim": 8}
    assert info["preprocess"]["input_size"] == 24 and info["preprocess"]["mean"] == [127.5] * 3
    out = petal("predict", "R/model", str(sorted(dataset.glob("*/*"))[0]), "--output", "-", "--format", "jsonl")
    assert json.loads(out.splitlines()[-1])["label"] in {p.name for p in dataset.iterdir()}
