"""Write the model bundle, atomically, and prove it matches the trained model.

The bundle graph is the cached backbone graph (the very one that produced the
training embeddings) merged with the trained head. Before the bundle folder
appears, it is loaded as a user would load it and run on the eval images: every
top-1 must equal the trained model's and every probability be within `atol`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from petal.backbones import BackboneConfig
from petal.bundle import BundleInfo, Model, write_bundle
from petal.errors import PetalError
from petal.loader import iter_items

if TYPE_CHECKING:
    import onnx

    from petal.head import HeadClassifier

PARITY_ATOL = 1e-4

Reference = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 -> (N, C) probabilities


def export_graph(
    out: Path,
    *,
    graph: onnx.ModelProto,
    cfg: BackboneConfig,
    classes: list[str],
    reference: Reference,
    parity_uris: list[str],
    training: dict,
    metrics: dict | None = None,
    name: str | None = None,
    atol: float = PARITY_ATOL,
) -> Path:
    """Write `graph` (an onnx ModelProto, uint8 images -> probabilities) as a bundle at `out`.

    `reference` is the trained model as trained; the bundle must agree with it on
    `parity_uris`, or nothing is written. `training` says how it was trained
    ({"kind": "head"|"finetune", ...}).
    """
    info = BundleInfo(name=name or Path(out).parent.name, backbone=cfg.identity(), preprocess=cfg.preprocess,
                      labels=classes, training=training,
                      metrics={k: v for k, v in (metrics or {}).items() if k != "confusion_matrix"})
    return write_bundle(out, graph.SerializeToString(), info,
                        check=lambda model: check_parity(model, reference, parity_uris, atol=atol))


def export_bundle(
    out: Path,
    *,
    cfg: BackboneConfig,
    head: HeadClassifier,
    classes: list[str],
    cache_dir: Path,
    parity_uris: list[str],
    metrics: dict | None = None,
    name: str | None = None,
    atol: float = PARITY_ATOL,
) -> Path:
    """The head-on-embeddings bundle: the cached backbone graph merged with the head."""
    from petal.onnx_graphs import backbone_onnx_path, bundle_graph
    from petal.runtime import make_session

    backbone_path = backbone_onnx_path(cfg, cache_dir)
    backbone = make_session(backbone_path)

    def reference(pixels: np.ndarray) -> np.ndarray:  # the backbone graph, then the torch head
        return head.predict_proba(backbone.run(["features"], {"images": pixels})[0])

    return export_graph(out, graph=bundle_graph(backbone_path, head.to_onnx()), cfg=cfg, classes=classes,
                        reference=reference, parity_uris=parity_uris, metrics=metrics, name=name,
                        training={"kind": "head", "head": head.get_params()}, atol=atol)


def check_parity(model: Model, reference: Reference, uris: list[str], atol: float = PARITY_ATOL,
                 batch_size: int = 32) -> dict:
    """The bundle vs the trained model on `uris`: same top-1 everywhere, probabilities within atol."""
    items = [it for it in iter_items(uris, model.preprocess) if it.error is None]
    if len(items) != len(uris):
        raise PetalError(f"export parity check: {len(uris) - len(items)} image(s) could not be re-read")
    if not items:
        return {"checked": 0, "max_abs_diff": 0.0}
    pixels = np.stack([it.pixels for it in items])  # (N, S, S, 3) uint8
    expected = np.concatenate([reference(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    got = model.predict_pixels(pixels)
    diff = float(np.abs(got - expected).max())
    mismatched = int((got.argmax(1) != expected.argmax(1)).sum())
    if mismatched or diff > atol:
        raise PetalError(
            f"export parity check failed on {len(items)} eval images: {mismatched} top-1 mismatches, "
            f"max probability difference {diff:.2e} (allowed {atol:.0e}); the bundle was not written"
        )
    return {"checked": len(items), "max_abs_diff": diff}
