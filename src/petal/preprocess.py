"""The preprocessing contract: how image bytes become the pixels a network sees.

One record, kept apart from the backbone's architecture and weights (as timm keeps
its data config apart from `PretrainedCfg`). `petal.images.load_pixels`, fine-tuning's
train view, the exported bundle and serving all read this record, so the pixels a
model was trained on are the pixels it is served.

    pre = Preprocess(input_size=224, crop_pct=0.875)
    pre.resize_size        # 256: the short side before the 224 center crop
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from petal.errors import PetalError
from petal.params import Int, OneOf, Real, Rule, Validated

RESAMPLING = ("bicubic", "bilinear")  # the Pillow filters petal.images knows


@dataclass(frozen=True)
class Preprocess(Validated):
    PARAMS: ClassVar[dict[str, Rule]] = {
        # input_size is capped: a bundle's petal.json is read before its graph, and 100,000 px
        # would allocate 30 GB per image
        "input_size": Int(1, 4096), "crop_pct": Real(0, 1, low_open=True), "resample": OneOf(*RESAMPLING)}

    input_size: int  # the square side the network sees, in pixels
    crop_pct: float  # resize the short side to input_size / crop_pct, then center-crop input_size
    resample: str = "bicubic"  # the Pillow filter of that resize
    # per RGB channel, on the 0..255 scale; applied inside the graph, whose input is uint8
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @property
    def resize_size(self) -> int:
        return int(round(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """The record from its JSON form; keys this petal does not know are ignored."""
        if not isinstance(d, dict):
            raise PetalError(f"preprocess: expected an object, got {type(d).__name__}")
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)
