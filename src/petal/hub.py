"""`--backbone hf:NAME_OR_PATH`: Hugging Face vision models as petal backbones.

    get_backbone("hf:facebook/dinov2-small")   # from the Hub (files cached by huggingface_hub)
    get_backbone("hf:./my-dinov2")             # a folder written by save_pretrained

A model is read from its folder's JSON alone: `config.json` names the family and the widths,
`preprocessor_config.json` gives the preprocessing, and the weights (`*.safetensors` only:
a pickled `.bin` can run code when loaded) are hashed into the revision that the cache's
producer record names. transformers and torch are needed once, to export the graph into the
cache (petal.hub_torch); bundles, serving and int8 run that graph, without them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from petal.backbone_config import Architecture, BackboneConfig, WeightsSource
from petal.errors import PetalError
from petal.preprocess import Preprocess

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
PILLOW_FILTERS = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values petal's decoder has


@dataclass(frozen=True)
class HubFamily:
    model_class: str  # the transformers class holding the vision tower
    model_types: tuple[str, ...]  # config.json "model_type" values of this family
    pooling: str  # petal.backbone_config.POOLINGS
    example: str  # a Hub id, for `petal backbones`
    example_dim: int  # its feature dim with this pooling
    linear_probe: str  # the published linear-probe figure (for the docs and `petal backbones`)


# Pooling follows each family's published linear-probe protocol: DINOv2's paper probes the CLS
# token concatenated with the mean patch token; CLIP and SigLIP their pooled image embedding;
# ConvNeXt (and EfficientNet) the global average.
FAMILIES: dict[str, HubFamily] = {
    "dinov2": HubFamily("Dinov2Model", ("dinov2",), "cls+mean", "facebook/dinov2-small", 768,
                        "ViT-S/14: ImageNet 81.1%, Oxford Flowers-102 ~99% (DINOv2 paper)"),
    "vit": HubFamily("ViTModel", ("vit",), "cls+mean", "google/vit-base-patch16-224-in21k", 1536,
                     "ViT-B/16 (IN-21k): ImageNet ~75-80% (linear probe, ViT paper's few-shot/probe figures)"),
    "clip": HubFamily("CLIPVisionModel", ("clip", "clip_vision_model"), "cls", "openai/clip-vit-base-patch32", 768,
                      "ViT-B/32: ImageNet 76.1%, Flowers-102 96.9% (CLIP paper, linear probe)"),
    "siglip": HubFamily("SiglipVisionModel", ("siglip", "siglip_vision_model"), "map",
                        "google/siglip-base-patch16-224", 768, "ViT-B/16: comparable to CLIP ViT-B/16 (SigLIP paper)"),
    "convnext": HubFamily("ConvNextModel", ("convnext",), "mean+norm", "facebook/convnext-tiny-224", 768,
                          "ConvNeXt-T (IN-1k supervised): ImageNet 82.1% fine-tuned; probes near its features"),
}


def family_of(config: dict, where: str) -> str:
    mt = config.get("model_type")
    for name, fam in FAMILIES.items():
        if mt in fam.model_types:
            return name
    raise PetalError(f"hf:{where}: model_type {mt!r} is not a family petal knows; expected one of "
                     f"{sorted(t for f in FAMILIES.values() for t in f.model_types)}")


def feature_dim(config: dict, family: str) -> int:
    """The pooled feature length from config.json (CLIP and SigLIP may hold the vision tower's
    config inside the whole model's)."""
    vision = config.get("vision_config", config) if family in ("clip", "siglip") else config
    width = vision["hidden_sizes"][-1] if family == "convnext" else vision["hidden_size"]
    return 2 * width if FAMILIES[family].pooling == "cls+mean" else width


def _side(size: object, key: str, where: str) -> int:
    """A size field of preprocessor_config.json: an int, or {"shortest_edge": n}, or a square {"height", "width"}."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"])
    if isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        return int(size["height"])
    raise PetalError(f"{where}: {key}: expected an int, {{'shortest_edge': n}} or a square "
                     f"{{'height', 'width'}}, got {size!r}")


def preprocess_from(p: dict, where: str) -> Preprocess:
    """preprocessor_config.json -> Preprocess. petal resizes the short side and centre-crops;
    a processor that resizes straight to a square (ViT, SigLIP) is read as crop_pct 1.0, which is
    the same for square images and keeps the aspect ratio for others."""
    short = _side(p.get("size", 224), "size", where) if p.get("do_resize", True) else None
    crop = _side(p["crop_size"], "crop_size", where) if p.get("do_center_crop") and "crop_size" in p else None
    if "crop_pct" in p and short is not None and short < 384:  # ConvNeXt: resize to size / crop_pct, crop size
        input_size, crop_pct = short, float(p["crop_pct"])
    elif crop is not None:
        input_size, crop_pct = crop, crop / (short or crop)
    elif short is not None:
        input_size, crop_pct = short, 1.0
    else:
        raise PetalError(f"{where}: neither a resize nor a crop: petal needs a fixed input size")
    resample = p.get("resample", 3)
    if resample not in PILLOW_FILTERS:
        raise PetalError(f"{where}: resample: expected 2 (bilinear) or 3 (bicubic), got {resample!r}")
    # the processor computes (x * rescale - mean) / std; on petal's 0..255 scale: (x - mean / rescale) / (std / rescale)
    rescale = float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0
    mean = p.get("image_mean", [0.0, 0.0, 0.0]) if p.get("do_normalize", True) else [0.0, 0.0, 0.0]
    std = p.get("image_std", [1.0, 1.0, 1.0]) if p.get("do_normalize", True) else [1.0, 1.0, 1.0]
    return Preprocess(input_size=input_size, crop_pct=min(crop_pct, 1.0), resample=PILLOW_FILTERS[resample],
                      mean=tuple(float(m) / rescale for m in mean), std=tuple(float(s) / rescale for s in std))


_REVISIONS: dict[tuple, str] = {}  # (path, size, mtime_ns) of the files -> their sha256: hashed once a process


def files_revision(files: list[Path]) -> str:
    """sha256 over the files' names and contents: names the exact weights."""
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _REVISIONS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        _REVISIONS[stamp] = h.hexdigest()
    return _REVISIONS[stamp]


def read_json(path: Path, spec: str) -> dict:
    if not path.is_file():
        raise PetalError(f"hf:{spec}: no {path.name} in {path.parent} (save the model and its image processor "
                         "with save_pretrained)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PetalError(f"hf:{spec}: {path} is not valid JSON ({e})") from None


@functools.cache
def hub_snapshot(repo_id: str) -> Path:
    """The Hub model's files on this machine (downloaded by huggingface_hub, or from its cache offline);
    asked once a process (a run resolves its backbone several times)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PetalError(f"hf:{repo_id} needs the Hugging Face packages: pip install 'petal[hub]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG, PREPROCESSOR, "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds (offline, 404, auth)
        raise PetalError(f"hf:{repo_id}: could not get it from the Hugging Face Hub or its cache: {e}") from None


def resolve(spec: str) -> BackboneConfig:
    """`hf:SPEC` -> its BackboneConfig: SPEC is a folder (a path that exists, or starts with . / ~)
    or a Hub id."""
    as_path = Path(spec).expanduser()
    hub = not as_path.is_dir()
    if not hub:
        folder, name = as_path.resolve(), f"hf:{as_path.resolve()}"
    elif spec.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise PetalError(f"--backbone hf:{spec}: expected a model folder (none is there) or a Hub id such as "
                         f"{FAMILIES['dinov2'].example}")
    else:
        folder, name = hub_snapshot(spec), f"hf:{spec}"
    config, pre = read_json(folder / CONFIG, spec), read_json(folder / PREPROCESSOR, spec)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise PetalError(f"hf:{spec}: no *.safetensors weights in {folder} (petal does not load pickled .bin "
                         "weights: save with save_pretrained(..., safe_serialization=True))")
    family = family_of(config, spec)
    revision = files_revision([folder / CONFIG, folder / PREPROCESSOR, *weights])
    source = WeightsSource("hub" if hub else "folder", spec if hub else str(folder), revision=revision,
                           commit=folder.name if hub and folder.parent.name == "snapshots" else "",
                           local=str(folder) if hub else "")
    arch = Architecture(family, feature_dim(config, family), FAMILIES[family].pooling)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name if not hub else spec.split("/")[-1])[:40].strip("-.")
    return BackboneConfig(name=name, arch=arch, weights=source, preprocess=preprocess_from(pre, str(folder)),
                          slug=f"hf-{family}-{slug or 'model'}-{revision[:12]}")
