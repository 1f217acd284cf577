"""Fuzzing with hypothesis: image decoding on mutated image bytes, and CSV / dict.txt parsing.

The only exceptions allowed out are petal's own (ImageError, PetalError), and every case
must finish within a time bound. The normal suite runs a bounded number of cases;
PETAL_FUZZ_EXAMPLES raises it for a longer run (the command is in docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import signal
import struct
import tempfile
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from petal.backbones import get_backbone
from petal.data import load_dataset, read_labels_file
from petal.errors import ImageError, PetalError
from petal.images import load_pixels

CFG = get_backbone("efficientnet_lite0")
EXAMPLES = int(os.environ.get("PETAL_FUZZ_EXAMPLES", "200"))
CASE_SECONDS = 5.0  # hard bound per case; a case over it fails the test
# mutated metadata makes Pillow warn (corrupt EXIF...); petal silences these outside pytest
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, database=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CaseTimeout(BaseException):
    """Raised by the alarm. A BaseException, so no `except Exception` in petal can hide it."""


@contextlib.contextmanager
def time_bound(seconds: float = CASE_SECONDS):
    """Fail a case that runs over `seconds`. The alarm interrupts Python code; a hang
    inside C code, which an alarm cannot interrupt, is ended by faulthandler, which
    dumps every thread's stack and exits the process after 3x the bound."""

    def on_alarm(signum, frame):
        raise CaseTimeout(f"case ran over {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- images

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16() -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + struct.pack(">HHH", 51400, 7710, 65535) * 6
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 5, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * 5)) + chunk(b"IEND", b""))


def _seeds() -> list[bytes]:
    a = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb = Image.fromarray(a)
    exif = rgb.getexif()
    exif[0x0112] = 6
    return [
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", progressive=True, exif=exif),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(Image.fromarray(np.arange(192, dtype=np.uint16).reshape(12, 16) * 300), "PNG"),
        _png16(),
        _encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P")]),
        _encode(rgb, "WEBP"),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF", compression="tiff_lzw"),
        _encode(Image.fromarray(a[..., 0].astype(np.float32) / 255), "TIFF"),
    ]


SEEDS = _seeds()
MAGIC = [s[:12] for s in SEEDS] + [b"II*\x00", b"MM\x00*", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBP", b"BM",
                                   b"\xff\xd8\xff"]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid seed image with 1-4 mutations, half of them aimed at the header."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        end = len(data) - 1
        pos = draw(st.one_of(st.integers(0, min(end, 80)), st.integers(0, end)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "field", "splice"]))
        if kind == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del data[pos: pos + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "field":  # sizes, lengths, offsets: the usual parser traps
            data[pos: pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                       b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x01\x00\x00"]))
        else:  # a chunk of another format spliced in
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other) - 1))
            data[pos:pos] = other[start: start + draw(st.integers(1, 200))]
    return bytes(data)


def check_decode(data: bytes) -> None:
    with time_bound():
        try:
            px = load_pixels(data, CFG.preprocess)
        except ImageError as e:
            assert str(e), "an ImageError must say why"
            return
    assert px.shape == (CFG.input_size, CFG.input_size, 3) and px.dtype == np.uint8


@FUZZ
@given(mutated_images())
def test_fuzz_load_pixels_mutated(data):
    check_decode(data)


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=300))
def test_fuzz_load_pixels_magic_then_noise(magic, tail):
    check_decode(magic + tail)


# --------------------------------------------------------------------------- CSV and dict.txt

# tokens that matter to a CSV reader, to petal's header / label checks, and to splitlines()
TOKENS = [",", ",", '"', '"', "\n", "\r\n", "\r", " ", "\t", "a", "b", "cat", "dog", "img/x.png", "y.jpg",
          "uri", "label", "\ufeff", "\x00", "\x0c", "\x85", "\u2028", "é", "名", "gs://b/", "file://", "../",
          "/", "  ", "#"]
csv_texts = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)


def _check_dataset(ds) -> None:
    assert len(set(ds.classes)) == len(ds.classes)
    for e in ds.examples:
        assert e.uri and e.label in ds.classes
        assert e.label.splitlines() == [e.label], f"label {e.label!r} would split labels.txt"
        assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in e.label)
    for where, reason in ds.skipped:
        assert isinstance(where, str) and reason


@FUZZ
@given(st.one_of(csv_texts.map(lambda t: t.encode("utf-8")), st.binary(max_size=200)), st.booleans())
def test_fuzz_csv(raw, require_train):
    with tempfile.TemporaryDirectory() as tmp, time_bound():
        path = Path(tmp) / "labels.csv"
        path.write_bytes(raw)
        try:
            ds = load_dataset(path, eval_percent=10.0, require_train=require_train)
        except PetalError as e:
            assert str(e)
            return
        assert ds.classes == sorted({e.label for e in ds.examples})
        _check_dataset(ds)


@FUZZ
@given(csv_texts, csv_texts)
def test_fuzz_csv_with_dict(csv_text, dict_text):
    with tempfile.TemporaryDirectory() as tmp, time_bound():
        (Path(tmp) / "l.csv").write_text(csv_text, encoding="utf-8")
        (Path(tmp) / "dict.txt").write_text(dict_text, encoding="utf-8")
        try:
            labels, warnings = read_labels_file(Path(tmp) / "dict.txt")
        except PetalError:
            labels = None
        else:
            assert labels and len(set(labels)) == len(labels) and all(lab.strip() == lab for lab in labels)
        try:
            ds = load_dataset(Path(tmp) / "l.csv", labels_file=Path(tmp) / "dict.txt", require_train=False)
        except PetalError:
            return
        assert ds.classes == labels
        _check_dataset(ds)
