"""Fine-tuning acceptance on tf_flowers: eval top-1 and wall time with the default settings.

    python benchmarks/finetune_flowers.py [FOLDER] [--out RUN] [--cache DIR] [--epochs N] [--unfreeze N]

Runs `petal.runs.finetune.finetune` (the same as `petal finetune FOLDER`)
from an empty run folder and, unless --cache is given, an empty cache: the
wall time covers everything a first run does (decoding, the one-off export of
the frozen trunk's ONNX graph, training, evaluation, export and its parity
check). Prints the epoch lines, then one JSON line: epochs, best epoch, wall
seconds, eval top-1/top-5, per-epoch seconds and eval accuracy, the machine's
cores and its load average before and after (the wall time is only
comparable on an otherwise idle machine; the accuracy does not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from petal.progress import Reporter
from petal.runs.finetune import FinetuneConfig, finetune
from petal.spec import DataSpec, RunSpec

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


class Log(Reporter):
    def message(self, text: str) -> None:
        print(time.strftime("%H:%M:%S"), text, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=str(DEFAULT))
    p.add_argument("--out", type=Path, default=None, help="run folder [default: a temporary one]")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--unfreeze", type=int, default=None)
    p.add_argument("--cache", type=Path, default=None, help="cache folder [default: a new, empty one]")
    args = p.parse_args()

    overrides = {k: v for k, v in (("epochs", args.epochs), ("unfreeze", args.unfreeze)) if v is not None}
    config = FinetuneConfig(**overrides)
    tmp = Path(tempfile.mkdtemp(prefix="petal-ft-flowers-"))
    cache = args.cache or tmp / "cache"
    out = args.out or tmp / "run"
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    r = finetune(RunSpec(DataSpec(args.data), out, cache_dir=cache, trainer=config), reporter=Log())
    wall = time.perf_counter() - start
    summary = {
        "epochs": r.epochs_done, "best_epoch": r.best_epoch, "wall_seconds": round(wall, 1),
        "eval_top1": r.metrics["accuracy"], "eval_top5": r.metrics["top5_accuracy"],
        "num_eval": r.metrics["num_eval"], "num_train": r.metrics["num_train"],
        "epoch_seconds": [round(h["seconds"], 1) for h in r.history],
        "eval_accuracy_by_epoch": [round(h["eval_accuracy"], 4) if "eval_accuracy" in h else None for h in r.history],
        "config": config.to_dict(), "model": str(r.model_dir), "cores": os.cpu_count(),
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
