"""A tiny stand-in backbone and dataset for tests and benchmarks; never offered to users.

The backbone is not in petal's registry until `register(cache_dir)` is called
in the process that wants it (the tests, benchmarks/scale.py), so `--backbone` never
lists it. Its graph is a fixed random projection of the pixels, written with
onnx.helper into the cache like an exported backbone:

    uint8 (N, 16, 16, 3) -> (x - 127.5) / 128 -> (N, 768) -> @ W (768, 1280) -> features (N, 1280)

It runs a million images in seconds, so that a run over a million files measures
petal's own costs (listing, hashing, the cache, the head, evaluation) at the real
feature size. `make_images` writes class-structured tiny BMPs: each class a random 4 x 4
colour layout, each image that plus noise, and its number in its first pixel, so that no
two files have the same bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from petal.backbones import Architecture, BackboneConfig, WeightsSource, register_backbone
from petal.onnx_graphs import GRAPH_VERSION, INPUT, OPSET
from petal.preprocess import Preprocess
from petal.storage import atomic_path

SIZE, DIM = 16, 1280
TINY = BackboneConfig(name="tiny_test", arch=Architecture("tiny", feature_dim=DIM, pooling="graph"),
                      weights=WeightsSource("builtin", "(none: petal.tiny writes its graph)"),
                      preprocess=Preprocess(input_size=SIZE, crop_pct=1.0, resample="bilinear"))


def register(cache_dir: str | Path) -> BackboneConfig:
    """Add the tiny backbone to this process's registry, and its graph to the cache."""
    register_backbone(TINY)
    path = TINY.graph_file(cache_dir, GRAPH_VERSION)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(graph().SerializeToString())
    return TINY


def graph():
    """The backbone graph: uint8 images (N, S, S, 3) -> `features` (N, DIM)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 1 / np.sqrt(SIZE * SIZE * 3), (SIZE * SIZE * 3, DIM)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "tiny_w"), numpy_helper.from_array(np.array(127.5, np.float32), "tiny_mean"),
             numpy_helper.from_array(np.array(1 / 128, np.float32), "tiny_scale"),
             numpy_helper.from_array(np.array([-1, SIZE * SIZE * 3], np.int64), "tiny_flat")]
    node = helper.make_node
    nodes = [node("Cast", [INPUT], ["tiny_x"], to=TensorProto.FLOAT),
             node("Sub", ["tiny_x", "tiny_mean"], ["tiny_c"]),
             node("Mul", ["tiny_c", "tiny_scale"], ["tiny_n"]),
             node("Reshape", ["tiny_n", "tiny_flat"], ["tiny_v"]),
             node("MatMul", ["tiny_v", "tiny_w"], ["features"])]
    g = helper.make_graph(nodes, "tiny_backbone",
                          [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", DIM])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def class_name(c: int) -> str:
    return f"class{c:04d}"


def make_images(root: str | Path, classes: int, first: int, count: int, per_class: int,
                spread: float = 12.0, noise: float = 64.0) -> None:
    """Write images number first .. first + count - 1 (image i is of class i // per_class)
    as `root/classNNNN/iNNNNNNN.bmp`. Class layouts are grey plus N(0, spread) per cell, and
    pixel noise N(0, noise): at 1000 classes they overlap enough that a head makes mistakes."""
    root = Path(root)
    ids = np.arange(first, first + count)
    cls = np.minimum(ids // per_class, classes - 1)
    layouts = {c: 128 + spread * np.random.default_rng(c).normal(size=(4, 4, 3)) for c in np.unique(cls)}
    base = np.stack([layouts[c] for c in cls]).repeat(SIZE // 4, axis=1).repeat(SIZE // 4, axis=2)  # (n, S, S, 3)
    pixels = np.clip(base + np.random.default_rng([first, count]).normal(0, noise, base.shape), 0, 255).astype(np.uint8)
    pixels[:, 0, 0] = np.stack([ids >> 16 & 255, ids >> 8 & 255, ids & 255], axis=1)  # every file distinct
    for c in np.unique(cls):
        (root / class_name(c)).mkdir(parents=True, exist_ok=True)
    rows = pixels[:, ::-1, :, ::-1]  # BMP: bottom row first, BGR (16 x 3 bytes a row: no padding)
    for i, c, p in zip(ids, cls, rows):
        (root / class_name(c) / f"i{i:08d}.bmp").write_bytes(BMP_HEADER + p.tobytes())


# a 24-bit uncompressed BMP of S x S: written by hand, 30x faster than an encoder for a million files
BMP_HEADER = struct.pack("<2sIHHI", b"BM", 54 + SIZE * SIZE * 3, 0, 0, 54) + struct.pack(
    "<IiiHHIIiiII", 40, SIZE, SIZE, 1, 24, 0, SIZE * SIZE * 3, 2835, 2835, 0, 0)
