"""The Open Inference Protocol route against the TF Serving route, side by side, in one run.

    python benchmarks/v2_load.py [--model RUN/model] [--images FOLDER] [--seconds 10]

One image per request, real JPEGs. Concurrency 1: p50 latency through `tritonclient[http]`
(/v2/models/NAME/infer, binary tensors) and through plain JSON/base64 rows
(/v1/models/NAME:predict). Concurrency 16: images per second for each. Also prints the
cold start of `petal serve` in this environment: from launch to /readyz answering 200.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as tc

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def v2_call(client: tc.InferenceServerClient, name: str, data: bytes) -> None:
    inp = tc.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=np.object_))
    client.infer(name, [inp])


def v1_call(http: httpx.Client, url: str, data: bytes) -> None:
    body = {"instances": [{"image_bytes": {"b64": base64.b64encode(data).decode()}}]}
    http.post(url, content=json.dumps(body)).raise_for_status()


def load(make_call, images: list[bytes], threads: int, seconds: float) -> tuple[float, float]:
    """(p50 ms, images/s) with `threads` callers, each with its own client, for `seconds`."""
    times: list[float] = []
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        call = make_call()
        k = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            call(images[k % len(images)])
            times.append(time.perf_counter() - t0)
            k += threads

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return 1000 * float(np.median(times)), len(times) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=FLOWERS)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8791)
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[:200]]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "petal.cli", "serve", str(args.model), "--name", "m",
                             "--port", str(args.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        report = {"cold_start_s": round(time.perf_counter() - t0, 2)}

        def v2():
            client = tc.InferenceServerClient(url=url.removeprefix("http://"))
            return lambda data: v2_call(client, "m", data)

        def v1():
            http = httpx.Client(timeout=60)
            return lambda data: v1_call(http, f"{url}/v1/models/m:predict", data)

        for name, make in (("v2 tritonclient", v2), ("v1 JSON rows", v1)):
            p50, _ = load(make, images, 1, args.seconds)
            _, rate = load(make, images, 16, args.seconds)
            report[name] = {"p50_ms_at_1": round(p50, 1), "images_per_s_at_16": round(rate, 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
