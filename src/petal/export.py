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
from importlib import metadata
from pathlib import Path

import numpy as np

from petal.backbones import BackboneConfig
from petal.bundle import BUNDLE_FORMAT, Model
from petal.errors import PetalError
from petal.loader import iter_items
from petal.storage import atomic_dir

PARITY_ATOL = 1e-4


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("petal", "onnxruntime", "onnx", "torch", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_bundle(
    out: Path,
    *,
    cfg: BackboneConfig,
    head,
    classes: list[str],
    cache_dir: Path,
    parity: tuple[list[str], np.ndarray],
    metrics: dict | None = None,
    name: str | None = None,
    atol: float = PARITY_ATOL,
) -> Path:
    """`parity` = (image URIs, the trained model's (N, C) probabilities for them)."""
    from petal.onnx_graphs import backbone_onnx_path, bundle_graph

    graph = bundle_graph(backbone_onnx_path(cfg, cache_dir), head.to_onnx())
    meta = {
        "format": BUNDLE_FORMAT,
        "name": name or Path(out).parent.name,
        "backbone": cfg.to_dict(),
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", cfg.input_size, cfg.input_size, 3],
                  "layout": "NHWC RGB, resized and center-cropped by petal.images.load_pixels"},
        "output": {"name": "probabilities", "shape": ["batch", len(classes)]},
        "labels": classes,
        "head": head.get_params(),
        "metrics": {k: v for k, v in (metrics or {}).items() if k != "confusion_matrix"},
        "versions": versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(graph.SerializeToString())
        (tmp / "labels.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
        (tmp / "petal.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        check_parity(Model(tmp), *parity, atol=atol)
    return Path(out)


def check_parity(model: Model, uris: list[str], expected: np.ndarray, atol: float = PARITY_ATOL) -> dict:
    items = [it for it in iter_items(uris, model.config) if it.error is None]
    if len(items) != len(uris):
        raise PetalError(f"export parity check: {len(uris) - len(items)} image(s) could not be re-read")
    if not items:
        return {"checked": 0, "max_abs_diff": 0.0}
    got = model.predict_pixels(np.stack([it.pixels for it in items]))
    diff = float(np.abs(got - expected).max())
    mismatched = int((got.argmax(1) != expected.argmax(1)).sum())
    if mismatched or diff > atol:
        raise PetalError(
            f"export parity check failed on {len(items)} eval images: {mismatched} top-1 mismatches, "
            f"max probability difference {diff:.2e} (allowed {atol:.0e}); the bundle was not written"
        )
    return {"checked": len(items), "max_abs_diff": diff}
