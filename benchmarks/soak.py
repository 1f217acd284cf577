"""Soak: many requests, some malformed, at high concurrency, while idle clients hold connections,
in turns with cheap-but-expensive requests (issue 21: items 2, 10, 11) and without them.

    python benchmarks/soak.py --model RUN/model [--images FOLDER] [--requests 10000]
                              [--concurrency 32] [--idle 200] [--malformed 0.1]
                              [--rounds 4] [--attackers 2]

Starts `petal serve` in its own process, keeps `--idle` connections open that send nothing
(re-opening each one the server closes, as a hostile client would), and sends `--requests`
one-image requests from `--concurrency` threads. A share `--malformed` of them is broken in
turn: invalid JSON, bad base64, bytes that are no image, a wrong field.

The requests go in `--rounds` x 2 phases of equal size, in turns: "quiet", then "attacked",
where `--attackers` more threads send, back to back, the expensive requests the issue found:
BYTES [1, 3000] one-pixel PNGs (binary and JSON forms; item 2), 8M zero-length BYTES elements
in a 32 MB body and a 15M-element row key (item 10), 27 lossless 6000 x 6000 WebPs and a
29-byte GIF declaring 6000 x 6000 (item 11). Prints the status codes of both kinds (the aim:
no 5xx), the p50 / p99 latency of the well-formed normal requests in each variant (the aim:
p99 attacked within 2 x quiet), the server's RSS after warm-up and at the end, and how often
the server closed an idle connection. Run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import socket
import struct
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


def attack_requests() -> list[tuple[str, str, bytes, dict]]:
    """(name, route, body, headers) of each cheap-but-expensive request the issue found."""
    from PIL import Image

    def encoded(size: tuple[int, int], fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, (40, 160, 90)).save(buf, fmt, **kw)
        return buf.getvalue()

    def binary(shape: list[int], elements: list[bytes]) -> tuple[bytes, dict]:
        raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
        header = json.dumps({"inputs": [{"name": "images", "shape": shape, "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return header + raw, {"Inference-Header-Content-Length": str(len(header))}

    png, webp = encoded((1, 1), "PNG"), encoded((6000, 6000), "WEBP", lossless=True)
    gif = (b"GIF89a" + struct.pack("<HHBBB", 6000, 6000, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, 6000, 6000, 0)
           + b"\x02\x02\x4c\x01\x00\x3b")
    rows = [("item 11: 27 lossless 6000x6000 WebPs", [webp] * 27), ("item 11: a GIF declaring 6000x6000", [gif])]
    v2_json = json.dumps({"inputs": [{"name": "images", "shape": [1, 3000], "datatype": "BYTES",
                                      "data": [base64.b64encode(png).decode()] * 3000}]}).encode()
    key = b"[" + b"0," * 15_000_000 + b"0]"
    out = [("item 2: BYTES [1, 3000] binary", "v2", *binary([1, 3000], [png] * 3000)),
           ("item 2: BYTES [1, 3000] JSON", "v2", v2_json, {"content-type": "application/json"}),
           ("item 10: 8M zero-length elements", "v2", *binary([1, 8_000_000], [b""] * 8_000_000)),
           ("item 10: a 15M-element row key", "v1",
            b'{"instances": [{"image_bytes": {"b64": "AA=="}, "key": ' + key + b"}]}", {})]
    for name, images in rows:
        doc = {"instances": [{"image_bytes": {"b64": base64.b64encode(i).decode()}} for i in images]}
        out.append((name, "v1", json.dumps(doc).encode(), {"content-type": "application/json"}))
    return out


class Attackers:
    """`n` threads sending the attack requests back to back while `active` is set."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.requests = url, attack_requests()
        self.active, self.stop = threading.Event(), threading.Event()
        self.codes: dict[str, collections.Counter] = {name: collections.Counter() for name, *_ in self.requests}
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def run(self, k: int) -> None:
        routes = {"v1": f"{self.url}/v1/models/m:predict", "v2": f"{self.url}/v2/models/m/infer"}
        with httpx.Client(timeout=120) as http:
            i = k
            while not self.stop.is_set():
                if not self.active.wait(0.1):
                    continue
                name, route, body, headers = self.requests[i % len(self.requests)]
                try:
                    code = http.post(routes[route], content=body, headers=headers).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                self.codes[name][code] += 1
                i += 1

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def send_all(url: str, payloads: list[bytes], threads: int, on_done) -> tuple[collections.Counter, list[float]]:
    """Send every payload; (status codes, latency in s of each one answered 200)."""
    codes: collections.Counter = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(k, len(payloads), threads):
                start = time.perf_counter()
                try:
                    code = http.post(url, content=payloads[i], headers={"content-type": "application/json"}
                                     ).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    codes[code] += 1
                    if code == 200:
                        latencies.append(time.perf_counter() - start)
                    on_done(sum(codes.values()))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return codes, latencies


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1) if values else float("nan")


