"""`--backbone hf:...` (issue 23): tiny random models of each family, saved as save_pretrained
folders (petal.hub_random), through the very path a Hub model takes: resolved from its JSON,
exported behind petal's front end, trained on, and predicted from a bundle that never imports
torch or transformers. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from petal import hub
from petal.backbones import get_backbone, with_options
from petal.errors import PetalError

pytest.importorskip("transformers")
FAMILIES = list(hub.FAMILIES)

# imports in the predicting process fail for these: the bundle must not need them
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'huggingface_hub'):
            raise ImportError(f'{name} is blocked: the bundle must predict without it')
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory) -> dict[str, Path]:
    """family -> a folder holding a tiny random model of it and its processor config (~100 kB each)."""
    from petal.hub_random import save_random

    root = tmp_path_factory.mktemp("hub")
    return {f: save_random(f, root / f"tiny-{f}") for f in FAMILIES}


@pytest.fixture(scope="module")
def hub_runs(hub_models, dataset, cache_dir, tmp_path_factory) -> dict:
    """family -> a finished `petal train` run with that backbone."""
    out = tmp_path_factory.mktemp("hub-runs")
    return {f: train_with(f"hf:{path}", dataset, out / f, cache_dir, epochs=20) for f, path in hub_models.items()}


def train_with(backbone: str, data: Path, out: Path, cache_dir: Path, epochs: int):
    """`petal train` with `backbone`, a quarter of `data` in eval."""
    from petal.head import HeadClassifier
    from petal.runs.head import train
    from petal.spec import DataSpec, RunSpec

    return train(RunSpec(DataSpec(data, eval_percent=25.0), out, backbone=backbone, cache_dir=cache_dir,
                         trainer=HeadClassifier(epochs=epochs, seed=0)))


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_gives_the_models_own_pooled_output(family, hub_models, cache_dir):
    """The cached graph (uint8 front end, units, pooling) against transformers' own forward."""
    import torch

    from petal.hub_torch import load_model
    from petal.models import Preprocess
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    cfg = get_backbone(f"hf:{hub_models[family]}")
    s = cfg.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    (features,) = make_session(backbone_onnx_path(cfg, cache_dir)).run(["features"], {"images": pixels})
    with torch.no_grad():
        out = load_model(cfg)(pixel_values=Preprocess(cfg)(torch.from_numpy(pixels)))
    h = out.last_hidden_state
    want = torch.cat([h[:, 0], h[:, 1:].mean(1)], -1) if cfg.arch.pooling == "cls+mean" else out.pooler_output
    assert features.shape == (3, cfg.feature_dim)
    np.testing.assert_allclose(features, want.numpy(), atol=1e-4)


