"""The server stays up under idle, slow and expensive clients: a real uvicorn server on
loopback, raw sockets for the misbehaving clients, httpx for the real requests."""

import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from petal.serve.config import Limits, ServeConfig  # noqa: E402
from petal.serve.service import Service  # noqa: E402
from serve_helpers import b64, png_header, running  # noqa: E402

LIMITS = Limits(max_images=8, max_pixels=4_000_000, max_request_pixels=3_000_000, header_timeout_s=1.0,
                body_timeout_s=2.0, max_concurrency=16)


@pytest.fixture(scope="module")
def served(model_dir):
    with running(ServeConfig({"shapes": model_dir}, limits=LIMITS)) as (url, app):
        yield url, app


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes `sock` (recv gives b"") within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def request(url: str, image: bytes) -> httpx.Response:
    body = {"instances": [{"image_bytes": {"b64": b64(image)}}]}
    return httpx.post(f"{url}/v1/models/shapes:predict", json=body, timeout=30)


def test_300_idle_connections_do_not_starve_a_real_request(served, dataset):
    url, _ = served
    image = next(dataset.rglob("*.png")).read_bytes()
    idle = [connect(url) for _ in range(300)]  # more than max_concurrency (16), sending nothing
    try:
        r = request(url, image)
        assert r.status_code == 200, r.text
        assert "error" not in r.json()["predictions"][0]
    finally:
        for s in idle:
            s.close()


def test_a_silent_connection_is_closed_after_the_header_timeout(served):
    url, _ = served
    start = time.monotonic()
    with connect(url) as s:
        s.sendall(b"POST /v1/models/shapes:predict HTTP/1.1\r\nHost: localhost\r\n")  # headers never end
        assert closed_within(s, 5)
    assert 0.8 < time.monotonic() - start < 4  # header_timeout_s = 1, counted from accept


def test_a_dripping_body_is_cut_at_the_body_timeout(served):
    url, _ = served
    start = time.monotonic()
    with connect(url) as s:
        s.sendall(b"POST /v1/models/shapes:predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")  # headers in time, the body never
        for _ in range(4):
            time.sleep(0.4)
            s.sendall(b" ")  # a byte now and then: still too slow
        assert closed_within(s, 5)
    assert 1.8 < time.monotonic() - start < 5  # body_timeout_s = 2, counted from accept


def test_a_request_over_the_pixel_budget_is_refused_from_the_headers(served):
    url, _ = served
    big = png_header(1500, 1000)  # 1.5 MP each, under max_pixels; two of them over the 3 MP budget
    body = {"instances": [{"image_bytes": {"b64": b64(big)}} for _ in range(3)]}
    r = httpx.post(f"{url}/v1/models/shapes:predict", json=body, timeout=30)
    assert r.status_code == 413
    assert "4,500,000 pixels decoded, over the 3,000,000 a request may" in r.json()["error"]


def test_decoding_is_skipped_once_the_request_deadline_passed(model_dir, dataset):
    service = Service(ServeConfig({"shapes": model_dir}, limits=LIMITS))
    service.load()
    try:
        served = service.get("shapes")
        image = next(dataset.rglob("*.png")).read_bytes()
        assert service._decode(image, served, deadline=time.monotonic() + 60).shape[-1] == 3
        assert service._decode(image, served, deadline=time.monotonic() - 1) == \
            "not decoded: the request's time ran out"
    finally:
        service.close()


def test_busy_is_a_503_counted_in_requests_and_health_probes_still_answer():
    import asyncio

    from petal.serve.limits import ConcurrencyLimit

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        if scope["path"] == "/work":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario():
        transport = httpx.ASGITransport(app=ConcurrencyLimit(slow_app, max_requests=1))
        async with httpx.AsyncClient(transport=transport, base_url="http://petal") as client:
            first = asyncio.create_task(client.get("/work"))
            await asyncio.sleep(0.05)  # the first request is in the app, holding the one slot
            second = await client.get("/work")
            health = await client.get("/healthz")
            release.set()
            return (await first).status_code, second, health.status_code

    first, second, health = asyncio.run(scenario())
    assert (first, second.status_code, health) == (200, 503, 200)
    assert "server busy" in second.json()["error"] and second.headers["retry-after"] == "1"


def encoded(size: tuple[int, int], fmt: str, **kw) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (40, 160, 90)).save(buf, fmt, **kw)
    return buf.getvalue()


def test_the_default_pixel_budget_refuses_cheap_requests_that_cost_seconds_to_decode(model_dir):
    """Item 11: three 6000 x 6000 lossless WebPs (a few KB) cost seconds of decoding; the default budget
    refuses them from their headers. JPEG photos count at their draft scale, so nine 12 MP ones pass."""
    webp, jpeg = encoded((6000, 6000), "WEBP", lossless=True), encoded((4000, 3000), "JPEG")
    with running(ServeConfig({"shapes": model_dir})) as (url, _):
        start = time.perf_counter()
        r = request_many(url, [webp] * 3)
        assert r.status_code == 413 and "108,000,000 pixels decoded" in r.json()["error"], r.text[:300]
        assert time.perf_counter() - start < 2.0
        r = request_many(url, [jpeg] * 9)  # 108 MP in full, 1.7 MP decoded
        assert r.status_code == 200 and all("error" not in p for p in r.json()["predictions"]), r.text[:300]
    from petal.backbones import get_backbone
    from petal.images import decode_pixels

    assert decode_pixels(jpeg, get_backbone("efficientnet_lite0").preprocess) == 500 * 375  # 1/8 scale
    assert Limits().max_request_pixels <= 150_000_000  # a few seconds of decoding, not 1e9


def request_many(url: str, images: list[bytes]) -> httpx.Response:
    body = {"instances": [{"image_bytes": {"b64": b64(image)}} for image in images]}
    return httpx.post(f"{url}/v1/models/shapes:predict", json=body, timeout=60)
