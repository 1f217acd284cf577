"""A generated corpus of hostile inputs (never downloaded): what must work, converted
correctly; what must be skipped, with its path and reason; data-definition mistakes,
each with its own message; and `petal embed` over all of it (exit 0, summary, errors file).

See docs/robustness.md for the policies and the list of cases.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import petal.images as images
from petal.backbones import get_backbone
from petal.data import load_dataset, read_labels_file
from petal.embed import embed
from petal.errors import DataError, ImageError, NothingUsableError, PetalError
from petal.images import PixelBudget, load_pixels
from petal.loader import iter_items
from petal.run import duplicate_warnings
from petal.runs.common import embed_dataset
from petal.storage import read_bytes

CFG = get_backbone("efficientnet_lite0")
S = CFG.input_size
RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


# --------------------------------------------------------------------------- builders

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color, size=(64, 48), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(w: int, h: int, depth: int, color_type: int, row: bytes = b"", idat: bytes | None = None) -> bytes:
    """A PNG written by hand: for bit depths and headers Pillow will not write."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    data = zlib.compress((b"\x00" + row) * h) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def quadrant_jpeg(orientation: int) -> bytes:
    """Top-left quadrant white, the rest black, with an EXIF orientation tag."""
    a = np.zeros((96, 96, 3), np.uint8)
    a[:48, :48] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif, quality=95)


