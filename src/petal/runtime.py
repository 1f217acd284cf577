"""ONNX Runtime sessions, configured once for every caller (embed, predict, serve)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from petal.params import env_int

if TYPE_CHECKING:
    import onnxruntime as ort


def make_session(path: str | Path | bytes, threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """`path`: an .onnx file, or a serialized graph. `spin=False` stops idle ORT threads
    busy-waiting, which helps when decode threads or other requests share the cores (a server,
    a pipeline)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or env_int("PETAL_ORT_THREADS", 0, low=0)  # 0: all cores
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
