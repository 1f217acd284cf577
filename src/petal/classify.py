"""ImageNet classification with a backbone's own pretrained head (`petal classify`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from petal.backbones import get_backbone, imagenet_classes
from petal.errors import PetalError
from petal.loader import iter_items
from petal.predictions import Prediction, prediction
from petal.storage import cache_folder


def classify_images(uris: list[str], backbone: str, cache_dir: Path | None = None, top_k: int = 5,
                    on_message: Callable[[str], None] | None = None
                    ) -> Iterator[Prediction]:
    """Yield one Prediction per URI, in order, over the 1000 ImageNet classes (`.error`
    set for an unreadable image). `on_message` hears about the one-off backbone export."""
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    cfg = get_backbone(backbone)
    if cfg.num_classes != 1000:
        raise PetalError(f"classify --backbone {cfg.name}: it has no ImageNet head (the efficientnet_lite* "
                         "backbones have one)")
    names = imagenet_classes()
    session = make_session(backbone_onnx_path(cfg, cache_folder(cache_dir), on_message))
    for item in iter_items(uris, cfg.preprocess):
        if item.error is not None:
            yield Prediction(item.uri, error=item.error)
            continue
        (probs,) = session.run(["imagenet_probs"], {"images": item.pixels[None]})  # (1, 1000)
        yield prediction(names, item.uri, probs[0], top_k)
