"""A fine-tuned model -> the usual bundle (uint8 images -> probabilities, ood_score, unknown).

The whole network (preprocessing, frozen trunk, trained top, calibrated softmax) is
exported from PyTorch as one ONNX graph with the registry's input size, the unknown
detector is added on its features (petal.onnx_graphs.with_unknown), and
`petal.export.export_graph` checks it against the model as trained (the
`Predictor`: the same trunk runtime and top that produced the reported
metrics) before the bundle folder appears.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from petal.calibration import softmax
from petal.export import export_graph
from petal.onnx_graphs import images_module_to_onnx, with_unknown
from petal.predictions import Scores
from petal.runs.finetune.model import FineTuneNet

if TYPE_CHECKING:
    from petal.unknown import KnnUnknown

PREDICT_BATCH = 64


class Predictor:
    """The trained model on the CPU, calibrated: uint8 (N, S, S, 3) -> Scores (probabilities
    softmax(logits / temperature), and ood scores once `unknown` is set)."""

    def __init__(self, model: FineTuneNet, trunk, temperature: float = 1.0, unknown: KnnUnknown | None = None):
        self.model, self.trunk = model.eval(), trunk
        self.temperature, self.unknown = temperature, unknown

    @torch.no_grad()
    def features_logits(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, R, R, 3) uint8 -> (N, D) features and (N, C) logits, on the central S x S view
        (R > S: a stored training square)."""
        s = self.model.cfg.input_size
        o = (pixels.shape[1] - s) // 2
        feats, logits = [], []
        for i in range(0, len(pixels), PREDICT_BATCH):
            x = torch.from_numpy(np.array(pixels[i:i + PREDICT_BATCH, o:o + s, o:o + s]))  # a writable copy
            f = self.model.top[:-1](self.trunk(x))  # the pooled 1280-d features, as the graph's "features"
            feats.append(f.numpy())
            logits.append(self.model.top[-1](f).numpy())
        if not feats:
            return np.zeros((0, self.model.cfg.feature_dim), np.float32), np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(feats), np.concatenate(logits)

    @property
    def num_classes(self) -> int:
        return self.model.top[-1].fc.out_features

    def __call__(self, pixels: np.ndarray) -> Scores:
        return self.scores(*self.features_logits(pixels))

    def scores(self, features: np.ndarray, logits: np.ndarray) -> Scores:
        """Scores from (N, D) features and (N, C) logits that features_logits gave."""
        probs = softmax(logits, self.temperature)
        if self.unknown is None:
            return Scores(probs)
        ood = self.unknown.score(features, probs)
        return Scores(probs, ood, ood > self.unknown.threshold)


class Outputs(torch.nn.Module):
    """What the bundle graph computes before unknown detection: calibrated probabilities, and
    the features that detection needs."""

    def __init__(self, model: FineTuneNet, temperature: float):
        super().__init__()
        self.model, self.inv_t = model, 1.0 / temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        features = m.top[:-1](m.trunk(m.pre(images)))
        return (m.top[-1](features) * self.inv_t).softmax(-1), features


def export_model(out: Path, predictor: Predictor, *, classes: list[str], parity_uris: list[str], metrics: dict,
                 training: dict) -> Path:
    """Export the predictor's model (on the CPU, eval mode), its temperature and unknown
    detector as a bundle folder at `out`."""
    model, u = predictor.model.eval(), predictor.unknown
    graph = with_unknown(images_module_to_onnx(Outputs(model, predictor.temperature), model.cfg,
                                               ["probabilities", "features"]), u)
    calibration = None
    if u is not None:  # calibrate() ran: the temperature, or the identity where it did not win out of fold
        calibration = {"method": "temperature" if predictor.temperature != 1.0 else "identity",
                       "temperature": predictor.temperature,
                       "fitted_on": "the calibration images set aside from the training split"}
    return export_graph(out, graph=graph, cfg=model.cfg, classes=classes, reference=predictor,
                        parity_uris=parity_uris, metrics=metrics, name=Path(out).parent.name, training=training,
                        calibration=calibration, unknown=u.to_dict() if u else None)
