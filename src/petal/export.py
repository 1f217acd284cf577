"""Write the model bundle, atomically, and prove it matches the trained model.

The bundle graph is the cached backbone graph (the very one that produced the
training embeddings) merged with the trained head. Before the bundle folder
appears, it is loaded as a user would load it and run on the eval images: every
top-1 must equal the trained model's and every probability be within `atol`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from petal.backbones import BackboneConfig
from petal.bundle import TRAIN_KEYS, BundleInfo, Model, train_keys_digest, write_bundle
from petal.cache import FEATURE_RTOL, EmbeddingCache, relative_diff
from petal.embed import feature_cache
from petal.errors import PetalError
from petal.gate import MAX_DROP_PT, MIN_AGREEMENT, int8_verdict, verdict_line
from petal.loader import iter_items
from petal.precision import INT8, Engine
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
    quantization: dict | None = None,
    atol: float = PARITY_ATOL,
    checked: dict | None = None,
) -> Path:
    """Write `graph` (an onnx ModelProto, uint8 images -> probabilities, and ood_score and
    unknown when `unknown` describes them) as a bundle at `out`.

    `reference` is the trained model as trained; the bundle must agree with it on
    `parity_uris`, or nothing is written. `training` says how it was trained
    ({"kind": "head"|"finetune", ...}); `calibration`, `unknown` and `quantization` go into petal.json;
    `checked` (other checks passed before, e.g. the cached features) joins the parity record.
    """
    info = BundleInfo(name=name or Path(out).parent.name, backbone=cfg.identity(), preprocess=cfg.preprocess,
                      labels=classes, training=training, calibration=calibration, unknown=unknown,
                      quantization=quantization,
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
    engine: Engine | None = None,
    quantization: dict | None = None,
    atol: float = PARITY_ATOL,
) -> Path:
    """The head-on-embeddings bundle: the cached backbone graph (`engine`'s int8 one if it is
    int8) merged with the head (its temperature included) and, with `unknown`, the unknown
    detector. `train_keys` (content keys of the training images) let `petal evaluate` warn
    about training images; `quantization` goes into petal.json."""
    engine = engine if engine is not None and engine.precision == INT8 else Engine(cfg)  # bf16 is a runtime choice
    backbone = engine.session(cache_dir)
    cached = check_cached_features(feature_cache(cfg, cache_dir, engine=engine), backbone, cfg, parity_uris)
    return export_graph(out, graph=head_bundle_graph(engine, head, unknown, cache_dir), cfg=cfg, classes=classes,
                        reference=head_reference(backbone, head, unknown), parity_uris=parity_uris,
                        metrics=metrics, name=name, quantization=quantization, atol=atol, checked=cached,
                        **head_bundle_fields(head, unknown, train_keys))


def head_bundle_graph(engine: Engine, head: HeadClassifier, unknown: KnnUnknown | None, cache_dir: Path,
                      int8_weights: bool = False) -> onnx.ModelProto:
    """The engine's backbone graph + the head (+ the unknown detector); `int8_weights`: their
    large float weights stored as int8 (onnx_graphs.int8_weights)."""
    from petal import onnx_graphs

    graph = onnx_graphs.bundle_graph(engine.graph_path(cache_dir), head.to_onnx(), unknown)
    return onnx_graphs.int8_weights(graph) if int8_weights else graph


def head_bundle_fields(head: HeadClassifier, unknown: KnnUnknown | None, train_keys: Iterable[str]) -> dict:
    """What petal.json says of a head bundle: how it was trained, calibrated, and decides unknown."""
    return {"training": {"kind": "head", "head": head.get_params(), TRAIN_KEYS: train_keys_digest(train_keys)},
            "calibration": {"method": "temperature" if head.temperature_ != 1.0 else "identity",
                            "temperature": head.temperature_,
                            "fitted_on": "out-of-fold logits of the training split"},
            "unknown": unknown.to_dict() if unknown else None}


def head_reference(backbone, head: HeadClassifier, unknown: KnnUnknown | None) -> Reference:
    """The trained model as trained: the backbone session, then the torch head and the numpy kNN."""
    def reference(pixels: np.ndarray) -> Scores:
        features = backbone.run(["features"], {"images": pixels})[0]
        probs = head.predict_proba(features)
        if unknown is None:
            return Scores(probs)
        ood = unknown.score(features, probs)
        return Scores(probs, ood, ood > unknown.threshold)

    return reference


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


class ExportRefused(PetalError):
    """The int8 bundle failed its parity gate; `figures` say by how much."""

    def __init__(self, message: str, figures: dict) -> None:
        super().__init__(message)
        self.figures = figures


def export_int8(out: Path, *, cfg: BackboneConfig, head: HeadClassifier, classes: list[str], cache_dir: Path,
                train_uris: list[str], eval_uris: list[str], eval_labels: np.ndarray, unknown: KnnUnknown | None = None,
                train_keys: Iterable[str] = (), force: bool = False, min_agreement: float = MIN_AGREEMENT,
                max_drop_pt: float = MAX_DROP_PT, on_message: Callable[[str], None] | None = None,
                engine: Engine | None = None, **info: Any) -> tuple[Path, dict]:
    """An int8 bundle of a head run at `out`: the int8 backbone calibrated on `train_uris` (or
    `engine`, an int8 one made elsewhere), the head and unknown detector with int8 weights, the
    detector's bank on its principal axes (KnnUnknown.reduce). On the eval images (labels
    `eval_labels`, class ids) it must pass petal.gate's test against the fp32 model, or
    ExportRefused says why and nothing is written; `force` writes it anyway. The figures go
    into petal.json's "quantization"; `info`: export_graph's metrics and name. Returns (the
    bundle, the figures)."""
    from petal.runtime import make_session

    if not eval_uris:
        raise PetalError("export --precision int8: the run has no eval images to prove the int8 model on")
    engine = engine or Engine.make(cfg, INT8, train_uris)
    reduced = unknown.reduce() if unknown is not None else None
    graph = head_bundle_graph(engine, head, reduced, cache_dir, int8_weights=True)
    session = make_session(graph.SerializeToString())
    outputs = [o.name for o in session.get_outputs()]

    def int8(pixels: np.ndarray) -> Scores:  # the very graph the bundle will hold
        return Scores(*session.run(outputs, {"images": pixels}))

    fp32 = head_reference(Engine(cfg).session(cache_dir, on_message), head, unknown)
    figures = parity_gate(fp32, int8, read_pixels(eval_uris, cfg), eval_labels, min_agreement, max_drop_pt)
    figures["forced"] = force and not figures["passed"]
    if on_message:
        on_message(verdict_line(figures))
    if not (figures["passed"] or force):
        raise ExportRefused(f"export --precision int8 refused: {verdict_line(figures)}; nothing was written. "
                            "--force writes it anyway, with these figures in petal.json", figures)
    path = export_graph(out, graph=graph, cfg=cfg, classes=classes, reference=int8, parity_uris=eval_uris,
                        quantization={**engine.record(), "gate": figures},
                        **head_bundle_fields(head, unknown, train_keys), **info)
    return path, figures


def read_pixels(uris: list[str], cfg: BackboneConfig) -> np.ndarray:
    """(N, S, S, 3) uint8 of every image in `uris`, or a PetalError naming one that cannot be read."""
    items = list(iter_items(uris, cfg.preprocess))
    bad = [it for it in items if it.error is not None]
    if bad:
        raise PetalError(f"{len(bad)} eval image(s) could not be re-read; the first, {bad[0].uri}: {bad[0].error}")
    return np.stack([it.pixels for it in items])


def parity_gate(reference: Reference, candidate: Reference, pixels: np.ndarray, labels: np.ndarray,
                min_agreement: float, max_drop_pt: float, batch_size: int = 32) -> dict:
    """petal.gate's verdict on `candidate` vs `reference` on pixels (N, S, S, 3) with true class
    ids `labels` (N,); how often they agree on "unknown" where both decide it; and each one's
    img/s on these batches (the reference runs its head in torch, not in the graph)."""
    scores, rate = {}, {}
    for name, model in (("fp32", reference), ("int8", candidate)):
        start = time.perf_counter()
        scores[name] = Scores.concat([model(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)], 0)
        rate[name] = len(pixels) / (time.perf_counter() - start)
    top1 = {name: s.probabilities.argmax(1) for name, s in scores.items()}
    unknown = None if scores["int8"].unknown is None or scores["fp32"].unknown is None else \
        float((scores["int8"].unknown == scores["fp32"].unknown).mean())
    return {**int8_verdict(top1["fp32"], top1["int8"], labels, min_agreement=min_agreement, max_drop_pt=max_drop_pt),
            "unknown_agreement": unknown, "images_per_second": round(rate["int8"], 1),
            "images_per_second_fp32": round(rate["fp32"], 1)}
