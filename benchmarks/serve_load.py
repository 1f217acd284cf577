"""Load benchmark for `petal serve` (a benchmark, not a test: it prints figures).

    .venv/bin/python benchmarks/serve_load.py                 # trains a small synthetic model first
    .venv/bin/python benchmarks/serve_load.py --model runs/flowers/model --soak

1. Offline rate: `Model.iter_predict` (what `petal predict` runs) over the same JPEGs.
2. Starts `petal serve` on loopback in a subprocess and drives it with real JPEGs
   (one image per request) at concurrency 1, 8 and 32: requests/s, images/s, p50/p99.
   Every answer is checked against the offline prediction of the same file.
3. --soak: 10,000 requests, ~10% malformed (bad JSON, bad base64, not images,
   decompression bombs, oversized bodies...). Expects zero 5xx, every good request
   answered correctly, and reports the server's RSS growth.

Targets on a 2-core machine: images/s at concurrency 32 >= 70% of the offline rate;
p50 at concurrency 1 < 30 ms; soak: no 5xx, RSS growth < 50 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "datasets" / "flower_photos"
JSON = {"content-type": "application/json"}


def train_small_model(out: Path, cache: Path | None) -> Path:
    """A bundle trained on a small synthetic set (the backbone is what costs, not the head)."""
    from petal.head import HeadClassifier
    from petal.runs.head import train
    from petal.spec import DataSpec, RunSpec
    from petal.synthetic import make_dataset

    print("training a small synthetic model...", flush=True)
    data = make_dataset(out / "data", per_class=16, seed=1)
    return train(RunSpec(DataSpec(data, eval_percent=25.0), out / "run", cache_dir=cache,
                         trainer=HeadClassifier(epochs=20, seed=0))).model_dir


def pick_jpegs(folder: Path, n: int) -> list[Path]:
    """n JPEGs spread over the class folders, in a fixed order."""
    files = sorted(folder.glob("*/*.jpg"))
    if not files:
        sys.exit(f"no JPEGs under {folder}; pass --images DIR")
    return files[:: max(1, len(files) // n)][:n]


def offline_rate(model_dir: Path, files: list[Path]) -> tuple[float, dict[str, np.ndarray]]:
    """images/s of Model.iter_predict (the `petal predict` path: threaded decode + batches of 32)."""
    from petal.bundle import Model

    m = Model(model_dir)
    list(m.iter_predict([str(f) for f in files[:32]]))  # warm up
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < 10:  # whole passes, at least 10 s: one is too noisy
        preds = list(m.iter_predict([str(f) for f in files]))
        done += len(files)
    rate = done / (time.perf_counter() - start)
    return rate, {p.uri: p.probabilities for p in preds}


def request_body(images: list[bytes], key: str = "k") -> bytes:
    return json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(d).decode()}, "key": key}
                                     for d in images]}).encode()


def start_server(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "petal.cli", "serve", str(model_dir), "--name", "bench", "--port", str(port),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):  # bounded: 2 minutes
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    sys.exit("server did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connection:
    """A minimal keep-alive HTTP/1.1 client. The load generator shares the 2 cores with the
    server, so it must be cheap: httpx costs 3-8 ms of CPU per request here, this ~0.3 ms."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body); status 0 if the connection failed (then it reconnects next time)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)))
            self.writer.write(body)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            answer = await self.reader.readexactly(int(headers.get("content-length", 0)))
            if headers.get("connection", "").lower() == "close":
                self.close()
            return int(lines[0].split()[1]), answer
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            return 0, b""

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def drive(url: str, jobs, concurrency: int, seconds: float | None, check) -> dict:
    """`concurrency` connections send jobs (an iterator of (kind, body)) until it ends or time
    runs out. check(kind, status, body) -> a problem string or None."""
    parsed = httpx.URL(url)
    lat: list[float] = []
    counts = {"requests": 0, "5xx": 0, "problems": 0, "connection errors": 0}
    problems: list[str] = []
    stop = time.perf_counter() + seconds if seconds else float("inf")

    async def worker():
        conn = Connection(parsed.host, parsed.port)
        for kind, body in jobs:
            t = time.perf_counter()
            status, answer = await conn.post(parsed.raw_path.decode(), body)
            lat.append(time.perf_counter() - t)
            counts["requests"] += 1
            counts["5xx"] += status >= 500
            counts["connection errors"] += status == 0
            if (problem := check(kind, status, answer)) is not None:
                counts["problems"] += 1
                problems.append(problem)
            if time.perf_counter() > stop:
                break
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    counts["seconds"] = time.perf_counter() - start
    counts["latencies"] = np.array(lat)
    counts["first_problems"] = problems[:5]
    return counts


