"""Embedding throughput (images/s) per precision, against the fp32 limit, in one run.

    python benchmarks/embed_throughput.py [FOLDER] [--limit N] [--skip bf16] [--rounds 3]

Prints, measured side by side on the same images:
- the fp32 limit: ONNX Runtime alone on pre-decoded batches of 32 (with and without
  spin-waiting, the better), and `load_pixels` on one core; with decode and inference
  sharing the cores, at best 1 / (1 / inference + 1 / (decode per core x cores)) images/s;
- baseline: a straightforward single-process loop (read, PIL decode, resize, batch of 32);
- petal embed at fp32, bf16 and int8, each into an empty cache, and fp32's share of the limit;
- beside each rate, the CPU time an image took (all threads), which other processes on a
  shared machine disturb less than the wall clock;
- for bf16 and int8: the feature cosine to fp32; for each precision, the eval accuracy of a
  head trained on that precision's features (FOLDER must then hold class folders).
The measurements take turns, `--rounds` times on a share of the images each, so that other
work on the machine weighs on all of them alike. The backbone graph is exported and
quantized before timing: those are one-off costs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from petal.backbones import get_backbone
from petal.data import EVAL, TRAIN, load_dataset
from petal.embed import embed
from petal.head import HeadClassifier
from petal.images import load_pixels
from petal.precision import FP32, PRECISIONS, Engine
from petal.runtime import make_session
from petal.storage import default_cache_dir

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def cpu_seconds() -> float:
    """CPU time this process has used, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Tally:
    """Images and seconds (wall, CPU) of one kind of work, summed over the rounds."""

    images: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def timing(self, images: int) -> Iterator[None]:
        start, cpu = time.perf_counter(), cpu_seconds()
        yield
        self.images += images
        self.wall += time.perf_counter() - start
        self.cpu += cpu_seconds() - cpu

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.images


def baseline(uris: list[str], session, size: int) -> None:
    batch = []
    for uri in uris:
        img = Image.open(uri).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        batch.append(np.asarray(img))
        if len(batch) == 32:
            session.run(["features"], {"images": np.stack(batch)})
            batch = []
    if batch:
        session.run(["features"], {"images": np.stack(batch)})


def limit_parts(sample: list[str], sessions: dict, cfg, tally: dict[str, Tally]) -> None:
    """Decode `sample` on one core, then run ONNX Runtime alone on its pixels, in batches of 32."""
    with tally["decode"].timing(len(sample)):
        pixels = np.stack([load_pixels(Path(u).read_bytes(), cfg.preprocess) for u in sample])
    for name, session in sessions.items():
        session.run(["features"], {"images": pixels[:32]})  # warm
        with tally[name].timing(len(pixels) // 32 * 32):
            for i in range(0, len(pixels) - 31, 32):
                session.run(["features"], {"images": pixels[i:i + 32]})


def head_accuracy(ds, keys: dict[str, str], cache) -> float:
    """Eval accuracy of the default head trained on these features."""
    split = {s: [e for e in ds.split(s) if e.uri in keys] for s in (TRAIN, EVAL)}
    X = {s: cache.get([keys[e.uri] for e in ex]) for s, ex in split.items()}
    y = {s: np.array([ds.label_id(e.label) for e in ex]) for s, ex in split.items()}
    head = HeadClassifier(seed=0).fit(X[TRAIN], y[TRAIN], num_classes=len(ds.classes))
    return float((head.predict(X[EVAL]) == y[EVAL]).mean())


def report(tally: dict[str, Tally], embedded: dict[str, tuple[dict, object]], ds) -> None:
    """Print the figures; `embedded`: precision -> (uri -> key, its cache)."""
    infer = max((tally[k] for k in ("inference", "inference, no spin")), key=lambda t: t.rate)
    decode, cores = tally["decode"], os.cpu_count() or 1
    limit = 1 / (1 / infer.rate + 1 / (decode.rate * cores))
    print(f"fp32 inference alone (batch 32) : {infer.rate:7.1f} img/s ({infer.cpu_ms:.1f} CPU ms an image)")
    print(f"decode (load_pixels, one core)  : {decode.rate:7.1f} img/s ({decode.cpu_ms:.1f} CPU ms an image)")
    print(f"fp32 limit, sharing {cores} cores   : {limit:7.1f} img/s")
    print(f"baseline single-process loop    : {tally['baseline'].rate:7.1f} img/s")
    reference = None
    for p, (keys, cache) in embedded.items():
        t, features = tally[p], cache.get(sorted(set(keys.values())))
        line = f"petal embed {p} (cold cache)   : {t.rate:7.1f} img/s ({t.cpu_ms:.1f} CPU ms an image)"
        if p == FP32:
            reference, line = features, line + f", {t.rate / limit:.2f} of the fp32 limit"
        elif reference is not None:
            cos = (features * reference).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(reference, axis=1)
            line += f", cosine to fp32 mean {cos.mean():.4f} min {cos.min():.4f}"
        print(line + f", head eval accuracy {head_accuracy(ds, keys, cache):.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--skip", nargs="*", default=[], choices=PRECISIONS, help="precisions not to run")
    ap.add_argument("--rounds", type=int, default=3, help="turns the measurements take, on a share of images each")
    args = ap.parse_args()

    cfg = get_backbone(args.backbone)
    ds = load_dataset(args.folder)
    examples = ds.examples[: args.limit] if args.limit else ds.examples
    uris, train_uris = [e.uri for e in examples], [e.uri for e in examples if e.split == TRAIN]
    precisions = [p for p in PRECISIONS if p not in args.skip]
    graph = Engine(cfg).graph_path(default_cache_dir())
    print(f"{len(uris)} images from {args.folder}, backbone {cfg.name}, {args.rounds} rounds")
    sessions = {"inference": make_session(graph), "inference, no spin": make_session(graph, spin=False)}
    tally = {name: Tally() for name in ["decode", *sessions, "baseline", *precisions]}
    embedded: dict[str, tuple[dict, object]] = {p: ({}, None) for p in precisions}

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        shutil.copy(graph, Path(tmp) / "models" / graph.name)
        for p in precisions:
            Engine.make(cfg, p, train_uris).graph_path(Path(tmp))  # quantize before timing
        for chunk in (list(c) for c in np.array_split(np.array(uris), args.rounds)):
            limit_parts(chunk[:96], sessions, cfg, tally)
            with tally["baseline"].timing(len(chunk)):
                baseline(chunk, sessions["inference"], cfg.input_size)
            for p in precisions:  # each precision's own cache folder, filled a chunk at a time
                with tally[p].timing(len(chunk)):
                    result, cache = embed(chunk, cfg, Path(tmp), precision=p, calibration_uris=train_uris)
                embedded[p] = ({**embedded[p][0], **result.keys}, cache)  # the last cache has every chunk
        report(tally, embedded, ds)


if __name__ == "__main__":
    main()
