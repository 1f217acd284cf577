"""Fine-tuning the backbone with its head: `petal finetune DATA`.

    from petal.runs.finetune import FinetuneConfig, finetune
    from petal.spec import DataSpec, RunSpec
    result = finetune(RunSpec(DataSpec("flower_photos"), "runs/flowers-ft", trainer=FinetuneConfig(epochs=12)))

- `config`: the settings (`FinetuneConfig`, `AugmentConfig`);
- `data`: decode-once pixel cache, augmentation, data-parallel batches;
- `model`: the frozen trunk / trained top split of EfficientNet-Lite;
- `train`: the loop, checkpoints, resume, TensorBoard;
- `distributed`: torchrun / --nproc process groups;
- `export`: the bundle, with the spine's parity check.

Needs torch, imported only when training starts (`config` alone is light, for the CLI).
"""

from petal.runs.finetune.config import AugmentConfig, FinetuneConfig

__all__ = ["AugmentConfig", "FinetuneConfig", "FinetuneResult", "finetune"]


def __getattr__(name: str):
    if name in ("finetune", "FinetuneResult"):
        from petal.runs.finetune import train

        return getattr(train, name)
    raise AttributeError(name)
