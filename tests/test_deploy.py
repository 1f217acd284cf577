"""Deployment contracts: the Vertex AI custom-container variables, the container recipe and
the Kubernetes manifests, each against a real `petal serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from petal.bundle import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def petal_serve(args: list[str], env: dict[str, str], port: int, ready: str, log: Path):
    """`petal serve ARGS` in a subprocess until GET `ready` answers 200 (bounded wait)."""
    out = open(log, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "petal.cli", "serve", *args], stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **env})
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready}").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        out.close()


def test_vertex_ai_variables_route_the_server(model_dir, dataset, tmp_path):
    port = free_port()
    env = {"AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": "/vertex/health",
           "AIP_PREDICT_ROUTE": "/vertex/predict", "AIP_STORAGE_URI": Path(model_dir).resolve().as_uri()}
    image = next(dataset.glob("squares/*.png"))
    with petal_serve(["--host", "127.0.0.1"], env, port, "/vertex/health", tmp_path / "log") as url:
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(image.read_bytes()).decode()}, "key": "a"}]}
        rows = httpx.post(f"{url}/vertex/predict", json=body, timeout=60).json()["predictions"]
    want = Model(model_dir).predict([str(image)])[0]
    assert rows[0]["key"] == "a" and rows[0]["label"] == want.label == "squares"
