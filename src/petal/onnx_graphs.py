"""Building the ONNX graphs petal runs: the backbone, the head, and the bundle.

- backbone graph: uint8 (N, S, S, 3) RGB -> `features` (N, D) and `imagenet_probs`
  (N, 1000). Exported once per backbone from `petal.models` and cached on disk.
- head graph: `features` (N, D) -> `probabilities` (N, C), written directly with
  onnx.helper from the head's numpy weights (Gemm/Relu/Softmax).
- bundle: the two merged into one graph, uint8 pixels -> probabilities.

Needs torch only to export a backbone the first time; onnx for the rest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from petal.backbones import BackboneConfig
from petal.storage import atomic_path

if TYPE_CHECKING:
    import onnx
    import torch

GRAPH_VERSION = 1  # bump when the exported backbone graph changes
OPSET = 18
INPUT = "images"


def backbone_onnx_path(cfg: BackboneConfig, cache_dir: Path,
                       on_export: Callable[[str], None] | None = None) -> Path:
    """The cached backbone graph, exported on first use (about 15 s; `on_export`
    hears about it first, so a progress bar does not stall unexplained)."""
    path = Path(cache_dir) / "models" / f"{cfg.name}-g{GRAPH_VERSION}.onnx"
    if not path.is_file():
        cfg.weights_path()  # a missing weights package is named before any news of an export
        if on_export:
            on_export(f"exporting {cfg.name} to ONNX into {path.parent} (once per cache, about 15 s)")
        with atomic_path(path) as tmp:
            export_backbone(cfg, tmp)
    return path


def export_backbone(cfg: BackboneConfig, path: Path) -> None:
    import onnx
    import torch

    from petal.models import Preprocess, build_backbone

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.net = Preprocess(cfg), build_backbone(cfg)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.net.features(self.pre(images))
            return features, self.net._fc(features).softmax(-1)

    onnx.save(images_module_to_onnx(Graph(), cfg, ["features", "imagenet_probs"]), str(path))


def images_module_to_onnx(module: torch.nn.Module, cfg: BackboneConfig, outputs: list[str]) -> onnx.ModelProto:
    """A torch module taking uint8 `images` (batch, S, S, 3), as an onnx ModelProto
    with a dynamic batch axis. Exported quietly: the exporter is chatty on stdout,
    stderr and in logging, and a user needs none of it."""
    import torch

    s = cfg.input_size
    example = torch.zeros(2, s, s, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        torch_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module.eval(), (example,), input_names=[INPUT], output_names=outputs,
                dynamic_shapes={INPUT: {0: batch}}, opset_version=OPSET, dynamo=True, verbose=False,
            )
        finally:
            torch_log.setLevel(level)
    return program.model_proto


def head_graph(layers: list[tuple[np.ndarray, np.ndarray]], feature_dim: int) -> onnx.ModelProto:
    """Dense layers (W: (in, out), b: (out,)) with ReLU between them, then softmax."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    x = "features"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"head_w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"head_b{i}")]
        y = f"head_z{i}"
        nodes.append(helper.make_node("Gemm", [x, f"head_w{i}", f"head_b{i}"], [y]))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"head_a{i}"]))
            y = f"head_a{i}"
        x = y
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=-1))
    num_classes = layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        "petal_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feature_dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def bundle_graph(backbone_path: Path, head: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: uint8 images -> probabilities. Unused backbone outputs are pruned."""
    import onnx
    from onnx import compose

    backbone = onnx.load(str(backbone_path))
    head = compose.add_prefix(head, "head/")
    if backbone.ir_version != head.ir_version:
        head.ir_version = backbone.ir_version
    merged = compose.merge_models(
        backbone, head, io_map=[("features", "head/features")], outputs=["head/probabilities"]
    )
    # rename the output back to the plain name the runtime and servers use
    for node in merged.graph.node:
        node.output[:] = ["probabilities" if o == "head/probabilities" else o for o in node.output]
    merged.graph.output[0].name = "probabilities"
    merged = onnx.utils.Extractor(merged).extract_model([INPUT], ["probabilities"])
    onnx.checker.check_model(merged)
    return merged
