"""Embedding throughput: local `petal embed` vs `--runner beam` on the DirectRunner,
plus per-core rates and the estimate for 1M images on Dataflow that follows from them.

    .venv/bin/python benchmarks/beam_throughput.py /work/shared/datasets/flower_photos

Each mode runs the real CLI in a subprocess on an empty embedding cache (the
exported backbone graph is shared, so no run pays the export) and reads its
`--json` summary. `images_per_second` there is images embedded / seconds of the
whole step, launcher and pipeline start included. Per-core rates are measured
on one thread: decode (read + load_pixels) and ONNX inference (batches of 32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from petal.backbones import DEFAULT_BACKBONE, get_backbone
from petal.data import load_dataset
from petal.errors import ImageError
from petal.images import load_pixels
from petal.onnx_graphs import backbone_onnx_path
from petal.runtime import make_session
from petal.storage import read_bytes


def run_cli(args: list[str]) -> dict:
    """`petal ARGS --json` -> its summary, plus the wall time of the whole process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "petal.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"petal {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["process_seconds"] = round(time.perf_counter() - start, 1)
    return summary


def per_core_rates(uris: list[str], model: Path, sample: int) -> dict:
    """Images per second on ONE core for each half of the work."""
    cfg = get_backbone(DEFAULT_BACKBONE)
    picked = uris[:: max(1, len(uris) // sample)][:sample]
    start = time.perf_counter()
    pixels = []
    for uri in picked:
        with contextlib.suppress(ImageError):  # a bad file costs its read, as in a run
            pixels.append(load_pixels(read_bytes(uri), cfg))
    decode = len(picked) / (time.perf_counter() - start)
    pixels = np.stack(pixels)  # (n, 224, 224, 3) uint8
    session = make_session(model, threads=1)
    session.run(["features"], {"images": pixels[:32]})  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), 32):
        session.run(["features"], {"images": pixels[i:i + 32]})
    infer = len(pixels) / (time.perf_counter() - start)
    return {"decode": round(decode, 1), "inference": round(infer, 1),
            "end_to_end": round(1 / (1 / decode + 1 / infer), 1), "sample": len(picked)}


def estimate(per_core: float, efficiency: float, images: int = 1_000_000, vcpus: int = 4,
             startup_s: float = 300.0) -> list[dict]:
    """Wall time for `images` on N Dataflow workers of `vcpus` each (one SDK process per vCPU)."""
    rows = []
    for n in (10, 25, 50, 100):
        rate = n * vcpus * per_core * efficiency  # images/s for the whole job
        rows.append({"workers": n, "vcpus": n * vcpus, "images_per_second": round(rate),
                     "minutes": round((images / rate + startup_s) / 60, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="A folder of class folders (e.g. flower_photos).")
    ap.add_argument("--sample", type=int, default=256, help="Images for the per-core rates.")
    ap.add_argument("--out", type=Path, help="Also write the results here as JSON.")
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    cfg = get_backbone(DEFAULT_BACKBONE)
    work = Path(tempfile.mkdtemp(prefix="petal-bench-"))
    model = backbone_onnx_path(cfg, work / "base")  # exported once, shared by every run

    def fresh(name: str) -> str:
        root = work / name
        root.mkdir()
        (root / "models").symlink_to(work / "base" / "models", target_is_directory=True)
        return str(root)

    beam = ["--runner", "beam"]
    multi = [*beam, "--direct_num_workers", str(cores), "--direct_running_mode", "multi_processing",
             "--ort_threads", "1", "--decode_threads", "1"]
    modes = {
        "local petal embed": [],
        "beam DirectRunner, in memory": beam,
        f"beam DirectRunner, {cores} processes": multi,
    }
    results: dict = {"cores": cores, "runs": {}}
    for name, extra in modes.items():
        cache = fresh(name.replace(" ", "_").replace(",", ""))
        cmd = ["embed", args.data, "--cache", cache, "--json", *extra]
        summary = run_cli(cmd)
        summary["command"] = "petal " + " ".join(cmd)
        results["runs"][name] = summary
        print(f"{name:34s} {summary['images_per_second']:7.1f} img/s  ({summary['embedded']} images in "
              f"{summary['seconds']:.1f}s; process {summary['process_seconds']}s)", flush=True)

    uris = [e.uri for e in load_dataset(args.data, eval_percent=0.0, require_train=False).examples]
    rates = per_core_rates(uris, model, args.sample)
    results["per_core"] = rates
    best_beam = max(results["runs"][n]["images_per_second"] for n in list(modes)[1:])
    efficiency = min(1.0, best_beam / (cores * rates["end_to_end"]))
    results["beam_efficiency"] = round(efficiency, 2)
    results["estimate_1M"] = estimate(rates["end_to_end"], efficiency)
    print(f"per core: decode {rates['decode']} img/s, inference {rates['inference']} img/s, "
          f"end to end {rates['end_to_end']} img/s; Beam reached {efficiency:.0%} of {cores} x that")
    print("1M images on Dataflow, 4-vCPU workers, one SDK process per vCPU, +5 min start-up:")
    for row in results["estimate_1M"]:
        print(f"  {row['workers']:4d} workers ({row['vcpus']} vCPUs): {row['images_per_second']:6d} img/s, "
              f"{row['minutes']} min")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
