"""`--backbone onnx:PATH`: bring your own ONNX feature extractor.

The graph takes one float image batch, NCHW (N, 3, S, S) or NHWC (N, S, S, 3), already
normalised, and gives features (N, D), or a feature map (N, D, H, W) that petal averages.
D is read from the graph. Its preprocessing is given by options or by a JSON beside it,
`PATH` with `.preprocess.json` for `.onnx`, on the 0..1 scale that torchvision and Hugging
Face use:

    {"image_size": 224, "crop_pct": 0.875, "resample": "bicubic",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

petal puts its uint8 front end before the graph (petal.onnx_graphs) and caches the result,
so bundles carry it like any backbone. A graph whose weights lie in external files is refused,
as bundles are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from petal.backbone_config import Architecture, BackboneConfig, WeightsSource
from petal.errors import PetalError
from petal.preprocess import Preprocess

if TYPE_CHECKING:
    import onnx

DEFAULT_CROP_PCT = 0.875
KEYS = ("image_size", "crop_pct", "resample", "mean", "std")


@dataclass(frozen=True)
class GraphIO:
    input: str  # the graph's image input
    layout: str  # "NCHW" or "NHWC"
    size: int | None  # its static side, if the graph fixes one
    output: str  # the features output
    rank: int  # 2: (N, D); 4: (N, D, H, W), averaged over H, W
    dim: int  # D


def preprocess_options(where: str, *, image_size: int | None, crop_pct: float | None = None,
                       resample: str | None = None, mean: list[float] | None = None,
                       std: list[float] | None = None) -> Preprocess:
    """Preprocess from the options (mean and std on the 0..1 scale, as RGB triples)."""
    for key, v in (("mean", mean), ("std", std)):
        if v is None:
            raise PetalError(f"{where}: give --{key} (three numbers on the 0..1 scale, e.g. 0.485,0.456,0.406) "
                             "or write them in the JSON beside the graph")
        if len(v) != 3 or not all(isinstance(x, int | float) for x in v):
            raise PetalError(f"{where}: {key}: expected three numbers (R, G, B), got {v!r}")
    if image_size is None:
        raise PetalError(f"{where}: give --image-size (the graph does not fix its input side)")
    return Preprocess(input_size=image_size, crop_pct=DEFAULT_CROP_PCT if crop_pct is None else crop_pct,
                      resample=resample or "bicubic", mean=tuple(255.0 * m for m in mean),
                      std=tuple(255.0 * s for s in std))


def triple(text: str | None, option: str) -> list[float] | None:
    """"0.485,0.456,0.406" -> [0.485, 0.456, 0.406]."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise PetalError(f"{option}: expected three numbers R,G,B on the 0..1 scale (e.g. 0.485,0.456,0.406), "
                         f"got {text!r}")
    return values


def sidecar(path: Path) -> Path:
    return path.with_suffix(".preprocess.json")


def load_graph(path: Path, where: str) -> onnx.ModelProto:
    """The graph without its external data; refused if it has any."""
    try:
        import onnx
    except ImportError:
        raise PetalError(f"{where} needs onnx to read the graph: pip install 'petal[train]'") from None
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and others
        raise PetalError(f"{where}: not an ONNX graph ({type(e).__name__}: {e})") from None
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise PetalError(f"{where}: its weights point at files outside it (ONNX external data); petal keeps a "
                         "backbone's weights inside its graph, so it is refused (save it with "
                         "save_as_external_data=False)")
    return model


def graph_io(model: onnx.ModelProto, where: str) -> GraphIO:
    """The image input and the features output of a user's graph, checked."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise PetalError(f"{where}: expected one image input and a features output, got inputs "
                         f"{[i.name for i in inputs]}")

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    x, y = dims(inputs[0]), dims(model.graph.output[0])
    if len(x) != 4 or 3 not in (x[1], x[3]):
        raise PetalError(f"{where}: input {inputs[0].name}: expected (N, 3, S, S) or (N, S, S, 3), got {x}")
    layout = "NCHW" if x[1] == 3 else "NHWC"
    side = x[2] if layout == "NCHW" else x[1]
    if len(y) not in (2, 4) or not y[1]:
        raise PetalError(f"{where}: output {model.graph.output[0].name}: expected (N, D) or (N, D, H, W) with D "
                         f"fixed, got {y}")
    return GraphIO(inputs[0].name, layout, side, model.graph.output[0].name, len(y), y[1])


def resolve(spec: str, options: dict | None = None) -> BackboneConfig:
    """`onnx:SPEC` -> its BackboneConfig; preprocessing from `options` (preprocess_options' keywords),
    else the JSON beside it; the image size may come from the graph."""
    path = Path(spec).expanduser().resolve()
    where = f"--backbone onnx:{spec}"
    if not path.is_file():
        raise PetalError(f"{where}: no such file")
    io = graph_io(load_graph(path, where), where)
    if options is None:
        if not sidecar(path).is_file():
            raise PetalError(f"{where}: its preprocessing is not known: give --image-size, --mean and --std, "
                             f"or write {sidecar(path)} ({', '.join(KEYS)})")
        where, options = str(sidecar(path)), json.loads(sidecar(path).read_text(encoding="utf-8"))
        if not isinstance(options, dict) or set(options) - set(KEYS):
            raise PetalError(f"{where}: expected an object with keys among {KEYS}, got {options!r}")
    given = {k: v for k, v in options.items() if v is not None}
    preprocess = preprocess_options(where, **{"image_size": io.size, **given})
    if io.size and io.size != preprocess.input_size:
        raise PetalError(f"{where}: the graph takes {io.size} px images, but the image size given is "
                         f"{preprocess.input_size}")
    revision = hashlib.sha256(path.read_bytes()).hexdigest()
    # the slug names the graph and the preprocessing: each pair has its own graph file and cache folder
    tag = hashlib.sha256(json.dumps([revision, preprocess.to_dict()]).encode()).hexdigest()[:12]
    return BackboneConfig(name=f"onnx:{path}", arch=Architecture("onnx", io.dim, "graph"),
                          weights=WeightsSource("onnx", str(path), revision=revision), preprocess=preprocess,
                          slug=f"onnx-{''.join(c if c.isalnum() else '-' for c in path.stem)[:40]}-{tag}")
