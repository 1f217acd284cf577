"""Building the ONNX graphs petal runs: the backbone, the head, and the bundle.

- backbone graph: uint8 (N, S, S, 3) RGB -> `features` (N, D) (and, for Lite, `imagenet_probs`
  (N, 1000)). Exported once per backbone and cached on disk: Lite from `petal.models`, Hugging
  Face models from `petal.hub_torch`, a user's ONNX graph with petal's front end put before it.
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

from petal.backbone_config import LITE, BackboneConfig
from petal.errors import PetalError
from petal.storage import atomic_path

if TYPE_CHECKING:
    import onnx
    import torch

    from petal.unknown import KnnUnknown

GRAPH_VERSION = 1  # bump when the exported backbone graph changes
OPSET = 18
INPUT = "images"


def backbone_onnx_path(cfg: BackboneConfig, cache_dir: Path,
                       on_export: Callable[[str], None] | None = None) -> Path:
    """The cached backbone graph, exported on first use (about 15 s; `on_export`
    hears about it first, so a progress bar does not stall unexplained)."""
    path = cfg.graph_file(cache_dir, GRAPH_VERSION)
    if not path.is_file() and cfg.parts:  # an ensemble: its parts' graphs, side by side
        graph = concat_graph([backbone_onnx_path(p, cache_dir, on_export) for p in cfg.parts])
        with atomic_path(path) as tmp:
            tmp.write_bytes(graph.SerializeToString())
    if not path.is_file():
        cfg.weights_path()  # a missing weights package is named before any news of an export
        if on_export:
            on_export(f"exporting {cfg.name} to ONNX into {path.parent} (once per cache, about 15 s"
                      f"{'' if cfg.arch.family == LITE else ' to minutes'})")
        with atomic_path(path) as tmp:
            export_backbone(cfg, tmp)
    return path


def check_backbone(cfg: BackboneConfig, cache_dir: Path) -> None:
    """Before any slow work: the backbone graph is cached, or its weights package is installed
    to make it (PetalError naming the package otherwise)."""
    if not cfg.graph_file(cache_dir, GRAPH_VERSION).is_file():
        cfg.weights_path()


def export_backbone(cfg: BackboneConfig, path: Path) -> None:
    """The backbone's graph at `path`: uint8 `images` (N, S, S, 3) -> `features` (N, D)."""
    import onnx

    if cfg.arch.family == "onnx":
        graph = front_ended(cfg)
    elif cfg.arch.family == LITE:
        graph = lite_graph(cfg)
    else:  # a Hugging Face family (petal.hub_torch says which it can build)
        from petal.hub_torch import HubFeatures

        graph = images_module_to_onnx(HubFeatures(cfg), cfg, ["features"])
    onnx.save(graph, str(path))


def lite_graph(cfg: BackboneConfig) -> onnx.ModelProto:
    """EfficientNet-Lite: features and its ImageNet head's probabilities."""
    import torch

    from petal.models import Preprocess, build_backbone

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.net = Preprocess(cfg), build_backbone(cfg)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.net.features(self.pre(images))
            return features, self.net._fc(features).softmax(-1)

    return images_module_to_onnx(Graph(), cfg, ["features", "imagenet_probs"])


def concat_graph(paths: list[Path]) -> onnx.ModelProto:
    """Backbone graphs run on the same `images`, their `features` concatenated: (N, D1 + D2 + ...).
    Each graph's names get a prefix (p0/, p1/, ...); their other outputs are dropped."""
    import onnx
    from onnx import TensorProto, compose, helper

    nodes, inits, dims, irs = [], [], [], []
    for i, path in enumerate(paths):
        part = compose.add_prefix(onnx.load(str(path)), f"p{i}/")
        nodes += [helper.make_node("Identity", [INPUT], [f"p{i}/{INPUT}"]), *part.graph.node]
        inits += part.graph.initializer
        dims.append(next(o for o in part.graph.output if o.name == f"p{i}/features").type.tensor_type.shape.dim[1])
        irs.append(part.ir_version)
    nodes.append(helper.make_node("Concat", [f"p{i}/features" for i in range(len(paths))], ["features"], axis=1))
    size = onnx.load(str(paths[0])).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    graph = helper.make_graph(
        nodes, "petal_ensemble", [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", sum(d.dim_value for d in dims)])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=max(irs))
    model = onnx.utils.Extractor(model).extract_model([INPUT], ["features"])  # prune the unused outputs' nodes
    onnx.checker.check_model(model)
    return model


def front_ended(cfg: BackboneConfig) -> onnx.ModelProto:
    """A user's ONNX graph (petal.onnx_backbone) behind petal's front end: uint8 `images`
    (N, S, S, 3) -> float, NCHW if the graph wants it, (x - mean) / std -> the graph ->
    `features` (N, D), a feature map (N, D, H, W) averaged over H and W."""
    from onnx import TensorProto, helper, numpy_helper

    from petal.onnx_backbone import graph_io, load_graph

    model = at_opset(load_graph(cfg.weights_path(), cfg.name), cfg.name)
    io = graph_io(model, cfg.name)
    g, pre = model.graph, cfg.preprocess
    shape = (1, 3, 1, 1) if io.layout == "NCHW" else (1, 1, 1, 3)
    g.initializer.extend([numpy_helper.from_array(np.array(pre.mean, np.float32).reshape(shape), "petal_mean"),
                          numpy_helper.from_array((1 / np.array(pre.std, np.float32)).reshape(shape), "petal_inv_std")])
    node = helper.make_node
    front = [node("Cast", [INPUT], ["petal_x"], to=TensorProto.FLOAT)]
    if io.layout == "NCHW":
        front.append(node("Transpose", ["petal_x"], ["petal_xt"], perm=[0, 3, 1, 2]))
    front += [node("Sub", [front[-1].output[0], "petal_mean"], ["petal_c"]),
              node("Mul", ["petal_c", "petal_inv_std"], [io.input])]
    if io.rank == 4:
        g.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "petal_hw"))
        pool = [node("ReduceMean", [io.output, "petal_hw"], ["features"], keepdims=0)]
    else:
        pool = [] if io.output == "features" else [node("Identity", [io.output], ["features"])]
    nodes = front + list(g.node) + pool
    del g.node[:], g.input[:], g.output[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", pre.input_size,
                                                                            pre.input_size, 3]))
    g.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", io.dim]))
    return model


