"""ImageNet classification with a backbone's own pretrained head (`petal classify`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from petal.backbones import get_backbone, imagenet_classes
from petal.loader import iter_items
from petal.storage import default_cache_dir


def classify_images(uris: list[str], backbone: str, cache_dir: Path | None = None, top_k: int = 5,
                    on_message: Callable[[str], None] | None = None
                    ) -> Iterator[tuple[str, list[tuple[str, float]] | str]]:
    """Yield (uri, [(class name, probability)...]) or (uri, error reason).
    `on_message` hears about the one-off backbone export."""
    from petal.onnx_graphs import backbone_onnx_path
    from petal.runtime import make_session

    cfg = get_backbone(backbone)
    names = imagenet_classes()
    session = make_session(backbone_onnx_path(cfg, Path(cache_dir or default_cache_dir()), on_message))
    for item in iter_items(uris, cfg):
        if item.error is not None:
            yield item.uri, item.error
            continue
        (probs,) = session.run(["imagenet_probs"], {"images": item.pixels[None]})
        order = np.argsort(-probs[0])[:top_k]
        yield item.uri, [(names[i], float(probs[0, i])) for i in order]
