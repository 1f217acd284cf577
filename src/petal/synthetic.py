"""A small synthetic labeled image set, for `petal demo` and the tests.

Each class is a shape drawn in its own colour family over a noisy background,
at random positions and sizes, saved as a mix of JPEG and PNG. A pretrained
backbone separates them easily, so a working pipeline scores near 100%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from petal.storage import check_output

CLASSES = {
    "circles": ((200, 40, 40), "ellipse"),
    "squares": ((40, 160, 40), "rectangle"),
    "triangles": ((40, 60, 200), "polygon"),
    "stripes": ((220, 180, 30), "stripes"),
}


def draw(kind: str, color: tuple[int, int, int], rng: np.random.Generator, size: int) -> Image.Image:
    bg = rng.integers(150, 256, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    jitter = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in color)
    r = int(size * rng.uniform(0.2, 0.35))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    if kind == "ellipse":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif kind == "rectangle":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif kind == "polygon":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    else:
        step = max(4, size // 8)
        for x in range(int(rng.integers(0, step)), size, step * 2):
            d.rectangle([x, 0, x + step - 1, size], fill=jitter)
    return img


def make_dataset(root: str | Path, per_class: int = 20, size: int = 96, seed: int = 0,
                 classes: int = 3) -> Path:
    """Write `root/<class>/<n>.jpg|png` and return root."""
    root = check_output(root, "out", folder=True)
    rng = np.random.default_rng(seed)
    for name, (color, kind) in list(CLASSES.items())[:classes]:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = draw(kind, color, rng, size)
            ext = "png" if i % 3 == 0 else "jpg"
            img.save(root / name / f"{name}_{i:03d}.{ext}", quality=90)
    return root


# scikit-image's sample pictures that ship inside its wheel (no download): everyday photos,
# astronomy, microscopy, textures, text and drawings. None is a flower or a shape of ours.
FOREIGN = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "moon", "retina", "stereo_motorcycle", "coins", "page", "text", "brick", "grass", "gravel", "cell",
           "horse", "clock", "colorwheel", "logo", "checkerboard", "binary_blobs", "shepp_logan_phantom")


def foreign_photos(folder: Path, names: tuple[str, ...] = FOREIGN) -> list[str]:
    """Write scikit-image's sample pictures as PNGs into `folder` (needs scikit-image,
    the test extra); returns their paths. Images from no class of any petal dataset."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        a = getattr(skimage.data, name)()
        a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
        if a.dtype == bool or a.max() <= 1:
            a = a.astype(np.float32) * 255
        path = folder / f"{name}.png"
        Image.fromarray(np.asarray(a).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths
