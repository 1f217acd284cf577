"""Soak: many requests, some malformed, at high concurrency, while idle clients hold connections.

    python benchmarks/soak.py --model RUN/model [--images FOLDER] [--requests 10000]
                              [--concurrency 32] [--idle 200] [--malformed 0.1]

Starts `petal serve` in its own process, keeps `--idle` connections open that send nothing
(re-opening each one the server closes, as a hostile client would), and sends `--requests`
one-image requests from `--concurrency` threads. A share `--malformed` of them is broken in
turn: invalid JSON, bad base64, bytes that are no image, a wrong field. Prints the status
codes seen (the aim: no 5xx), the server's RSS after warm-up and at the end, and how often
the server closed an idle connection.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def bodies(images: list[bytes], n: int, malformed: float) -> list[bytes]:
    """n request bodies; every round(1/malformed)-th one is broken, four ways in turn."""
    broken = [b'{"instances": [{"image_bytes": {"b64": ', b'{"instances": [{"image_bytes": {"b64": "@@@"}}]}',
              json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(b"<html>").decode()}}]}).encode(),
              b'{"instances": [{"pixels": [1, 2, 3]}]}']
    every = round(1 / malformed) if malformed else n + 1
    out = []
    for i in range(n):
        if i % every == every - 1:
            out.append(broken[(i // every) % len(broken)])
        else:
            b64 = base64.b64encode(images[i % len(images)]).decode()
            out.append(json.dumps({"instances": [{"image_bytes": {"b64": b64}}]}).encode())
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class IdleClients:
    """`n` connections that send nothing; one the server closes is opened again."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n, self.reopened, self.stop = port, n, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        socks = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(self.n)]
        for s in socks:
            s.setblocking(False)
        while not self.stop.wait(0.2):
            for i, s in enumerate(socks):
                try:
                    if s.recv(1) == b"":  # closed by the server
                        raise ConnectionResetError
                except BlockingIOError:
                    continue  # still open
                except OSError:
                    pass
                s.close()
                socks[i] = socket.create_connection(("127.0.0.1", self.port))
                socks[i].setblocking(False)
                self.reopened += 1
        for s in socks:
            s.close()


def send_all(url: str, payloads: list[bytes], threads: int, on_done) -> collections.Counter:
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(k, len(payloads), threads):
                try:
                    code = http.post(url, content=payloads[i], headers={"content-type": "application/json"}
                                     ).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    codes[code] += 1
                    on_done(sum(codes.values()))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=FLOWERS)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--malformed", type=float, default=0.1)
    ap.add_argument("--port", type=int, default=8793)
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[:300]]
    payloads = bodies(images, args.requests, args.malformed)
    proc = subprocess.Popen([sys.executable, "-m", "petal.cli", "serve", str(args.model), "--name", "m",
                             "--port", str(args.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        idle = IdleClients(args.port, args.idle)
        idle.thread.start()
        rss: dict[str, float] = {}
        warm = min(1000, args.requests // 10)

        def on_done(n: int) -> None:
            if n == warm:
                rss["after_warmup_mb"] = round(rss_mb(proc.pid), 1)

        start = time.perf_counter()
        codes = send_all(f"{url}/v1/models/m:predict", payloads, args.concurrency, on_done)
        seconds = time.perf_counter() - start
        rss["end_mb"] = round(rss_mb(proc.pid), 1)
        idle.stop.set()
        idle.thread.join()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    five = sum(n for c, n in codes.items() if not isinstance(c, int) or c >= 500)
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "idle_connections": args.idle,
                      "malformed_share": args.malformed, "status_codes": {str(k): v for k, v in codes.items()},
                      "5xx_or_transport_errors": five, "seconds": round(seconds, 1),
                      "requests_per_s": round(args.requests / seconds, 1), "server_rss": rss,
                      "rss_growth_mb": round(rss["end_mb"] - rss.get("after_warmup_mb", float("nan")), 1),
                      "idle_connections_closed_by_server": idle.reopened}, indent=1))


if __name__ == "__main__":
    main()
