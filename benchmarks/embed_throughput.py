"""Embedding throughput (images/s) on a folder of images, from a cold cache.

    python benchmarks/embed_throughput.py [FOLDER] [--limit N]

Prints two figures measured in the same run, on the same images:
- baseline: a straightforward single-process loop (read, PIL decode, resize,
  batch of 32, ONNX Runtime), the reference the spine issue compares against;
- petal: `petal.embed.embed` (threaded decode overlapped with inference,
  writing Parquet shards), from an empty cache.
The backbone graph is exported before timing; export is a one-off cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from petal.backbones import get_backbone
from petal.data import expand_inputs
from petal.embed import embed
from petal.onnx_graphs import backbone_onnx_path
from petal.runtime import make_session
from petal.storage import default_cache_dir

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def baseline(uris: list[str], onnx_path: Path, size: int) -> float:
    session = make_session(onnx_path)
    start = time.perf_counter()
    batch = []
    for uri in uris:
        img = Image.open(uri).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        batch.append(np.asarray(img))
        if len(batch) == 32:
            session.run(["features"], {"images": np.stack(batch)})
            batch = []
    if batch:
        session.run(["features"], {"images": np.stack(batch)})
    return len(uris) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()

    cfg = get_backbone(args.backbone)
    uris, _ = expand_inputs([args.folder])
    if args.limit:
        uris = uris[: args.limit]
    graph = backbone_onnx_path(cfg, default_cache_dir())
    print(f"{len(uris)} images from {args.folder}, backbone {cfg.name}")

    rate = baseline(uris, graph, cfg.input_size)
    print(f"baseline single-process loop : {rate:7.1f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        shutil.copy(graph, Path(tmp) / "models" / graph.name)
        result, _ = embed(uris, cfg, Path(tmp))
        s = result.summary()
        print(f"petal embed (cold cache)     : {s['total'] / s['seconds']:7.1f} img/s "
              f"({s['embedded']} embedded, {s['failed']} failed, {s['seconds']:.1f} s)")
        result, _ = embed(uris, cfg, Path(tmp))
        s = result.summary()
        print(f"petal embed (warm cache)     : {s['total'] / s['seconds']:7.1f} img/s "
              f"({s['cached']} cached, {s['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