def strips(w: int, h: int) -> bytes:
    """Thirds along the long side: red, green, blue (a 4000x3 or 3x4000 photo)."""
    a = np.zeros((h, w, 3), np.uint8)
    if w > h:
        a[:, : w // 3], a[:, w // 3: 2 * w // 3], a[:, 2 * w // 3:] = RED, GREEN, BLUE
    else:
        a[: h // 3], a[h // 3: 2 * h // 3], a[2 * h // 3:] = RED, GREEN, BLUE
    return encode(Image.fromarray(a), "PNG")


def noise(fmt: str, size=(120, 90), **kw) -> bytes:
    a = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(a)
    return encode(img.convert("P") if fmt == "GIF" else img, fmt, **kw)


def palette_image() -> Image.Image:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([*RED, *BLUE])
    img.paste(1, (32, 0, 64, 64))
    return img


def jpeg_bomb() -> bytes:
    """A real 16x16 JPEG whose frame header is patched to claim 65000 x 65000."""
    data = bytearray(encode(solid(RED, (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def mean_color(px: np.ndarray) -> np.ndarray:
    return px.reshape(-1, 3).mean(0)


def near(px_or_color, color, tol=6.0) -> bool:
    got = mean_color(px_or_color) if isinstance(px_or_color, np.ndarray) and px_or_color.ndim == 3 else px_or_color
    return bool(np.all(np.abs(np.asarray(got, float) - np.asarray(color, float)) <= tol))


# --------------------------------------------------------------------------- the corpus

# name -> (file name, bytes, expected mean RGB of the 224x224 crop). All must decode.
GOOD: dict[str, tuple[str, bytes, tuple]] = {
    "cmyk_jpeg": ("cmyk.jpg", encode(solid(RED, mode="CMYK"), "JPEG", quality=95), RED),
    "grey_jpeg": ("grey.jpeg", encode(solid(RED, mode="L"), "JPEG", quality=95), (81, 81, 81)),
    "progressive_jpeg": ("progressive.jpg", encode(solid(BLUE), "JPEG", progressive=True, quality=95), BLUE),
    "jpeg_trailing_junk": ("junk_after_eoi.jpg", encode(solid(GREEN), "JPEG", quality=95) + b"\0junk" * 20, GREEN),
    "png16_grey": ("grey16.png", encode(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "PNG"), (156,) * 3),
    "png16_rgb": ("rgb16.png", raw_png(8, 6, 16, 2, struct.pack(">HHH", 51400, 7710, 7710) * 8), RED),
    "png16_rgba": ("rgba16.png", raw_png(8, 6, 16, 6, struct.pack(">HHHH", 51400, 7710, 7710, 65535) * 8), RED),
    "png_1bit": ("bilevel.png", encode(Image.new("1", (40, 40), 1), "PNG"), (255, 255, 255)),
    "png_palette": ("palette.png", encode(solid(BLUE, mode="P"), "PNG"), BLUE),
    # left half: palette entry 0, red and fully transparent (-> white); right half: entry 1, opaque blue
    "png_palette_transparent": ("palette_t.png", encode(palette_image(), "PNG", transparency=0), (142, 142, 228)),
    # 50% red over white: (255 + 200) / 2, (255 + 30) / 2
    "png_rgba_half": ("rgba.png", encode(Image.new("RGBA", (50, 50), (200, 30, 30, 128)), "PNG"), (227, 142, 142)),
    "png_la": ("la.png", encode(Image.new("LA", (50, 50), (0, 0)), "PNG"), (255,) * 3),
    "tiff_float01": ("float.tif", encode(Image.fromarray(np.full((30, 30), 0.5, np.float32)), "TIFF"), (127,) * 3),
    "gif_animated": ("anim.gif", encode(solid(RED, mode="P"), "GIF", save_all=True,
                                        append_images=[solid(BLUE, mode="P")]), RED),
    "webp": ("photo.webp", encode(solid(GREEN), "WEBP", quality=95), GREEN),
    "webp_alpha": ("alpha.webp", encode(Image.new("RGBA", (30, 30), (0, 0, 0, 0)), "WEBP", lossless=True), (255,) * 3),
    "bmp": ("photo.bmp", encode(solid(BLUE), "BMP"), BLUE),
    "tiff": ("photo.tiff", encode(solid(GREEN), "TIFF"), GREEN),
    "tiff_cmyk": ("cmyk.tif", encode(solid(RED, mode="CMYK"), "TIFF"), RED),
    "png_named_jpg": ("really_a_png.jpg", encode(solid(RED), "PNG"), RED),
    "size_1x1": ("one_pixel.png", encode(solid(GREEN, (1, 1)), "PNG"), GREEN),
    "unicode_and_spaces": ("café au lait 🌸 名前.png", encode(solid((90, 60, 30)), "PNG"), (90, 60, 30)),
}
# extreme sizes and EXIF rotations are checked pixel by pixel below, and go in the corpus too
GOOD_EXTRA = {
    "size_4000x3": ("wide_4000x3.png", strips(4000, 3)),
    "size_3x4000": ("tall_3x4000.png", strips(3, 4000)),
    **{f"exif_orientation_{o}": (f"exif_{o}.jpg", quadrant_jpeg(o)) for o in (2, 3, 6, 8)},
}

_ok_jpeg = encode(solid(RED, (300, 300)), "JPEG", quality=90)
# name -> (file name, bytes, reason pattern). Each must be skipped with that reason.
BAD: dict[str, tuple[str, bytes, str]] = {
    "empty": ("empty.jpg", b"", "empty file"),
    "random_bytes": ("random.jpg", np.random.default_rng(1).bytes(5000), "not an image"),
    "html_named_jpg": ("page.jpg", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not an image"),
    "pdf_named_png": ("doc.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not an image"),
    "truncated_jpeg": ("cut.jpg", half(_ok_jpeg), "truncated"),
    "jpeg_missing_end_marker": ("no_eoi.jpg", _ok_jpeg[:-2], "truncated"),
    "truncated_png": ("cut.png", half(noise("PNG")), "truncated"),
    "truncated_gif": ("cut.gif", half(noise("GIF")), "truncated"),
    "truncated_bmp": ("cut.bmp", half(noise("BMP")), "truncated"),
    "truncated_tiff": ("cut.tiff", half(noise("TIFF")), "truncated"),
    "truncated_webp": ("cut.webp", half(noise("WEBP")), "not a readable image|truncated"),
    "bomb_png": ("bomb.png", raw_png(100_000, 100_000, 8, 2, idat=zlib.compress(b"")), "too large.*decompression bomb"),
    "bomb_jpeg": ("bomb.jpg", jpeg_bomb(), "too large.*decompression bomb"),
    "bomb_gif": ("bomb.gif", b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + b","
                 + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;", "too large"),
    "bomb_bmp": ("bomb.bmp", b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
                 + struct.pack("<IiiHHIIiiII", 40, 50000, 50000, 1, 24, 0, 0, 0, 0, 0, 0), "too large"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_must_work_converted_to_rgb(name):
    _, data, color = GOOD[name]
    px = load_pixels(data, CFG.preprocess)
    assert px.shape == (S, S, 3) and px.dtype == np.uint8
    assert near(px, color), f"{name}: mean color {mean_color(px).round(1)}, expected {color}"


@pytest.mark.parametrize("orientation, white", [(2, "top-right"), (3, "bottom-right"), (6, "top-right"),
                                                (8, "bottom-left")])
def test_exif_rotated_photos_come_out_upright(orientation, white):
    px = load_pixels(GOOD_EXTRA[f"exif_orientation_{orientation}"][1], CFG.preprocess).astype(float)
    q = S // 2
    quads = {"top-left": px[:q, :q], "top-right": px[:q, q:], "bottom-left": px[q:, :q], "bottom-right": px[q:, q:]}
    assert quads[white].mean() > 200
    assert all(v.mean() < 60 for k, v in quads.items() if k != white)


@pytest.mark.parametrize("name, axis", [("size_4000x3", 1), ("size_3x4000", 0)])
def test_extreme_aspect_ratios(name, axis):
    """The center crop of a 4000x3 strip is its middle 2.6 px: green, the middle third."""
    px = load_pixels(GOOD_EXTRA[name][1], CFG.preprocess)
    assert near(px, GREEN, tol=1)


def test_large_photo_is_resized_correctly(tmp_path):
    """A 24 MP PNG (no JPEG draft mode to help): decoded once, within the pixel budget."""
    a = np.zeros((4000, 6000, 3), np.uint8)
    a[:, :3000], a[:, 3000:] = RED, BLUE
    px = load_pixels(encode(Image.fromarray(a), "PNG", compress_level=1), CFG.preprocess)
    assert near(px[:, : S // 2 - 4], RED, 1) and near(px[:, S // 2 + 4:], BLUE, 1)


def test_decode_threads_share_a_pixel_budget(monkeypatch):
    """Three threads, three 4 MP images, a 5 MP budget: never two decoded at once."""
    budget = PixelBudget(5_000_000)
    peak = []
    orig = budget.hold

    def hold(pixels):
        ctx = orig(pixels)

        class Track:
            def __enter__(self):
                ctx.__enter__()
                peak.append(budget.used)

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Track()

    monkeypatch.setattr(budget, "hold", hold)
    monkeypatch.setattr(images, "DECODE_BUDGET", budget)
    data = encode(solid(BLUE, (2000, 2000)), "PNG", compress_level=1)
    results = {}

    def work(i):
        results[i] = load_pixels(data, CFG.preprocess)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(near(p, BLUE, 1) for p in results.values())
    assert max(peak) == 4_000_000 and budget.used == 0
    # an image larger than the whole budget still runs (alone): no deadlock
    assert near(load_pixels(encode(solid(RED, (3000, 2000)), "PNG", compress_level=1), CFG.preprocess), RED, 1)


@pytest.mark.parametrize("name", sorted(BAD))
def test_must_be_refused_with_the_reason(name):
    _, data, reason = BAD[name]
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=reason):
        load_pixels(data, CFG.preprocess)
    assert time.perf_counter() - t0 < 1.0  # bombs are refused from the header, nothing allocated


def test_read_failures_are_reasons_not_crashes(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block forever
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "loop_b.jpg", tmp_path / "loop_a.jpg")
    os.symlink(tmp_path / "loop_a.jpg", tmp_path / "loop_b.jpg")
    (tmp_path / "big.jpg").write_bytes(b"\xff" * 100)
    cases = {
        "dir.jpg": "is a directory", "pipe.jpg": "not a regular file", "dangling.jpg": "dangling symbolic link",
        "missing.jpg": "file not found", "loop_a.jpg": "cannot read file: Too many levels of symbolic links",
    }
    outcomes: dict[str, str] = {}

    def read_all():  # in a thread: were the FIFO opened, this would block, not fail
        for name in cases:
            try:
                read_bytes(str(tmp_path / name))
                outcomes[name] = "read"
            except ImageError as e:
                outcomes[name] = str(e)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), f"read_bytes hung after {outcomes}"
    for name, reason in cases.items():
        assert re.search(reason, outcomes[name]), (name, outcomes[name])
    with pytest.raises(ImageError, match="invalid path"):
        read_bytes(str(tmp_path / "nul\0.jpg"))
    with pytest.raises(ImageError, match="file too large: 100 bytes, limit 10"):
        read_bytes(str(tmp_path / "big.jpg"), max_bytes=10)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_and_folder(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c / "sub").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    (tmp_path / "a" / "x.png").chmod(0)
    (tmp_path / "b" / "sub").chmod(0)
    try:
        ds = load_dataset(tmp_path, eval_percent=0, require_train=False)
        assert any("cannot list folder" in r and "sub" in p for p, r in ds.skipped)
        with pytest.raises(ImageError, match="permission denied"):
            read_bytes(str(tmp_path / "a" / "x.png"))
    finally:
        (tmp_path / "a" / "x.png").chmod(0o644)
        (tmp_path / "b" / "sub").chmod(0o755)


# --------------------------------------------------------------------------- a whole folder

BAD_NAME = b"latin1-\xe9t\xe9.png"  # not valid UTF-8: os.fsdecode gives surrogates


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A class folder per kind, holding every case above. Returns (root, good, bad):
    good: path -> case, bad: path -> reason pattern."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    good, bad = {}, {}
    for name, (fn, data, _) in GOOD.items():
        (root / "good").mkdir(parents=True, exist_ok=True)
        (root / "good" / fn).write_bytes(data)
        good[str(root / "good" / fn)] = name
    for name, (fn, data) in GOOD_EXTRA.items():
        (root / "extra").mkdir(parents=True, exist_ok=True)
        (root / "extra" / fn).write_bytes(data)
        good[str(root / "extra" / fn)] = name
    raw = os.fsencode(root / "extra") + b"/" + BAD_NAME
    with open(raw, "wb") as f:
        f.write(encode(solid(RED), "PNG"))
    good[os.fsdecode(raw)] = "non_utf8_file_name"
    bad_dir = root / "bad"
    bad_dir.mkdir()
    for fn, data, reason in BAD.values():
        (bad_dir / fn).write_bytes(data)
        bad[str(bad_dir / fn)] = reason
    raw = os.fsencode(bad_dir) + b"/broken-\xff.jpg"  # a bad file whose name is not UTF-8 either
    with open(raw, "wb") as f:
        f.write(b"GIF89a\x00garbage")
    bad[os.fsdecode(raw)] = "not a readable image|not an image|truncated"
    os.mkfifo(bad_dir / "pipe.png")
    bad[str(bad_dir / "pipe.png")] = "not a regular file"
    os.symlink(root / "nowhere.jpg", bad_dir / "dangling.jpg")
    bad[str(bad_dir / "dangling.jpg")] = "dangling symbolic link"
    (bad_dir / "notes.txt").write_text("not an image")
    os.symlink("..", bad_dir / "loop")  # a symlink loop up to the data folder
    (root / "empty_class").mkdir()
    return root, good, bad


def test_folder_listing_survives_loops_and_odd_names(corpus):
    root, good, bad = corpus
    ds = load_dataset(root, eval_percent=0)
    assert {e.uri for e in ds.examples} == set(good) | set(bad)  # each once: the loop was not followed
    assert ds.classes == ["bad", "extra", "good"]
    skipped = dict(ds.skipped)
    assert skipped[str(root / "bad" / "notes.txt")] == "not an image file extension"
    assert "symbolic link loop" in skipped[str(root / "bad" / "loop")]
    assert any("'empty_class' has no images" in w for w in ds.warnings)


def test_petal_embed_over_the_corpus(tmp_path, corpus, cache_dir):
    """Exit 0; every good image embedded, every bad one listed with its reason."""
    root, good, bad = corpus
    own = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", own / "models")
    errors = tmp_path / "errors.csv"
    r = subprocess.run([sys.executable, "-m", "petal.cli", "embed", str(root), "--cache", str(own), "--json",
                        "--errors", str(errors)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["embedded"] + summary["cached"] == len(good)
    assert summary["failed"] == len(bad) and summary["skipped"] == 2  # notes.txt, the loop
    with open(errors, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = {row["uri"]: row["reason"] for row in csv.DictReader(f)}
    for path, reason in bad.items():
        assert re.search(reason, rows[path]), (path, rows[path])
    assert not set(good) & set(rows)


def test_every_image_corrupt_is_one_clear_error(tmp_path, cache_dir):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "x.jpg").write_bytes(b"<html>")
    ds = load_dataset(tmp_path / "d", eval_percent=0)
    with pytest.raises(NothingUsableError, match="none of the 2 images could be read; first error: .*not an image"):
        embed_dataset(ds, cache_dir=cache_dir)


def test_same_bytes_in_two_classes_or_in_train_and_eval(tmp_path, cache_dir):
    own = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", own / "models")
    photo = encode(solid(RED), "PNG")
    for path in ("cats/a.png", "dogs/a_copy.png", "cats/b.png"):
        (tmp_path / "d" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / path).write_bytes(photo if "a" in Path(path).stem else encode(solid(BLUE), "PNG"))
    (tmp_path / "ev" / "cats").mkdir(parents=True)
    (tmp_path / "ev" / "cats" / "b_again.png").write_bytes(encode(solid(BLUE), "PNG"))
    (tmp_path / "ev" / "dogs").mkdir(parents=True)
    (tmp_path / "ev" / "dogs" / "c.png").write_bytes(encode(solid(GREEN), "PNG"))
    ds = load_dataset(tmp_path / "d", eval_source=tmp_path / "ev")
    result, _ = embed([e.uri for e in ds.examples], CFG, own)
    warnings = duplicate_warnings(ds.examples, result.keys)
    assert len(warnings) == 2
    assert "same image in classes 'cats'" in warnings[0] and "a_copy.png" in warnings[0]
    assert "same image in both train and eval" in warnings[1] and "b_again.png" in warnings[1]


# --------------------------------------------------------------------------- data definitions

def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture
def imgs(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c,with comma.png", "d.png"):
        write(tmp_path / "img" / name, b"x")
    return tmp_path


def test_csv_bom_crlf_quotes_blank_lines(imgs):
    text = '\ufeffuri,label\r\nimg/a.png,cat\r\n\r\n"img/c,with comma.png",dog\r\n   \r\nimg/b.png, cat \r\n'
    ds = load_dataset(write(imgs / "l.csv", text), eval_percent=0)
    assert [(Path(e.uri).name, e.label) for e in ds.examples] == [
        ("a.png", "cat"), ("c,with comma.png", "dog"), ("b.png", "cat")]
    assert ds.skipped == [] and ds.warnings == []


def test_csv_row_problems_each_named(imgs):
    text = ("img/a.png,cat\nimg/b.png,dog\nimg/a.png,cat\nimg/a.png,dog\nimg/d.png,\n,cat\nimg/d.png\n"
            'img/d.png,"multi\nline"\nimg/b.png,dog\n')
    ds = load_dataset(write(imgs / "l.csv", text), eval_percent=0)
    where = {Path(p).name: r for p, r in ds.skipped}
    assert where["l.csv:4"] == "img/a.png already labeled 'cat' on line 1"
    assert where["l.csv:5"] == "empty label"
    assert where["l.csv:6"] == "empty uri"
    assert where["l.csv:7"] == "row has no label column"
    assert where["l.csv:8"] == "label contains a line break or control character ('multi\\nline')"
    assert ds.warnings == [f"{imgs / 'l.csv'}: 2 duplicate row(s) ignored: line 3 repeats line 1, "
                           "line 10 repeats line 2"]


def test_csv_unknown_labels_with_dict(imgs):
    write(imgs / "dict.txt", "cat\n\ndog\n")
    ds = load_dataset(write(imgs / "l.csv", "img/a.png,cat\nimg/b.png,dog\nimg/d.png,bird\n"),
                      labels_file=imgs / "dict.txt", eval_percent=0)
    assert ds.classes == ["cat", "dog"]
    assert ds.skipped == [(str(imgs / "img" / "d.png"), "label 'bird' not in the labels file")]
    assert "blank line 2 ignored" in ds.warnings[0] and "'bird' (1)" in ds.warnings[1]


def test_csv_and_dict_refusals(imgs):
    with pytest.raises(DataError, match=r"l.csv: not UTF-8 text"):
        load_dataset(write(imgs / "l.csv", b"img/a.png,caf\xe9\n"))
    with pytest.raises(DataError, match=r"line 2: not a valid CSV row \(field larger than field limit"):
        load_dataset(write(imgs / "l.csv", "img/a.png,cat\n" + '"' + "x" * 200_000 + '",dog\n'))
    if not _has("gcsfs"):  # a URI scheme without its package: refused up front, naming it
        with pytest.raises(DataError, match=r"2 row\(s\) use gs:// URIs: cannot read gs:// URIs .*pip install gcsfs"):
            load_dataset(write(imgs / "l.csv", "gs://bucket/a.jpg,cat\ngs://bucket/b.jpg,dog\n"))
    with pytest.raises(DataError, match="line 3 repeats label 'a' from line 1"):
        read_labels_file(write(imgs / "d.txt", "a\nb\na\n"))
    with pytest.raises(DataError, match="expected UTF-8 text"):
        read_labels_file(write(imgs / "d.txt", b"caf\xe9\n"))
    with pytest.raises(DataError, match="no labels in it"):
        read_labels_file(write(imgs / "d.txt", "\n \n"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_folder_refusals(tmp_path):
    write(tmp_path / "only" / "a.png", b"x")
    with pytest.raises(DataError, match=r"need at least 2 classes with images, found 1 \('only'\)"):
        load_dataset(tmp_path)
    write(tmp_path / "ok2" / "b.png", b"x")
    (tmp_path / "empty").mkdir()
    ds = load_dataset(tmp_path, eval_percent=0)
    assert ds.classes == ["ok2", "only"] and "'empty' has no images" in ds.warnings[0]
    bad = os.fsencode(tmp_path) + b"/caf\xe9"  # a class folder name that is not UTF-8
    os.mkdir(bad)
    write(Path(os.fsdecode(bad)) / "c.png", b"x")
    write(tmp_path / "line\nbreak" / "d.png", b"x")
    ds = load_dataset(tmp_path, eval_percent=0)
    assert ds.classes == ["ok2", "only"]
    reasons = sorted(r for _, r in ds.skipped)
    assert reasons[0].startswith("class folder name unusable: label contains a line break")
    assert reasons[1].startswith("class folder name unusable: label is not valid UTF-8")


def test_loader_keeps_going_past_every_failure(corpus):
    """iter_items gives one Item per input, in order, whatever each one is."""
    root, good, bad = corpus
    uris = sorted(good) + sorted(bad) + ["gs://no-driver/x.jpg", str(root / "nope.png")]
    items = list(iter_items(uris, CFG.preprocess, workers=4))
    assert [it.uri for it in items] == uris
    assert all(it.error is None and it.pixels is not None for it in items[: len(good)])
    assert all(it.error and it.pixels is None for it in items[len(good):])


def test_io_errors_do_not_set_good_shards_aside(tmp_path, monkeypatch):
    """EIO or too many open files is the machine's trouble: the shard stays, the error is raised."""
    import errno

    import pyarrow.parquet as pq

    from petal.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path, "b", 4)
    with cache.writer() as w:
        w.add(["k1", "k2"], np.ones((2, 4), np.float32))
    shard = cache.shards()[0]
    for exc in (OSError(errno.EIO, "Input/output error"), OSError(errno.EMFILE, "Too many open files"),
                MemoryError()):
        def fail(*a, exc=exc, **kw):
            raise exc
        monkeypatch.setattr(pq, "read_table", fail)
        with pytest.raises(type(exc)):
            EmbeddingCache(tmp_path, "b", 4).load()  # a fresh reader: the writer's own index knows the shard
        assert shard.exists() and not list(tmp_path.rglob("*.corrupt"))
    monkeypatch.undo()
    assert set(EmbeddingCache(tmp_path, "b", 4).load()) == {"k1", "k2"}


def test_a_full_disk_is_one_clear_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    """(benchmarks/faults.py does it on a real tmpfs.)"""
    import errno

    import pyarrow.parquet as pq

    from petal.cache import EmbeddingCache
    from petal.errors import CacheError

    cache = EmbeddingCache(tmp_path, "b", 4)
    with cache.writer() as w:
        w.add(["k1"], np.ones((1, 4), np.float32))

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(CacheError, match="no space left on the disk of .*: free some space .* run again to go on"):
        with cache.writer() as w:
            w.add(["k2"], np.ones((1, 4), np.float32))
    monkeypatch.undo()
    assert set(EmbeddingCache(tmp_path, "b", 4).load()) == {"k1"} and not list(tmp_path.rglob(".shard-*.tmp"))


@pytest.mark.parametrize("location", ["w.bin", "../../../../etc/passwd", "/etc/passwd"])
def test_a_bundle_with_external_data_is_refused(tmp_path, model_dir, location):
    """A graph whose weights live in another file could read any file: petal never writes one."""
    import shutil

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from petal.bundle import Model

    bundle = tmp_path / "bundle"
    shutil.copytree(model_dir, bundle)
    weights = numpy_helper.from_array(np.ones((3, 3), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["images", "W"], ["probabilities"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3])], [weights])
    onnx.save_model(helper.make_model(graph), bundle / "model.onnx", save_as_external_data=True,
                    location="w.bin", size_threshold=0)
    if location != "w.bin":
        m = onnx.load(bundle / "model.onnx", load_external_data=False)
        m.graph.initializer[0].external_data[0].value = location
        onnx.save(m, bundle / "model.onnx")
    with pytest.raises(PetalError, match=r"model.onnx: its weights point at files outside it \(ONNX external data\)"):
        Model(bundle)
