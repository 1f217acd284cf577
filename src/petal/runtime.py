"""ONNX Runtime sessions, configured once for every caller (embed, predict, serve)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from petal.errors import PetalError
from petal.params import env_int

if TYPE_CHECKING:
    import onnxruntime as ort


def make_session(path: str | Path | bytes, threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """`path`: an .onnx file, or a serialized graph. `spin=False` stops idle ORT threads
    busy-waiting, which helps when decode threads or other requests share the cores (a server,
    a pipeline).

    petal's graphs hold their weights inline, so a graph whose tensors point at external
    files (a path that could name any file on the machine) is refused: it is loaded from
    its bytes with an empty folder as the only place external data may come from."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or env_int("PETAL_ORT_THREADS", 0, low=0)  # 0: all cores
    so.log_severity_level = 3  # errors only
    graph = path if isinstance(path, bytes) else Path(path).read_bytes()
    with tempfile.TemporaryDirectory(prefix="petal-no-external-data-") as empty:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own classes
            if "external data" in str(e).lower():
                where = "the graph" if isinstance(path, bytes) else path
                raise PetalError(f"{where}: its weights point at files outside it (ONNX external data); "
                                 "petal's graphs keep them inside, so it is refused") from None
            raise