def start_server(model: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "petal.cli", "serve", str(model), "--name", "m",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)


def run_phases(url: str, payloads: list[bytes], args: argparse.Namespace, attackers: Attackers, on_done) -> dict:
    """Quiet and attacked phases in turns -> per variant: status codes and latencies."""
    out = {v: {"codes": collections.Counter(), "latencies": []} for v in ("quiet", "attacked")}
    size = len(payloads) // (2 * args.rounds)
    for r in range(2 * args.rounds):
        variant = "attacked" if r % 2 else "quiet"
        if variant == "attacked":
            attackers.active.set()
        codes, latencies = send_all(f"{url}/v1/models/m:predict", payloads[r * size:(r + 1) * size],
                                    args.concurrency, on_done)
        attackers.active.clear()
        out[variant]["codes"].update(codes)
        out[variant]["latencies"] += latencies
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=FLOWERS)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--malformed", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=4, help="quiet/attacked turns")
    ap.add_argument("--attackers", type=int, default=2, help="threads sending the expensive requests")
    ap.add_argument("--port", type=int, default=8793)
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[:300]]
    payloads = bodies(images, args.requests, args.malformed)
    proc = start_server(args.model, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        idle = IdleClients(args.port, args.idle)
        idle.thread.start()
        attackers = Attackers(url, args.attackers)
        rss: dict[str, float] = {}
        warm = min(1000, args.requests // 10)

        def on_done(n: int) -> None:
            if n == warm and "after_warmup_mb" not in rss:
                rss["after_warmup_mb"] = round(rss_mb(proc.pid), 1)

        start = time.perf_counter()
        phases = run_phases(url, payloads, args, attackers, on_done)
        seconds = time.perf_counter() - start
        rss["end_mb"] = round(rss_mb(proc.pid), 1)
        attackers.close()
        idle.stop.set()
        idle.thread.join()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report(args, phases, attackers, rss, seconds, idle.reopened)


def report(args: argparse.Namespace, phases: dict, attackers: Attackers, rss: dict, seconds: float,
           reopened: int) -> None:
    def five(codes: collections.Counter) -> int:
        return sum(n for c, n in codes.items() if not isinstance(c, int) or c >= 500)

    variants = {v: {"status_codes": {str(k): n for k, n in p["codes"].items()}, "5xx": five(p["codes"]),
                    "p50_ms": percentile(p["latencies"], 0.5), "p99_ms": percentile(p["latencies"], 0.99)}
                for v, p in phases.items()}
    attacks = {name: {str(k): n for k, n in codes.items()} for name, codes in attackers.codes.items()}
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "idle_connections": args.idle,
                      "malformed_share": args.malformed, "rounds": args.rounds, "attackers": args.attackers,
                      "normal": variants, "attack_status_codes": attacks,
                      "attack_5xx": sum(five(collections.Counter(c)) for c in attackers.codes.values()),
                      "p99_attacked_over_quiet": round(variants["attacked"]["p99_ms"] / variants["quiet"]["p99_ms"], 2),
                      "seconds": round(seconds, 1), "requests_per_s": round(args.requests / seconds, 1),
                      "server_rss": rss,
                      "rss_growth_mb": round(rss["end_mb"] - rss.get("after_warmup_mb", float("nan")), 1),
                      "idle_connections_closed_by_server": reopened}, indent=1))


if __name__ == "__main__":
    main()
