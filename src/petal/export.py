"""Write the model bundle, atomically, and prove it matches the trained model.

The bundle graph is the cached backbone graph (the very one that produced the
training embeddings) merged with the trained head. Before the bundle folder
appears, it is loaded as a user would load it and run on the eval images: every
top-1 must equal the trained model's and every probability be within `atol`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from petal.backbones import BackboneConfig
from petal.bundle import TRAIN_KEYS, BundleInfo, Model, train_keys_digest, write_bundle
from petal.cache import FEATURE_RTOL, EmbeddingCache, relative_diff
from petal.embed import feature_cache
from petal.errors import PetalError
from petal.loader import iter_items
from petal.predictions import Scores

if TYPE_CHECKING:
    import onnx

    from petal.head import HeadClassifier
    from petal.unknown import KnnUnknown

PARITY_ATOL = 1e-4

OOD_ATOL = 1e-3  # ood scores are in standard deviations of known images; float32 sums differ by ~1e-5
Reference = Callable[[np.ndarray], Scores]  # (N, S, S, 3) uint8 -> probabilities (and ood scores)


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
    calibration: dict | None = None,
    unknown: dict | None = None,
    atol: float = PARITY_ATOL,
    checked: dict | None = None,
) -> Path:
    """Write `graph` (an onnx ModelProto, uint8 images -> probabilities, and ood_score and
    unknown when `unknown` describes them) as a bundle at `out`.

    `reference` is the trained model as trained; the bundle must agree with it on
    `parity_uris`, or nothing is written. `training` says how it was trained
    ({"kind": "head"|"finetune", ...}); `calibration` and `unknown` go into petal.json;
    `checked` (other checks passed before, e.g. the cached features) joins the parity record.
    """
    info = BundleInfo(name=name or Path(out).parent.name, backbone=cfg.identity(), preprocess=cfg.preprocess,
                      labels=classes, training=training, calibration=calibration, unknown=unknown,
                      metrics={k: v for k, v in (metrics or {}).items() if k != "confusion_matrix"})
    return write_bundle(out, graph.SerializeToString(), info,
                        check=lambda model: {**check_parity(model, reference, parity_uris, atol=atol),
                                             **(checked or {})})


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
    unknown: KnnUnknown | None = None,
    train_keys: Iterable[str] = (),
    atol: float = PARITY_ATOL,
) -> Path:
    """The head-on-embeddings bundle: the cached backbone graph merged with the head (its
    temperature included) and, with `unknown`, the unknown detector. `train_keys` (content
    keys of the training images) let `petal evaluate` warn about training images."""
    from petal.onnx_graphs import backbone_onnx_path, bundle_graph
    from petal.runtime import make_session

    backbone_path = backbone_onnx_path(cfg, cache_dir)
    backbone = make_session(backbone_path)
    cached = check_cached_features(feature_cache(cfg, cache_dir), backbone, cfg, parity_uris)

    def reference(pixels: np.ndarray) -> Scores:  # the backbone graph, then the torch head and numpy kNN
        features = backbone.run(["features"], {"images": pixels})[0]
        probs = head.predict_proba(features)
        if unknown is None:
            return Scores(probs)
        ood = unknown.score(features, probs)
        return Scores(probs, ood, ood > unknown.threshold)

    calibration = {"method": "temperature", "temperature": head.temperature_,
                   "fitted_on": "out-of-fold logits of the training split"}
    return export_graph(out, graph=bundle_graph(backbone_path, head.to_onnx(), unknown), cfg=cfg, classes=classes,
                        reference=reference, parity_uris=parity_uris, metrics=metrics, name=name,
                        training={"kind": "head", "head": head.get_params(), TRAIN_KEYS: train_keys_digest(train_keys)},
                        calibration=calibration,
                        unknown=unknown.to_dict() if unknown else None, atol=atol, checked=cached)


def check_cached_features(cache: EmbeddingCache, backbone, cfg: BackboneConfig, uris: list[str],
                          batch_size: int = 32) -> dict:
    """The features the head was trained on (in the cache) against what the backbone computes
    now, on the parity images: a cache filled by another producer is caught here, not in the
    field. Raises PetalError past FEATURE_RTOL; returns the figures for petal.json."""
    stored = cache.index()
    items = [it for it in iter_items(uris, cfg.preprocess) if it.error is None and it.key in stored]
    if not items:
        return {"cached_features_checked": 0}
    chunks = [np.stack([it.pixels for it in items[i:i + batch_size]]) for i in range(0, len(items), batch_size)]
    now = np.concatenate([backbone.run(["features"], {"images": px})[0] for px in chunks])  # (N, D)
    diff = relative_diff(now, cache.get([it.key for it in items]))
    if (bad := diff > FEATURE_RTOL).any():
        raise PetalError(f"export parity check failed: the cached features the head was trained on differ from "
                         f"the backbone's by up to {diff.max():.2%} on {int(bad.sum())} of {len(items)} images (e.g. "
                         f"{items[int(diff.argmax())].uri}); run `petal cache verify DATA` to see which shards; "
                         "the bundle was not written")
    return {"cached_features_checked": len(items), "cached_features_max_rel_diff": float(diff.max())}


def check_parity(model: Model, reference: Reference, uris: list[str], atol: float = PARITY_ATOL,
                 batch_size: int = 32) -> dict:
    """The bundle vs the trained model on `uris`: same top-1 everywhere, probabilities within atol."""
    read = list(iter_items(uris, model.preprocess))
    items = [it for it in read if it.error is None]
    if len(items) != len(uris):
        bad = next(it for it in read if it.error is not None)
        raise PetalError(f"export parity check: {len(uris) - len(items)} image(s) could not be re-read; the first, "
                         f"{bad.uri}: {bad.error}")
    if not items:
        return {"checked": 0, "max_abs_diff": 0.0}
    pixels = np.stack([it.pixels for it in items])  # (N, S, S, 3) uint8
    expected = Scores.concat([reference(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)],
                             len(model.labels))
    got = model.scores(pixels)
    diff = float(np.abs(got.probabilities - expected.probabilities).max())
    mismatched = int((got.probabilities.argmax(1) != expected.probabilities.argmax(1)).sum())
    ood_diff = 0.0
    if (got.ood_score is None) != (expected.ood_score is None):
        raise PetalError("export parity check failed: the bundle and the trained model disagree on whether "
                         "there is an unknown detector; the bundle was not written")
    if got.ood_score is not None:
        ood_diff = float(np.abs(got.ood_score - expected.ood_score).max())
    if mismatched or diff > atol or ood_diff > OOD_ATOL:
        raise PetalError(
            f"export parity check failed on {len(items)} eval images: {mismatched} top-1 mismatches, "
            f"max probability difference {diff:.2e} (allowed {atol:.0e}), max ood_score difference "
            f"{ood_diff:.2e} (allowed {OOD_ATOL:.0e}); the bundle was not written"
        )
    return {"checked": len(items), "max_abs_diff": diff, "max_ood_diff": ood_diff}
