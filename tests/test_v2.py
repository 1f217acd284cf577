"""The Open Inference Protocol (KServe v2) routes, driven by the real `tritonclient[http]`
client against a real uvicorn on 127.0.0.1 serving the session's trained bundle."""

from __future__ import annotations

import base64
import json
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
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "labels", "nearest", "ood_score", "unknown"]


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


# --------------------------------------------------------------------------- hardening (issue 21)

def one_pixel_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def binary_request(shape: list[int], elements: list[bytes], **extra) -> tuple[bytes, dict]:
    """A v2 request in the binary extension, as tritonclient sends it: (body, headers)."""
    import json
    import struct

    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps({"inputs": [{"name": "images", "shape": shape, "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}], **extra}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture(scope="module")
def v2_url(model_dir):
    with running(ServeConfig({"shapes": model_dir}, limits=Limits(max_images=8))) as (url, _):
        yield f"{url}/v2/models/shapes/infer"


def test_the_image_limit_counts_every_element_not_the_first_dimension(v2_url):
    """Item 2: BYTES [1, 300] is 300 images, refused before a single one is split or decoded."""
    import base64

    import httpx

    png = one_pixel_png()
    body, headers = binary_request([1, 300], [png] * 300)
    r = httpx.post(v2_url, content=body, headers=headers, timeout=60)
    assert r.status_code == 413 and "at most 8 images per request, got 300 " in r.json()["error"], r.text[:300]
    doc = {"inputs": [{"name": "images", "shape": [1, 30], "datatype": "BYTES",
                       "data": [base64.b64encode(png).decode()] * 30}]}
    r = httpx.post(v2_url, json=doc, timeout=60)
    assert r.status_code == 413 and "got 30 " in r.json()["error"], r.text[:300]
    body, headers = binary_request([1, 2], [png] * 2)  # within the limit: answered
    assert httpx.post(v2_url, content=body, headers=headers, timeout=60).status_code == 200


BYTES_1 = {"name": "images", "shape": [1], "datatype": "BYTES"}
UINT8_1 = {"name": "images", "shape": [1, 224, 224, 3], "datatype": "UINT8"}
PIXELS = [0] * (224 * 224 * 3)
PNG = json.dumps(base64.b64encode(one_pixel_png()).decode())  # a real image: these requests get past decoding
CLIENT_MISTAKES = [  # (JSON text of the request, status, what the error names)
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}], "parameters": 5}',
     400, "parameters"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + '], "parameters": 5}]}',
     400, "inputs.0.parameters"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": "abc"}}]}',
     400, "binary_data_size"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": [1]}}]}',
     400, "binary_data_size"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}',
     400, "binary_data_size 9 goes past"),
    (json.dumps({"inputs": [{**UINT8_1, "data": [300] + PIXELS[1:]}]}), 400, "integers 0..255"),
    (json.dumps({"inputs": [{**UINT8_1, "data": [-1] + PIXELS[1:]}]}), 400, "integers 0..255"),
    (json.dumps({"inputs": [{**UINT8_1, "data": ["a"] + PIXELS[1:]}]}), 400, "flat list of integers"),
    (json.dumps({"inputs": [{**UINT8_1, "data": [[0, 0], [0]] + PIXELS[3:]}]}), 400, "flat list of integers"),
    (json.dumps({"inputs": [{**UINT8_1, "data": [[0]] * len(PIXELS)}]}), 413, "JSON arrays and objects"),
    (json.dumps({"inputs": [{**UINT8_1, "shape": [1, 2**32, 2**32, 3], "data": [0]}]}), 400, "shape.1"),
    (json.dumps({"inputs": [{**UINT8_1, "shape": [1, 2**31 - 1, 2**31 - 1, 3], "data": [0]}]}), 400,
     "this model takes UINT8 [N, 224, 224, 3]"),
    (json.dumps({"inputs": [{**BYTES_1, "shape": [1, 2**32, 2**32], "data": []}]}), 400, "shape.1: Input should be"),
    (json.dumps({"inputs": [{**BYTES_1, "shape": [1, 2**31 - 1, 2**31 - 1], "data": []}]}), 413,
     "at most 8 images"),
    (json.dumps({"inputs": [{**BYTES_1, "shape": [0], "data": []}]}), 400, "at least one image"),
    (json.dumps({"inputs": [{**BYTES_1, "data": ["not base64!"]}]}), 400, "images.data[0]: b64"),
    (json.dumps({"inputs": [{**BYTES_1, "data": [5]}]}), 400, "images.data[0]: b64"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}], "outputs": 5}',
     400, "outputs"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}], '
     '"outputs": [{"name": "nope"}]}', 400,
     "no output named 'nope'"),
    ('{"id": NaN, "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}]}', 400,
     "NaN is not JSON"),
    ('{"id": 1e400, "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}]}',
     400, "id: Input should be a valid string"),
    ('{"id": "\\ud800", "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}]}',
     400, "id"),
    ('{"id": 5, "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [' + PNG + ']}]}', 400, "id"),
    ('{"inputs": [{"name": "images", "shape": [true], "datatype": "BYTES", "data": [' + PNG + ']}]}', 400, "shape.0"),
    ('{"inputs": [5]}', 400, "inputs.0"),
    ('{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": "AA=="}]}', 400, "data"),
]


