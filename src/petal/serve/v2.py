"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it), REST.

    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer

One input, "images": either encoded image files as a BYTES tensor [N], or pixels already
resized as the bundle's preprocessing says, UINT8 [N, S, S, 3]. Tensor data come as JSON
("data": [...]; BYTES elements as base64 strings) or in the binary extension that
`tritonclient` uses by default (an `Inference-Header-Content-Length` header, then the raw
tensors; each BYTES element prefixed by its 4-byte little-endian length). Outputs, as JSON:
"probabilities" FP32 [N, C], "labels" BYTES [N] (the answer: "unknown" for an image like none
of the classes, else the top-1 class; `?unknown=false`: always the top-1 class), "nearest" BYTES
[N] (the top-1 class), and where the bundle has unknown detection "ood_score" FP32 [N] and
"unknown" BOOL [N].
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from petal.predictions import UNKNOWN, Scores
from petal.serve.protocol import RequestError, b64decode

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class ImagesInput:
    """The request's images: encoded files, or (N, S, S, 3) uint8 pixels."""

    files: list[bytes] | None = None
    pixels: np.ndarray | None = None


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> tuple[dict, ImagesInput]:
    """The request body -> (its JSON header, the "images" input). Raises RequestError (400/413)."""
    n = len(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH}: expected a number, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise RequestError(f"{HEADER_LENGTH}: {n} is outside the body of {len(body)} bytes")
    try:
        doc = json.loads(body[:n])
    except (ValueError, RecursionError) as e:
        raise RequestError(f"body: expected a JSON inference request, got invalid JSON ({e})") from None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestError('body: expected {"inputs": [{"name": "images", ...}]}')
    binary, offset = memoryview(body)[n:], 0
    for spec in inputs:
        size = int((spec.get("parameters") or {}).get("binary_data_size", 0)) if isinstance(spec, dict) else 0
        if isinstance(spec, dict) and spec.get("name") == "images":
            return doc, images_input(spec, bytes(binary[offset:offset + size]) if size else None, max_images)
        offset += size
    raise RequestError('inputs: expected an input named "images" (BYTES [N] files or UINT8 [N, S, S, 3] pixels)')


def images_input(spec: dict, raw: bytes | None, max_images: int) -> ImagesInput:
    shape, dtype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(f"images: expected a shape like [N] or [N, S, S, 3], got {shape!r}")
    if shape[0] > max_images:
        raise RequestError(f"images: at most {max_images} images per request, got {shape[0]}", status=413)
    if dtype == "BYTES":
        files = split_bytes(raw) if raw is not None else [b64decode(x) for x in spec.get("data") or []]
        if len(files) != int(np.prod(shape)):
            raise RequestError(f"images: shape {shape} says {int(np.prod(shape))} files, got {len(files)}")
        return ImagesInput(files=files)
    if dtype == "UINT8":
        data = np.frombuffer(raw, np.uint8) if raw is not None else np.asarray(spec.get("data") or [], np.uint8)
        if len(shape) != 4 or shape[3] != 3 or data.size != int(np.prod(shape)):
            raise RequestError(f"images: UINT8 pixels must be [N, S, S, 3] with N*S*S*3 values, got shape {shape} "
                               f"and {data.size} values")
        return ImagesInput(pixels=data.reshape(shape))
    raise RequestError(f"images: expected datatype BYTES (image files) or UINT8 (pixels), got {dtype!r}")


def split_bytes(raw: bytes) -> list[bytes]:
    """A binary BYTES tensor: each element is a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise RequestError("images: a BYTES element's length prefix is cut off")
        (size,) = struct.unpack_from("<I", raw, i)
        if i + 4 + size > len(raw):
            raise RequestError("images: a BYTES element is longer than the data sent")
        out.append(raw[i + 4:i + 4 + size])
        i += 4 + size
    return out


def infer_response(name: str, version: str, request: dict, scores: Scores, labels: list[str],
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
    wanted = [o.get("name") for o in request.get("outputs") or [] if isinstance(o, dict)]
    doc: dict[str, Any] = {"model_name": name, "model_version": version,
                           "outputs": [o for o in outputs if not wanted or o["name"] in wanted]}
    if "id" in request:
        doc["id"] = request["id"]
    return doc


def tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def model_metadata(name: str, version: str, input_size: int, num_classes: int, has_unknown: bool) -> dict:
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]},
               {"name": "labels", "datatype": "BYTES", "shape": [-1]},
               {"name": "nearest", "datatype": "BYTES", "shape": [-1]}]
    if has_unknown:
        outputs += [{"name": "ood_score", "datatype": "FP32", "shape": [-1]},
                    {"name": "unknown", "datatype": "BOOL", "shape": [-1]}]
    return {"name": name, "versions": [version], "platform": "onnxruntime",
            # also accepted: "images" as UINT8 [-1, input_size, input_size, 3] pixels (see the module doc)
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs}
