"""The network being fine-tuned: a frozen trunk, then the trained top.

EfficientNet-Lite as a list of units, input to output:

    stem (3x3 conv), MBConv block 0 ... block 15 (Lite0), head conv (1x1 to 1280, pooled)

followed by a new classifier (dropout + linear). A Hugging Face backbone (petal.hub_torch) is
a list of units the same way: embeddings, encoder layers (ConvNeXt: stages), final norm and
pooling; a user's ONNX graph has no trainable weights, and is refused. `--unfreeze N` trains the last
N blocks together with the head conv and the classifier; 0 trains only the
classifier; -1 trains everything. The frozen units form the `trunk`, which
needs no gradients: on a CPU it runs in ONNX Runtime (several times faster than
eager PyTorch here), on a GPU in PyTorch. The trained units form the `top`.

BatchNorm: with pretrained weights every BatchNorm keeps its ImageNet
statistics (eval mode) and only its scale and shift are trained, as Keras'
fine-tuning guide advises; it also makes the result independent of how a batch
is split between data-parallel processes. From scratch, the statistics are
learned (train mode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from petal.backbone_config import LITE, BackboneConfig
from petal.errors import PetalError
from petal.hub_torch import PARTS, units_of
from petal.models import Preprocess, build_backbone
from petal.onnx_graphs import images_module_to_onnx
from petal.runs.finetune.config import ALL_BLOCKS
from petal.storage import atomic_path

TRUNK_GRAPH_VERSION = 1  # bump when the trunk graph changes


class Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)))


class HeadConv(nn.Module):
    """1x1 conv to feature_dim, then global average pooling: (N, C, H, W) -> (N, D)."""

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x))).mean(dim=(2, 3))


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, C) logits
        return self.fc(self.dropout(x))


def trained_units(unfreeze: int, num_blocks: int) -> int:
    """How many of the (num_blocks + 2) units are trained for --unfreeze N."""
    if unfreeze == ALL_BLOCKS or unfreeze >= num_blocks:
        return num_blocks + 2  # stem, every block, head conv
    return unfreeze + 1 if unfreeze > 0 else 0  # N blocks + the head conv


def check_finetunable(cfg: BackboneConfig) -> None:
    """Before any slow work: the family can be trained in PyTorch, and its weights are here."""
    if cfg.arch.family != LITE and cfg.arch.family not in PARTS:
        raise PetalError(f"petal finetune --backbone {cfg.name}: the {cfg.arch.family!r} family cannot be "
                         f"fine-tuned (petal trains efficientnet_lite* and the Hugging Face families "
                         f"{', '.join(sorted(PARTS))}); use petal train, which trains a head on its features")
    cfg.weights_path()


def backbone_units(cfg: BackboneConfig, pretrained: bool) -> tuple[list[nn.Module], int]:
    """The backbone as units, input to output (stem, blocks..., head), and how many blocks."""
    check_finetunable(cfg)
    if cfg.arch.family == LITE:
        net = build_backbone(cfg, pretrained)  # ImageNet weights; its 1000-class _fc is dropped
        return [Stem(net._conv_stem, net._bn0), *net._blocks, HeadConv(net._conv_head, net._bn1)], len(net._blocks)
    hub = units_of(cfg, pretrained)  # embeddings, layers..., norm + pooling
    return hub, len(hub) - 2


class FineTuneNet(nn.Module):
    """uint8 (N, S, S, 3) RGB images -> (N, C) logits, as `trunk` then `top`."""

    def __init__(self, cfg: BackboneConfig, num_classes: int, *, unfreeze: int, dropout: float = 0.2,
                 pretrained: bool = True):
        super().__init__()
        units, blocks = backbone_units(cfg, pretrained)
        self.cut = len(units) - trained_units(unfreeze, blocks)
        self.cfg, self.pretrained = cfg, pretrained
        self.pre = Preprocess(cfg)
        self.trunk = nn.Sequential(*units[:self.cut])  # may be empty
        self.top = nn.Sequential(*units[self.cut:], Classifier(cfg.feature_dim, num_classes, dropout))
        self.trunk.requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # NHWC kernels: much faster on CPU

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        self.trunk.eval()
        if self.pretrained:  # keep the ImageNet BatchNorm statistics
            for m in self.top.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(self.pre(images)))

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the classifier at `lr`, the trained backbone units at `backbone_lr`;
        weight decay on conv/linear weights only (not on biases and BatchNorm)."""
        head = self.top[-1]
        groups = []
        for name, group_lr, modules in (("backbone", backbone_lr, list(self.top)[:-1]), ("head", lr, [head])):
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            groups += [{"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay},
                       {"name": name, "params": no_decay, "lr": group_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


class TrunkInput(nn.Module):
    """Preprocess + the frozen units: uint8 (N, S, S, 3) -> float activations."""

    def __init__(self, model: FineTuneNet):
        super().__init__()
        self.pre, self.trunk = model.pre, model.trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.pre(images))


# --------------------------------------------------------------------------- ONNX


def to_onnx(module: nn.Module, cfg: BackboneConfig, output: str):
    """`module` (uint8 `images` (batch, S, S, 3) -> `output`) as an onnx ModelProto."""
    return images_module_to_onnx(module, cfg, [output])


def trunk_onnx_path(model: FineTuneNet, cache_dir: Path) -> Path:
    """The pretrained trunk as an ONNX graph, exported once per (backbone, cut) into the cache."""
    if not model.pretrained:
        raise ValueError("only a pretrained trunk is the same in every run")
    path = Path(cache_dir) / "models" / f"{model.cfg.slug}-trunk{model.cut}-g{TRUNK_GRAPH_VERSION}.onnx"
    if not path.is_file():
        proto = to_onnx(TrunkInput(model), model.cfg, "activations")
        with atomic_path(path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
    return path


class OnnxTrunk:
    """The frozen trunk in ONNX Runtime: uint8 (N, S, S, 3) -> float32 channels-last activations.

    Its threads do not spin while idle: on a small CPU they would steal the cores
    PyTorch needs for the top, and the other way round.
    """

    def __init__(self, path: Path, threads: int):
        from petal.runtime import make_session

        self.session = make_session(path, threads, spin=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["activations"], {"images": np.ascontiguousarray(images.numpy())})[0]
        h = torch.from_numpy(out)
        return h.contiguous(memory_format=torch.channels_last) if h.ndim == 4 else h


class TrunkCollate:
    """A DataLoader collate_fn that also runs the ONNX trunk, in the worker process.

    On a CPU this pipelines the work: workers augment and run the frozen layers
    (one thread each) while the main process trains the top, so no two thread
    pools wait on each other. Returns ((B, C, H, W) activations, (B,) labels).
    """

    def __init__(self, path: Path, threads: int = 1):
        self.path, self.threads = path, threads
        self._trunk: OnnxTrunk | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_trunk": None}  # each worker opens its own session

    def __call__(self, batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from petal.runs.finetune.data import collate

        images, labels = collate(batch)
        if self._trunk is None:
            self._trunk = OnnxTrunk(self.path, self.threads)
        return self._trunk(images), labels


class TorchTrunk:
    """The frozen trunk in PyTorch, without gradients, on the model's device."""

    def __init__(self, model: FineTuneNet, device: torch.device, autocast):
        self.module, self.device, self.autocast = TrunkInput(model), device, autocast

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.module(images.to(self.device, non_blocking=True))
