"""The Cloud ML / TF Serving JSON row format, as used by `petal serve` and `petal.client`.

Request:  {"instances": [{"image_bytes": {"b64": "<base64>"}, "key": "<any>"}, ...]}
Response: {"predictions": [{"key": ..., "prediction": <class id>, "label": "<name> or unknown",
                            "nearest": "<name>", "scores": [<one per class, in id order>],
                            "unknown": <bool>, "ood_score": <number or null>}, ...]}
("unknown": true means the image is like none of the classes: "label" is then "unknown",
"prediction" null, and "nearest" the closest class. `?unknown=false` on the URL turns that off:
"label" is then always the nearest class.)
A failed instance answers {"key": ..., "error": "<reason>"} in its slot.

No server packages: the client and `petal encode-request` use it too. Rows are built
from `petal.predictions.Prediction`, the record every prediction path shares.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from typing import Any

from petal.errors import PetalError
from petal.predictions import Prediction


class RequestError(PetalError):
    """The whole request is unusable. `status` is the HTTP answer (400, or 413 for too big)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class InstanceError(PetalError):
    """One instance is unusable; the others are still answered."""


def _describe(value: object) -> str:
    """A short description of a JSON value for error messages (never the whole payload)."""
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads(body: bytes) -> Any:
    """Strict JSON: NaN and Infinity are refused (the first one stops the parse). Raises
    RequestError (400) with the reason. (1e400 parses as inf: what is passed back is checked
    by `check_echo`, and nothing else takes floats.)"""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:  # e.g. a body of 100,000 '['
        raise RequestError("body: expected JSON, got JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long, NaN
        raise RequestError(f"body: expected JSON, got invalid JSON ({e})") from None


def check_counts(body: bytes, *, values: int, strings: int, containers: int) -> None:
    """Refuse (413) a JSON body holding more values, strings or arrays and objects than any
    request this server takes, from counts of its bytes, before parsing: parsing 8M tiny
    elements holds the interpreter for seconds, counting them takes milliseconds. Commas,
    quotes and brackets inside strings are counted too, which only errs on the safe side."""
    found = {"values": (body.count(b",") + 1, values), "strings": (body.count(b'"') // 2, strings),
             "arrays and objects": (body.count(b"[") + body.count(b"{"), containers)}
    for what, (n, limit) in found.items():
        if n > limit:
            raise RequestError(f"body: holds {n:,} JSON {what}, more than a request to this server may "
                               f"({limit:,}); send fewer or smaller images", status=413)


def row_limits(max_instances: int) -> dict[str, int]:
    """What a row-format body may hold: per instance an image, a key and a few more fields."""
    return {"values": 64 * max_instances + 4096, "strings": 16 * max_instances + 4096,
            "containers": 16 * max_instances + 4096}


def parse_request(body: bytes, max_instances: int) -> list[Any]:
    """Request body -> its list of instances (not yet validated one by one). Every key
    must be one the response can carry back (checked here, before any work)."""
    check_counts(body, **row_limits(max_instances))
    doc = loads(body)
    if not isinstance(doc, dict) or "instances" not in doc:
        got = f"an object with keys {sorted(doc)[:5]}" if isinstance(doc, dict) else _describe(doc)
        raise RequestError(f'body: expected a JSON object {{"instances": [...]}}, got {got}')
    instances = doc["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(f"instances: expected a non-empty list, got {_describe(instances)}")
    if len(instances) > max_instances:
        raise RequestError(f"instances: at most {max_instances} images per request, got {len(instances)}",
                           status=413)
    for i, inst in enumerate(instances):
        if isinstance(inst, dict) and "key" in inst:
            check_echo(inst["key"], f"instances[{i}].key")
    return instances


def check_echo(value: object, where: str) -> None:
    """A value the response passes back must encode as the response does (UTF-8 JSON):
    a lone surrogate ("\\ud800") would make it fail after the work is done."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError
        raise RequestError(f"{where}: cannot be passed back ({type(e).__name__}: {str(e)[:100]})") from None


def instance_key(instance: object) -> tuple[bool, Any]:
    """(has a key, the key). The key is passed back unchanged, whatever its JSON type."""
    if isinstance(instance, dict) and "key" in instance:
        return True, instance["key"]
    return False, None


def b64decode(text: object) -> bytes:
    """Standard or URL-safe base64, with or without padding or line breaks."""
    if not isinstance(text, str):
        raise InstanceError(f"b64: expected a base64 string, got {_describe(text)}")
    text = "".join(text.split())  # MIME-style line breaks
    text = text.replace("-", "+").replace("_", "/")  # URL-safe alphabet -> standard
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InstanceError(f"b64: expected standard or URL-safe base64, got invalid data ({e})") from None


def instance_bytes(instance: object) -> bytes:
    """The encoded image of one instance: {"image_bytes": {"b64": ...}} (or just {"b64": ...})."""
    if not isinstance(instance, dict):
        raise InstanceError('instance: expected an object {"image_bytes": {"b64": "..."}}, '
                            f"got {_describe(instance)}")
    value = instance.get("image_bytes", instance)
    if not isinstance(value, dict) or "b64" not in value:
        raise InstanceError('image_bytes: expected an object {"b64": "<base64>"}, '
                            f"got {_describe(value) if 'image_bytes' in instance else 'no image_bytes'}")
    return b64decode(value["b64"])


def prediction_row(key: tuple[bool, Any], p: Prediction) -> dict:
    """One answered instance: the answer's id and label (null and "unknown" for an unknown
    image), the nearest class, every class's score in id order, and whether it is unknown."""
    row = {"key": key[1]} if key[0] else {}
    row.update(prediction=None if p.unknown else p.label_id, label=p.label, nearest=p.nearest,
               scores=[float(x) for x in p.probabilities], unknown=p.unknown, ood_score=p.ood_score)
    return row


def error_row(key: tuple[bool, Any], reason: str) -> dict:
    row = {"key": key[1]} if key[0] else {}
    row["error"] = reason
    return row


def encode_request(items: Iterable[tuple[Any, bytes]]) -> dict:
    """[(key, encoded image bytes)] -> a request body (as a dict) in the row format."""
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(data).decode("ascii")}, "key": key}
                          for key, data in items]}


def encode_files(uris: Sequence[str]) -> dict:
    """Image files -> one request; each file's URI is its key. Raises if a file cannot be read."""
    from petal.storage import read_bytes

    def read(uri: str) -> bytes:
        try:
            return read_bytes(uri)
        except PetalError as e:
            raise PetalError(f"encode-request: cannot read {uri}: {e}") from None

    return encode_request((uri, read(uri)) for uri in uris)


def encode_requests(uris: Sequence[str], per_request: int | None = None) -> list[tuple[int, str]]:
    """Image files -> [(images, request body as JSON text)], at most `per_request` images each (None: one)."""
    step = per_request or max(1, len(uris))
    return [(len(uris[i:i + step]), json.dumps(encode_files(uris[i:i + step]))) for i in range(0, len(uris), step)]


def oversize(images: int, body: str, max_images: int, max_body_bytes: int) -> str | None:
    """Why a server with these limits answers 413 to this request, or None."""
    if images > max_images:
        return f"{images} images, over the {max_images} a request may hold"
    if len(body) > max_body_bytes:
        return f"{len(body):,} bytes, over the {max_body_bytes:,}-byte body limit"
    return None
