"""Hugging Face vision models in PyTorch, as petal's backbones: a list of units.

    units_of(cfg) -> [embed, layer 0, ..., layer L-1, pool]     (torch modules, applied in turn)

`embed` takes normalised (N, 3, S, S) pixels and gives tokens (N, T, C) (feature maps for
ConvNeXt); each layer maps them to the same shape; `pool` applies the model's final norm and
the family's pooling (petal.backbone_config.POOLINGS) and gives (N, D). The ONNX export
(petal.onnx_graphs) runs them all behind petal's uint8 front end; fine-tuning
(petal.runs.finetune.model) trains the last ones. The tests check they reproduce the model's own
outputs.

Needs torch and transformers (`pip install 'petal[hub]'`).
"""

from __future__ import annotations

import torch
from torch import nn

from petal.backbone_config import BackboneConfig
from petal.errors import PetalError
from petal.hub import FAMILIES
from petal.models import Preprocess

# family -> (its embedding modules, its layer list, its final norm), inside the vision tower
PARTS = {
    "dinov2": (("embeddings",), "encoder.layer", "layernorm"),
    "vit": (("embeddings",), "layers", "layernorm"),
    "clip": (("embeddings", "pre_layrnorm"), "encoder.layers", "post_layernorm"),
    "siglip": (("embeddings",), "encoder.layers", "post_layernorm"),
    "convnext": (("embeddings",), "encoder.stages", "layernorm"),
}


class Layer(nn.Module):
    """One encoder layer or stage: (N, T, C) -> (N, T, C), no attention mask (images have no padding)."""

    def __init__(self, layer: nn.Module, masked: bool) -> None:
        super().__init__()
        self.layer, self.masked = layer, masked  # masked: the layer takes an attention mask (None here)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer(h, None) if self.masked else self.layer(h)
        return out[0] if isinstance(out, tuple) else out


class Pool(nn.Module):
    """The final norm and the family's pooling: (N, T, C) or (N, C, H, W) -> (N, D)."""

    def __init__(self, norm: nn.Module, pooling: str, head: nn.Module | None = None) -> None:
        super().__init__()
        self.norm, self.pooling, self.head = norm, pooling, head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean+norm":  # ConvNeXt: average the (N, C, H, W) map, then LayerNorm
            return self.norm(h.mean(dim=(-2, -1)))
        h = self.norm(h)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "map":  # SigLIP's attention-pooling head
            return self.head(h)
        return torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=-1)  # cls+mean


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def load_model(cfg: BackboneConfig, pretrained: bool = True) -> nn.Module:
    """The transformers model of `cfg` from its folder: weights loaded, or (`pretrained` False)
    freshly initialised from its config."""
    try:
        import transformers
    except ImportError:
        raise PetalError(f"backbone {cfg.name}: exporting or fine-tuning it needs transformers: "
                         "pip install 'petal[hub]'") from None
    transformers.logging.disable_progress_bar()  # petal reports its own progress; the export is announced
    transformers.logging.set_verbosity_error()
    cls = getattr(transformers, FAMILIES[cfg.arch.family].model_class)
    folder = cfg.weights_path()
    if pretrained:
        return cls.from_pretrained(folder, dtype=torch.float32).eval()
    return cls(cls.config_class.from_pretrained(folder)).eval()


def units_of(cfg: BackboneConfig, pretrained: bool = True) -> list[nn.Module]:
    """[embed, layers..., pool] of a hub backbone (see the module docstring)."""
    if cfg.arch.family not in PARTS:
        raise PetalError(f"backbone {cfg.name}: family {cfg.arch.family!r} is not a Hugging Face family petal "
                         f"can build in PyTorch ({sorted(PARTS)})")
    embed, layers, norm = PARTS[cfg.arch.family]
    model = load_model(cfg, pretrained)
    tower = getattr(model, "vision_model", model)  # CLIP and SigLIP wrap it in some transformers versions
    head = tower.head if cfg.arch.pooling == "map" else None
    first = nn.Sequential(*(_get(tower, e) for e in embed))
    masked = cfg.arch.family != "convnext"  # transformer layers take an attention mask; ConvNeXt stages do not
    return [first, *(Layer(m, masked) for m in _get(tower, layers)), Pool(_get(tower, norm), cfg.arch.pooling, head)]


class HubFeatures(nn.Module):
    """uint8 (N, S, S, 3) RGB images -> (N, D) features: petal's front end, then the units."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.pre, self.net = Preprocess(cfg), nn.Sequential(*units_of(cfg))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre(images))
