"""`petal finetune`: train backbone blocks and a new head together.

    finetune(RunSpec(DataSpec(data), out, trainer=FinetuneConfig(unfreeze=3))) -> FinetuneResult

The loop, per epoch: augmented uint8 batches from DataLoader workers -> frozen
trunk (no gradients) -> trained top -> label-smoothed cross-entropy -> AdamW
with a warmup + cosine schedule. Then the eval split is scored, a checkpoint
is written atomically (`RUN/checkpoints/last.pt`), and the best epoch so far
(eval accuracy, then eval loss) is kept in `best.pt`. At the end the best epoch
is evaluated, audited and reported as a head run is (petal.runs.common.finish), and
exported as the usual bundle, with the parity check.

Reproducible: the shuffle, the augmentation and dropout are seeded per epoch,
so `resume=True` after a kill continues to exactly the weights an uninterrupted
run reaches, and N data-parallel processes reach those of one process with the
same global batch (up to float rounding), BatchNorm statistics being frozen.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from petal.backbones import BackboneConfig, get_backbone
from petal.bundle import TRAIN_KEYS, train_keys_digest
from petal.calibration import choose_temperature, softmax
from petal.data import CALIBRATION, EVAL, MIN_CALIBRATION, TEST, TRAIN, Dataset
from petal.errors import PetalError
from petal.features import Features
from petal.params import Int, check_param, env_int
from petal.progress import Reporter
from petal.run import FINETUNE, Run, RunSettings, epoch_tag, require_training_images
from petal.runs.common import Ending, Scored, finish, open_run, parity_images, record
from petal.runs.finetune.config import FinetuneConfig
from petal.runs.finetune.data import (
    EpochBatches,
    PixelFile,
    TrainImages,
    build_pixel_file,
    collate,
    read_pixel_file,
    train_view,
)
from petal.runs.finetune.distributed import World, close_world, init_world
from petal.runs.finetune.export import Predictor, export_model
from petal.runs.finetune.model import (
    FineTuneNet,
    OnnxTrunk,
    TorchTrunk,
    TrunkCollate,
    check_finetunable,
    trunk_onnx_path,
)
from petal.spec import RunSpec
from petal.storage import atomic_path
from petal.unknown import KnnUnknown

CHECKPOINT_FORMAT = 1
EVAL_BATCH = 64
EVAL_CACHE_BYTES = 2 << 30  # eval activations kept in memory up to this size

SPLITS = (TRAIN, EVAL, CALIBRATION, TEST)


@dataclass
class Prepared:
    """What Trainer.prepare found and decoded: the data, each split's pixel file and its
    (N,) int64 class ids, the data warnings, the run's fingerprint, the checkpoint to resume."""

    ds: Dataset
    pixels: dict[str, PixelFile]  # split name -> its decoded images
    labels: dict[str, np.ndarray]  # split name -> (N,) class ids, in the pixel file's order
    warnings: list[str]
    fingerprint: dict
    checkpoint: dict | None


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path | None  # None when not exported (export=False, or stopped early)
    metrics: dict  # of the exported (best) epoch, on the eval split
    best_epoch: int
    epochs_done: int
    history: list[dict]  # one dict per epoch
    seconds: float  # wall time of this call
    warnings: list[str] = field(default_factory=list)


def finetune(spec: RunSpec, *, resume: bool = False, export: bool = True, stop_after: int | None = None,
             reporter: Reporter | None = None) -> FinetuneResult | None:
    """Fine-tune as `spec` says (its trainer a FinetuneConfig) into the run folder `spec.out`.
    Under torchrun every process calls this; the result comes back on rank 0, None elsewhere.

    `stop_after=N` ends after epoch N, as if killed there; `resume=True` goes on
    from the last checkpoint; `spec.overwrite` starts afresh in a folder that holds a
    finished run or a checkpoint (without either, such a folder is refused).
    """
    if spec.kind != FINETUNE:
        raise PetalError("trainer: petal.runs.finetune.finetune trains with a FinetuneConfig; a HeadClassifier "
                         "goes to petal.runs.head.train")
    check_finetunable(get_backbone(spec.backbone))  # before any slow work: a family torch trains, its weights here
    if stop_after is not None:
        check_param("stop_after", stop_after, Int(1, what="an epoch >= 1"))
    world = init_world()
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(spec, world, reporter if world.main else None)
        # resuming a finished run re-exports it
        run, ds = open_run(spec, trainer.reporter, resume=resume, calibration_percent=spec.trainer.calibration_percent)
        return trainer.run(run, ds, resume=resume, export=export, stop_after=stop_after)
    finally:
        torch.set_num_threads(threads)
        close_world(world)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:16]


