"""`petal serve` and `petal encode-request`.

Thin: parse options, call `petal.serve`. FastAPI and uvicorn are imported only
when `petal serve` runs, so the rest of the CLI starts fast without them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.cli.command import Command
from petal.errors import PetalError
from petal.serve.config import Batching, Limits

LIM, BAT = Limits(), Batching()  # the serving defaults, shown in --help

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app

ModelPath = Annotated[Optional[str], typer.Argument(help=(
    "Exported model folder (RUN/model), or its URI (gs://..., file://...); under Vertex AI, "
    "AIP_STORAGE_URI gives it."))]
Precision = Annotated[Optional[str], typer.Option(help=(
    "Run the models at this precision: bf16 runs fp32 bundles on OpenVINO; default: each bundle's own "
    "(int8 for a bundle from petal export RUN --precision int8)."))]


@commands.command("serve", cls=Command)
def serve(
    model: ModelPath = None,
    *,
    name: Annotated[Optional[str], typer.Option(help="URL name of MODEL (default: its run folder).")] = None,
    models: Annotated[Optional[list[str]], typer.Option("--model", help="More models: NAME=PATH (repeat).")
                      ] = None,
    host: Annotated[Optional[str], typer.Option(help=(
        "Interface to listen on; 0.0.0.0 for all (default 127.0.0.1; under Vertex AI 0.0.0.0)."))] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(envvar="PETAL_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY'.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(envvar="PETAL_API_KEY_FILE", show_envvar=True, help=(
        "Read the API key from this file (unlike --api-key, `ps` does not show it)."))] = None,
    max_batch: Annotated[int, typer.Option(help="Images per inference call (memory grows with it).")] = BAT.max_batch,
    batch_wait_ms: Annotated[float, typer.Option(help="Longest wait (ms) for a batch to fill.")] = BAT.max_wait_ms,
    max_body_mb: Annotated[float, typer.Option(help="Request body limit (413 beyond).")] = LIM.max_body_bytes / 2**20,
    max_images: Annotated[int, typer.Option(help="Images per request (413 beyond).")] = LIM.max_images,
    max_pixels: Annotated[int, typer.Option(help="Pixels per image, checked before decoding.")] = LIM.max_pixels,
    max_request_pixels: Annotated[int, typer.Option(help=(
        "Pixels all images of a request will decode (JPEGs at draft scale), from their headers (413 beyond)."))
    ] = LIM.max_request_pixels,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds.")] = LIM.timeout_s,
    header_timeout: Annotated[float, typer.Option(help=(
        "Seconds from accepting a connection to its request headers; then it is closed."))] = LIM.header_timeout_s,
    body_timeout: Annotated[float, typer.Option(help=(
        "Seconds from accepting a connection to its whole request; then it is closed."))] = LIM.body_timeout_s,
    max_concurrency: Annotated[int, typer.Option(help=(
        "Requests in progress before 503 'busy' (idle connections do not count)."))] = LIM.max_concurrency,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads (default: all cores).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decode threads (default: all cores).")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    unknown: Annotated[bool, typer.Option(help=(
        "Answer unknown for images unlike every class; --no-unknown always names the nearest class."))] = True,
    precision: Precision = None,
) -> None:
    """Serve models over HTTP (Cloud ML / TF Serving JSON API, upload endpoint, web page at /)."""
    from petal.serve.config import (
        ServeConfig,
        VertexEnv,
        api_key_from_env,
        apply_vertex,
        check_port,
        model_specs,
    )
    from petal.serve.server import serve as run_server

    require_serving_packages()
    vertex = VertexEnv.from_env()
    model_path, host, port = apply_vertex(model, host, port, vertex)
    config = ServeConfig(
        models=model_specs(model_path, name, models or []),
        limits=Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_images=max_images, max_pixels=max_pixels,
                      max_request_pixels=max_request_pixels, timeout_s=timeout, header_timeout_s=header_timeout,
                      body_timeout_s=body_timeout, max_concurrency=max_concurrency),
        batching=Batching(max_batch=max_batch, max_wait_ms=batch_wait_ms),
        api_key=api_key_from_env(api_key, api_key_file), threads=threads, decode_workers=workers,
        reject_unknown=unknown, precision=precision, vertex=vertex)
    check_port(host, port)
    announce(config, host, port)
    run_server(config, host, port, access_log=access_log)


def announce(config, host: str, port: int) -> None:
    """Before loading: a warning if the server is exposed without a key, and each predict URL."""
    from petal.serve.config import exposure_warning

    if warning := exposure_warning(host, config.api_key):
        typer.secho(warning, fg="yellow", err=True)
    for n in config.models:
        typer.echo(f"serving {n}: POST http://{host}:{port}/v1/models/{n}:predict (page: http://{host}:{port}/)",
                   err=True)


def require_serving_packages() -> None:
    """Before any work: FastAPI and uvicorn are installed, or the extra that brings them is named."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise PetalError(f"serve: needs the serving packages ({e.name} is missing); "
                         "install them with: pip install 'petal[serve]'") from None


@commands.command("encode-request", cls=Command)
def encode_request(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    *,
    output: Annotated[Optional[Path], typer.Option(help=(
        "Write here instead of stdout; split requests go to NAME-1.json, NAME-2.json, ..."))] = None,
    max_per_request: Annotated[Optional[int], typer.Option(min=1, help=(
        "Split into requests of at most this many images (stdout: one request per line)."))] = None,
) -> None:
    """Encode images into a JSON predict request (each file's path is its key)."""
    from petal.data import expand_inputs
    from petal.serve.protocol import encode_requests, oversize
    from petal.storage import atomic_write_text, check_output

    if output:
        check_output(output, "output")
    uris, problems = expand_inputs(inputs)
    if problems:
        raise PetalError(f"encode-request: {problems[0]}")
    bodies = encode_requests(uris, max_per_request)
    for i, (n, body) in enumerate(bodies):
        if why := oversize(n, body, LIM.max_images, LIM.max_body_bytes):
            typer.secho(f"warning: request {i + 1} holds {why}: `petal serve` refuses it by default "
                        f"(413); split it with --max-per-request {LIM.max_images}", fg="yellow", err=True)
    if not output:
        sys.stdout.write("\n".join(body for _, body in bodies) + "\n")
        return
    names = [output] if len(bodies) == 1 else [
        output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(len(bodies))]
    for name, (_, body) in zip(names, bodies):
        atomic_write_text(name, body)
    typer.echo(f"{len(uris)} images in {len(bodies)} request(s): {', '.join(map(str, names))}", err=True)

