"""What `petal serve` is told: which models, limits, batching, auth. No heavy imports."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from petal.errors import PetalError
from petal.params import Bool, Instance, Int, Real, Rule, Validated, env_int

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no ':' or '/': names sit in URL paths
API_KEY_ENV = "PETAL_API_KEY"
API_KEY_FILE_ENV = "PETAL_API_KEY_FILE"


@dataclass(frozen=True)
class Limits(Validated):
    PARAMS: ClassVar[dict[str, Rule]] = {
        "max_body_bytes": Int(1024), "max_images": Int(1), "max_pixels": Int(1), "max_request_pixels": Int(1),
        "timeout_s": Real(0, low_open=True), "header_timeout_s": Real(0, low_open=True),
        "body_timeout_s": Real(0, low_open=True), "max_concurrency": Int(1)}

    max_body_bytes: int = 32 * 1024 * 1024  # whole request body; more -> 413
    max_images: int = 64  # instances or files per request; more -> 413
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    # All images of a request, decoded (JPEGs at their draft scale), from their headers; more -> 413.
    # Tied to decode capacity: about 3 s on one core for the slowest formats petal reads
    # (lossless WebP, PNG: 25-40 MP/s measured); a JPEG photo counts at 1/8 of its size or less.
    max_request_pixels: int = 100_000_000
    timeout_s: float = 30.0  # per request, body upload included; -> 408 (upload) or 503
    header_timeout_s: float = 10.0  # from accept to the request's headers; then the connection is closed
    body_timeout_s: float = 30.0  # from accept to the whole request; then the connection is closed
    max_concurrency: int = 256  # requests in progress; one more -> 503 "busy" (idle connections don't count)


@dataclass(frozen=True)
class Batching(Validated):
    PARAMS: ClassVar[dict[str, Rule]] = {"max_batch": Int(1), "max_wait_ms": Real(0, 1000)}

    # Images per ONNX Runtime call. On a CPU, images/s hardly grows past 8, but ONNX Runtime's
    # memory arena keeps the peak: +75 MB at 8, +340 MB at 32 (EfficientNet-Lite0, 224 px).
    max_batch: int = 8
    max_wait_ms: float = 5.0  # how long a batch may wait to fill up, when under load


@dataclass(frozen=True)
class ServeConfig(Validated):
    PARAMS: ClassVar[dict[str, Rule]] = {"limits": Instance(Limits), "batching": Instance(Batching),
                                         "threads": Int(1, none_ok=True), "decode_workers": Int(1, none_ok=True),
                                         "reject_unknown": Bool()}

    models: dict[str, Path]  # URL name -> bundle folder
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    api_key: str | None = None  # None or "": no auth
    threads: int | None = None  # ONNX Runtime intra-op threads [default: all cores, no spin-wait]
    decode_workers: int | None = None  # image decode threads [default: all cores]
    reject_unknown: bool = True  # False: never answer "unknown" (a request can also say ?unknown=false)
    precision: str | None = None  # petal.precision: None runs each bundle at its own
    vertex: VertexEnv | None = None  # Vertex AI's health and predict routes, when it sets them

    def check_together(self) -> None:
        if not self.models:
            raise PetalError("serve: expected at least one model (a bundle path or --model NAME=PATH)")


@dataclass(frozen=True)
class VertexEnv:
    """The Vertex AI custom-container contract, from the variables Vertex sets."""

    port: int  # AIP_HTTP_PORT
    health_route: str  # AIP_HEALTH_ROUTE: 200 once the model is loaded
    predict_route: str  # AIP_PREDICT_ROUTE: {"instances": [...]} in, {"predictions": [...]} out
    storage_uri: str | None  # AIP_STORAGE_URI: the model folder, local or gs:// (copied at start-up)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> VertexEnv | None:
        env = os.environ if env is None else env
        if not env.get("AIP_HTTP_PORT"):
            return None
        port = env_int("AIP_HTTP_PORT", 8080)
        return cls(port, env.get("AIP_HEALTH_ROUTE") or "/healthz",
                   env.get("AIP_PREDICT_ROUTE") or "/predict", env.get("AIP_STORAGE_URI") or None)


def apply_vertex(model: str | None, host: str | None, port: int, vertex: VertexEnv | None
                 ) -> tuple[Path | None, str, int]:
    """(model, host, port) as `petal serve` uses them: under Vertex AI, the model from
    AIP_STORAGE_URI unless given, all interfaces unless --host says otherwise, AIP_HTTP_PORT.
    A model URI (gs://, s3://, file://) is copied into a local folder first."""
    if vertex is not None:
        model, port, host = model or vertex.storage_uri, vertex.port, host or "0.0.0.0"
    return (local_model(model) if model else None), host or "127.0.0.1", port


def local_model(uri: str) -> Path:
    """A bundle folder given by path or URI, as a local folder (remote ones are copied once)."""
    import tempfile

    from petal.storage import copy_folder, is_local, local_path

    if is_local(uri):
        return Path(local_path(uri))
    return copy_folder(uri, Path(tempfile.mkdtemp(prefix="petal-model-")))


def check_bundle(name: str, path: Path) -> Path:
    if not NAME_RE.fullmatch(name):
        raise PetalError(f"model name: expected letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
    if not (path / "petal.json").is_file():
        hint = f"did you mean {path / 'model'}?" if (path / "model" / "petal.json").is_file() else \
            "expected an exported folder such as runs/NAME/model"
        raise PetalError(f"model {name!r}: {path} is not a petal model bundle (no petal.json); {hint}")
    return path


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before any model loads: one line, not uvicorn's message."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PetalError(f"port: cannot listen on {host}:{port} ({e.strerror or e}); is another server "
                             "running there? choose another --port") from None


def model_specs(path: Path | None, name: str | None, specs: list[str]) -> dict[str, Path]:
    """`petal serve PATH --name N --model N2=PATH2 ...` -> {name: path}, each checked."""
    models: dict[str, Path] = {}
    if path is not None:
        models[name or default_name(path)] = path
    elif name:
        raise PetalError("--name: names the bundle PATH argument, but none was given")
    for spec in specs:
        n, sep, p = spec.partition("=")
        if not sep or not n or not p:
            raise PetalError(f"--model: expected NAME=PATH, got {spec!r}")
        if n in models:
            raise PetalError(f"--model: the name {n!r} is used twice")
        models[n] = Path(p)
    for n, p in models.items():
        check_bundle(n, p)
    return models


def default_name(path: Path) -> str:
    """The bundle's own name (petal.json's, set by `petal export --name`), else its run folder's:
    runs/flowers/model -> 'flowers', as `Model.name` does."""
    path = path.resolve()
    try:
        name = json.loads((path / "petal.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):  # no bundle there: check_bundle says so
        name = None
    if not isinstance(name, str) or not name.strip():
        name = path.parent.name if path.name == "model" else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-") or "model"


def api_key_from_env(given: str | None, key_file: str | Path | None = None) -> str | None:
    """The API key: given, else from a file (--api-key-file or $PETAL_API_KEY_FILE, which `ps`
    does not show, unlike argv), else $PETAL_API_KEY; None: no auth."""
    key_file = key_file or os.environ.get(API_KEY_FILE_ENV)
    if not given and key_file:
        try:
            given = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise PetalError(f"api key file: cannot read {key_file} ({e.strerror or e})") from None
        if not given:
            raise PetalError(f"api key file: {key_file} is empty")
    return given or os.environ.get(API_KEY_ENV) or None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when serving beyond loopback with no API key."""
    if api_key or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the "
            f"models; set --api-key-file or ${API_KEY_FILE_ENV} (or put an authenticating proxy in front)")
