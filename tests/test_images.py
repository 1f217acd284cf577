"""Decoding and preprocessing: one code path, every mode to upright RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from petal.backbones import get_backbone
from petal.errors import ImageError
from petal.images import load_pixels

CFG = get_backbone("efficientnet_lite0")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_center_crop_keeps_the_middle():
    # left third red, middle green, right third blue: the crop sees mostly green
    a = np.zeros((300, 900, 3), np.uint8)
    a[:, :300, 0] = 255
    a[:, 300:600, 1] = 255
    a[:, 600:, 2] = 255
    px = load_pixels(encode(Image.fromarray(a)), CFG.preprocess)
    assert px.shape == (224, 224, 3) and px.dtype == np.uint8
    assert px[..., 1].mean() > 250 and px[..., 0].mean() < 5


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_modes_become_rgb(mode):
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    if mode == "I;16":
        img = Image.fromarray((np.full((48, 64), 40000)).astype(np.uint16))
    else:
        img = img.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else ("TIFF" if mode == "I;16" else "PNG")
    px = load_pixels(encode(img, fmt), CFG.preprocess)
    assert px.shape == (224, 224, 3)


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    px = load_pixels(encode(img), CFG.preprocess)
    assert px.min() == 255


def test_exif_rotation_is_applied():
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = 255  # left half white, in the stored (landscape) orientation
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown as portrait, white on top
    px = load_pixels(encode(img, "JPEG", exif=exif, quality=95), CFG.preprocess)
    assert px[:40].mean() > 200 and px[-40:].mean() < 50


def test_bad_bytes_are_image_errors():
    with pytest.raises(ImageError, match="empty file"):
        load_pixels(b"", CFG.preprocess)
    with pytest.raises(ImageError, match="not an image"):
        load_pixels(b"<html>nope</html>", CFG.preprocess)
    good = encode(Image.new("RGB", (300, 300), (10, 200, 10)), "JPEG")
    with pytest.raises(ImageError, match="truncated|corrupt|decode"):
        load_pixels(good[: len(good) // 2], CFG.preprocess)


def test_decompression_bomb_refused_from_header():
    # a tiny PNG whose header claims 20000 x 20000 pixels
    bomb = encode(Image.new("1", (20000, 20000)), "PNG", optimize=True)
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="too large.*decompression bomb"):
        load_pixels(bomb, CFG.preprocess, max_pixels=50_000_000)


def test_remote_reads_stop_at_the_byte_limit(monkeypatch):
    import fsspec

    from petal import storage
    from petal.storage import read_bytes

    # memory:// stands for a cloud store here (petal reads no memory:// URI of its own accord)
    monkeypatch.setattr(storage, "READ_SCHEMES", storage.READ_SCHEMES | {"memory"})

    with fsspec.open("memory://petal-test/big.jpg", "wb") as f:
        f.write(b"y" * 5000)
    assert len(read_bytes("memory://petal-test/big.jpg", max_bytes=5000)) == 5000
    with pytest.raises(ImageError, match="file too large: over 4,999 bytes"):
        read_bytes("memory://petal-test/big.jpg", max_bytes=4999)


def test_only_the_promised_formats_are_opened():
    """EPS would run Ghostscript (with no time limit: `{ } loop` holds a decode thread forever);
    it and every other format Pillow knows beyond the six are refused from their first bytes."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    with pytest.raises(ImageError, match=r"EPS images are not read \(petal reads JPEG, PNG, GIF, WEBP, BMP, TIFF\)"):
        load_pixels(eps, CFG.preprocess)
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    for fmt in ("PPM", "ICO", "PCX", "TGA"):  # Pillow reads them; petal does not promise to
        with pytest.raises(ImageError, match="images are not read|not an image"):
            load_pixels(encode(img, fmt), CFG.preprocess)


def test_the_allowed_formats_decode_to_the_same_pixels_as_before():
    """The list of formats changes what is opened, never the pixels (the cache depends on them)."""
    from petal.images import resize_crop, to_rgb

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                    ("TIFF", {})):
        data = encode(img, fmt, **kw)
        unrestricted = resize_crop(to_rgb(Image.open(io.BytesIO(data))), CFG.preprocess)
        assert np.array_equal(load_pixels(data, CFG.preprocess), unrestricted), fmt
