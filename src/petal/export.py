"""Write the model bundle, atomically, and prove it matches the trained model.

The bundle graph is the cached backbone graph (the very one that produced the
training embeddings) merged with the trained head. Before the bundle folder
appears, it is loaded as a user would load it and run on the eval images: every
top-1 must equal the trained model's and every probability be within `atol`.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from petal.backbones import BackboneConfig
from petal.bundle import BUNDLE_FORMAT, Model
from petal.errors import PetalError
from petal.loader import iter_items
from petal.storage import atomic_dir

if TYPE_CHECKING:
    import onnx

    from petal.head import HeadClassifier

PARITY_ATOL = 1e-4


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("petal", "onnxruntime", "onnx", "torch", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


Reference = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 -> (N, C) probabilities


def write_bundle(
    out: Path,
    *,
    graph: onnx.ModelProto,
    cfg: BackboneConfig,
    classes: list[str],
    reference: Reference,
    parity_uris: list[str],
    metrics: dict | None = None,
    name: str | None = None,
    extra: dict | None = None,
    atol: float = PARITY_ATOL,
) -> Path:
    """Write `graph` (an onnx ModelProto, uint8 images -> probabilities) as a bundle at `out`.

    `reference` is the trained model as trained; the bundle must agree with it on
    `parity_uris`, or nothing is written.
    """
    meta = {
        "format": BUNDLE_FORMAT,
        "name": name or Path(out).parent.name,
        "backbone": cfg.to_dict(),
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", cfg.input_size, cfg.input_size, 3],
                  "layout": "NHWC RGB, resized and center-cropped by petal.images.load_pixels"},
        "output": {"name": "probabilities", "shape": ["batch", len(classes)]},
        "labels": classes,
        **(extra or {}),
        "metrics": {k: v for k, v in (metrics or {}).items() if k != "confusion_matrix"},
        "versions": versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(graph.SerializeToString())
        (tmp / "labels.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
        (tmp / "petal.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        check_parity(Model(tmp), reference, parity_uris, atol=atol)
    return Path(out)


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

    return write_bundle(out, graph=bundle_graph(backbone_path, head.to_onnx()), cfg=cfg, classes=classes,
                        reference=reference, parity_uris=parity_uris, metrics=metrics, name=name,
                        extra={"head": head.get_params()}, atol=atol)


def check_parity(model: Model, reference: Reference, uris: list[str], atol: float = PARITY_ATOL,
                 batch_size: int = 32) -> dict:
    """The bundle vs the trained model on `uris`: same top-1 everywhere, probabilities within atol."""
    items = [it for it in iter_items(uris, model.config) if it.error is None]
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