@pytest.mark.parametrize(("text", "status", "says"), CLIENT_MISTAKES, ids=[says for _, _, says in CLIENT_MISTAKES])
def test_client_mistakes_are_4xx_with_one_log_line(v2_url, caplog, text, status, says):
    """Item 9: the issue's cases were 500s with a traceback (or, for BYTES [1, 2**32, 2**32], a 200
    with no outputs)."""
    import httpx

    caplog.set_level("INFO")
    r = httpx.post(v2_url, content=text.encode(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status and says in r.json()["error"], (r.status_code, r.text[:300])
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR" or rec.exc_info]
    assert len([rec for rec in caplog.records if rec.name == "petal.serve"]) == 1


def test_healthz_answers_while_a_huge_body_is_refused(model_dir):
    """Item 10: 8M zero-length BYTES elements (32 MB), a 15M-element row key and 7M floats as pixels
    used to hold the event loop for seconds; /healthz must answer meanwhile, and the requests are refused."""
    import threading
    import time

    import httpx

    with running(ServeConfig({"shapes": model_dir})) as (url, _):
        body, headers = binary_request([1, 8_000_000], [b""] * 8_000_000)
        key = b"[" + b"0," * 15_000_000 + b"0]"
        row = b'{"instances": [{"image_bytes": {"b64": "AA=="}, "key": ' + key + b"}]}"
        floats = b'{"inputs": [{"name": "images", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [' + \
            b"0.5," * 7_000_000 + b"0.5]}]}"
        posts = [(f"{url}/v2/models/shapes/infer", body, headers), (f"{url}/v1/models/shapes:predict", row, {}),
                 (f"{url}/v2/models/shapes/infer", floats, {})]
        for target, content, extra in posts:
            answers, done = [], threading.Event()

            def send(target=target, content=content, extra=extra, answers=answers, done=done):
                answers.append(httpx.post(target, content=content, headers=extra, timeout=120))
                done.set()

            threading.Thread(target=send, daemon=True).start()
            slowest, end = 0.0, time.perf_counter() + 20
            while not done.is_set() and time.perf_counter() < end:
                start = time.perf_counter()
                assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
                slowest = max(slowest, time.perf_counter() - start)
                time.sleep(0.02)
            assert slowest < 1.0, f"/healthz took {slowest:.2f} s while {target} was parsed"
            assert done.wait(10) and answers[0].status_code == 413, answers[0].text[:300] if answers else "no answer"
