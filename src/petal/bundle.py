"""Load an exported model bundle and predict. Needs only onnxruntime, numpy and Pillow.

A bundle folder holds `model.onnx` (uint8 (N, S, S, 3) RGB -> probabilities),
`labels.txt` and `petal.json` (backbone config, labels, metrics, versions).

    m = petal.load("runs/flowers/model")
    for p in m.predict(["rose.jpg", "tulip.png"]):
        print(p.uri, p.label, p.score)        # p.top: [(label, score), ...]; p.error if unreadable
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from petal.backbones import BackboneConfig
from petal.errors import PetalError
from petal.images import DEFAULT_MAX_PIXELS, load_pixels
from petal.loader import batches, iter_items

BUNDLE_FORMAT = 1


@dataclass
class Prediction:
    uri: str
    label: str | None = None  # top-1 label
    score: float | None = None  # its probability
    top: list[tuple[str, float]] = field(default_factory=list)  # top-k (label, probability)
    probabilities: np.ndarray | None = None  # (C,) in label-id order
    error: str | None = None  # why this input could not be predicted

    def to_dict(self) -> dict:
        d = {"uri": self.uri}
        if self.error is not None:
            d["error"] = self.error
        else:
            d.update(label=self.label, score=self.score, top=[{"label": k, "score": v} for k, v in self.top])
        return d


def prediction(labels: list[str], uri: str, probs: np.ndarray, top_k: int = 5) -> Prediction:
    """(C,) probabilities in label-id order -> a Prediction with the top-k labels."""
    order = np.argsort(-probs)[:top_k]
    top = [(labels[i], float(probs[i])) for i in order]
    return Prediction(uri, top[0][0], top[0][1], top, probs)


def config_from_dict(d: dict) -> BackboneConfig:
    d = dict(d)
    d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
    return BackboneConfig(**d)


class Model:
    """An exported bundle, ready to predict."""

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True) -> None:
        from petal.runtime import make_session

        self.path = Path(path)
        if not self.path.exists():
            raise PetalError(f"model: {self.path} does not exist")
        meta_path = self.path / "petal.json"
        if not meta_path.is_file():
            hint = f"; did you mean {self.path / 'model'}?" if (self.path / "model" / "petal.json").is_file() else ""
            raise PetalError(f"model: {self.path} is not a petal model bundle (no petal.json){hint}")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if self.meta.get("format") != BUNDLE_FORMAT:
                raise PetalError(f"model: bundle format {self.meta.get('format')!r} not supported "
                                 f"(this petal reads format {BUNDLE_FORMAT})")
            self.labels: list[str] = (self.path / "labels.txt").read_text(encoding="utf-8").splitlines()
            self.config = config_from_dict(self.meta["backbone"])
            self.session = make_session(self.path / "model.onnx", threads, spin)
        except PetalError:
            raise
        except Exception as e:  # noqa: BLE001 - JSON, OS, key and ONNX Runtime errors alike
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            raise PetalError(f"model: {self.path} is a damaged bundle ({reason}); export it again") from e
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels):
            raise PetalError(f"model: {self.path} is a damaged bundle: labels.txt has {len(self.labels)} "
                             f"labels, model.onnx gives {outputs} scores")

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.parent.name)

    def predict_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, C) probabilities."""
        out = [self.session.run(["probabilities"], {"images": pixels[i:i + batch_size]})[0]
               for i in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def pixels_from_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return load_pixels(data, self.config, max_pixels)

    def prediction(self, uri: str, probs: np.ndarray, top_k: int = 5) -> Prediction:
        return prediction(self.labels, uri, probs, top_k)

    def iter_predict(self, uris: Iterable[str], top_k: int = 5, batch_size: int = 32,
                     workers: int | None = None) -> Iterator[Prediction]:
        """Predictions in input order; unreadable images come back with `.error` set."""
        for batch in batches(iter_items(uris, self.config, workers=workers), batch_size):
            good = [it for it in batch if it.error is None]
            probs = self.predict_pixels(np.stack([it.pixels for it in good])) if good else []
            by_uri = dict(zip((id(it) for it in good), probs))
            for it in batch:
                if it.error is not None:
                    yield Prediction(it.uri, error=it.error)
                else:
                    yield self.prediction(it.uri, by_uri[id(it)], top_k)

    def predict(self, uris: Iterable[str], top_k: int = 5, **kw: Any) -> list[Prediction]:
        if isinstance(uris, str | Path):
            uris = [str(uris)]
        return list(self.iter_predict([str(u) for u in uris], top_k, **kw))


def load(path: str | Path) -> Model:
    """Load an exported bundle folder (e.g. `runs/flowers/model`)."""
    return Model(path)
