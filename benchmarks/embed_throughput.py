"""Embedding throughput (images/s) per precision, against the fp32 limit, in one run.

    python benchmarks/embed_throughput.py [FOLDER] [--limit N] [--skip bf16]

Prints, measured side by side on the same images:
- the fp32 limit: ONNX Runtime alone on pre-decoded batches of 32, and `load_pixels` on one
  core; with decode and inference sharing the cores, at best
  1 / (1 / inference + 1 / (decode per core x cores)) images/s;
- baseline: a straightforward single-process loop (read, PIL decode, resize, batch of 32);
- petal embed at fp32, bf16 and int8, each from an empty cache, and its share of the limit;
  beside each rate, the CPU time an image took (all threads), which other processes on a
  shared machine disturb less than the wall clock;
- for bf16 and int8: the feature cosine to fp32, and for each precision the eval accuracy of a
  head trained on that precision's features (FOLDER must then hold class folders).
The backbone graph is exported and quantized before timing: those are one-off costs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from petal.backbones import get_backbone
from petal.data import EVAL, TRAIN, load_dataset
from petal.embed import embed
from petal.head import HeadClassifier
from petal.images import load_pixels
from petal.precision import PRECISIONS, Engine
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


def cpu_seconds() -> float:
    """CPU time this process has used (all threads): less sensitive than wall time to other
    processes sharing the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fp32_limit(uris: list[str], onnx_path: Path, cfg) -> tuple[float, float, float, float]:
    """(inference img/s on pre-decoded batches, decode img/s on one core, the limit on all cores,
    the CPU ms an image of the two together)."""
    sample = uris[:256]
    start, cpu = time.perf_counter(), cpu_seconds()
    pixels = np.stack([load_pixels(Path(u).read_bytes(), cfg.preprocess) for u in sample])
    decode, decode_cpu = len(sample) / (time.perf_counter() - start), (cpu_seconds() - cpu) / len(sample)
    session = make_session(onnx_path)
    session.run(["features"], {"images": pixels[:32]})  # warm up
    n = len(pixels) // 32 * 32
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in range(0, n, 32):
        session.run(["features"], {"images": pixels[i:i + 32]})
    infer, infer_cpu = n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n
    return infer, decode, 1 / (1 / infer + 1 / (decode * (os.cpu_count() or 1))), 1000 * (infer_cpu + decode_cpu)


def head_accuracy(ds, keys: dict[str, str], cache) -> float:
    """Eval accuracy of the default head trained on these features."""
    split = {s: [e for e in ds.split(s) if e.uri in keys] for s in (TRAIN, EVAL)}
    X = {s: cache.get([keys[e.uri] for e in ex]) for s, ex in split.items()}
    y = {s: np.array([ds.label_id(e.label) for e in ex]) for s, ex in split.items()}
    head = HeadClassifier(seed=0).fit(X[TRAIN], y[TRAIN], num_classes=len(ds.classes))
    return float((head.predict(X[EVAL]) == y[EVAL]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--skip", nargs="*", default=[], choices=PRECISIONS, help="precisions not to run")
    args = ap.parse_args()

    cfg = get_backbone(args.backbone)
    ds = load_dataset(args.folder)
    examples = ds.examples[: args.limit] if args.limit else ds.examples
    uris = [e.uri for e in examples]
    train_uris = [e.uri for e in examples if e.split == TRAIN]
    graph = Engine(cfg).graph_path(default_cache_dir())
    print(f"{len(uris)} images from {args.folder}, backbone {cfg.name}, {os.cpu_count()} cores")

    infer, decode, limit, limit_cpu = fp32_limit(uris, graph, cfg)
    print(f"fp32 inference alone (batch 32) : {infer:7.1f} img/s")
    print(f"decode (load_pixels, one core)  : {decode:7.1f} img/s")
    print(f"fp32 limit, sharing the cores   : {limit:7.1f} img/s ({limit_cpu:.1f} CPU ms an image)")
    print(f"baseline single-process loop    : {baseline(uris, graph, cfg.input_size):7.1f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        shutil.copy(graph, models / graph.name)
        fp32_features = None
        for precision in (p for p in PRECISIONS if p not in args.skip):
            Engine.make(cfg, precision, train_uris).graph_path(Path(tmp))  # quantize before timing
            cpu = cpu_seconds()
            result, cache = embed(uris, cfg, Path(tmp), precision=precision, calibration_uris=train_uris)
            rate, cpu = len(uris) / result.seconds, 1000 * (cpu_seconds() - cpu) / len(uris)
            keys = sorted(set(result.keys.values()))
            features = cache.get(keys)
            line = f"petal embed {precision} (cold cache) : {rate:7.1f} img/s ({cpu:.1f} CPU ms an image)"
            line += f", {rate / limit:.2f} of the fp32 limit" if precision == "fp32" else ""
            if fp32_features is None:
                fp32_features = features
            else:
                cos = (features * fp32_features).sum(1) / np.linalg.norm(features, axis=1) \
                    / np.linalg.norm(fp32_features, axis=1)
                line += f", cosine to fp32 mean {cos.mean():.4f} min {cos.min():.4f}"
            print(line + f", head eval accuracy {head_accuracy(ds, result.keys, cache):.4f}", flush=True)


if __name__ == "__main__":
    main()