def test_preprocessing_is_read_from_the_processor_config():
    from petal.hub_random import processor

    dino = hub.preprocess_from(processor("dinov2", 224), "x")  # resize 256, crop 224
    assert (dino.input_size, dino.resize_size, dino.resample) == (224, 256, "bicubic")
    np.testing.assert_allclose(dino.mean, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(dino.std, [58.395, 57.12, 57.375])
    vit = hub.preprocess_from(processor("vit", 224), "x")  # straight to 224 x 224
    assert (vit.input_size, vit.crop_pct, vit.resample, vit.mean) == (224, 1.0, "bilinear", (127.5,) * 3)
    convnext = hub.preprocess_from(processor("convnext", 224), "x")  # 224 / crop_pct 0.875, then crop
    assert (convnext.input_size, convnext.resize_size) == (224, 256)
    old_clip = {"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3}  # older processors give plain ints
    assert hub.preprocess_from(old_clip, "x").input_size == 224
    with pytest.raises(PetalError, match="resample: expected 2 .bilinear. or 3 .bicubic., got 1"):
        hub.preprocess_from({**old_clip, "resample": 1}, "x")


def test_folders_that_cannot_be_used_are_named(hub_models, tmp_path):
    bad = shutil.copytree(hub_models["vit"], tmp_path / "bad")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(PetalError, match="no \\*.safetensors weights.*pickled .bin"):
        get_backbone(f"hf:{bad}")
    (bad / "pytorch_model.bin").rename(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(PetalError, match="model_type 'bert' is not a family petal knows"):
        get_backbone(f"hf:{bad}")
    (bad / "preprocessor_config.json").unlink()
    with pytest.raises(PetalError, match="no preprocessor_config.json"):
        get_backbone(f"hf:{bad}")
    with pytest.raises(PetalError, match="expected a model folder .none is there. or a Hub id"):
        get_backbone(f"hf:{tmp_path / 'nowhere'}")


def test_a_hub_id_resolves_through_the_hub_cache(hub_models, tmp_path, monkeypatch):
    """A Hub id takes huggingface_hub's snapshot folder (here laid out by hand: no network) and
    records its commit."""
    import huggingface_hub

    snapshot = shutil.copytree(hub_models["dinov2"], tmp_path / "models--org--dino" / "snapshots" / ("c0ffee" * 6))
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or str(snapshot))
    cfg = get_backbone("hf:org/dino")
    assert asked == ["org/dino"] and cfg.name == "hf:org/dino" and cfg.weights.kind == "hub"
    assert cfg.weights.commit == "c0ffee" * 6 and cfg.weights_path() == snapshot
    assert cfg.slug.startswith("hf-dinov2-dino-") and cfg.feature_dim == 64
    local = get_backbone(f"hf:{hub_models['dinov2']}")
    assert cfg.weights.revision == local.weights.revision  # the same files: the same weights


def test_provenance_names_the_weights_and_cache_info_the_backbone(hub_runs, hub_models, cache_dir, tmp_path):
    from petal.cache_check import backbone_of, cache_info
    from petal.embed import feature_cache
    from petal.hub_random import save_random

    cfg = get_backbone(f"hf:{hub_models['dinov2']}")
    cache = feature_cache(cfg, cache_dir)
    assert cache.producer["weights"] == {"kind": "folder", "location": str(hub_models["dinov2"]),
                                         "sha256": cfg.weights.revision}
    assert cache.dir.name.startswith(cfg.slug) and cache.shards()  # the run's features are there
    folders = {f["folder"]: f for f in cache_info(cache_dir)}
    assert folders[str(cache.dir)]["backbone"] == cfg.name and folders[str(cache.dir)]["rows"] > 0
    lite = [("efficientnet_lite0", "efficientnet_lite0"), ("efficientnet_lite1", "efficientnet_lite1")]
    assert backbone_of("efficientnet_lite1-p1-0123456789ab", None, lite) == "efficientnet_lite1"  # by its slug
    # other weights, same architecture: another revision, another graph, another cache folder
    other = get_backbone(f"hf:{save_random('dinov2', tmp_path / 'tiny-dinov2', seed=1)}")
    assert other.weights.revision != cfg.weights.revision and other.slug != cfg.slug
    assert feature_cache(other, tmp_path / "c").dir.name != cache.dir.name


def test_each_family_trains_and_its_bundle_predicts_without_torch(hub_runs, hub_models, dataset):
    """Every family's bundle, loaded and run in a process where torch, transformers and onnx
    cannot be imported, answers as in this process."""
    from petal.bundle import load

    images = [str(p) for p in sorted(dataset.glob("*/*"))[::6]]
    want = {}
    for family, run in hub_runs.items():
        info = json.loads((run.model_dir / "petal.json").read_text())
        assert info["backbone"]["name"] == f"hf:{hub_models[family]}"
        assert run.metrics["accuracy"] is not None and run.embed["embedded"] > 0
        want[family] = [p.label for p in load(run.model_dir).predict(images)]
    code = BLOCKER + (
        "import json\nfrom petal.bundle import load\n"
        f"runs = {json.dumps({f: str(r.model_dir) for f, r in hub_runs.items()})}\n"
        f"images = {json.dumps(images)}\n"
        "print(json.dumps({f: [p.label for p in load(m).predict(images)] for f, m in runs.items()}))\n"
        "assert not any(n.split('.')[0] in ('torch', 'transformers') for n in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == want


def test_cli_train_on_a_relative_folder_then_predict(hub_models, dataset, cache_dir, tmp_path):
    """The issue's own words: `petal train DATA --backbone hf:./tiny-dinov2 --out R`, then
    `petal predict R/model IMG`, offline."""
    shutil.copytree(hub_models["dinov2"], tmp_path / "tiny-dinov2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}

    def petal(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "petal.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    petal("train", str(dataset), "--backbone", "hf:./tiny-dinov2", "--out", "R", "--epochs", "5",
          "--cache", str(cache_dir))
    image = sorted(dataset.glob("*/*"))[0]
    out = petal("predict", "R/model", str(image), "--output", "-", "--format", "jsonl")
    assert json.loads(out.splitlines()[-1])["label"] in {p.name for p in dataset.iterdir()}
    settings = json.loads((tmp_path / "R" / "settings.json").read_text())
    assert settings["backbone"]["name"] == f"hf:{tmp_path / 'tiny-dinov2'}"  # absolute: the run can be re-exported


def test_serve_and_int8_with_a_hub_backbone(hub_runs, dataset, cache_dir):
    """The served bundle answers as petal.load; the int8 export quantizes the ViT graph and predicts."""
    import httpx

    from petal.bundle import load
    from petal.runs.reexport import export_run
    from petal.serve import protocol
    from petal.serve.config import ServeConfig
    from serve_helpers import running

    run = hub_runs["dinov2"]
    images = sorted(dataset.glob("*/*"))[:4]
    want = [p.label for p in load(run.model_dir).predict([str(p) for p in images])]
    with running(ServeConfig({"m": run.model_dir})) as (url, _):
        body = protocol.encode_request((p.name, p.read_bytes()) for p in images)
        r = httpx.post(f"{url}/v1/models/m:predict", content=json.dumps(body).encode(), timeout=60)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == want
    int8_dir = export_run(run.run_dir, cache_dir, precision="int8", force=True)
    assert json.loads((int8_dir / "petal.json").read_text())["quantization"]["precision"] == "int8"
    assert len(load(int8_dir).predict([str(p) for p in images])) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_trains_the_last_layers_of_a_hub_backbone(family, hub_models, dataset, cache_dir, tmp_path):
    """`petal finetune --backbone hf:...`: the top layer and the head trained (the trunk in ONNX on
    a CPU), exported; the bundle predicts without torch."""
    from petal.bundle import load
    from petal.runs.finetune import FinetuneConfig, finetune
    from petal.spec import DataSpec, RunSpec

    config = FinetuneConfig(epochs=1, batch_size=8, unfreeze=1, dropout=0.0)
    r = finetune(RunSpec(DataSpec(dataset, eval_percent=25), tmp_path / "run", backbone=f"hf:{hub_models[family]}",
                         cache_dir=cache_dir, trainer=config))
    assert r.epochs_done == 1 and r.metrics["num_eval"] == 12
    meta = json.loads((tmp_path / "run" / "model" / "petal.json").read_text())
    assert meta["backbone"]["name"] == f"hf:{hub_models[family]}" and meta["training"]["kind"] == "finetune"
    assert len(load(tmp_path / "run" / "model").predict([str(p) for p in sorted(dataset.glob("*/*"))[:3]])) == 3
    assert list((cache_dir / "models").glob(f"{get_backbone(f'hf:{hub_models[family]}').slug}-trunk*.onnx"))


def test_finetune_refuses_a_family_it_cannot_train_by_name(tmp_path, dataset):
    from petal.runs.finetune import FinetuneConfig, finetune
    from petal.spec import DataSpec, RunSpec
    from test_onnx_backbone import extractor

    name = with_options(f"onnx:{extractor(tmp_path / 'm.onnx')}", mean="0,0,0", std="1,1,1")
    with pytest.raises(PetalError, match="the 'onnx' family cannot be fine-tuned.*use petal train"):
        finetune(RunSpec(DataSpec(dataset), tmp_path / "run", backbone=name, trainer=FinetuneConfig()))
    assert not (tmp_path / "run").exists()


def test_an_ensemble_concatenates_its_parts_features(hub_models, dataset, cache_dir, tmp_path):
    """`--backbone A+B`: both graphs on the same pixels, features side by side; trained and
    predicted like any backbone. Parts that see different pixels are refused."""
    from petal.bundle import load
    from petal.hub_random import save_random
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    other = save_random("dinov2", tmp_path / "dino+2", seed=2)  # a '+' inside a path stays in it
    name = f"hf:{hub_models['dinov2']}+hf:{other}"
    cfg = get_backbone(name)
    assert [p.name for p in cfg.parts] == [f"hf:{hub_models['dinov2']}", f"hf:{other}"] and cfg.feature_dim == 128
    pixels = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)

    def run(c):
        return make_session(backbone_onnx_path(c, cache_dir)).run(["features"], {"images": pixels})[0]

    np.testing.assert_allclose(run(cfg), np.concatenate([run(p) for p in cfg.parts], axis=1), atol=1e-6)
    r = train_with(name, dataset, tmp_path / "run", cache_dir, epochs=5)
    assert len(load(r.model_dir).predict([str(p) for p in sorted(dataset.glob("*/*"))[:3]])) == 3
    with pytest.raises(PetalError, match="the parts must see the same pixels.*28 px, crop 0.875.*28 px, crop 1.000"):
        get_backbone(f"hf:{hub_models['dinov2']}+hf:{hub_models['clip']}")


@pytest.mark.parametrize("family", FAMILIES)
def test_web_page_runs_a_hub_bundle(family, hub_runs, dataset, tmp_path):
    """The exported page (onnxruntime-web in Chromium) answers as the Python predictor for each
    family's graph."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from petal.bundle import Model
    from petal.webpage import export_web, find_ort
    from petal.webpage.browser import chromium, chromium_path, classify, open_page, serve_folder

    if not chromium_path():
        pytest.skip("no Chromium browser found (apt-get install chromium, or set PETAL_CHROMIUM)")
    try:
        find_ort()
    except PetalError:
        pytest.skip("onnxruntime-web is not installed")
    run = hub_runs[family]
    export_web(run.run_dir, tmp_path / "site")
    images = sorted(dataset.glob("*/*"))[::8]
    want = Model(run.model_dir).predict([str(p) for p in images])
    with chromium() as browser, serve_folder(tmp_path / "site") as url:
        got = classify(open_page(browser, url), images)
    assert [(g["label"], g["unknown"], g["error"]) for g in got] == [(p.label, p.unknown, None) for p in want]
