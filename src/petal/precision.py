"""Reduced-precision inference: what fp32, bf16 and int8 mean in petal, in one place.

- fp32: the backbone graph as exported, on ONNX Runtime (the reference).
- bf16: the same graph on OpenVINO with bf16 inference (`pip install 'petal[bf16]'`), where
  the CPU has bf16 instructions (AVX-512 BF16 or AMX). About 1.5x fp32's speed; features within
  a few percent (cosine 0.999 on flowers).
- int8: the graph quantized by ONNX Runtime, calibrated on the user's own training images
  (`quantize_backbone`, the recipe below). Runs on plain onnxruntime.

Features of each precision are cached apart (`Engine.cache_tag`): they never mix with fp32's.
int8 features depend on the recipe and their calibration images too, so the tag names those.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from petal.backbone_config import BackboneConfig
from petal.errors import PetalError

if TYPE_CHECKING:
    import onnxruntime as ort

FP32, BF16, INT8 = "fp32", "bf16", "int8"
PRECISIONS = (FP32, BF16, INT8)
CALIBRATION_IMAGES = 128  # training images the int8 ranges are measured on
INT8_RECIPE_VERSION = 1  # bump when quantize_backbone changes what comes out: new graphs, new cache folders
# The int8 recipe, as petal.json records it (see quantize_backbone for the reasons).
INT8_RECIPE = {"version": INT8_RECIPE_VERSION, "tool": "onnxruntime.quantization", "format": "QDQ",
               "weights": "int8 per channel, symmetric", "activations": "uint8 per tensor",
               "calibration": f"min-max on {CALIBRATION_IMAGES} training images", "preprocess": "quant_pre_process",
               "float": "input normalisation, stem conv, first depthwise conv (with their ReLU6), ImageNet head"}


def check_precision(value: str, option: str = "--precision", allowed: Sequence[str] = PRECISIONS) -> str:
    if value not in allowed:
        raise PetalError(f"{option}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def calibration_order(uris: Sequence[str]) -> list[str]:
    """The order int8 takes calibration images in (the first CALIBRATION_IMAGES readable ones):
    by the hash of their names, so the same data set gives the same sample whatever its order."""
    return sorted(uris, key=lambda u: hashlib.sha256(u.encode()).hexdigest())


def calibration_digest(keys: Sequence[str]) -> str:
    """12 hex digits naming a calibration set by its images' content keys (order-free)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]


