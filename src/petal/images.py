"""Image bytes -> the uint8 pixels a backbone sees. One code path for all.

Embedding, prediction, evaluation, serving and the Beam pipelines all call
`load_pixels`, so what the model is trained on is exactly what it is served.

Policy for awkward files:
- only JPEG, PNG, GIF, WebP, BMP and TIFF are opened (`FORMATS`): Pillow knows some forty
  formats, and some run outside programs (EPS runs Ghostscript, with no time limit);
- every mode Pillow reads becomes 8-bit RGB; transparency is composited on white;
- EXIF orientation is applied, so photos come out upright;
- animated images use their first frame;
- a file larger than `max_pixels` is refused from its header, before any
  pixel is allocated (decompression bombs);
- large images are decoded within a process-wide pixel budget (`DECODE_BUDGET`),
  so a thread pool of huge PNGs cannot hold more than about one 64 MP image's worth
  of decoded pixels at a time (JPEGs are also decoded at reduced scale: draft mode);
- 16-bit and 32-bit grey scale their full range to 8 bits; float images in [0, 1]
  are taken as 0..1, other floats as 0..255;
- a truncated file is refused, not padded with grey: a half-grey photo would
  quietly teach the model the wrong thing.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from petal.errors import ImageError
from petal.preprocess import Preprocess

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
)
# the formats petal reads, as Pillow names them; any other is refused from its first bytes
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: larger than any camera photo, far below a bomb


def quiet_pillow_warnings() -> None:
    """Silence Pillow's warnings about image files, process-wide. Called only where petal
    owns the process (the CLI, the server, Beam workers), never on import: a library's
    host program owns its warnings filters. Calling it again changes nothing.

    Process-wide because warnings.catch_warnings() around each decode would race between
    the decode threads (it swaps the global filter list in and out).
    """
    # Pillow warns (UserWarning) about damaged metadata, e.g. corrupt EXIF, common in scraped
    # photos and harmless to the pixels; a file that cannot be decoded gets an ImageError instead.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    # Pillow's own bomb guard stays on for the host program (Image.MAX_IMAGE_PIXELS, ~89 MP to
    # warn, twice that to refuse); petal refuses from `max_pixels` first and words it itself.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class PixelBudget:
    """At most `limit` decoded pixels in flight across threads.

    An image larger than the whole budget still runs, alone, so nothing deadlocks.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


# Decoding takes up to ~4 bytes per pixel and converting (RGBA -> composited RGB)
# a few copies more: this budget keeps the decode threads under ~1 GB together.
DECODE_BUDGET = PixelBudget(DEFAULT_MAX_PIXELS)

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_pixels(data: bytes, pre: Preprocess) -> int:
    """The pixels `load_pixels` will decode, from the header alone: width x height, or for a
    JPEG its size at the draft scale it will be decoded at; 0 for what is no readable image
    (decoding it then says why). What a server budgets per request."""
    try:
        img = open_image(data, max_pixels=2**62)
    except ImageError:
        return 0
    draft(img, pre)  # sets the size only: nothing is decoded
    w, h = img.size
    return w * h


def draft(img: Image.Image, pre: Preprocess) -> None:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when it is far larger than needed:
    much faster, and the result still has >= the pixels the resize needs. The same for every
    path (training, prediction, serving), so the pixels a model sees never depend on which."""
    if img.format == "JPEG":
        img.draft("RGB", (pre.resize_size, pre.resize_size))


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only. Raises ImageError if it is no image or too large."""
    if not data:
        raise ImageError("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # past Pillow's hard limit, before our own check
        count = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(count.group(1)):,} pixels" if count else f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise ImageError(f"image too large: {size}, limit {max_pixels:,} (possible decompression bomb)") from None
    except UnidentifiedImageError:
        other = known_format(data)
        if other:
            raise ImageError(f"{other} images are not read (petal reads {', '.join(FORMATS)})") from None
        raise ImageError("not an image (unrecognised format)") from None
    except Exception as e:  # Pillow raises many types on garbage headers
        raise ImageError(f"not a readable image: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"image too large: {w}x{h} = {w * h:,} pixels, limit {max_pixels:,} "
            "(possible decompression bomb)"
        )
    return img


def known_format(data: bytes) -> str | None:
    """The name of a format Pillow knows but petal does not read, from the magic bytes only
    (each plugin's accept test: nothing is parsed or run); None if none matches."""
    Image.init()
    head = data[:64]
    for name, (_, accept) in Image.OPEN.items():
        if name not in FORMATS and accept is not None:
            try:
                if accept(head):
                    return name
            except Exception:  # noqa: BLE001 - a plugin's test that fails on odd bytes: not that format
                continue
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> upright 8-bit RGB. Decodes the pixels."""
    img.seek(0)  # first frame of animations
    # (Pillow's UserWarnings, e.g. "Palette images with transparency...", are filtered by
    # quiet_pillow_warnings() where petal owns the process: warnings.catch_warnings() here
    # would race between decode threads.)
    ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy when upright
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale the full range to 0..255 instead of clipping
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if img.mode.startswith("I;16") or a.max() > 255:
            hi = 65535.0
        elif img.mode == "F" and a.max() <= 1.0:
            hi = 1.0  # float images are usually in [0, 1]
        else:
            hi = 255.0
        img = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        if img.mode != "RGBA":
            img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    # convert() copies even RGB -> RGB; skip that full-size copy
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_crop(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """RGB image -> (S, S, 3) uint8, S = pre.input_size.

    Equivalent to "resize the short side to S / crop_pct, then center-crop S",
    done as one resample of the central square (no pixels outside it are touched).
    """
    w, h = img.size
    side = min(w, h) * pre.crop_pct  # the crop, in source pixels
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    out = img.resize((pre.input_size, pre.input_size), RESAMPLE[pre.resample], box=box)
    return np.asarray(out, dtype=np.uint8)


def load_pixels(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (S, S, 3) uint8 RGB as `pre` says. Raises ImageError with the reason."""
    img = open_image(data, max_pixels)
    try:
        draft(img, pre)
        w, h = img.size  # after draft: what will really be decoded
        with DECODE_BUDGET.hold(w * h):
            img.load()
            return resize_crop(to_rgb(img), pre)
    except ImageError:
        raise
    except OSError as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg:
            raise ImageError(f"truncated or corrupt image data ({msg})") from None
        raise ImageError(f"cannot decode image: {msg}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