def good_checker(expected: dict[str, np.ndarray]):
    """A good request must answer 200 with the offline prediction of the same file."""
    def check(kind: str, status: int, answer: bytes) -> str | None:
        if status != 200:
            return f"{kind}: HTTP {status} {answer[:100]!r}"
        row = json.loads(answer)["predictions"][0]
        want = expected[kind]
        if "error" in row or row["prediction"] != int(np.argmax(want)) \
                or not np.allclose(row["scores"], want, atol=1e-3):
            return f"{kind}: wrong answer {str(row)[:100]}"
        return None
    return check


def load_levels(url: str, bodies: dict[str, bytes], expected, levels: list[int], seconds: float) -> list[dict]:
    results = []
    keys = list(bodies)
    for c in levels:
        def jobs(n=10**6):  # bounded; the duration ends it first
            for i in range(n):
                yield keys[i % len(keys)], bodies[keys[i % len(keys)]]
        shared = jobs()
        asyncio.run(drive(url, shared, c, 2.0, good_checker(expected)))  # warm up at this concurrency
        r = asyncio.run(drive(url, shared, c, seconds, good_checker(expected)))
        r["concurrency"] = c
        results.append(r)
        lat = r["latencies"] * 1000
        print(f"  concurrency {c:>2}: {r['requests'] / r['seconds']:7.1f} requests/s  "
              f"{r['requests'] / r['seconds']:7.1f} images/s  p50 {np.percentile(lat, 50):6.1f} ms  "
              f"p99 {np.percentile(lat, 99):6.1f} ms  ({r['requests']} requests, {r['5xx']} 5xx, "
              f"{r['problems']} wrong)", flush=True)
        for p in r["first_problems"]:
            print("    ", p)
    return results


