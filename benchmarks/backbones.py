"""img/s of each backbone family at its real size, side by side with Lite0, in one run.

    nice python benchmarks/backbones.py [--images 32] [--rounds 3] [--families dinov2,clip]

Each Hugging Face family is built at its published size with random weights
(petal.hub_random: speed does not depend on the weights), saved as a model folder and
taken through `--backbone hf:FOLDER`'s own path: resolved, exported to ONNX behind petal's
uint8 front end, run by ONNX Runtime. Lite0 is the wheel's real graph. The models run in
turns, a round at a time, so that a machine shared with other work slows them alike; the
figure is the median over rounds of images / second on pre-decoded batches of 16 (the
network alone: decoding adds the same few ms an image to each). Also printed: the export
time, the feature dim and the graph's size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from petal.backbones import get_backbone
from petal.hub_random import REAL, save_random
from petal.onnx_graphs import backbone_onnx_path
from petal.runtime import make_session

BATCH = 16


def prepare(families: list[str], work: Path) -> dict:
    """name -> (cfg, session, export seconds), Lite0 first."""
    prepared = {}
    for fam in ["lite0", *families]:
        start = time.perf_counter()
        if fam == "lite0":
            name, cfg = "EfficientNet-Lite0", get_backbone("efficientnet_lite0")
        else:
            name, cfg = REAL[fam][0], get_backbone(f"hf:{save_random(fam, work / fam, real=True)}")
        path = backbone_onnx_path(cfg, work / "cache")
        prepared[name] = (cfg, make_session(path), time.perf_counter() - start, path.stat().st_size)
        print(f"ready: {name} ({prepared[name][2]:.0f} s to build and export)", flush=True)
    return prepared


def rate(session, cfg, images: int) -> float:
    s = cfg.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, s, s, 3), dtype=np.uint8)
    session.run(["features"], {"images": pixels})  # warm
    start, done = time.perf_counter(), 0
    while done < images:
        session.run(["features"], {"images": pixels})
        done += BATCH
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images a model runs per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--families", default=",".join(REAL), help=f"comma-separated, of {','.join(REAL)}")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="petal-bench-backbones-") as tmp:
        prepared = prepare([f for f in a.families.split(",") if f], Path(tmp))
        rates: dict[str, list[float]] = {name: [] for name in prepared}
        for r in range(a.rounds):
            for name, (cfg, session, _, _) in prepared.items():
                rates[name].append(rate(session, cfg, a.images))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    lite = statistics.median(rates["EfficientNet-Lite0"])
    print("\n| backbone | input | feature dim | img/s | vs Lite0 | export s | graph MB |")
    print("|---|---|---|---|---|---|---|")
    for name, (cfg, _, export_s, size) in prepared.items():
        med = statistics.median(rates[name])
        print(f"| {name} | {cfg.input_size} | {cfg.feature_dim} | {med:.1f} | {med / lite:.2f}x | {export_s:.0f} "
              f"| {size / 2**20:.0f} |")


if __name__ == "__main__":
    main()
