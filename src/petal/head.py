"""The classifier head trained on cached embeddings, as a scikit-learn style estimator.

    head = HeadClassifier(hidden=1024).fit(X_train, y_train, eval_set=(X_eval, y_eval))
    probs = head.predict_proba(X)           # (N, C)

Default: one hidden dense layer with ReLU and dropout, then softmax (the Cloud ML
flowers head); `hidden=0` is a linear head. Deterministic for a fixed seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from petal.errors import PetalError
from petal.params import Int, OneOf, Real, Rule, Validated

if TYPE_CHECKING:
    import onnx
    from torch import nn


PARALLEL_ROWS = 50_000  # training images from which the head trains on every core
PREDICT_ROWS = 8192  # embeddings per inference batch


def as_features(X: np.ndarray) -> np.ndarray:
    """Embeddings as float16 or float32 (others become float32), not copied when already so."""
    X = np.asarray(X)
    return X if X.dtype in (np.float16, np.float32) else X.astype(np.float32)


DEFAULT_EPOCHS = 15
EXAMPLES_PER_RUN = 2_500_000  # past 166k training images, the default epochs shrink to see about this many


def auto_epochs(n: int) -> int:
    """The default passes over `n` training images: 15, fewer past 166k so that a run sees about
    2.5M examples (at least 2). A head on fixed features has long converged by then; 15 epochs of
    a million images would take an hour on 2 cores."""
    return max(2, min(DEFAULT_EPOCHS, round(EXAMPLES_PER_RUN / max(n, 1))))


@dataclass
class HeadClassifier(Validated):
    """Dense head on embeddings: fit / predict / predict_proba, parameters checked by PARAMS."""

    PARAMS: ClassVar[dict[str, Rule]] = {
        "hidden": Int(0),
        "dropout": Real(0, 1, high_open=True),
        "epochs": Int(1, none_ok=True),
        "lr": Real(0, low_open=True),
        "batch_size": Int(1),
        "weight_decay": Real(0),
        "label_smoothing": Real(0, 1, high_open=True),
        "class_weight": OneOf(None, "balanced"),
        "seed": Int(0),
        "compute": OneOf("auto", "float32", "bfloat16"),
    }

    hidden: int = 1024
    dropout: float = 0.5
    epochs: int | None = None  # None: auto_epochs(training images), 15 up to 166k of them
    lr: float = 3e-3
    batch_size: int = 256
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    class_weight: str | None = None  # None or "balanced"
    compute: str = "auto"  # training products: "float32", "bfloat16", or "auto" (compute_dtype)
    seed: int = 0
    temperature_: float = field(default=1.0, init=False, repr=False)  # fitted by calibrate()
    calibration_: dict | None = field(default=None, init=False, repr=False)  # how calibrate() chose it

    def for_data(self, n: int) -> HeadClassifier:
        """This head with its epochs fixed for `n` training images (auto_epochs where not set)."""
        return self if self.epochs is not None else replace(self, epochs=auto_epochs(n))

    def get_params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    # ------------------------------------------------------------------ training

    def _module(self, dim: int, num_classes: int) -> nn.Sequential:
        from torch import nn

        if self.hidden == 0:
            return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(dim, num_classes))
        return nn.Sequential(
            nn.Linear(dim, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
            nn.Linear(self.hidden, num_classes),
        )

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        num_classes: int | None = None,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
        on_batch: Callable[[int], None] = lambda n: None,
    ) -> HeadClassifier:
        """X: (N, D) float embeddings (float16 is kept as is, each batch computed in float32),
        y: (N,) int class ids. `on_epoch(epoch, logs)` per epoch, `on_batch(n)` per step of n."""
        import torch

        self.validate()  # attributes may have been set since construction
        # One thread on small data: the head is small, and torch's spinning threads slow to
        # a crawl when decode or serving share the cores. Past PARALLEL_ROWS every core.
        threads = torch.get_num_threads()
        torch.set_num_threads(threads if len(X) >= PARALLEL_ROWS else 1)
        try:
            return self._fit(X, y, num_classes, eval_set, on_epoch, on_batch)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, X: np.ndarray, y: np.ndarray, num_classes: int | None,
             eval_set: tuple[np.ndarray, np.ndarray] | None,
             on_epoch: Callable[[int, dict], None] | None, on_batch: Callable[[int], None]) -> HeadClassifier:
        import torch

        X = as_features(X)
        y = np.asarray(y, dtype=np.int64)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise PetalError(f"X, y: expected (N, D) and (N,) with N > 0, got {X.shape} and {y.shape}")
        self.num_classes_ = int(num_classes or y.max() + 1)
        if y.min() < 0 or y.max() >= self.num_classes_:
            raise PetalError(f"y: expected class ids in [0, {self.num_classes_}), got {y.min()}..{y.max()}")
        self.feature_dim_ = X.shape[1]

        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        net = self._module(self.feature_dim_, self.num_classes_)
        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(y, minlength=self.num_classes_).astype(np.float32)
            weight = torch.from_numpy(len(y) / (self.num_classes_ * np.maximum(counts, 1)))
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps_per_epoch = -(-len(X) // self.batch_size)
        epochs = self.epochs or auto_epochs(len(X))
        total = epochs * steps_per_epoch
        # warm up over 10% of the steps; torch's OneCycleLR divides by zero when that is exactly
        # one step (10 steps in all: e.g. 10 epochs of one batch, as in a small fold)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=total, pct_start=0.2 if total == 10 else 0.1
        )
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        self.history_ = []
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            order = torch.randperm(len(X), generator=gen)
            logs = self._epoch(net, opt, sched, (Xt, yt), order, weight, on_batch)
            self.net_ = net.eval()
            if eval_set is not None and len(eval_set[0]):
                logs.update(self._eval_logs(*eval_set))
            logs["seconds"] = time.perf_counter() - started
            self.history_.append(logs)
            if on_epoch:
                on_epoch(epoch, logs)
        self.net_ = net.eval()
        return self

    def _epoch(self, net: nn.Module, opt, sched, data: tuple, order, weight, on_batch: Callable[[int], None]) -> dict:
        """One pass over the training data (Xt (N, D), yt (N,) tensors) in `order`; its loss and accuracy.
        Each batch is computed in float32, or with bfloat16 matrix products (compute_dtype)."""
        import torch
        import torch.nn.functional as F

        Xt, yt = data
        net.train()
        total, correct = 0.0, 0
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.compute_dtype(len(order)) == "bfloat16"):
                logits = net(Xt[idx].float())  # (B, C)
            loss = F.cross_entropy(logits.float(), yt[idx], weight=weight, label_smoothing=self.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
            on_batch(len(idx))
        return {"train_loss": total / len(order), "train_accuracy": correct / len(order)}

    def compute_dtype(self, rows: int) -> str:
        """The training products' dtype: `compute`, or for "auto" bfloat16 from PARALLEL_ROWS
        training rows on (2.4x faster on a CPU with AVX512-BF16; weights and inference stay float32)."""
        if self.compute != "auto":
            return self.compute
        return "bfloat16" if rows >= PARALLEL_ROWS else "float32"

    def _eval_logs(self, X: np.ndarray, y: np.ndarray) -> dict:
        p = self.predict_proba(X)
        y = np.asarray(y)
        loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
        return {"eval_loss": loss, "eval_accuracy": float((p.argmax(1) == y).mean())}

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise PetalError("this HeadClassifier is not fitted yet: call fit() or from_state()")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, C) logits, before any temperature; in float32 batches
        of PREDICT_ROWS, so that float16 features are never converted whole."""
        return np.concatenate(list(self._logit_batches(X)) or [np.zeros((0, self.num_classes_), np.float32)])

    def _logit_batches(self, X: np.ndarray) -> Iterator[np.ndarray]:
        import torch

        self._check_fitted()
        X = as_features(X)
        with torch.no_grad():
            for i in range(0, len(X), PREDICT_ROWS):
                yield self.net_(torch.from_numpy(np.asarray(X[i:i + PREDICT_ROWS], np.float32))).numpy()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, C) probabilities, calibrated once `calibrate` has run."""
        from petal.calibration import softmax

        return softmax(self.decision_function(X), self.temperature_)

    def calibrate(self, X: np.ndarray, y: np.ndarray, folds: int = 5,
                  on_fold: Callable[[int], None] = lambda n: None) -> HeadClassifier:
        """Fit `temperature_` on out-of-fold logits of heads with these parameters, trained
        on the other folds of (X, y): held-out predictions without touching any eval data.
        The temperature is kept only where it beats the identity out of fold
        (calibration.choose_temperature); `calibration_` records how it was chosen."""
        from petal.calibration import choose_temperature, out_of_fold_logits, softmax

        self._check_fitted()
        params, c = self.get_params(), self.num_classes_

        def fit_logits(X_fit: np.ndarray, y_fit: np.ndarray, X_held: np.ndarray) -> np.ndarray:
            return HeadClassifier(**params).fit(X_fit, y_fit, num_classes=c).decision_function(X_held)

        y = np.asarray(y)
        if np.bincount(y).max() < 2:  # one image per class: no fold can hold one out; nothing to fit on
            self.temperature_, self.oof_proba_ = 1.0, None
            return self
        oof = out_of_fold_logits(fit_logits, X, y, folds, self.seed, on_fold)  # (N, C)
        self.temperature_, self.calibration_ = choose_temperature(oof, y, folds, self.seed)
        self.oof_proba_ = softmax(oof, self.temperature_)  # held-out probabilities of the training images
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) class ids; batch by batch, never holding (N, C) (the temperature keeps the argmax)."""
        return np.concatenate([z.argmax(1) for z in self._logit_batches(X)] or [np.zeros(0, np.int64)])

    # ------------------------------------------------------------------ persistence

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Dense layers as (W: (in, out), b: (out,)), input to output."""
        from torch import nn

        self._check_fitted()
        return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                for m in self.net_ if isinstance(m, nn.Linear)]

    def to_onnx(self) -> onnx.ModelProto:
        """features (N, D) -> calibrated probabilities (N, C)."""
        from petal.onnx_graphs import head_graph

        return head_graph(self.layers(), self.feature_dim_, self.temperature_)

    def state(self) -> dict[str, np.ndarray]:
        out = {"temperature": np.float64(self.temperature_)}
        for i, (w, b) in enumerate(self.layers()):
            out[f"w{i}"], out[f"b{i}"] = w, b
        return out

    @classmethod
    def from_state(cls, params: dict, state: dict[str, np.ndarray]) -> HeadClassifier:
        import torch

        head = cls(**params)
        head.temperature_ = float(state.get("temperature", 1.0))  # head.npz of petal 0.1 has none
        layers = sum(1 for k in state if k.startswith("w"))
        w0 = state["w0"]
        last = state[f"w{layers - 1}"]
        head.feature_dim_, head.num_classes_ = w0.shape[0], last.shape[1]
        net = head._module(head.feature_dim_, head.num_classes_)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for i, m in enumerate(linears):
                m.weight.copy_(torch.from_numpy(state[f"w{i}"].T))
                m.bias.copy_(torch.from_numpy(state[f"b{i}"]))
        head.net_ = net.eval()
        return head
