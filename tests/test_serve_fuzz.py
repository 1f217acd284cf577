"""Fuzzing a real server with hostile request bodies (hypothesis): the row format, and the Open
Inference Protocol (v2) as JSON and in its binary extension. Every answer must be a 2xx or 4xx
with a JSON body: never a 5xx, never a dropped connection.

Bodies are built from the shapes each route expects, with every field drawn from hostile
values (NaN, 1e400, lone surrogates, huge and negative numbers, deep nesting, wrong types),
then sometimes mangled byte-wise. The normal suite runs a bounded number of cases per format;
PETAL_FUZZ_EXAMPLES raises it (see docs/robustness.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from petal.serve.config import Limits, ServeConfig  # noqa: E402
from serve_helpers import running  # noqa: E402

EXAMPLES = int(os.environ.get("PETAL_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png((1, 1)), _png((40, 30))]
B64 = [base64.b64encode(i).decode() for i in IMAGES]

# Hostile scalars: what broke servers before (NaN, 1e400, lone surrogates, 2**64, bools for ints)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**31, 2**32, 2**63, 2**64, -1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), 1e308]),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),  # lone surrogates included
    st.sampled_from(B64 + ["", "@@@", "AA==", "\ud800", "images", "BYTES", "UINT8"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)


def dumps(doc: object) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as tokens, surrogates escaped."""
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def mangled(draw, body: bytes) -> bytes:
    """Sometimes the body as is, sometimes truncated, flipped or spliced."""
    kind = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "flip", "insert"]))
    if kind == "keep" or not body:
        return body
    pos = draw(st.integers(0, len(body) - 1))
    if kind == "truncate":
        return body[:pos]
    if kind == "flip":
        return body[:pos] + bytes([body[pos] ^ draw(st.integers(1, 255))]) + body[pos + 1:]
    return body[:pos] + draw(st.sampled_from([b"[", b"{", b'"', b",", b"\\", b"\xff", b"NaN", b"1e400"])) + body[pos:]


@st.composite
def row_bodies(draw) -> bytes:
    instance = st.fixed_dictionaries({"image_bytes": st.one_of(
        st.fixed_dictionaries({"b64": st.one_of(st.sampled_from(B64), scalars)}), json_values)},
        optional={"key": json_values})
    doc = draw(st.one_of(st.fixed_dictionaries({"instances": st.lists(st.one_of(instance, json_values),
                                                                      max_size=6)}), json_values))
    return draw(mangled(dumps(doc)))


dims = st.one_of(st.integers(-2, 6), st.sampled_from([224, 2**31 - 1, 2**32, 2**63, True]), scalars)
v2_input = st.fixed_dictionaries(
    {"name": st.one_of(st.just("images"), scalars), "shape": st.one_of(st.lists(dims, max_size=5), json_values),
     "datatype": st.one_of(st.sampled_from(["BYTES", "UINT8", "FP32"]), scalars)},
    optional={"data": st.one_of(st.lists(st.one_of(st.sampled_from(B64), st.integers(-1, 300), scalars),
                                         max_size=8), json_values),
              "parameters": st.one_of(st.fixed_dictionaries({"binary_data_size": st.one_of(
                  st.integers(-1, 200), scalars)}), json_values)})
v2_docs = st.fixed_dictionaries({"inputs": st.one_of(st.lists(v2_input, max_size=3), json_values)}, optional={
    "id": json_values, "parameters": json_values,
    "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": st.one_of(
        st.sampled_from(["probabilities", "labels", "unknown"]), scalars)}), max_size=3), json_values)})


@st.composite
def v2_binary(draw) -> tuple[bytes, dict]:
    """The binary extension: a JSON header, then raw tensors, its length in a header."""
    header = dumps(draw(v2_docs))
    elements = draw(st.lists(st.one_of(st.sampled_from(IMAGES), st.binary(max_size=40)), max_size=6))
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements) + draw(st.binary(max_size=8))
    length = draw(st.one_of(st.just(str(len(header))), st.integers(-5, len(header) + len(raw) + 5).map(str),
                            st.sampled_from(["", "abc", "1e3", "99999999999999999999"])))
    return header + raw, {"Inference-Header-Content-Length": length}


@pytest.fixture(scope="module")
def url(model_dir):
    limits = Limits(max_images=4, max_body_bytes=1024 * 1024, max_request_pixels=10_000_000)
    with running(ServeConfig({"shapes": model_dir}, limits=limits)) as (base, _):
        yield base


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    assert isinstance(response.json(), dict)


@FUZZ
@given(body=row_bodies())
def test_fuzz_row_format(url, body):
    check(httpx.post(f"{url}/v1/models/shapes:predict", content=body, timeout=60,
                     headers={"Content-Type": "application/json"}))


@FUZZ
@given(doc=v2_docs, mangle=st.data())
def test_fuzz_v2_json(url, doc, mangle):
    body = mangle.draw(mangled(dumps(doc)))
    check(httpx.post(f"{url}/v2/models/shapes/infer", content=body, timeout=60))


@FUZZ
@given(request=v2_binary())
def test_fuzz_v2_binary(url, request):
    body, headers = request
    check(httpx.post(f"{url}/v2/models/shapes/infer", content=body, headers=headers, timeout=60))
