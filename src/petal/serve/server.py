"""Run the app under uvicorn: one process, one event loop, one inference thread per model.

Scale out with replicas behind a load balancer (each replica batches on its own).
On SIGTERM / Ctrl-C uvicorn stops accepting connections, lets in-flight requests
finish (up to the request timeout), then the lifespan drains the batchers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from petal.serve.config import ServeConfig

if TYPE_CHECKING:
    import uvicorn


def make_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, *,
                access_log: bool = False, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn.Server for the app; `.run()` it (or `.run(sockets=[...])` on a bound socket).
    Connections have header and body deadlines (petal.serve.connections); the app itself
    limits the requests in progress (config.limits.max_concurrency)."""
    import uvicorn

    from petal.serve.app import create_app
    from petal.serve.connections import timed_protocol

    limits = config.limits
    uv = uvicorn.Config(
        create_app(config, host), host=host, port=port, log_level=log_level, access_log=access_log,
        http=timed_protocol(limits.header_timeout_s, limits.body_timeout_s),
        timeout_graceful_shutdown=int(limits.timeout_s) + 5,  # in-flight requests finish
        timeout_keep_alive=15, server_header=False,
    )
    return uvicorn.Server(uv)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, **kw: Any) -> None:
    """Serve until interrupted (blocking): this process is the server's."""
    from petal.images import quiet_pillow_warnings

    quiet_pillow_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    make_server(config, host, port, **kw).run()
