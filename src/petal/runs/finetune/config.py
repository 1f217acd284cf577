"""The fine-tuning settings, in one record with its own validation.

`FinetuneConfig` is written into every checkpoint: `--resume` refuses to continue
a run with different settings (that would not be the same run any more).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from petal.errors import PetalError
from petal.params import Bool, Instance, Int, OneOf, Real, Rule, Validated, check_param

ALL_BLOCKS = -1  # --unfreeze -1: train every layer, the stem included
DEFAULT_UNFREEZE = 3  # with pretrained weights; from scratch trains everything
RUNTIME_ONLY = ("loader_workers", "decode_workers")  # settings that do not change the result
PERCENT = Real(0, 100, high_open=True, what="a percentage in [0, 100)")


@dataclass
class AugmentConfig(Validated):
    """retrain.py-style augmentation of the training images (never of eval images).

    The eval view is the central `crop_pct` (87.5%) of the image's short side; a
    training crop varies around it:
    - random_scale PCT: the crop's side is the eval view's side times a factor in
      [1 - PCT/100, 1 + PCT/100] (zoom in and out), clipped to the image;
    - random_crop PCT: its centre moves by up to PCT% of the image side;
    - flip: mirror left-right, half the time;
    - random_brightness PCT: pixel values times a factor in [1 - PCT/100, 1 + PCT/100];
    - random_color PCT: saturation times a factor in that range (0 = grey).
    """

    PARAMS: ClassVar[dict[str, Rule]] = {
        "enabled": Bool(), "flip": Bool(), "random_scale": PERCENT, "random_crop": PERCENT,
        "random_brightness": PERCENT, "random_color": PERCENT,
    }

    enabled: bool = True
    flip: bool = True
    random_scale: float = 50.0
    random_crop: float = 25.0
    random_brightness: float = 20.0
    random_color: float = 20.0


@dataclass
class FinetuneConfig(Validated):
    """What `petal finetune` trains, and how."""

    PARAMS: ClassVar[dict[str, Rule]] = {
        "epochs": Int(1), "batch_size": Int(1), "lr": Real(0, low_open=True), "backbone_lr_mult": Real(0),
        "warmup_epochs": Real(0),  # and <= epochs: check_together
        "weight_decay": Real(0), "label_smoothing": Real(0, 1, high_open=True), "dropout": Real(0, 1, high_open=True),
        "unfreeze": Int(ALL_BLOCKS, what="-1 (all) or a number of blocks >= 0"), "pretrained": Bool(),
        "seed": Int(0), "augment": Instance(AugmentConfig), "trunk_runtime": OneOf("auto", "onnx", "torch"),
        "amp": Bool(), "loader_workers": Int(0, none_ok=True), "decode_workers": Int(1, none_ok=True),
        "calibration_percent": Real(0, 50, what="a percentage in [0, 50]"),
    }

    epochs: int = 12
    batch_size: int = 32  # the global batch: split across data-parallel workers
    lr: float = 1e-3  # the head's peak learning rate
    backbone_lr_mult: float = 0.3  # backbone lr = lr * this
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to 0
    weight_decay: float = 0.05  # AdamW, on conv/linear weights only
    label_smoothing: float = 0.1
    dropout: float = 0.3  # before the classifier
    unfreeze: int | None = None  # MBConv blocks trained, from the top, with the 1x1 head conv; -1: all
    #   [default: DEFAULT_UNFREEZE when pretrained, else -1]
    pretrained: bool = True  # False: random init, everything trained, BatchNorm statistics learned
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trunk_runtime: str = "auto"  # frozen layers in "onnx" (fast on CPU), "torch", or "auto"
    amp: bool = True  # mixed precision on a GPU (ignored on a CPU)
    loader_workers: int | None = None  # DataLoader worker processes; None: Trainer.threads() chooses
    decode_workers: int | None = None  # threads decoding images into the pixel cache
    # set aside from the training split, never trained on: fits the temperature and the
    # unknown threshold (0: neither; too few images to set aside: neither, with a warning)
    calibration_percent: float = 5.0

    def __post_init__(self) -> None:
        if self.unfreeze is None:
            self.unfreeze = DEFAULT_UNFREEZE if self.pretrained else ALL_BLOCKS
        super().__post_init__()

    def check_together(self) -> None:
        check_param("warmup_epochs", self.warmup_epochs, Real(0, self.epochs))
        if not self.pretrained and self.unfreeze != ALL_BLOCKS:
            raise PetalError(f"unfreeze: training from scratch (--no-pretrained) trains every layer; "
                             f"expected -1, got {self.unfreeze!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """The config as `to_dict` wrote it (in a run's settings.json); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        aug = {f.name for f in fields(AugmentConfig)}
        kw = {k: v for k, v in d.items() if k in known and k != "augment"}
        return cls(**kw, augment=AugmentConfig(**{k: v for k, v in d.get("augment", {}).items() if k in aug}))

    def training_dict(self) -> dict:
        """The settings that decide the trained weights: a resumed run must have the same."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}
