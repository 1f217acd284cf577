"""The Open Inference Protocol (KServe v2) routes, driven by the real `tritonclient[http]`
client against a real uvicorn on 127.0.0.1 serving the session's trained bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from petal.bundle import Model  # noqa: E402
from petal.images import load_pixels  # noqa: E402
from petal.serve.config import Limits, ServeConfig  # noqa: E402
from serve_helpers import running  # noqa: E402


@pytest.fixture(scope="module")
def client(model_dir):
    config = ServeConfig({"shapes": model_dir}, limits=Limits(max_images=8))
    with running(config) as (url, _):
        c = http.InferenceServerClient(url=url.removeprefix("http://"))
        yield c
        c.close()


@pytest.fixture(scope="module")
def images(dataset) -> list[Path]:
    return sorted(dataset.glob("*/*_00[0-1].*"))


def files_input(paths: list[Path]) -> http.InferInput:
    data = np.array([p.read_bytes() for p in paths], dtype=np.object_)
    inp = http.InferInput("images", [len(paths)], "BYTES")
    inp.set_data_from_numpy(data)  # binary tensor extension, as tritonclient sends by default
    return inp


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("shapes")
    meta = client.get_model_metadata("shapes")
    assert meta["inputs"][0] == {"name": "images", "datatype": "BYTES", "shape": [-1]}
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "labels", "ood_score", "unknown"]


def test_infer_files_matches_petal_predict(client, images, model_dir):
    local = Model(model_dir).predict([str(p) for p in images])
    result = client.infer("shapes", [files_input(images)])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(images), 3)
    np.testing.assert_allclose(probs, np.stack([p.probabilities for p in local]), atol=1e-5)
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("labels")]
    assert labels == [p.label for p in local] == [p.parent.name for p in images]
    assert result.as_numpy("unknown").tolist() == [p.unknown for p in local]


def test_infer_pixels_and_requested_outputs(client, images, model_dir):
    model = Model(model_dir)
    pixels = np.stack([load_pixels(p.read_bytes(), model.preprocess) for p in images])
    inp = http.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    result = client.infer("shapes", [inp], outputs=[http.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), model.predict_pixels(pixels), atol=1e-5)
    assert result.as_numpy("labels") is None  # only what was asked for


def test_bad_requests_are_named(client, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InferenceServerException, match=r"images\[1\]: not an image"):
        client.infer("shapes", [files_input([images[0], bad])])
    with pytest.raises(InferenceServerException, match="at most 8 images per request"):
        client.infer("shapes", [files_input(images * 2)])
    wrong = http.InferInput("images", [1, 10, 10, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 10, 10, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=r"takes UINT8 \[N, 224, 224, 3\]"):
        client.infer("shapes", [wrong])
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("nope", [files_input(images[:1])])


def test_malformed_v2_bodies_are_400_not_500(client, model_dir):
    import httpx

    from petal.serve.config import ServeConfig
    from serve_helpers import running

    with running(ServeConfig({"shapes": model_dir})) as (url, _):
        for body, status, says in ((b"[" * 100_000, 413, "arrays and objects"), (b"[" * 1000, 400, "nested too deeply"),
                                   (b'{"inputs": []}', 400, "inputs: List should have at least 1 item"),
                                   (b'{"inputs": [{"name": "images", "shape": [1], "datatype": "FP32"}]}', 400,
                                    "BYTES")):
            r = httpx.post(f"{url}/v2/models/shapes/infer", content=body, timeout=60)
            assert r.status_code == status and says in r.json()["error"], (r.status_code, r.text[:200])
        r = httpx.post(f"{url}/v2/models/shapes/infer", content=b'{"inputs": []}',
                       headers={"Inference-Header-Content-Length": "999"}, timeout=60)
        assert r.status_code == 400 and "outside the body" in r.json()["error"]
