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
def petal_serve(args: list[str], env: dict[str, str], port: int, ready: str, log: Path,
                petal: tuple[str, ...] = (sys.executable, "-m", "petal.cli")):
    """`petal serve ARGS` in a subprocess until GET `ready` answers 200 (bounded wait)."""
    out = open(log, "w+")
    proc = subprocess.Popen([*petal, "serve", *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
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
    assert "POST http://127.0.0.1:" in (tmp_path / "log").read_text()  # the startup log names the predict URL


def manifests() -> list[dict]:
    import yaml

    docs = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    pod = spec.get("template", {}).get("spec") or spec.get("predictor") or {}
    return pod.get("containers", [])


def test_kubernetes_manifests_probe_real_routes(model_dir):
    from petal.serve.config import ServeConfig
    from serve_helpers import running

    docs = manifests()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "InferenceService"} <= {d["kind"] for d in docs}
    probes = [(c[p]["httpGet"]["path"], c[p]["httpGet"]["port"], c) for d in docs for c in containers(d)
              for p in ("readinessProbe", "livenessProbe")]
    assert len(probes) == 4
    for _, port, c in probes:  # every probe targets the port the container listens on
        assert port in [p["containerPort"] for p in c["ports"]] and "8080" in " ".join(
            [*c.get("args", []), *(e["value"] for e in c.get("env", []))])
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] == 8080
    kinds = {d["kind"]: d for d in docs}
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    with running(ServeConfig({"flowers": model_dir})) as (url, _):
        for path, _, _ in probes:
            assert httpx.get(url + path).status_code == 200, path


@pytest.mark.slow
def test_container_recipe_installs_serving_only(model_dir, dataset, tmp_path):
    """The Dockerfile's install step, run in a fresh venv: no torch, under 500 MB, and the
    server answers; training commands say in one line which extra to install."""
    recipe = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in recipe and "pip install --no-cache-dir '.[serve]'" in recipe
    assert "\nUSER petal" in recipe and "/healthz" in recipe.split("HEALTHCHECK", 1)[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{ROOT}[serve]"], capture_output=True,
                         text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    python, petal_cmd = str(venv / "bin" / "python"), str(venv / "bin" / "petal")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < 500 * 2**20, f"{size / 2**20:.0f} MB"
    r = subprocess.run([petal_cmd, "train", str(dataset), "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'petal[train]'" in r.stderr and "Traceback" not in r.stderr
    port = free_port()
    with petal_serve([str(model_dir), "--port", str(port)], {}, port, "/readyz", tmp_path / "log", (petal_cmd,)) as url:
        image = next(dataset.glob("circles/*.png"))
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(image.read_bytes()).decode()}}]}
        row = httpx.post(f"{url}/v1/models/shapes:predict", json=body, timeout=60).json()
    assert row["predictions"][0]["label"] == "circles"