def quantize_backbone(fp32_path: Path, out: Path, pixels: np.ndarray) -> None:
    """The int8 recipe: fp32 backbone graph -> int8 graph at `out`, calibrated on `pixels`
    ((N, S, S, 3) uint8, the user's training images).

    What was tried on tf_flowers (Lite0; feature cosine to fp32 on the eval images, and the top-1
    agreement of the run's head with fp32; speeds on pre-decoded batches):
    - Conv-only static quantization (the naive one): cosine 0.82, no faster than fp32: every
      residual Add stays float, so each block goes int8 -> float -> int8 and the layout flips.
    - All of the trunk in QDQ after `quant_pre_process` (Conv, Add, ReLU6 folded into the ranges,
      the pooling): cosine 0.993, agreement 98.95%, 0.5 pt accuracy lost; 280 vs 200 img/s.
      Percentile or entropy calibration, moving-average ranges, 512 calibration images instead of
      128, symmetric int8 activations: no better (0.992-0.994).
    - Keeping a conv in float without its ReLU6 quantizes the ReLU6's input on the conv's whole
      range: worse (0.92-0.98). A float conv keeps its ReLU6 in float too.
    - Keeping the first convs in float, the stem and block 0's depthwise conv (they work at 112x112
      on the picture itself, and all 16 blocks inherit their error): cosine 0.9955, agreement
      99.5%, no accuracy lost, speed kept. This is the recipe. More convs in float (3, 4, 7):
      cosine 0.996-0.997 but no better at the gate.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(pixels[i:i + 16] for i in range(0, len(pixels), 16))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    pre = out.with_name(out.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)  # fold, fuse, infer shapes
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=float_nodes(onnx.load(str(pre)).graph))
    finally:
        pre.unlink(missing_ok=True)


def float_nodes(graph) -> list[str]:
    """The nodes int8 keeps in float: the stem conv and the first depthwise conv, each with the
    ReLU6 (Clip) that reads it. (A ViT-style graph has only its patch-embedding conv, ConvNeXt
    no ReLU6: what a graph lacks is not kept.)"""
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    keep = convs[:1] + depthwise[:1]
    relu6 = [n for n in graph.node if n.op_type == "Clip" and any(n.input[0] == k.output[0] for k in keep)]
    return [n.name for n in keep + relu6]


QUANTIZED_OPS = ["Conv", "Add", "ReduceMean", "Clip"]  # the trunk; the normalisation and ImageNet head stay float


@dataclass
class Engine:
    """A backbone at a precision: where its features are cached and the graph that makes them."""

    cfg: BackboneConfig
    precision: str = FP32
    calibration: np.ndarray | None = None  # int8: (N, S, S, 3) uint8, the images the ranges come from
    digest: str | None = None  # int8: names the calibration set (calibration_digest)

    @classmethod
    def make(cls, cfg: BackboneConfig, precision: str = FP32, calibration_uris: Sequence[str] = ()) -> Engine:
        """int8 reads a stable sample of `calibration_uris` (the training images) first."""
        from petal.loader import iter_items

        check_precision(precision)
        if precision != INT8:
            return cls(cfg, precision)
        readable = (it for it in iter_items(calibration_order(calibration_uris), cfg.preprocess) if it.error is None)
        items = list(itertools.islice(readable, CALIBRATION_IMAGES))  # the first n readable: the same at export
        if not items:
            raise PetalError("--precision int8: none of the calibration (training) images could be read")
        return cls(cfg, INT8, np.stack([it.pixels for it in items]), calibration_digest([it.key for it in items]))

    @property
    def cache_tag(self) -> str:
        """The embedding-cache name of these features (the producer's fingerprint follows it:
        petal.embed.feature_cache): fp32 the plain backbone name; the others add the precision,
        and int8 its calibration digest."""
        if self.precision == FP32:
            return self.cfg.slug
        return f"{self.cfg.slug}-{self.precision}" + (f"q{INT8_RECIPE_VERSION}-{self.digest}" if self.digest else "")

    def graph_path(self, cache_dir: Path, on_message: Callable[[str], None] | None = None) -> Path:
        """The ONNX graph to run: the cached fp32 backbone, or its int8 quantization (made on
        first use, about 20 s, and kept beside it)."""
        from petal.onnx_graphs import backbone_onnx_path
        from petal.storage import atomic_path

        fp32 = backbone_onnx_path(self.cfg, cache_dir, on_message)
        if self.precision != INT8:
            return fp32
        path = fp32.with_name(f"{fp32.stem}-int8q{INT8_RECIPE_VERSION}-{self.digest}.onnx")
        if not path.is_file():
            if on_message:
                on_message(f"quantizing {self.cfg.name} to int8, calibrated on {len(self.calibration)} "
                           "of your images (once, about 20 s)")
            with atomic_path(path) as tmp:
                quantize_backbone(fp32, tmp, self.calibration)
        return path

    def session(self, cache_dir: Path, on_message: Callable[[str], None] | None = None,
                threads: int | None = None, spin: bool = True) -> ort.InferenceSession | OpenVinoSession:
        return session_for(self.graph_path(cache_dir, on_message), self.precision, threads, spin)

    def record(self) -> dict:
        """What a bundle or run records of how its features were computed."""
        if self.precision != INT8:
            return {"precision": self.precision}
        return {"precision": INT8, "recipe": INT8_RECIPE,
                "calibration": {"images": len(self.calibration), "digest": self.digest}}


def bf16_session(path: Path, threads: int | None = None) -> OpenVinoSession:
    """The graph at `path` on OpenVINO in bf16, or a PetalError saying why not here."""
    try:
        import openvino as ov
    except ImportError:
        raise PetalError("--precision bf16 runs on OpenVINO, which is not installed: "
                         "pip install 'petal[bf16]' (or use --precision fp32 or int8)") from None
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise PetalError("--precision bf16: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so "
                         "bf16 would be emulated and slower than fp32; use --precision fp32 or int8")
    config = {"INFERENCE_PRECISION_HINT": "bf16"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return OpenVinoSession(core.compile_model(str(path), "CPU", config))


class OpenVinoSession:
    """An OpenVINO compiled model behind the part of ort.InferenceSession petal uses:
    run(names, feeds), get_inputs() and get_outputs() (items with .name and .shape)."""

    class Output:
        def __init__(self, port) -> None:
            self.name = port.get_any_name()
            shape = port.get_partial_shape()
            self.shape = [d.get_length() if d.is_static else None for d in shape]

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def get_inputs(self) -> list[OpenVinoSession.Output]:
        return [self.Output(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[OpenVinoSession.Output]:
        return [self.Output(p) for p in self.compiled.outputs]

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled.create_infer_request().infer(feeds)  # a request per call: thread-safe
        return [np.array(result[n]) for n in names]


def bundle_precision(path: Path, quantization: dict | None, wanted: str | None) -> str:
    """The precision a bundle runs at: its own (int8 if quantized, else fp32) unless `wanted`
    says bf16, which runs an fp32 bundle on OpenVINO. PetalError for what cannot be."""
    own = (quantization or {}).get("precision", FP32)
    if wanted is None or wanted == own:
        return own
    check_precision(wanted)
    if own == FP32 and wanted == INT8:
        raise PetalError(f"--precision int8: {path} is an fp32 bundle; make an int8 one with "
                         "`petal export RUN --precision int8` and use RUN/model-int8")
    if own != FP32:
        raise PetalError(f"--precision {wanted}: {path} is an {own} bundle; it runs at {own} only "
                         "(use RUN/model for fp32 or bf16)")
    return wanted


def session_for(path: Path, precision: str, threads: int | None = None, spin: bool = True
                ) -> ort.InferenceSession | OpenVinoSession:
    """A session running the graph at `path` at `precision` (int8: `path` is already quantized)."""
    from petal.runtime import make_session

    return bf16_session(path, threads) if precision == BF16 else make_session(path, threads, spin)
