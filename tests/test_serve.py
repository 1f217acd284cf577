"""`petal serve`: the row-format API, limits, auth, batching, metrics, shutdown and the client.

Every server here is a real uvicorn on 127.0.0.1 serving the session's trained bundle.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from petal.bundle import Model  # noqa: E402
from petal.errors import PetalError  # noqa: E402
from petal.serve import protocol  # noqa: E402
from petal.serve.batcher import Batcher  # noqa: E402
from petal.serve.config import Limits, ServeConfig, api_key_from_env, model_specs  # noqa: E402
from serve_helpers import b64, png_header, read_response, running  # noqa: E402

LIMITS = Limits(max_body_bytes=2 * 1024 * 1024, max_images=8, max_pixels=4_000_000, timeout_s=30)


@pytest.fixture(scope="module")
def images(dataset) -> list[Path]:
    """Six synthetic images, PNG and JPEG, two per class."""
    return sorted(dataset.glob("*/*_00[0-1].*"))


@pytest.fixture(scope="module")
def local(model_dir) -> Model:
    return Model(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    with running(ServeConfig({"shapes": model_dir}, limits=LIMITS)) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


def predict(url: str, body, **kw) -> httpx.Response:
    """POST a predict request: a dict (sent as JSON), or raw bytes, or an iterator of bytes (chunked)."""
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{url}/v1/models/shapes:predict", content=content, timeout=60, **kw)


def request_for(paths: list[Path]) -> dict:
    return protocol.encode_request((p.name, p.read_bytes()) for p in paths)


# -- the protocol, without a server --

def test_b64_accepts_standard_urlsafe_unpadded_and_wrapped():
    data = bytes(range(256)) * 3
    for text in (b64(data), b64(data, urlsafe=True), b64(data).rstrip("="),
                 b64(data, urlsafe=True).rstrip("="), "\n".join(b64(data)[i:i + 76] for i in range(0, 1024, 76))):
        assert protocol.b64decode(text) == data
    for bad in ("abc!", "a", 12, None, "é"):
        with pytest.raises(protocol.InstanceError, match="b64: expected"):
            protocol.b64decode(bad)


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "expected JSON"),
    (b"\xff\xfe\x00garbage", 400, "expected JSON"),
    (b"[" * 100_000, 413, "holds 100,000 JSON arrays and objects"),
    (b"[" * 1000, 400, "nested too deeply"),
    (b"[1, 2]", 400, 'expected a JSON object {"instances"'),
    (b'{"inputs": []}', 400, "got an object with keys ['inputs']"),
    (b'{"instances": 5}', 400, "expected a non-empty list, got int 5"),
    (b'{"instances": []}', 400, "expected a non-empty list"),
    (json.dumps({"instances": [{}] * 9}).encode(), 413, "at most 8 images per request, got 9"),
])
def test_parse_request_refuses_malformed_bodies(body, status, message):
    with pytest.raises(protocol.RequestError, match=message.replace("[", r"\[").replace("{", r"\{")) as e:
        protocol.parse_request(body, max_instances=8)
    assert e.value.status == status


def test_model_specs_checks_names_and_bundles(model_dir, tmp_path):
    assert model_specs(model_dir, "shapes", [f"b={model_dir}"]) == {"shapes": model_dir, "b": model_dir}
    assert list(model_specs(model_dir, None, [])) == [model_dir.parent.name]
    for path, name, specs, message in [
        (tmp_path, "x", [], "not a petal model bundle"),
        (model_dir, "bad:name", [], "model name: expected letters"),
        (None, None, ["noequals"], "expected NAME=PATH"),
        (model_dir, "a", [f"a={model_dir}"], "used twice"),
        (None, "x", [], "--name: names the bundle PATH"),
    ]:
        with pytest.raises(PetalError, match=message):
            model_specs(path, name, specs)
    with pytest.raises(PetalError, match="at least one model"):
        ServeConfig({})


def test_the_served_name_is_the_bundles_own(model_dir, dataset, tmp_path):
    """Issue 22 item 18: a run folder named "split" named the served model and the page "split"."""
    import shutil

    from petal.bundle import rename

    bundle = tmp_path / "split" / "model"
    shutil.copytree(model_dir, bundle)
    assert list(model_specs(bundle, None, [])) == ["shapes"]  # the name it was exported with, wherever it is now
    rename(bundle, "flower finder")
    assert list(model_specs(bundle, None, [])) == ["flower-finder"] and Model(bundle).name == "flower finder"
    assert Model(bundle).predict([str(next(dataset.rglob("*.png")))])[0].error is None  # still a working bundle
    with pytest.raises(PetalError, match="name: expected a name of 1 to"):
        rename(bundle, "two\nlines")


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("PETAL_API_KEY", "from-env")
    assert api_key_from_env(None) == "from-env"
    assert api_key_from_env("given") == "given"
    monkeypatch.delenv("PETAL_API_KEY")
    assert api_key_from_env(None) is None


def test_api_key_from_a_file_and_the_exposure_warning(monkeypatch, tmp_path):
    from petal.serve.config import exposure_warning

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert api_key_from_env(None, key) == "s3cret"
    monkeypatch.setenv("PETAL_API_KEY_FILE", str(key))
    assert api_key_from_env(None) == "s3cret" and api_key_from_env("given") == "given"
    (tmp_path / "empty").write_text("")
    with pytest.raises(PetalError, match="is empty"):
        api_key_from_env(None, tmp_path / "empty")
    with pytest.raises(PetalError, match="cannot read"):
        api_key_from_env(None, tmp_path / "missing")
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("0.0.0.0", "k") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)


def test_a_batch_that_fails_outside_the_model_fails_its_requests_not_the_worker():
    calls = []

    def on_batch(images, seconds):  # a broken metrics callback, once
        calls.append(images)
        if len(calls) == 1:
            raise RuntimeError("metrics exploded")

    b = Batcher(lambda px: px.astype(np.float32), max_batch=4, max_wait_ms=0, on_batch=on_batch)
    with pytest.raises(RuntimeError, match="metrics exploded"):
        b.submit(np.array([[1]])).result(timeout=10)
    assert b.submit(np.array([[2]])).result(timeout=10).tolist() == [[2.0]] and b.alive
    b.close()


# -- the batcher, with a fake model --

def test_batcher_merges_queued_requests_and_drains_on_close():
    gate, calls = threading.Event(), []

    def fake(pixels: np.ndarray) -> np.ndarray:  # (N, 1) -> (N, 2): [value, N]
        calls.append(len(pixels))
        gate.wait(10)
        return np.stack([pixels[:, 0], np.full(len(pixels), len(pixels))], axis=1).astype(np.float32)

    b = Batcher(fake, max_batch=6, max_wait_ms=0)
    first = b.submit(np.array([[1]]))
    while not calls:  # the worker is now busy with the first job
        time.sleep(0.001)
    rest = [b.submit(np.array([[v]] * n)) for v, n in [(2, 2), (3, 3), (4, 2)]]  # 2 + 3 fit, 2 more do not
    cancelled = b.submit(np.array([[9]]))
    assert cancelled.cancel()
    gate.set()
    b.close()  # returns once every queued job is done
    assert first.result()[:, 0].tolist() == [1]
    assert [f.result()[:, 0].tolist() for f in rest] == [[2, 2], [3, 3, 3], [4, 4]]
    assert calls == [1, 5, 2]  # the two queued requests shared one call; the cancelled one ran in none


# -- the server --

def test_predict_matches_the_local_model(url, images, local):
    body = request_for(images)
    body["instances"][1]["image_bytes"]["b64"] = b64(images[1].read_bytes(), urlsafe=True).rstrip("=")
    body["instances"][2]["key"] = {"any": ["json", 1]}  # keys come back unchanged, whatever they are
    del body["instances"][3]["key"]
    r = predict(url, body)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    want = local.predict([str(p) for p in images])
    assert len(rows) == len(images)
    for i, (row, p) in enumerate(zip(rows, want, strict=True)):
        assert row.get("key") == body["instances"][i].get("key")
        assert ("key" in row) == (i != 3)
        assert row["label"] == p.label == local.labels[row["prediction"]]
        np.testing.assert_allclose(row["scores"], p.probabilities, atol=1e-5)
    assert [r["label"] for r in rows] == [p.parent.name for p in images]  # and the model is right


def test_served_predictions_say_unknown_and_the_flag_turns_it_off(url, images, local, tmp_path):
    from petal.synthetic import foreign_photos

    cat = foreign_photos(tmp_path, ("chelsea",))[0]
    files = [str(images[0]), cat]
    body = {"instances": [{"image_bytes": {"b64": b64(Path(f).read_bytes())}, "key": i} for i, f in enumerate(files)]}
    rows = predict(url, body).json()["predictions"]
    want = local.predict(files)
    assert [r["unknown"] for r in rows] == [p.unknown for p in want] == [False, True]
    np.testing.assert_allclose([r["ood_score"] for r in rows], [p.ood_score for p in want], atol=1e-4)
    # one meaning of "unknown" (issue 22 item 3): the rejected row's label is the answer
    assert [r["label"] for r in rows] == [p.label for p in want] == [images[0].parent.name, "unknown"]
    assert rows[1]["nearest"] == want[1].nearest != "unknown" and rows[1]["prediction"] is None
    off = httpx.post(f"{url}/v1/models/shapes:predict?unknown=false", content=json.dumps(body), timeout=60)
    assert [r["unknown"] for r in off.json()["predictions"]] == [False, False]
    assert off.json()["predictions"][1]["label"] == want[1].nearest  # the old shape
    with open(cat, "rb") as f:
        up = httpx.post(f"{url}/v1/models/shapes:upload", files=[("file", ("cat.png", f, "image/png"))], timeout=60)
    assert up.json()["predictions"][0]["unknown"] is True and up.json()["predictions"][0]["label"] == "unknown"
    v2 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                      "data": [b64(Path(f).read_bytes()) for f in files]}]}
    outputs = {o["name"]: o["data"] for o in httpx.post(f"{url}/v2/models/shapes/infer", json=v2,
                                                        timeout=60).json()["outputs"]}
    assert outputs["labels"] == [p.label for p in want] and outputs["nearest"] == [p.nearest for p in want]


def test_a_bad_instance_gets_an_error_in_its_slot(url, images, local):
    good = images[0].read_bytes()
    instances = [
        {"image_bytes": {"b64": "%%%not base64"}, "key": "b64"},
        {"image_bytes": {"b64": b64(b"just some text")}, "key": "text"},
        {"image_bytes": {"b64": b64(png_header(50_000, 50_000))}, "key": "bomb"},  # 7.5 GB if decoded
        {"image_bytes": {"b64": b64(good[: len(good) // 2])}, "key": "truncated"},
        {"key": "no image"},
        "a string",
        {"b64": b64(good), "key": "good"},  # the short form is accepted too
    ]
    r = predict(url, {"instances": instances})
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    errors = {row.get("key"): row.get("error", "") for row in rows}
    assert "invalid" in errors["b64"]
    assert "not an image" in errors["text"]
    assert "too large: 2,500,000,000 pixels" in errors["bomb"] and "limit 4,000,000" in errors["bomb"]
    assert "truncated" in errors["truncated"] or "cannot decode" in errors["truncated"]
    assert 'expected an object {"b64"' in errors["no image"]
    assert "expected an object" in rows[5]["error"] and "key" not in rows[5]
    assert rows[6]["label"] == local.predict([str(images[0])])[0].label and "error" not in rows[6]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(url, images):
    for body in [b"", b"{", b"[" * 1000, b'{"instances": "x"}', b"\x00" * 1000]:
        r = predict(url, body)
        assert r.status_code == 400, (body[:20], r.status_code, r.text)
        assert r.json()["error"].startswith(("body:", "instances:"))
    r = httpx.post(f"{url}/v1/models/shapes:predict", data={"not": "json"})  # a form: not a JSON route's type
    assert r.status_code == 415 and "content-type: expected application/json" in r.json()["error"]
    r = httpx.get(f"{url}/v1/models/shapes:predict")  # a GET on a POST route: 405, not "model not found"
    assert r.status_code == 405 and "use POST" in r.json()["error"]
    r = httpx.post(f"{url}/v1/models/nope:predict", content=b"{}")
    assert r.status_code == 404 and r.json()["error"] == "model 'nope' not found; serving: shapes"
    r = httpx.delete(f"{url}/healthz")
    assert r.status_code == 405 and r.json()["error"] == "method not allowed: DELETE /healthz"
    assert predict(url, request_for(images[:1])).status_code == 200


def test_limits_on_body_size_and_images_per_request(url, images):
    big = b'{"instances": [{"image_bytes": {"b64": "' + b"A" * (3 * 1024 * 1024) + b'"}}]}'
    with httpx.Client(base_url=url, timeout=60) as client:  # one keep-alive connection
        r = client.post("/v1/models/shapes:predict", content=big)  # with a Content-Length: refused at once
        assert r.status_code == 413 and "expected at most 2,097,152 bytes" in r.json()["error"]
        r = client.post("/v1/models/shapes:predict", content=json.dumps(request_for(images[:1])))
        assert r.status_code == 200  # the connection survived: no reset, no stray body bytes
    r = predict(url, (big[i:i + 65536] for i in range(0, len(big), 65536)))  # chunked: cut off mid-stream
    assert r.status_code == 413 and "too large" in r.json()["error"]
    r = predict(url, request_for(images[:1] * 9))
    assert r.status_code == 413 and r.json()["error"] == "instances: at most 8 images per request, got 9"
    files = [("file", (f"{i}.png", images[0].read_bytes())) for i in range(9)]
    r = httpx.post(f"{url}/v1/models/shapes:upload", files=files)
    assert r.status_code == 413 and "at most 8 files per request, got 9" in r.json()["error"]


def test_upload_answers_top_k_per_file(url, images, local):
    files = [("file", (p.name, p.read_bytes())) for p in images[:3]] + [("other", ("notes.txt", b"hello"))]
    r = httpx.post(f"{url}/v1/models/shapes:upload?top_k=2", files=files, timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert [row["filename"] for row in rows] == [p.name for p in images[:3]] + ["notes.txt"]
    for row, p in zip(rows, local.predict([str(p) for p in images[:3]], top_k=2), strict=False):
        assert row["label"] == p.label and len(row["top"]) == 2
        assert row["top"][0] == {"label": p.label, "score": pytest.approx(p.score, abs=1e-5)}
    assert "not an image" in rows[3]["error"]
    r = httpx.post(f"{url}/v1/models/shapes:upload", data={"a": "b"})
    assert r.status_code == 400 and "expected one or more image files" in r.json()["error"]
    r = httpx.post(f"{url}/v1/models/shapes:upload?top_k=0", files=files)
    assert r.status_code == 400 and "top_k" in r.json()["error"]


def test_model_status_listing_and_metadata(url, local):
    r = httpx.get(f"{url}/v1/models/shapes")
    assert r.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert httpx.get(f"{url}/v1/models").json()["models"] == [
        {"name": "shapes", "version": "1", "state": "AVAILABLE", "labels": local.labels}]
    meta = httpx.get(f"{url}/v1/models/shapes/metadata").json()
    assert meta["model_spec"] == {"name": "shapes", "version": "1"}
    assert meta["metadata"]["labels"] == local.labels and meta["metadata"]["input_size"] == 224
    assert httpx.get(f"{url}/v1/models/other").status_code == 404


def test_concurrent_requests_are_batched_and_all_answered(url, images, local):
    def metric(name: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    calls_before, images_before = metric("petal_batch_size_count"), metric("petal_batch_size_sum")
    want = {p.name: p.parent.name for p in images}
    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda i: predict(url, request_for([images[i % 6]])).json()["predictions"][0],
                             range(32)))
    assert all(row["label"] == want[row["key"]] for row in rows)
    assert metric("petal_batch_size_sum") - images_before == 32  # every image went through a batch
    assert metric("petal_batch_size_count") - calls_before <= 32


def test_health_readiness_metrics_and_docs(url):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready", "models": ["shapes"]}
    text = httpx.get(f"{url}/metrics").text
    for name in ("petal_requests_total", "petal_request_errors_total", "petal_request_latency_seconds_bucket",
                 "petal_batch_size_bucket", "petal_inference_seconds", "petal_requests_in_flight"):
        assert name in text
    assert 'petal_requests_total{code="200",method="POST",route="/v1/models/{name}:predict"}' in text
    assert 'petal_images_total{model="shapes",outcome="failed"}' in text
    assert "petal_models_ready 1.0" in text
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/models/{name}:predict", "/v1/models/{name}:upload", "/healthz"} <= set(paths)
    assert httpx.get(f"{url}/docs").status_code == 200
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<title>petal</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets


def test_bearer_token_auth(model_dir, images):
    with running(ServeConfig({"shapes": model_dir}, limits=LIMITS, api_key="s3cret")) as (url, _):
        body = request_for(images[:1])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = predict(url, body, headers=headers)
            assert r.status_code == 401 and "invalid API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200  # health stays open
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert predict(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_timeouts_slow_inference_503_slow_upload_408(model_dir, images):
    limits = Limits(max_body_bytes=LIMITS.max_body_bytes, max_images=8, timeout_s=2)
    with running(ServeConfig({"shapes": model_dir}, limits=limits)) as (url, app):
        batcher = app.state.service.models["shapes"].batcher
        fast, release = batcher.predict, threading.Event()
        batcher.predict = lambda px: (release.wait(60), fast(px))[1]  # stuck until the request timed out
        r = predict(url, request_for(images[:1]))
        assert r.status_code == 503 and "timed out" in r.json()["error"] and r.headers["retry-after"] == "1"
        batcher.predict = fast
        release.set()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
            s.sendall(b"POST /v1/models/shapes:predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{")
            status, answer = read_response(s)  # the rest of the body never comes
        assert status == 408 and json.loads(answer)["error"] == "request body not received within 2 s"
        assert predict(url, request_for(images[:1])).status_code == 200  # still serving


def test_server_never_imports_torch(model_dir):
    code = ("import asyncio, sys\n"
            "from petal.serve.app import create_app\n"
            "from petal.serve.config import ServeConfig\n"
            f"app = create_app(ServeConfig({{'m': {str(model_dir)!r}}}))\n"
            "async def main():\n"
            "    async with app.router.lifespan_context(app):\n"
            "        assert app.state.service.ready\n"
            "asyncio.run(main())\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cli_serve_shuts_down_gracefully_finishing_in_flight_requests(model_dir, images, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "petal.cli", "serve", str(model_dir), "--name", "shapes",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded wait for startup
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = json.dumps(request_for(images[:2])).encode()
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)
        conn.sendall(b"POST /v1/models/shapes:predict HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
        for _ in range(600):  # until the server is handling it
            if "petal_requests_in_flight 2.0" in httpx.get(f"{base}/metrics").text:  # it, and this scrape
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        conn.sendall(body[100:])  # the in-flight request completes after the signal
        status, answer = read_response(conn)
        conn.close()
        assert status == 200, answer[:200]
        rows = json.loads(answer)["predictions"]
        assert [r["label"] for r in rows] == [p.parent.name for p in images[:2]]
        # uvicorn re-raises the signal once shut down, so the exit status is "terminated by SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log.seek(0)
        assert "Application shutdown complete" in log.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        print(log.read())
        log.close()


def test_cli_encode_request_and_predict_url(url, images, local, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "petal.cli", "encode-request", *map(str, images[:2])],
                         capture_output=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [i["key"] for i in doc["instances"]] == [str(p) for p in images[:2]]
    assert protocol.b64decode(doc["instances"][1]["image_bytes"]["b64"]) == images[1].read_bytes()
    r = predict(url, out.stdout)  # what the curl example sends
    assert [row["key"] for row in r.json()["predictions"]] == [str(p) for p in images[:2]]

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    preds = tmp_path / "preds.jsonl"
    out = subprocess.run([sys.executable, "-m", "petal.cli", "predict", "--url",
                          f"{url}/v1/models/shapes:predict", *map(str, images), str(bad), "--output", str(preds)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["uri"], r["label"]) for r in rows] == [(str(p), p.parent.name) for p in images]
    assert "bad.jpg" in out.stderr and "not an image" in out.stderr


def test_remote_model_matches_local_and_splits_on_413(url, images, local, tmp_path):
    from petal.client import RemoteModel

    uris = [str(p) for p in images] * 2 + [str(tmp_path / "missing.jpg")]
    with RemoteModel(url, batch_size=16) as remote:  # a server root with one model; 13 > 8 images: split
        assert remote.predict_url == f"{url}/v1/models/shapes:predict"
        got = remote.predict(uris, top_k=2)
    want = local.predict(uris[:-1], top_k=2)
    for g, w in zip(got, want, strict=False):
        assert (g.uri, g.label, [k for k, _ in g.top]) == (w.uri, w.label, [k for k, _ in w.top])
        np.testing.assert_allclose(g.probabilities, w.probabilities, atol=1e-5)
    assert got[-1].error == "file not found"
    with pytest.raises(PetalError, match="model 'nope' not found"):
        RemoteModel(f"{url}/v1/models/nope:predict").predict(uris[:1])
    with pytest.raises(PetalError, match="cannot reach"):
        RemoteModel("http://127.0.0.1:9/v1/models/x:predict").predict(uris[:1])


def test_cli_serve_mistakes_get_one_line_before_loading(model_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "petal.cli", "serve", str(model_dir), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "petal.cli", "serve", str(model_dir.parent)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and f"did you mean {model_dir}" in r.stderr.replace("\n", "")


def test_get_on_predict_is_405_and_urls_need_no_scheme(url, images, local):
    r = httpx.get(f"{url}/v1/models/shapes:predict")
    assert r.status_code == 405 and "use POST" in r.json()["error"]
    from petal.client import RemoteModel

    with RemoteModel(url.removeprefix("http://")) as remote:  # 127.0.0.1:PORT, as a user types it
        assert [p.label for p in remote.predict([str(images[0])])] == [local.predict([str(images[0])])[0].label]


# --------------------------------------------------------------------------- hardening (issue 21)

@pytest.mark.parametrize("key", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"\\ud800"', b'{"a": ["\\udfff"]}'])
def test_a_key_that_cannot_be_passed_back_is_a_400_before_any_work(url, images, key, caplog):
    """Item 9 (row format): these keys were answered 500, after the inference was done."""
    caplog.set_level("INFO")
    image = b64(images[0].read_bytes())
    body = b'{"instances": [{"image_bytes": {"b64": "' + image.encode() + b'"}, "key": ' + key + b"}]}"
    r = predict(url, body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"].startswith(("body: expected JSON", "instances[0].key: cannot be passed back"))
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR" or rec.exc_info]
    assert predict(url, request_for(images[:1])).status_code == 200


def test_browsers_cannot_drive_a_local_server(url, images):
    """Item 13: a page of another site may not POST (text/plain, a form, or any type with the browser's
    cross-site marks), and a loopback server answers only loopback Host names (DNS rebinding)."""
    body = json.dumps(request_for(images[:1]))
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"):
        r = predict(url, body, headers={"Content-Type": ctype})
        assert r.status_code == 415 and "content-type: expected application/json" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/shapes/infer", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/octet-stream" in r.json()["error"]
    cross = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"},
             {"Origin": "null"}]
    for headers in cross:
        r = predict(url, body, headers=headers)
        assert r.status_code == 403 and "cross-site request refused" in r.json()["error"], headers
    for host in ("evil.example", "evil.example:80", "10.0.0.1", "127.0.0.1.evil.example"):
        for r in (httpx.get(f"{url}/v1/models", headers={"Host": host}), predict(url, body, headers={"Host": host})):
            assert r.status_code == 403 and "answers only loopback names" in r.json()["error"], host
    netloc = url.removeprefix("http://")
    same = [{"Sec-Fetch-Site": "same-origin", "Origin": url}, {"Origin": url}, {"Content-Type": "application/json"},
            {"Host": f"localhost:{netloc.split(':')[1]}"}, {"Host": "[::1]"}]
    for headers in same:
        assert predict(url, body, headers=headers).status_code == 200, headers
    assert httpx.get(f"{url}/").status_code == 200


def test_an_api_key_server_takes_cross_site_requests_to_its_auth_and_readyz_names_no_model(model_dir, images):
    """Item 18 (serving): /readyz names the models only to a caller with the key."""
    with running(ServeConfig({"shapes": model_dir}, limits=LIMITS, api_key="s3cret")) as (url, _):
        assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
        assert httpx.get(f"{url}/readyz", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ready"}
        named = httpx.get(f"{url}/readyz", headers={"Authorization": "Bearer s3cret"}).json()
        assert named == {"status": "ready", "models": ["shapes"]}
        r = predict(url, request_for(images[:1]), headers={"Origin": "http://other.example"})
        assert r.status_code == 401  # the key decides, not the guard
