"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it), REST.

    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer

One input, "images": either encoded image files as a BYTES tensor [N], or pixels already
resized as the bundle's preprocessing says, UINT8 [N, S, S, 3]. Tensor data come as JSON
("data": [...], flat, row-major; BYTES elements as base64 strings) or in the binary
extension that `tritonclient` uses by default (an `Inference-Header-Content-Length` header,
then the raw tensors; each BYTES element prefixed by its 4-byte little-endian length).
Outputs, as JSON: "probabilities" FP32 [N, C], "labels" BYTES [N] (the answer: "unknown" for
an image like none of the classes, else the top-1 class; `?unknown=false`: always the top-1
class), "nearest" BYTES [N] (the top-1 class), and where the bundle has unknown detection
"ood_score" FP32 [N] and "unknown" BOOL [N].

A request is checked whole before any image is decoded: its size from byte counts, then its
JSON header against the declared schema (`InferRequest`), then the tensor's element count
against the images-per-request limit, then its data. Every mistake is a 400 (413 for too
big) naming the field.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
    ValidationError,
)

from petal.predictions import UNKNOWN, Scores
from petal.serve.protocol import InstanceError, RequestError, b64decode, check_counts, loads

HEADER_LENGTH = "inference-header-content-length"
MAX_DIM = 2**31 - 1  # a dimension; their product is computed in Python integers, never int64
JSON_PIXEL_IMAGES = 8  # images a request may send as UINT8 JSON numbers (see json_limits)


def _utf8(text: str) -> str:
    text.encode("utf-8")  # a lone surrogate cannot be written back: UnicodeEncodeError, a ValueError
    return text


def _json_list(value: Any) -> list:
    if not isinstance(value, list):  # checked without copying what may be millions of elements
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


Name = Annotated[StrictStr, Field(max_length=256)]
Dim = Annotated[StrictInt, Field(ge=0, le=MAX_DIM)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None


class InputTensor(_Schema):
    name: Name
    shape: Annotated[list[Dim], Field(min_length=1, max_length=8)]
    datatype: Annotated[StrictStr, Field(max_length=16)]
    parameters: InputParameters | None = None
    data: Annotated[list, PlainValidator(_json_list)] | None = None

    @property
    def binary_size(self) -> int:
        return (self.parameters.binary_data_size or 0) if self.parameters else 0


class RequestedOutput(_Schema):
    name: Name
    parameters: dict | None = None


class InferRequest(_Schema):
    """The JSON header of an inference request, as the protocol declares it."""

    id: Annotated[StrictStr, Field(max_length=1024), AfterValidator(_utf8)] | None = None
    parameters: dict | None = None
    inputs: Annotated[list[InputTensor], Field(min_length=1, max_length=64)]
    outputs: Annotated[list[RequestedOutput], Field(max_length=64)] | None = None


@dataclass
class ImagesInput:
    """The request's images: encoded files, or (N, S, S, 3) uint8 pixels."""

    files: list[bytes] | None = None
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class ModelInputs:
    """What parsing a request needs to know of the model it is for."""

    max_images: int
    input_size: int  # S of UINT8 [N, S, S, 3]
    outputs: list[str]  # the output names it can give


def describe_errors(errors: list[dict]) -> str:
    """pydantic's errors -> "field.path: message; ..." (never the values sent)."""
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:5])


def json_limits(model: ModelInputs) -> dict[str, int]:
    """What a v2 JSON header may hold: a string per image file, or UINT8 pixels as numbers for
    up to JSON_PIXEL_IMAGES images (1.2M numbers at 224 px, parsed in about 0.1 s; more pixels
    go in the binary extension, which costs no parsing)."""
    s = model.input_size
    return {"values": min(model.max_images, JSON_PIXEL_IMAGES) * s * s * 3 + 4096,
            "strings": model.max_images + 4096, "containers": 4096}


def parse_infer(body: bytes, header_length: str | None, model: ModelInputs) -> tuple[InferRequest, ImagesInput]:
    """The request body -> (its JSON header, the "images" input). Raises RequestError (400/413)."""
    n = len(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH}: expected a number, got {header_length[:40]!r}") from None
        if not 0 < n <= len(body):
            raise RequestError(f"{HEADER_LENGTH}: {n} is outside the body of {len(body)} bytes")
    header = body[:n]
    check_counts(header, **json_limits(model))
    try:
        request = InferRequest.model_validate(loads(header))
    except ValidationError as e:
        raise RequestError(describe_errors(e.errors())) from None
    check_outputs(request, model.outputs)
    binary, offset = memoryview(body)[n:], 0
    for spec in request.inputs:
        if spec.name == "images":
            if offset + spec.binary_size > len(binary):
                raise RequestError(f"images: binary_data_size {spec.binary_size} goes past the "
                                   f"{len(binary)} bytes of binary data sent")
            raw = binary[offset:offset + spec.binary_size] if spec.binary_size else None  # a view: no copy
            return request, images_input(spec, raw, model)
        offset += spec.binary_size
    raise RequestError('inputs: expected an input named "images" (BYTES [N] files or UINT8 [N, S, S, 3] pixels)')


def check_outputs(request: InferRequest, available: list[str]) -> None:
    unknown = [o.name for o in request.outputs or [] if o.name not in available]
    if unknown:
        raise RequestError(f"outputs: no output named {unknown[0][:60]!r}; this model gives {', '.join(available)}")


