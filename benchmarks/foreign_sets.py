"""Small test sets of real images that are not flowers, from pictures Python packages ship
(no download; nothing is copied into the repo): the benchmarks write them to a temporary folder.

    sets = foreign_sets(Path(tmp))     # {"skimage": [paths], "lfw": [...], "digits": [...], "crops": [...]}

- skimage: scikit-image's 24 sample pictures (petal.synthetic.FOREIGN): photos, astronomy,
  microscopy, textures, text, drawings.
- lfw: scikit-image's `lfw_subset`, 100 faces from Labeled Faces in the Wild and 100 non-face
  patches of the same photos (25 x 25 grey, upscaled).
- digits: 200 of scikit-learn's handwritten digits (8 x 8 scans, upscaled).
- crops: 150 random crops (a quarter to two thirds of the side) of the real photos among them
  and of scikit-learn's china.jpg and matplotlib's grace_hopper.jpg: parts of buildings,
  faces, animals, rockets, textures.

Also the labeled sets the calibration benchmark uses: `digits_labeled` (1797 images, 10
classes) and `lfw_labeled` (200 images, face / not a face).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from petal.synthetic import foreign_photos

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "coins", "brick", "grass", "gravel", "camera", "moon")
SIZE = 160  # side the small grey pictures are upscaled to


def grey_images(folder: Path, images: np.ndarray, names: list[str]) -> list[str]:
    """(N, H, W) grey arrays (any range) -> PNGs of SIZE x SIZE RGB in `folder`; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = float(images.min()), float(images.max())
    paths = []
    for a, name in zip(images, names):
        a8 = ((a - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
        path = folder / f"{name}.png"
        Image.fromarray(a8).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(path)
        paths.append(str(path))
    return paths


def source_photos() -> list[np.ndarray]:
    """(H, W, 3) uint8 real photos the crops come from."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_image

    out = []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        out.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
    out.append(load_sample_image("china.jpg"))
    out.append(np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")))
    return [a.astype(np.uint8) for a in out]


def crops(folder: Path, n: int = 150, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng, photos, paths = np.random.default_rng(seed), source_photos(), []
    for i in range(n):
        a = photos[i % len(photos)]
        side = int(min(a.shape[:2]) * rng.uniform(0.25, 0.67))
        y, x = rng.integers(0, a.shape[0] - side + 1), rng.integers(0, a.shape[1] - side + 1)
        path = folder / f"crop_{i:03d}.jpg"
        Image.fromarray(a[y:y + side, x:x + side]).save(path, quality=92)
        paths.append(str(path))
    return paths


def lfw_labeled(folder: Path) -> tuple[list[str], np.ndarray]:
    """200 images, labels 1 = a face, 0 = a patch of no face."""
    import skimage.data

    images = skimage.data.lfw_subset()
    return grey_images(folder / "lfw", images, [f"lfw_{i:03d}" for i in range(len(images))]), \
        np.r_[np.ones(100, int), np.zeros(100, int)]


def digits_labeled(folder: Path) -> tuple[list[str], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return grey_images(folder / "digits", d.images, [f"digit_{i:04d}" for i in range(len(d.images))]), d.target


def foreign_sets(folder: Path) -> dict[str, list[str]]:
    """{set name: image paths}, written under `folder`."""
    digits, _ = digits_labeled(folder)
    lfw, _ = lfw_labeled(folder)
    return {"skimage": foreign_photos(folder / "skimage"), "lfw": lfw, "digits": digits[:200],
            "crops": crops(folder / "crops")}
