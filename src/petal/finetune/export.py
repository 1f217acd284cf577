"""A fine-tuned model -> the usual bundle (uint8 images -> probabilities), parity-checked.

The whole network (preprocessing, frozen trunk, trained top, softmax) is
exported from PyTorch as one ONNX graph with the registry's input size, and
`petal.export.export_graph` checks it against the model as trained (the
`Predictor`: the same trunk runtime and top that produced the reported
metrics) before the bundle folder appears.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from petal.export import export_graph
from petal.finetune.model import FineTuneNet, Probabilities, to_onnx
from petal.predictions import Scores

PREDICT_BATCH = 64


class Predictor:
    """The trained model on the CPU: uint8 (N, S, S, 3) -> (N, C) float32 probabilities."""

    def __init__(self, model: FineTuneNet, trunk):
        self.model, self.trunk = model.eval(), trunk

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = [self.model.top(self.trunk(torch.from_numpy(np.array(pixels[i:i + PREDICT_BATCH]))))
               .softmax(-1).numpy() for i in range(0, len(pixels), PREDICT_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, self.model.top[-1].fc.out_features), np.float32)


def export_model(out: Path, model: FineTuneNet, reference: Predictor, classes: list[str],
                 parity_uris: list[str], metrics: dict, training: dict) -> Path:
    """Export `model` (on the CPU, eval mode) as a bundle folder at `out`."""
    graph = to_onnx(Probabilities(model.eval()), model.cfg, "probabilities")
    return export_graph(out, graph=graph, cfg=model.cfg, classes=classes, reference=lambda px: Scores(reference(px)),
                        parity_uris=parity_uris, metrics=metrics, name=Path(out).parent.name, training=training)