def malformed_bodies(jpeg: bytes, max_body: int, max_images: int) -> dict[str, tuple[bytes, int]]:
    """kind -> (body, expected HTTP status). 200 means: answered, with an error in the slot."""
    def png_header(w: int, h: int) -> bytes:  # a tiny file claiming w x h pixels: a bomb's header
        def chunk(t: bytes, d: bytes) -> bytes:
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))

    def one(b64: str) -> bytes:
        return json.dumps({"instances": [{"image_bytes": {"b64": b64}, "key": "bad"}]}).encode()

    return {
        "not json": (b"{this is not json", 400),
        "empty body": (b"", 400),
        "no instances": (b'{"inputs": [1, 2, 3]}', 400),
        "deep nesting": (b"[" * 200_000, 400),
        "too many images": (request_body([b"x"] * (max_images + 1)), 413),
        "oversized body": (b'{"instances": [{"image_bytes": {"b64": "' + b"A" * max_body + b'"}}]}', 413),
        "bad base64": (one("***not base64***"), 200),
        "not an image": (one(base64.b64encode(b"hello, world" * 100).decode()), 200),
        "truncated jpeg": (one(base64.b64encode(jpeg[: len(jpeg) // 3]).decode()), 200),
        "bomb": (one(base64.b64encode(png_header(60_000, 60_000)).decode()), 200),
        "wrong types": (b'{"instances": [5, null, {"image_bytes": 7}]}', 200),
    }


def soak(url: str, pid: int, bodies: dict[str, bytes], expected, n: int, concurrency: int,
         max_body: int, max_images: int) -> None:
    rng = random.Random(0)
    bad = malformed_bodies(next(iter(bodies.values())), max_body, max_images)
    keys = list(bodies)
    plan = [("bad:" + rng.choice(list(bad))) if rng.random() < 0.10 else rng.choice(keys) for _ in range(n)]
    good_check = good_checker(expected)

    def check(kind: str, status: int, answer: bytes) -> str | None:
        if not kind.startswith("bad:"):
            return good_check(kind, status, answer)
        want = bad[kind[4:]][1]
        if status != want:
            return f"{kind}: expected HTTP {want}, got {status} {answer[:100]!r}"
        doc = json.loads(answer)
        if want != 200 and "error" not in doc:
            return f"{kind}: no error message"
        if want == 200 and not all("error" in row for row in doc["predictions"]):
            return f"{kind}: a bad instance was not refused"
        return None

    def jobs():
        for kind in plan:
            yield kind, (bad[kind[4:]][0] if kind.startswith("bad:") else bodies[kind])

    rss_start = rss_mb(pid)
    print(f"\nsoak: {n} requests at concurrency {concurrency}, "
          f"{sum(k.startswith('bad:') for k in plan)} malformed; server RSS {rss_start:.0f} MB", flush=True)
    it = jobs()
    checkpoints = []
    for part in range(10):  # report RSS along the way
        share = iter([next(it) for _ in range(n // 10)])
        r = asyncio.run(drive(url, share, concurrency, None, check))
        checkpoints.append((r, rss_mb(pid)))
        print(f"  {(part + 1) * (n // 10):>6} requests: {r['requests'] / r['seconds']:6.1f}/s, "
              f"{r['5xx']} 5xx, {r['problems']} wrong, RSS {checkpoints[-1][1]:.0f} MB", flush=True)
        for p in r["first_problems"]:
            print("    ", p)
    total_5xx = sum(r["5xx"] for r, _ in checkpoints)
    wrong = sum(r["problems"] for r, _ in checkpoints)
    resets = sum(r["connection errors"] for r, _ in checkpoints)
    rss_end = checkpoints[-1][1]
    print(f"soak result: {sum(r['requests'] for r, _ in checkpoints)} requests, {total_5xx} 5xx, "
          f"{wrong} wrong answers, {resets} connection errors; RSS {rss_start:.0f} -> {rss_end:.0f} MB "
          f"(growth {rss_end - rss_start:+.0f} MB; after the first 10%: {rss_end - checkpoints[0][1]:+.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="An exported bundle [default: train a small synthetic one].")
    ap.add_argument("--images", type=Path, default=FLOWERS, help="Folder of class folders of JPEGs.")
    ap.add_argument("--num-images", type=int, default=200, help="Distinct JPEGs to send.")
    ap.add_argument("--seconds", type=float, default=10.0, help="Measured seconds per concurrency level.")
    ap.add_argument("--levels", default="1,8,32", help="Concurrency levels.")
    ap.add_argument("--soak", action="store_true", help="Also run the soak (10,000 requests, 10%% malformed).")
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument("--soak-concurrency", type=int, default=8)
    ap.add_argument("--cache", type=Path, help="Embedding cache for training [default: petal's].")
    ap.add_argument("--server-args", default="", help="Extra `petal serve` options, e.g. '--batch-wait-ms 2'.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="petal-bench-") as tmp:
        model_dir = args.model or train_small_model(Path(tmp), args.cache)
        files = pick_jpegs(args.images, args.num_images)
        rate, expected_by_path = offline_rate(model_dir, files)
        print(f"\nmachine: {os.cpu_count()} cores; model {model_dir}; {len(files)} JPEGs from {args.images}")
        print(f"offline `petal predict` (Model.iter_predict) rate: {rate:.1f} images/s", flush=True)

        bodies = {str(f): request_body([f.read_bytes()], key=f.name) for f in files}
        max_body_mb, max_images = 4, 64
        port = free_port()
        proc = start_server(model_dir, port, ["--max-body-mb", str(max_body_mb), "--max-images", str(max_images),
                                              *args.server_args.split()])
        url = f"http://127.0.0.1:{port}/v1/models/bench:predict"
        try:
            print(f"server pid {proc.pid}, RSS {rss_mb(proc.pid):.0f} MB after loading", flush=True)
            results = load_levels(url, bodies, expected_by_path, [int(c) for c in args.levels.split(",")],
                                  args.seconds)
            by_c = {r["concurrency"]: r for r in results}
            if 32 in by_c:
                ips = by_c[32]["requests"] / by_c[32]["seconds"]
                print(f"images/s at concurrency 32: {ips:.1f} = {100 * ips / rate:.0f}% of the offline rate "
                      f"(target >= 70%)")
            if 1 in by_c:
                print(f"p50 at concurrency 1: {np.percentile(by_c[1]['latencies'], 50) * 1000:.1f} ms "
                      "(target < 30 ms)")
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            lines = metrics.splitlines()
            count = sum(float(x.split()[-1]) for x in lines if x.startswith("petal_batch_size_count"))
            total = sum(float(x.split()[-1]) for x in lines if x.startswith("petal_batch_size_sum"))
            print(f"mean batch size over the run: {total / max(count, 1):.1f} images per inference call")
            if args.soak:
                soak(url, proc.pid, bodies, expected_by_path, args.soak_requests, args.soak_concurrency,
                     max_body_mb * 1024 * 1024, max_images)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