def images_input(spec: InputTensor, raw: memoryview | None, model: ModelInputs) -> ImagesInput:
    """The "images" tensor, its element count checked against the limit before any data is split."""
    shape, count = spec.shape, math.prod(spec.shape)
    if spec.datatype == "BYTES":
        check_image_count(count, shape, model.max_images)
        if raw is not None:
            return ImagesInput(files=split_bytes(raw, count))
        return ImagesInput(files=bytes_data(spec.data, count))
    if spec.datatype == "UINT8":
        s = model.input_size
        if len(shape) != 4 or shape[1:] != [s, s, 3]:
            raise RequestError(f"images: this model takes UINT8 [N, {s}, {s}, 3] pixels, got shape {shape}")
        check_image_count(shape[0], shape, model.max_images)
        pixels = np.frombuffer(raw, np.uint8) if raw is not None else uint8_data(spec.data)
        if pixels.size != count:
            raise RequestError(f"images: shape {shape} holds {count:,} values, got {pixels.size:,}")
        return ImagesInput(pixels=pixels.reshape(shape))
    raise RequestError(f"images: expected datatype BYTES (image files) or UINT8 (pixels), got {spec.datatype!r}")


def check_image_count(images: int, shape: list[int], max_images: int) -> None:
    if images < 1:
        raise RequestError(f"images: expected at least one image, got shape {shape}")
    if images > max_images:
        raise RequestError(f"images: at most {max_images} images per request, got {images:,} (shape {shape})",
                           status=413)


def bytes_data(data: list | None, count: int) -> list[bytes]:
    """JSON BYTES data: `count` base64 strings."""
    if data is None or len(data) != count:
        raise RequestError(f"images: expected {count} base64 image files in data, got "
                           f"{'none' if data is None else len(data)}")
    out = []
    for i, text in enumerate(data):
        try:
            out.append(b64decode(text))
        except InstanceError as e:
            raise RequestError(f"images.data[{i}]: {e}") from None
    return out


def uint8_data(data: list | None) -> np.ndarray:
    """JSON UINT8 data: a flat list of integers 0..255."""
    if data is None:
        raise RequestError("images: expected the pixels in data (or binary_data_size), got none")
    try:
        a = np.array(data)
    except (ValueError, TypeError, OverflowError):  # ragged nesting
        a = None
    if a is None or a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise RequestError("images: UINT8 data must be a flat list of integers 0..255")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise RequestError(f"images: UINT8 data must be integers 0..255, got values from {a.min()} to {a.max()}")
    return a.astype(np.uint8)


def split_bytes(raw: memoryview, count: int) -> list[bytes]:
    """A binary BYTES tensor of `count` elements: each a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw) and len(out) < count:
        if i + 4 > len(raw):
            raise RequestError("images: a BYTES element's length prefix is cut off")
        (size,) = struct.unpack_from("<I", raw, i)
        if i + 4 + size > len(raw):
            raise RequestError("images: a BYTES element is longer than the data sent")
        out.append(bytes(raw[i + 4:i + 4 + size]))
        i += 4 + size
    if len(out) != count or i != len(raw):
        raise RequestError(f"images: the shape says {count} files; the binary data holds "
                           f"{'more' if i < len(raw) else len(out)}")
    return out


def output_names(has_unknown: bool) -> list[str]:
    return ["probabilities", "labels", "nearest"] + (["ood_score", "unknown"] if has_unknown else [])


def infer_response(name: str, version: str, request: InferRequest, scores: Scores, labels: list[str],
                   reject_unknown: bool = True) -> dict:
    """The response document: every output as JSON data, in the order the protocol lists them.
    "labels" are the answers ("unknown" for an image like none of the classes, unless
    `reject_unknown` is False), "nearest" the top-1 classes."""
    n, c = scores.probabilities.shape
    nearest = [labels[i] for i in scores.probabilities.argmax(1)]
    unknown = [bool(u) and reject_unknown for u in scores.unknown] if scores.ood_score is not None else [False] * n
    outputs = [tensor("probabilities", "FP32", [n, c], scores.probabilities.reshape(-1).tolist()),
               tensor("labels", "BYTES", [n], [UNKNOWN if u else k for k, u in zip(nearest, unknown)]),
               tensor("nearest", "BYTES", [n], nearest)]
    if scores.ood_score is not None:
        outputs += [tensor("ood_score", "FP32", [n], scores.ood_score.tolist()),
                    tensor("unknown", "BOOL", [n], unknown)]
    wanted = [o.name for o in request.outputs or []]
    doc: dict[str, Any] = {"model_name": name, "model_version": version,
                           "outputs": [o for o in outputs if not wanted or o["name"] in wanted]}
    if request.id is not None:
        doc["id"] = request.id
    return doc


def tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def model_metadata(name: str, version: str, input_size: int, num_classes: int, has_unknown: bool) -> dict:
    shapes = {"probabilities": [-1, num_classes]}
    types = {"probabilities": "FP32", "labels": "BYTES", "nearest": "BYTES", "ood_score": "FP32", "unknown": "BOOL"}
    outputs = [{"name": o, "datatype": types[o], "shape": shapes.get(o, [-1])} for o in output_names(has_unknown)]
    return {"name": name, "versions": [version], "platform": "onnxruntime",
            # also accepted: "images" as UINT8 [-1, input_size, input_size, 3] pixels (see the module doc)
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs}
