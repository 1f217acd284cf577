"""petal: train your own image classifier by transfer learning, offline, fast on a CPU.

    import petal
    m = petal.load("runs/flowers/model")
    m.predict(["rose.jpg"])          # -> [Prediction]: .label ('unknown' if like no class), .nearest, .score, .top

Heavy modules (torch, onnx) load only when a step needs them.
"""

from petal.errors import DataError, ImageError, PetalError

__version__ = "0.1.0"
__all__ = ["DataError", "ImageError", "PetalError", "load", "__version__"]


def load(path):
    """Load an exported model bundle (see `petal.bundle.Model`)."""
    from petal.bundle import load as _load

    return _load(path)