def at_opset(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """The graph at petal's opset (a bundle merges it with the head, and merging wants one opset)."""
    from onnx import version_converter

    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    if version == OPSET:
        return model
    try:
        return version_converter.convert_version(model, OPSET)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors per op
        raise PetalError(f"{where}: its graph is at opset {version}, and converting it to opset {OPSET} "
                         f"(which petal's bundles use) failed: {e}") from None


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


def head_graph(layers: list[tuple[np.ndarray, np.ndarray]], feature_dim: int,
               temperature: float = 1.0) -> onnx.ModelProto:
    """features (N, D) -> probabilities (N, C): dense layers (W: (in, out), b: (out,)) with
    ReLU between them, then softmax(logits / temperature)."""
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
    inits.append(numpy_helper.from_array(np.array(1.0 / temperature, np.float32), "head_inv_t"))
    nodes += [helper.make_node("Mul", [x, "head_inv_t"], ["head_scaled"]),
              helper.make_node("Softmax", ["head_scaled"], ["probabilities"], axis=-1)]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", layers[-1][0].shape[1]])]
    graph = helper.make_graph(
        nodes, "petal_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feature_dim])],
        outputs, initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def with_unknown(model: onnx.ModelProto, u: KnnUnknown | None) -> onnx.ModelProto:
    """A graph images -> probabilities (and, inside, `features`) -> the same with ood_score
    (N,) and unknown (N,) bool outputs, as `KnnUnknown.score` computes them; every output but
    these is dropped. With `u` None: just images -> probabilities."""
    import onnx
    from onnx import TensorProto, helper

    names = ["probabilities"]
    if u is not None:
        nodes, inits = unknown_nodes(u)
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
        model.graph.output.extend([helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]),
                                   helper.make_tensor_value_info("unknown", TensorProto.BOOL, ["batch"])])
        names += ["ood_score", "unknown"]
    model = onnx.utils.Extractor(model).extract_model([INPUT], names)
    onnx.checker.check_model(model)
    return model


def unknown_nodes(u: KnnUnknown) -> tuple[list, list]:
    """features (N, D), probabilities (N, C) -> ood_score (N,) and unknown (N,) bool."""
    from onnx import helper, numpy_helper

    def const(name: str, value, dtype=np.float32):
        return numpy_helper.from_array(np.array(value, dtype), name)

    k = min(u.k, len(u.bank))
    sim_nodes, sim_inits = similarity_nodes(u)
    inits = sim_inits + [
             const("ood_axis", [1], np.int64), const("ood_k", [k], np.int64), const("ood_last", k - 1, np.int64),
             const("ood_eps", 1e-12), const("ood_one", 1.0), const("ood_knn_mu", u.knn_stats[0]),
             const("ood_knn_sd", u.knn_stats[1]), const("ood_threshold", u.threshold)]
    node = helper.make_node
    nodes = [node("ReduceL2", ["features", "ood_axis"], ["ood_norm"], keepdims=1),
             node("Max", ["ood_norm", "ood_eps"], ["ood_norm_safe"]),
             node("Div", ["features", "ood_norm_safe"], ["ood_unit"]),
             *sim_nodes,
             node("TopK", ["ood_sims", "ood_k"], ["ood_top", "ood_top_idx"], axis=-1, largest=1),
             node("Gather", ["ood_top", "ood_last"], ["ood_kth"], axis=1),  # (N,)
             node("Sub", ["ood_one", "ood_kth"], ["ood_knn"]),
             node("Sub", ["ood_knn", "ood_knn_mu"], ["ood_knn_c"]),
             node("Div", ["ood_knn_c", "ood_knn_sd"], ["ood_knn_z"])]
    score = "ood_knn_z"
    if u.msp_weight:
        inits += [const("ood_msp_mu", u.msp_stats[0]), const("ood_msp_w", u.msp_weight / u.msp_stats[1])]
        nodes += [node("ReduceMax", ["probabilities", "ood_axis"], ["ood_pmax"], keepdims=0),
                  node("Sub", ["ood_one", "ood_pmax"], ["ood_msp"]),
                  node("Sub", ["ood_msp", "ood_msp_mu"], ["ood_msp_c"]),
                  node("Mul", ["ood_msp_c", "ood_msp_w"], ["ood_msp_z"]),
                  node("Add", ["ood_knn_z", "ood_msp_z"], ["ood_sum"])]
        score = "ood_sum"
    nodes += [node("Identity", [score], ["ood_score"]),
              node("Greater", ["ood_score", "ood_threshold"], ["unknown"])]
    return nodes, inits


