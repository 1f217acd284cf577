"""Randomly initialised Hugging Face models, saved as a Hub model's folder; for tests and benchmarks.

    save_random("dinov2", folder)               # tiny: a 2-layer, 32-wide model on 28 px, ~100 kB
    save_random("dinov2", folder, real=True)    # the published ViT-S/14's shapes, random weights

The folder holds what `save_pretrained` writes for the model and its image processor
(config.json, model.safetensors, preprocessor_config.json, the latter as the published model's),
so `--backbone hf:FOLDER` takes the very path a downloaded model takes. Speed does not depend
on the weights, so the real-size ones time each family without a download. Needs transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from petal.hub import FAMILIES, PREPROCESSOR

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def processor(family: str, side: int) -> dict:
    """The preprocessor_config.json of the family's published models, at `side` px."""
    short = round(side * 256 / 224)
    return {
        "dinov2": {"size": {"shortest_edge": short}, "do_center_crop": True,
                   "crop_size": {"height": side, "width": side}, "resample": 3, **IMAGENET},
        "vit": {"size": {"height": side, "width": side}, "resample": 2, **HALF},
        "clip": {"size": {"shortest_edge": side}, "do_center_crop": True, "crop_size": {"height": side, "width": side},
                 "resample": 3, **CLIP_NORM},
        "siglip": {"size": {"height": side, "width": side}, "resample": 3, **HALF},
        "convnext": {"size": {"shortest_edge": side}, "crop_pct": 0.875, "resample": 3, **IMAGENET},
    }[family] | {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}


# family -> (name, config keywords of the published model) at real size
REAL = {
    "dinov2": ("DINOv2 ViT-S/14", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                       intermediate_size=1536, patch_size=14, image_size=518)),
    "vit": ("ViT-B/16", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             patch_size=16, image_size=224)),
    "clip": ("CLIP ViT-B/32", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, patch_size=32, image_size=224)),
    "siglip": ("SigLIP ViT-B/16", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                       intermediate_size=3072, patch_size=16, image_size=224)),
    "convnext": ("ConvNeXt-T", dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], image_size=224)),
}
TINY = {
    "convnext": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], image_size=32),
    **{f: dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
               image_size=28) for f in ("dinov2", "vit", "clip", "siglip")},
}
CONFIGS = {"dinov2": "Dinov2Config", "vit": "ViTConfig", "clip": "CLIPVisionConfig", "siglip": "SiglipVisionConfig",
           "convnext": "ConvNextConfig"}


def save_random(family: str, folder: str | Path, *, real: bool = False, seed: int = 0) -> Path:
    """A random model of `family` saved in `folder` as save_pretrained does, with its processor config."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = REAL[family][1] if real else TINY[family]
    config = getattr(transformers, CONFIGS[family])(**kwargs)
    model = getattr(transformers, FAMILIES[family].model_class)(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    side = 224 if real else (32 if family == "convnext" else 28)
    (folder / PREPROCESSOR).write_text(json.dumps(processor(family, side), indent=1), encoding="utf-8")
    return folder
