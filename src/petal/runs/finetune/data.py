"""Training images for fine-tuning: decoded once per run, augmented in DataLoader workers.

Decoding a JPEG costs more than augmenting it, so every image is decoded once
(by `petal.images.load_pixels`, THE preprocessing) into a flat uint8 file that
DataLoader workers memory-map: no pickling of pixels, pages shared between
workers and between data-parallel processes on one machine.

- eval images are stored exactly as served: (S, S, 3), S = input_size;
- training images, when augmented, are stored as the whole central square of
  the image at `resize_size` (256 for a 224 input), so a random crop can zoom
  out as well as in; the eval view is its central S x S (87.5%).

Augmentation draws its random numbers from a generator seeded by (seed, epoch,
image index), so an image is augmented the same way whichever worker, process
or resumed run handles it: that is what makes --resume and data-parallel runs
reproduce a single uninterrupted process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from petal.errors import PetalError
from petal.images import RESAMPLE
from petal.loader import iter_items
from petal.preprocess import Preprocess
from petal.runs.finetune.config import AugmentConfig
from petal.storage import atomic_path, atomic_write_text

# --------------------------------------------------------------------------- decode-once cache


def train_view(pre: Preprocess, augment: bool) -> Preprocess:
    """The preprocessing `load_pixels` is called with for training images.

    Augmented: the full central square at resize_size (crop_pct 1), for random crops.
    Not augmented: exactly the eval/serving view.
    """
    return dataclasses.replace(pre, input_size=pre.resize_size, crop_pct=1.0) if augment else pre


@dataclass
class PixelFile:
    """A flat uint8 file of (n, size, size, 3) images, plus a JSON index beside it."""

    path: Path  # the .u8 file; the index is path.with_suffix(".json")
    uris: list[str]  # the images in it, in row order
    keys: dict[str, str]  # uri -> sha256 of the file's bytes
    failed: list[tuple[str, str]]  # (uri, reason) for images that could not be decoded
    size: int

    def open(self) -> np.ndarray:
        """(n, size, size, 3) uint8, memory-mapped read-only."""
        if not self.uris:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.memmap(self.path, np.uint8, mode="r", shape=(len(self.uris), self.size, self.size, 3))


def read_pixel_file(path: Path, uris: list[str], size: int) -> PixelFile | None:
    """The file written earlier for these very URIs at this size, or None."""
    index = Path(path).with_suffix(".json")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("all_uris") != uris or meta.get("size") != size:
        return None
    pf = PixelFile(Path(path), meta["uris"], meta["keys"], [tuple(f) for f in meta["failed"]], size)
    if not pf.path.is_file() or pf.path.stat().st_size != len(pf.uris) * size * size * 3:
        return None
    return pf


def build_pixel_file(
    path: Path,
    uris: list[str],
    pre: Preprocess,
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
) -> PixelFile:
    """Decode every URI once with `load_pixels(data, pre)` into `path` (reused if already there).

    The .u8 file is written first and the JSON index last, both atomically: an
    index on disk always describes a complete pixel file.
    """
    size = pre.input_size
    done = read_pixel_file(path, uris, size)
    if done is not None:
        on_progress(len(uris))
        return done
    ok, keys, failed = [], {}, []
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for item in iter_items(uris, pre, workers=workers):
            on_progress(1)
            if item.error is not None:
                failed.append((item.uri, item.error))
                continue
            f.write(np.ascontiguousarray(item.pixels).tobytes())  # (size, size, 3) uint8
            ok.append(item.uri)
            keys[item.uri] = item.key
    meta = {"size": size, "all_uris": uris, "uris": ok, "keys": keys, "failed": failed}
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta) + "\n")
    return PixelFile(Path(path), ok, keys, failed, size)


# --------------------------------------------------------------------------- augmentation


def augment_image(img: np.ndarray, out_size: int, crop_pct: float, aug: AugmentConfig,
                  rng: np.random.Generator, resample: str = "bilinear") -> np.ndarray:
    """(R, R, 3) uint8, the image's central square -> (out_size, out_size, 3) uint8.

    Pillow does every step in C on uint8 (a few ms an image; bilinear costs half
    of bicubic here). Every random number is drawn whatever the options, so each
    option changes only its own effect.
    """
    r = img.shape[0]
    u = rng.uniform(-1.0, 1.0, size=6)  # scale, dx, dy, flip, brightness, colour
    side = min(r * crop_pct * (1 + u[0] * aug.random_scale / 100), r)  # the crop's side, in pixels
    half = side / 2
    cx = np.clip(r / 2 + u[1] * aug.random_crop / 100 * r, half, r - half)  # keep the crop inside
    cy = np.clip(r / 2 + u[2] * aug.random_crop / 100 * r, half, r - half)
    out = Image.fromarray(img).resize((out_size, out_size), RESAMPLE[resample],
                                      box=(cx - half, cy - half, cx + half, cy + half))
    if aug.flip and u[3] > 0:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    color = 1 + u[5] * aug.random_color / 100
    if color != 1:  # blend with the greyscale image: 0 = grey, 1 = unchanged
        out = ImageEnhance.Color(out).enhance(color)
    bright = 1 + u[4] * aug.random_brightness / 100
    if bright != 1:  # blend with black, i.e. pixel values times `bright`
        out = ImageEnhance.Brightness(out).enhance(bright)
    return np.asarray(out)


def center_view(img: np.ndarray, out_size: int) -> np.ndarray:
    """The eval view of a stored square: its central out_size x out_size pixels."""
    r = img.shape[0]
    if r == out_size:
        return np.asarray(img)
    o = (r - out_size) // 2
    return np.ascontiguousarray(img[o:o + out_size, o:o + out_size])


class TrainImages(torch.utils.data.Dataset):
    """Indexed by (epoch, i): image i of the pixel file, augmented for that epoch.

    Returns ((S, S, 3) uint8 array, label id). The memory map is opened lazily
    in each worker process, so the Dataset pickles small.
    """

    def __init__(self, pixels: PixelFile, labels: np.ndarray, pre: Preprocess,
                 augment: AugmentConfig, seed: int):
        # pre: the eval/serving view that augmented crops vary around
        self.pixels, self.labels, self.pre, self.augment, self.seed = pixels, labels, pre, augment, seed
        self._map: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pixels.uris)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        epoch, i = key
        if self._map is None:
            self._map = self.pixels.open()
        img = self._map[i]
        s = self.pre.input_size
        if self.augment.enabled:
            rng = np.random.default_rng([self.seed, epoch, i])
            img = augment_image(img, s, self.pre.crop_pct, self.augment, rng)  # bilinear: half the cost
        else:
            img = center_view(img, s)
        return img, int(self.labels[i])


def collate(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (B, S, S, 3) uint8 images, (B,) int64 labels."""
    return (torch.from_numpy(np.stack([b[0] for b in batch])),
            torch.tensor([b[1] for b in batch], dtype=torch.int64))


# --------------------------------------------------------------------------- batches


class EpochBatches(torch.utils.data.Sampler):
    """This process's share of each global batch, as lists of (epoch, index).

    Every process draws the same permutation (seeded by seed and epoch), cuts it
    into global batches of `batch_size` (the last partial one is dropped), and
    takes its contiguous slice of each: together the processes see exactly the
    batches one process would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise PetalError("training data: expected at least 1 usable training image, got 0")
        self.global_batch = min(batch_size, n)
        if self.global_batch < world:
            raise PetalError(f"batch_size: expected at least one image per process "
                             f"(>= {world} processes), got {self.global_batch}")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        bounds = np.linspace(0, self.global_batch, self.world + 1).astype(int)  # near-equal shares
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        for step in range(len(self)):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield [(self.epoch, i) for i in batch[lo:hi]]