def similarity_nodes(u: KnnUnknown) -> tuple[list, list]:
    """ood_unit (N, D) -> ood_sims (N, M): cosines to the bank, stored (D, M) in float16, or
    from its ReducedBank (unknown.ReducedBank: a (D, d+1) and a (d+1, M) product and two shifts)."""
    from onnx import TensorProto, helper, numpy_helper

    node, r = helper.make_node, u.reduced
    if r is None:
        return ([node("Cast", ["ood_bank_t"], ["ood_bank_f"], to=TensorProto.FLOAT),
                 node("MatMul", ["ood_unit", "ood_bank_f"], ["ood_sims"])],  # (N, M) cosines
                [numpy_helper.from_array(u.bank.T.astype(np.float16), "ood_bank_t")])  # (D, M), float16 on disk
    inits = [numpy_helper.from_array(r.basis.astype(np.float32), "ood_basis"),  # (D, d+1)
             numpy_helper.from_array(r.shift.astype(np.float32), "ood_shift"),  # (d+1,)
             numpy_helper.from_array(np.ascontiguousarray(r.coords.T, np.float32), "ood_coords_t"),  # (d+1, M)
             numpy_helper.from_array(r.offsets.astype(np.float32), "ood_offsets")]  # (M,)
    return ([node("MatMul", ["ood_unit", "ood_basis"], ["ood_proj"]),
             node("Sub", ["ood_proj", "ood_shift"], ["ood_proj_c"]),
             node("MatMul", ["ood_proj_c", "ood_coords_t"], ["ood_sims_c"]),
             node("Add", ["ood_sims_c", "ood_offsets"], ["ood_sims"])], inits)


def bundle_graph(backbone_path: Path, head: onnx.ModelProto, unknown: KnnUnknown | None = None
                 ) -> onnx.ModelProto:
    """One graph: uint8 images -> probabilities, and ood_score and unknown with `unknown`.
    Unused backbone outputs are pruned."""
    import onnx
    from onnx import compose

    backbone = onnx.load(str(backbone_path))
    head = compose.add_prefix(head, "head/")
    if backbone.ir_version != head.ir_version:
        head.ir_version = backbone.ir_version
    merged = compose.merge_models(backbone, head, io_map=[("features", "head/features")],
                                  outputs=["head/probabilities", "features"])
    # rename the output back to the plain name the runtime and servers use
    for node in merged.graph.node:
        node.output[:] = ["probabilities" if o == "head/probabilities" else o for o in node.output]
    for out in merged.graph.output:
        out.name = "probabilities" if out.name == "head/probabilities" else out.name
    return with_unknown(merged, unknown)


def int8_weights(model: onnx.ModelProto, min_elements: int = 1 << 16) -> onnx.ModelProto:
    """The graph (changed in place) with its large float matrices (the head's dense layers, the unknown detector's
    bank; (rows, cols) with >= min_elements) stored as int8 with one scale per column, and a
    DequantizeLinear in the graph giving back the float32 tensor under its old name: a quarter
    of float32's size, with an error of at most half a step (1/254 of the column's largest value)."""
    from onnx import helper, numpy_helper

    kept, nodes = [], []
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind != "f" or w.ndim != 2 or w.size < min_elements:
            kept.append(init)
            continue
        scale = (np.maximum(np.abs(w).max(0), 1e-12) / 127).astype(np.float32)  # (cols,)
        q = np.round(w.astype(np.float32) / scale).astype(np.int8)
        names = [f"{init.name}_int8", f"{init.name}_scale", f"{init.name}_zero"]
        kept += [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                 numpy_helper.from_array(np.zeros(len(scale), np.int8), names[2])]
        nodes.append(helper.make_node("DequantizeLinear", names, [init.name], axis=1))
    graph_nodes = nodes + list(model.graph.node)  # the dequantized weights first: the graph stays in order
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(kept)
    model.graph.node.extend(graph_nodes)
    return model