def group_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    """{"backbone": lr, "head": lr}, the current learning rates."""
    return {g["name"]: g["lr"] for g in opt.param_groups}


def check_same_run(saved: dict, now: dict) -> None:
    """Refuse to resume a checkpoint whose fingerprint (`saved`) differs from this run's (`now`),
    naming what differs (each fine-tuning setting by name)."""
    if saved != now:
        keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if "finetune" in keys:  # each setting by name, beside the other differences
            a, b = saved.get("finetune", {}), now.get("finetune", {})
            keys = [k for k in keys if k != "finetune"] + [
                f"finetune.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise PetalError("resume: the checkpoint was made with other settings or data ("
                         + ", ".join(keys) + " differ); use the same options, or a new --out")


def epoch_line(logs: dict, epochs: int, best_epoch: int) -> str:
    line = (f"epoch {logs['epoch']}/{epochs}: train loss {logs['train_loss']:.4f} "
            f"accuracy {logs['train_accuracy']:.4f}")
    if "eval_accuracy" in logs:
        line += f" | eval loss {logs['eval_loss']:.4f} accuracy {logs['eval_accuracy']:.4f}"
    return line + f" | best epoch {best_epoch} | {logs['seconds']:.0f}s"


class Evaluator:
    """Eval-split logits for the current top. The frozen trunk's output on the
    (never augmented) eval images is computed once and kept, when it fits."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, trunk, device: torch.device, cache: bool = True):
        self.pixels, self.labels, self.trunk, self.device = pixels, labels, trunk, device
        self.cache = cache
        self.acts: list[torch.Tensor] | None = None

    def activations(self):
        if self.acts is not None:
            yield from self.acts
            return
        acts, size = [], 0
        for i in range(0, len(self.pixels), EVAL_BATCH):
            h = self.trunk(torch.from_numpy(np.array(self.pixels[i:i + EVAL_BATCH]))).to(self.device)  # copy
            size += h.numel() * h.element_size()
            acts.append(h)
            yield h
        if self.cache and size <= EVAL_CACHE_BYTES:
            self.acts = acts

    @torch.no_grad()
    def logits(self, top: torch.nn.Module, autocast) -> torch.Tensor:
        """(M, C) float32 logits on the CPU; `top` must be in eval mode."""
        out = []
        for h in self.activations():
            with autocast():
                out.append(top(h).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def scores(self, model: FineTuneNet, autocast) -> dict:
        """{"eval_loss", "eval_accuracy"} of the model as it is now (plain cross-entropy)."""
        model.eval()
        logits = self.logits(model.top, autocast)
        y = torch.from_numpy(self.labels)
        return {"eval_loss": float(F.cross_entropy(logits, y)),
                "eval_accuracy": float((logits.argmax(1) == y).float().mean())}


@dataclass
class TrainState:
    """Everything one fine-tuning run changes as it trains, in one record."""

    model: FineTuneNet
    top: torch.nn.Module  # model.top, wrapped for data-parallel training when there are several processes
    trunk: Any  # the frozen layers: OnnxTrunk or TorchTrunk
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: EpochBatches
    loader: Any = None  # torch DataLoader of (activations or images, labels)
    evaluator: Evaluator | None = None
    history: list[dict] = field(default_factory=list)  # one dict per finished epoch
    best: dict = field(default_factory=lambda: {"epoch": 0, "accuracy": -1.0, "loss": math.inf})

    def load(self, ckpt: dict) -> None:
        """Continue from a last.pt checkpoint."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.history, self.best = ckpt["history"], ckpt["best"]


class Trainer:
    """One fine-tuning run as its spec says, in this process (one of several under torchrun)."""

    def __init__(self, spec: RunSpec, world: World, reporter: Reporter | None):
        self.spec, self.c, self.world = spec, spec.trainer, world
        self.cfg, self.cache_dir = get_backbone(spec.backbone), spec.cache
        self.reporter = reporter or Reporter()
        self.amp_dtype = None
        if world.device.type == "cuda" and self.c.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    # ------------------------------------------------------------------ data

    def pixel_files(self, run: Run, ds: Dataset) -> dict[str, PixelFile]:
        """Decode every image once (one process per machine does it; the others wait).
        Training images in the augmentation view, the others as served."""
        pre = self.cfg.preprocess
        views = [(split, run.pixels_dir / f"{split}.u8", [e.uri for e in ds.split(split)],
                  train_view(pre, self.c.augment.enabled) if split == TRAIN else pre) for split in SPLITS]
        if self.world.local_rank == 0:
            with self.reporter.progress("decoding images", len(ds.examples)) as advance:
                files = {split: build_pixel_file(p, uris, view, workers=self.c.decode_workers, on_progress=advance)
                         for split, p, uris, view in views}
        self.world.barrier()
        if self.world.local_rank != 0:
            files = {split: read_pixel_file(p, uris, view.input_size) for split, p, uris, view in views}
            if None in files.values():
                raise PetalError(f"the decoded images in {run.pixels_dir} are missing on this machine")
        return files

    def threads(self) -> tuple[int, int]:
        """(DataLoader workers, PyTorch threads) for this process.

        CPU with the ONNX trunk: half the cores run workers (augmentation + trunk,
        one thread each), the other half plus one train the top (measured on 2
        cores: 1 worker + 2 threads beats 1 + 1 by 1.7x when other programs share
        the CPU). CPU otherwise: one worker augments, every core trains. GPU:
        workers feed it, up to 8.
        """
        per_proc = env_int("OMP_NUM_THREADS", 0, low=0) or max(1, (os.cpu_count() or 1) // self.world.local_size)
        if self.world.device.type == "cuda":
            workers = max(1, min(8, per_proc - 1))
        elif self.runtime == "onnx":
            workers = max(1, per_proc // 2)
        else:
            workers = 1
        workers = workers if self.c.loader_workers is None else self.c.loader_workers
        if self.world.device.type == "cpu" and self.runtime == "onnx":
            return workers, max(1, per_proc - workers + 1)
        return workers, per_proc

    def loader(self, dataset: TrainImages, sampler: EpochBatches, workers: int) -> torch.utils.data.DataLoader:
        # with the ONNX trunk, batches come out of the workers as activations already
        fn = TrunkCollate(self.trunk_path, threads=1) if self.runtime == "onnx" else collate
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=fn,
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
            pin_memory=self.world.device.type == "cuda")

    # ------------------------------------------------------------------ model

    def build_model(self, num_classes: int) -> FineTuneNet:
        """A fresh network to train."""
        torch.manual_seed(self.c.seed)  # the new classifier's (or, from scratch, every layer's) init
        return FineTuneNet(self.cfg, num_classes, unfreeze=self.c.unfreeze, dropout=self.c.dropout,
                           pretrained=self.c.pretrained)

    def choose_runtime(self, model: FineTuneNet) -> None:
        """Where the frozen layers run: self.runtime, and self.trunk_path for ONNX."""
        runtime = self.c.trunk_runtime
        if runtime == "auto":
            cpu = self.world.device.type == "cpu"
            runtime = "onnx" if cpu and model.cut > 0 and model.pretrained else "torch"
        if runtime == "onnx" and not model.pretrained:
            raise PetalError("trunk_runtime: 'onnx' needs pretrained weights; use 'torch' or 'auto'")
        self.runtime, self.trunk_path = runtime, None
        if runtime == "onnx":
            if self.world.local_rank == 0:
                trunk_onnx_path(model, self.cache_dir)  # exported once per machine, kept in the cache
            self.world.barrier()
            self.trunk_path = trunk_onnx_path(model, self.cache_dir)

    def main_trunk(self, model: FineTuneNet, device: torch.device):
        """The frozen layers in this process (eval, and training batches on a GPU)."""
        if self.runtime == "onnx":
            return OnnxTrunk(self.trunk_path, torch.get_num_threads())
        return TorchTrunk(model, device, self.autocast if device.type == "cuda" else contextlib.nullcontext)

    # ------------------------------------------------------------------ the run

    def run(self, run: Run, ds: Dataset, *, resume: bool, export: bool, stop_after: int | None
            ) -> FinetuneResult | None:
        start = time.perf_counter()
        c, world = self.c, self.world
        pr = self.prepare(run, ds, resume=resume)
        st = self.setup(len(pr.ds.classes), pr.pixels[TRAIN], pr.labels[TRAIN], pr.pixels[EVAL], pr.labels[EVAL],
                        pr.checkpoint)
        self.train_epochs(run, st, min(c.epochs, stop_after) if stop_after else c.epochs, pr.fingerprint)
        if not world.main:
            return None
        result = FinetuneResult(run_dir=run.path, model_dir=None, metrics={}, best_epoch=st.best["epoch"],
                                epochs_done=len(st.history), history=st.history,
                                seconds=time.perf_counter() - start, warnings=pr.warnings)
        if len(st.history) < c.epochs:  # stopped early: --resume goes on
            return result
        run.write_history(st.history)
        result.metrics, result.model_dir = self.finish(run, pr, st.best, st.trunk, export)
        shutil.rmtree(run.pixels_dir, ignore_errors=True)  # decoded for this run only
        result.seconds = time.perf_counter() - start
        return result

    def setup(self, num_classes: int, tr_px: PixelFile, y_tr: np.ndarray, ev_px: PixelFile, y_ev: np.ndarray,
              ckpt: dict | None) -> TrainState:
        """Model, frozen trunk, optimiser, schedule and data, resumed from `ckpt` if given.
        (The order matters: each step may draw from the seeded global RNG.)"""
        c, world, device = self.c, self.world, self.world.device
        model = self.build_model(num_classes).to(device)
        if world.size > 1 and device.type == "cuda" and not c.pretrained:
            model.top = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.top)  # statistics over all GPUs
        self.choose_runtime(model)
        workers, threads = self.threads()
        torch.set_num_threads(threads)
        trunk = self.main_trunk(model, device)
        sampler = EpochBatches(len(tr_px.uris), c.batch_size, c.seed, world.rank, world.size)
        total, warmup = c.epochs * len(sampler), round(c.warmup_epochs * len(sampler))
        opt = torch.optim.AdamW(model.param_groups(c.lr, c.lr * c.backbone_lr_mult, c.weight_decay))
        st = TrainState(model, model.top, trunk, opt,
                        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total)),
                        torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16), sampler)
        if ckpt is not None:
            st.load(ckpt)
            self.reporter.message(f"resuming after epoch {ckpt['epoch']} of {c.epochs}")
        if world.all_sum([len(st.history)])[0] != len(st.history) * world.size:
            raise PetalError("resume: not every process found the same checkpoint; on several machines "
                             "--out must be a folder they all share")
        if world.size > 1:
            st.top = torch.nn.parallel.DistributedDataParallel(
                model.top, device_ids=[device.index] if device.type == "cuda" else None)
        st.loader = self.loader(TrainImages(tr_px, y_tr, self.cfg.preprocess, c.augment, c.seed), sampler, workers)
        st.evaluator = Evaluator(ev_px.open(), y_ev, trunk, device) if world.main and len(y_ev) else None
        return st

    def train_epochs(self, run: Run, st: TrainState, last: int, fingerprint: dict) -> None:
        """Epochs len(history) + 1 .. last: train, score, log, checkpoint (on the main process)."""
        c, world, steps = self.c, self.world, len(st.sampler)
        log_ctx = run.tensorboard() if world.main else contextlib.nullcontext(lambda *a: None)
        with log_ctx as log:
            for epoch in range(len(st.history) + 1, last + 1):
                t0 = time.perf_counter()
                st.sampler.set_epoch(epoch)
                batches = iter(st.loader)  # (starting workers draws from the global RNG: before seeding)
                torch.manual_seed(c.seed * 1_000_003 + epoch * 1009 + world.rank)  # dropout masks
                st.model.train()
                with self.reporter.progress(f"epoch {epoch}/{c.epochs}", steps) as advance:
                    logs = self.train_epoch(st, batches, log, (epoch - 1) * steps, advance)
                if st.evaluator is not None:
                    logs.update(st.evaluator.scores(st.model, self.autocast))
                logs = {"epoch": epoch, **logs, "seconds": time.perf_counter() - t0}
                st.history.append(logs)
                if world.main:
                    for k, v in logs.items():
                        if k != "epoch":
                            log(epoch_tag(k), v, epoch)
                    st.best = self.checkpoint(run, st, fingerprint)
                    self.reporter.message(epoch_line(logs, c.epochs, st.best["epoch"]))
                world.barrier()

    def prepare(self, run: Run, ds: Dataset, *, resume: bool) -> Prepared:
        """Find the checkpoint to resume from, decode every image once into the run's pixel files,
        and record the run (split.csv, errors.csv, settings.json)."""
        world = self.world
        fingerprint = {"format": CHECKPOINT_FORMAT, "finetune": self.c.training_dict(), "backbone": self.cfg.name,
                       "classes": ds.classes, "train": digest([e.uri for e in ds.split(TRAIN)]),
                       "eval": digest([e.uri for e in ds.split(EVAL)])}
        ckpt = self.saved_checkpoint(run, fingerprint, resume=resume)  # before any slow work
        run.make()
        pixels = self.pixel_files(run, ds)
        label_of = {e.uri: ds.label_id(e.label) for e in ds.examples}
        labels = {k: np.array([label_of[u] for u in px.uris], np.int64) for k, px in pixels.items()}
        require_training_images(ds.classes, (ds.classes[i] for i in labels[TRAIN]))
        keys = {u: key for px in pixels.values() for u, key in px.keys.items()}
        failed = [f for px in pixels.values() for f in px.failed]
        warnings = record(run, self.spec, ds, keys=keys, failed=failed, reporter=self.reporter,
                          extra={"world_size": world.size}) if world.main else []
        return Prepared(ds, pixels, labels, warnings, fingerprint, ckpt)

    def saved_checkpoint(self, run: Run, fingerprint: dict, *, resume: bool) -> dict | None:
        """The checkpoint to resume from (same settings and data), or None to start afresh."""
        path, overwrite = run.checkpoints / "last.pt", self.spec.overwrite
        if not path.exists() or (overwrite and not resume):
            if resume:
                self.reporter.message(f"warning: no checkpoint in {path.parent}; starting from the beginning")
            elif overwrite and self.world.main:  # --overwrite: nothing of the old run may mix in
                shutil.rmtree(run.checkpoints, ignore_errors=True)
                run.clear()
            self.world.barrier()
            return None
        if not resume:
            raise PetalError(f"out: {run.path} already holds a fine-tuning checkpoint; pass --resume to continue "
                             "it, --overwrite to start again, or choose a new --out")
        ckpt = torch.load(path, map_location=self.world.device, weights_only=True)
        check_same_run(ckpt["settings"], fingerprint)
        return ckpt

    def train_epoch(self, st: TrainState, batches, log, step: int, advance) -> dict:
        """One pass over this process's batches; returns the epoch's train loss/accuracy
        (over all processes) and learning rates."""
        top, trunk, opt, sched, scaler, sampler = st.top, st.trunk, st.opt, st.sched, st.scaler, st.sampler
        ls = self.c.label_smoothing
        # Each process sums its samples' losses; scaled so that DDP's mean over the
        # processes is the mean over the whole global batch, however it was split.
        scale = self.world.size / sampler.global_batch
        totals = [0.0, 0.0, 0.0]  # loss * n, correct, n
        for x, labels in batches:
            # (B, C, H, W) activations of the frozen units, no gradients; the ONNX trunk
            # already ran in the DataLoader worker, the torch one runs here
            h = x if self.runtime == "onnx" else trunk(x)
            labels = labels.to(self.world.device, non_blocking=True)
            with self.autocast():
                logits = top(h.to(self.world.device, non_blocking=True))
            loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=ls, reduction="sum")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss_sum * scale).backward()
            scaler.step(opt)
            scaler.update()
            lrs = group_lrs(opt)
            sched.step()
            n, loss, correct = len(labels), loss_sum.item() / len(labels), int((logits.argmax(1) == labels).sum())
            totals = [totals[0] + loss * n, totals[1] + correct, totals[2] + n]
            step += 1
            log("step/loss", loss, step)
            log("step/accuracy", correct / n, step)
            for name, lr in lrs.items():
                log(f"step/lr_{name}", lr, step)
            advance(1)
        loss_sum, correct, n = self.world.all_sum(totals)
        return {"train_loss": loss_sum / max(n, 1), "train_accuracy": correct / max(n, 1),
                **{f"lr_{k}": v for k, v in group_lrs(opt).items()}}

    # ------------------------------------------------------------------ files

    def checkpoint(self, run: Run, st: TrainState, fingerprint: dict) -> dict:
        """Write best.pt if this epoch is the best so far, then last.pt; both atomically.

        Best: higher eval accuracy, then lower eval loss; without an eval split, the last.
        """
        model, history, best = st.model, st.history, st.best
        logs, folder = history[-1], run.checkpoints
        acc, loss = logs.get("eval_accuracy", 0.0), logs.get("eval_loss", 0.0)
        if "eval_accuracy" not in logs or (acc, -loss) > (best["accuracy"], -best["loss"]):
            best = {"epoch": logs["epoch"], "accuracy": acc, "loss": loss}
            with atomic_path(folder / "best.pt") as tmp:
                torch.save({"epoch": logs["epoch"], "model": model.state_dict()}, tmp)
        state = {"format": CHECKPOINT_FORMAT, "settings": fingerprint, "epoch": logs["epoch"],
                 "model": model.state_dict(), "optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict(),
                 "scaler": st.scaler.state_dict(), "history": history, "best": best}
        with atomic_path(folder / "last.pt") as tmp:
            torch.save(state, tmp)
        return best

    def finish(self, run: Run, pr: Prepared, best: dict, trunk, export: bool) -> tuple[dict, Path | None]:
        """Evaluate the best epoch on the CPU in float32, calibrated; audit and report it as every
        run is (petal.runs.common.finish); export it."""
        classes = pr.ds.classes
        model = best_model(run, self.cfg, self.c, len(classes))
        cpu_trunk = trunk if self.runtime == "onnx" else TorchTrunk(model, torch.device("cpu"), contextlib.nullcontext)
        predictor = Predictor(model, cpu_trunk)
        outputs = self.outputs(predictor, pr)
        self.calibrate(run, predictor, pr, outputs)
        metrics = finish(run, classes, self.ending(predictor, pr, outputs, best["epoch"]), self.reporter)
        model_dir = None
        if export:
            parity = parity_images(eval_uris=pr.pixels[EVAL].uris, train_uris=pr.pixels[TRAIN].uris,
                                   reporter=self.reporter, what=f" epoch {best['epoch']}")
            model_dir = export_model(run.model_dir, predictor, classes=classes, parity_uris=parity, metrics=metrics,
                                     training=training_record(self.c, best["epoch"], run))
        return metrics, model_dir

    def outputs(self, predictor: Predictor, pr: Prepared) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each split's (N, D) features and (N, C) logits under the best epoch's weights (training
        images on the served view)."""
        out = {}
        with self.reporter.progress("scoring the best epoch", len(SPLITS)) as advance:
            for split in SPLITS:
                out[split] = predictor.features_logits(pr.pixels[split].open())
                advance(1)
        return out

    def calibrate(self, run: Run, predictor: Predictor, pr: Prepared, outputs: dict) -> None:
        """The temperature and the unknown detector from the calibration images, the detector's
        bank from the training images; both set on the predictor and saved in the run."""
        (cal_features, cal_logits), y_cal = outputs[CALIBRATION], pr.labels[CALIBRATION]
        if len(y_cal) < MIN_CALIBRATION:
            self.reporter.message(f"warning: fewer than {MIN_CALIBRATION} calibration images (--calibration-percent "
                                  f"{self.c.calibration_percent:g}): confidences are not calibrated and nothing is "
                                  "called unknown")
            return
        with self.reporter.progress("calibrating", 1) as advance:
            predictor.temperature, _ = choose_temperature(cal_logits, y_cal)  # identity unless it wins out of fold
            predictor.unknown = KnnUnknown.fit_held_out(outputs[TRAIN][0], pr.labels[TRAIN], cal_features,
                                                        softmax(cal_logits, predictor.temperature),
                                                        keep=self.spec.keep, seed=self.c.seed)
            advance(1)
        run.write_calibration(predictor.temperature)
        run.write_unknown(predictor.unknown)

    def ending(self, predictor: Predictor, pr: Prepared, outputs: dict, best_epoch: int) -> Ending:
        """What `finish` writes up: the fine-tuned features of every image (for the audit), the
        eval and test splits scored, the calibration and the unknown threshold."""
        def scored(split: str) -> Scored:
            features, logits = outputs[split]
            return Scored(pr.pixels[split].uris, pr.labels[split], predictor.scores(features, logits), logits)

        u = predictor.unknown
        return Ending(tuned_features(pr, outputs), scored(EVAL), scored(TEST) if len(pr.labels[TEST]) else None,
                      temperature=predictor.temperature, keep=self.spec.keep if u else None,
                      threshold=u.threshold if u else None,
                      extra={"num_train": len(pr.pixels[TRAIN].uris), "best_epoch": best_epoch},
                      no_eval_note=", the last epoch is exported")


def tuned_features(pr: Prepared, outputs: dict) -> Features:
    """Every decoded image's features under the fine-tuned model, split by split, as the audit reads
    them. The calibration images count as training images there (they were set aside from them):
    the same photo in both is no train/eval leak."""
    by_uri = {e.uri: replace(e, split=TRAIN) if e.split == CALIBRATION else e for e in pr.ds.examples}
    examples, bounds = [], {}
    for split in SPLITS:
        bounds[split] = slice(len(examples), len(examples) + len(pr.pixels[split].uris))
        examples += [by_uri[u] for u in pr.pixels[split].uris]
    return Features(examples=examples, X=np.concatenate([outputs[s][0] for s in SPLITS]),
                    y=np.concatenate([pr.labels[s] for s in SPLITS]),
                    keys=[pr.pixels[s].keys[u] for s in SPLITS for u in pr.pixels[s].uris], bounds=bounds)


def training_record(config: FinetuneConfig, best_epoch: int | None, run: Run) -> dict:
    """How a fine-tuned bundle was trained, for its petal.json (with the digest of its
    training images, for `petal evaluate`'s overlap warning)."""
    return {"kind": FINETUNE, FINETUNE: config.to_dict(), "best_epoch": best_epoch,
            TRAIN_KEYS: train_keys_digest(run.train_keys())}


def best_model(run: Run, cfg: BackboneConfig, config: FinetuneConfig, num_classes: int) -> FineTuneNet:
    """The best epoch's weights (RUN/checkpoints/best.pt), on the CPU, in eval mode."""
    state = run.read(lambda: torch.load(run.checkpoints / "best.pt", map_location="cpu", weights_only=True))
    model = FineTuneNet(cfg, num_classes, unfreeze=config.unfreeze, dropout=config.dropout,
                        pretrained=config.pretrained)
    model.load_state_dict(state["model"])
    return model.eval()


def export_finetuned(run: Run, settings: RunSettings) -> Path:
    """`petal export RUN` for a fine-tuning run: its best epoch, parity-checked against
    the same network in PyTorch. (No feature cache is needed: the whole network is exported.)"""
    config = settings.spec.trainer
    model = best_model(run, get_backbone(settings.spec.backbone), config, len(settings.classes))
    metrics = run.metrics()
    predictor = Predictor(model, TorchTrunk(model, torch.device("cpu"), contextlib.nullcontext),
                          run.temperature(), run.unknown())
    return export_model(run.model_dir, predictor, classes=settings.classes, parity_uris=run.parity_uris(),
                        metrics=metrics, training=training_record(config, metrics.get("best_epoch"), run))
