"""Know when it doesn't know: an out-of-distribution score on backbone embeddings.

A softmax always picks a known class (a cat comes out as "tulips 0.97"); the distance
to what the model was trained on does not. Two signals, each standardised by its
mean and spread on held-out images of the known classes, are added:

    knn  = 1 - cos(x, its k-th nearest training embedding)   far from every known image
    msp  = 1 - max calibrated class probability               between known classes
    ood_score = (knn - mu_knn) / sd_knn + w * (msp - mu_msp) / sd_msp

On tf_flowers with Lite0, kNN alone separates flowers from photos of other domains
at an AUROC of 0.998 (the top softmax probability alone: 0.86); adding msp with
w = 0.5 lifts held-out flower classes ("near unknowns") from 0.76 to about 0.82 while
keeping 0.99 on other domains (benchmarks/trust_flowers.py).

The training embeddings, L2-normalised, are the bank the score searches. It is stored
in the bundle graph as float16 and capped at `BANK_CAP` rows by a per-class stratified
sample, so a large training set costs at most BANK_CAP x D x 2 bytes (51 MB at 1280-D)
and one (1, D) x (D, M) product per image. Held-out scores of known images decide the
statistics and the threshold (the `keep` quantile): leave-one-out kNN for the bank's
own rows, and out-of-fold probabilities (from calibration) for msp. Neither the eval
split nor an image's own label decides them.

    u = KnnUnknown.fit(X_train, y_train, held_out_probs=oof_probs, keep=0.95)
    u.score(X, probs)                 # (N,) ood scores; > u.threshold: unknown
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

K = 5  # the k-th neighbour: robust to a few near-duplicates, still local
MSP_WEIGHT = 0.5
MIN_SPREAD = 0.01
BANK_CAP = 20_000
DEFAULT_KEEP = 0.95
REDUCED_DIMS = 256  # principal axes of the int8 bundle's bank (ReducedBank; measured in docs/trust.md)
CHUNK = 2048  # query rows per matrix product: bounds the (rows, M) similarity block


def normalize(X: np.ndarray) -> np.ndarray:
    """(N, D) -> rows of unit length (float32)."""
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def kth_similarity(queries: np.ndarray, bank: np.ndarray | ReducedBank, k: int) -> np.ndarray:
    """(N, D) unit rows and a bank of (M, D) unit rows (or its ReducedBank) -> (N,) cosine of
    each query's k-th most similar bank row."""
    k = min(k, len(bank))
    out = np.empty(len(queries), np.float32)
    for i in range(0, len(queries), CHUNK):
        q = queries[i:i + CHUNK]
        sims = bank.similarities(q) if isinstance(bank, ReducedBank) else q @ bank.T  # (rows, M)
        out[i:i + CHUNK] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return out


@dataclass
class ReducedBank:
    """The bank's cosines from fewer numbers: each unit row b as its coordinates on the top d
    principal axes P (D, d) of the bank around its mean mu, so that

        q . b = (q - mu) . (b - mu) + q . mu + (b . mu - mu . mu)
              ~ [q P - mu P, q . mu] . [(b - mu) P, 1] + offset_b

    exactly but for the (b - mu) residual off those axes. As arrays: basis (D, d + 1) = [P, mu],
    shift (d + 1,) = [mu P, 0], coords (M, d + 1) = [(b - mu) P, 1], offsets (M,). The int8
    bundle stores this instead of the (M, D) bank (docs/trust.md has what it costs)."""

    basis: np.ndarray
    shift: np.ndarray
    coords: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, bank: np.ndarray, dims: int) -> ReducedBank:
        """The (M, D) unit-row bank on its top `dims` principal axes."""
        mu = bank.mean(0)
        centered = bank - mu
        _, _, vt = np.linalg.svd(centered, full_matrices=False)  # rows of vt: the axes, largest first
        p = vt[:dims].T.astype(np.float32)  # (D, d)
        return cls(np.c_[p, mu].astype(np.float32), np.r_[mu @ p, 0.0].astype(np.float32),
                   np.c_[centered @ p, np.ones(len(bank))].astype(np.float32),
                   (bank @ mu - mu @ mu).astype(np.float32))

    def __len__(self) -> int:
        return len(self.coords)

    def similarities(self, queries: np.ndarray) -> np.ndarray:
        """(N, D) unit rows -> (N, M) approximate cosines to the bank's rows."""
        return (queries @ self.basis - self.shift) @ self.coords.T + self.offsets


def capped_sample(y: np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Indices of at most `cap` rows, each class keeping its share (at least one row)."""
    y = np.asarray(y)
    if len(y) <= cap:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        n = max(1, int(round(cap * len(rows) / len(y))))
        keep.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


@dataclass
class KnnUnknown:
    bank: np.ndarray  # (M, D) float32 unit rows, rounded through float16 as the graph stores them
    threshold: float  # ood_score above this: unknown
    knn_stats: tuple[float, float]  # (mean, std) of held-out kNN distances of known images
    msp_stats: tuple[float, float] = (0.0, 1.0)  # (mean, std) of held-out 1 - max probability
    msp_weight: float = 0.0  # w; 0 when no held-out probabilities were given
    k: int = K
    keep: float = DEFAULT_KEEP  # the share of known images the threshold was chosen to keep
    left_out: int = 0  # training images kept out of the bank and its statistics (audit outliers, label suspects)
    reduced: ReducedBank | None = None  # set by `reduce`: the bank the scores are computed with instead

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, held_out_probs: np.ndarray | None = None, *,
            keep: float = DEFAULT_KEEP, k: int = K, msp_weight: float = MSP_WEIGHT, cap: int = BANK_CAP,
            seed: int = 0, leave_out: np.ndarray | None = None) -> KnnUnknown:
        """From training embeddings X (N, D), class ids y (N,) and, optionally, held-out
        (out-of-fold) probabilities (N, C) of the same images; kNN held out by leave-one-out.
        `leave_out` (N,) bool: images kept out of the bank and of its statistics (the audit's
        outliers and strong label suspects: a shop sign filed under roses would accept shop
        signs as roses). They still count, scored against the bank, for the threshold: it
        keeps `keep` of the known images as they come, odd ones included."""
        clean = np.ones(len(X), bool) if leave_out is None or leave_out.all() else ~leave_out
        Xn, ids = normalize(X), np.flatnonzero(clean)
        rows = ids[capped_sample(np.asarray(y)[clean], cap, seed)]
        bank = Xn[rows].astype(np.float16).astype(np.float32)
        k = max(1, min(k, len(bank) - 1))  # a tiny bank: the k-th of the others must exist
        held = np.ones(len(Xn), bool)
        held[rows] = False
        knn = np.empty(len(Xn), np.float32)  # bank rows: their (k+1)-th neighbour is the k-th among the others
        knn[rows] = 1 - kth_similarity(Xn[rows], bank, k + 1)
        knn[held] = 1 - kth_similarity(Xn[held], bank, k)
        u = cls.from_held_out(bank, knn, held_out_probs, keep, k, msp_weight, clean)
        u.left_out = int((~clean).sum())
        return u

    @classmethod
    def fit_held_out(cls, X: np.ndarray, y: np.ndarray, X_held: np.ndarray, held_probs: np.ndarray, *,
                     keep: float = DEFAULT_KEEP, k: int = K, msp_weight: float = MSP_WEIGHT,
                     cap: int = BANK_CAP, seed: int = 0) -> KnnUnknown:
        """The bank from training embeddings X (N, D) with ids y; statistics and threshold
        from other images of the known classes, X_held (M, D) with their probabilities (M, C)."""
        bank = normalize(X)[capped_sample(y, cap, seed)].astype(np.float16).astype(np.float32)
        k = min(k, len(bank))
        knn = 1 - kth_similarity(normalize(X_held), bank, k)
        return cls.from_held_out(bank, knn, held_probs, keep, k, msp_weight)

    @classmethod
    def from_held_out(cls, bank: np.ndarray, knn: np.ndarray, probs: np.ndarray | None, keep: float, k: int,
                      msp_weight: float, stats_rows: np.ndarray | None = None) -> KnnUnknown:
        """Statistics (from the `stats_rows` (N,) bool, default all) and the `keep` threshold
        (from all) of held-out kNN distances (N,) and probabilities (N, C)."""
        rows = slice(None) if stats_rows is None else stats_rows
        u = cls(bank, 0.0, spread(knn[rows]), k=k, keep=keep)
        if probs is not None and msp_weight > 0:
            u.msp_stats, u.msp_weight = spread(1 - probs[rows].max(1)), msp_weight
        u.threshold = float(np.quantile(u.combine(knn, probs), keep))
        return u

    def combine(self, knn: np.ndarray, probs: np.ndarray | None) -> np.ndarray:
        """(N,) kNN distances and (N, C) probabilities -> (N,) ood scores."""
        score = (knn - self.knn_stats[0]) / self.knn_stats[1]
        if self.msp_weight and probs is not None:
            score = score + self.msp_weight * ((1 - probs.max(1)) - self.msp_stats[0]) / self.msp_stats[1]
        return score.astype(np.float32)

    def score(self, X: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
        """(N, D) embeddings and their (N, C) calibrated probabilities -> (N,) ood scores,
        as the bundle graph computes them. Normalized a CHUNK of rows at a time."""
        bank = self.bank if self.reduced is None else self.reduced
        knn = [1 - kth_similarity(normalize(X[i:i + CHUNK]), bank, self.k) for i in range(0, len(X), CHUNK)]
        return self.combine(np.concatenate(knn) if knn else np.zeros(0, np.float32), probs)

    def to_dict(self) -> dict:
        """The bundle's `unknown` record (petal.json)."""
        return {"score": "knn_cosine+max_softmax", "k": self.k, "bank_size": int(len(self.bank)),
                "knn_stats": list(self.knn_stats), "msp_stats": list(self.msp_stats),
                "msp_weight": self.msp_weight, "threshold": self.threshold, "keep": self.keep,
                "left_out": self.left_out,
                **({"bank_dims": int(self.reduced.coords.shape[1] - 1)} if self.reduced else {})}

    def reduce(self, dims: int = REDUCED_DIMS) -> KnnUnknown:
        """This detector with its bank on `dims` principal axes (ReducedBank): the same
        statistics and threshold, scores within float noise of the full bank's where the
        residual is small; the bank costs (M + D) x (dims + 1) numbers instead of M x D."""
        m, d = self.bank.shape
        if (m + d) * (min(dims, m) + 1) >= m * d:  # a small bank: its axes would cost more than its rows
            return self
        return replace(self, reduced=ReducedBank.of(self.bank, dims))

    def state(self) -> dict[str, np.ndarray]:
        scalars = {k: v for k, v in self.to_dict().items() if k not in ("score", "bank_size", "bank_dims")}
        return {"bank": self.bank.astype(np.float16), **{k: np.asarray(v) for k, v in scalars.items()}}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> KnnUnknown:
        return cls(state["bank"].astype(np.float32), float(state["threshold"]),
                   tuple(map(float, state["knn_stats"])), tuple(map(float, state["msp_stats"])),
                   float(state["msp_weight"]), int(state["k"]), float(state["keep"]),
                   int(state["left_out"]) if "left_out" in state else 0)  # unknown.npz before petal had left_out


def spread(values: np.ndarray) -> tuple[float, float]:
    """(mean, std), the std at least 0.01: on easy data the held-out scores barely vary, and
    dividing by a tiny spread would turn float rounding (1e-6) into score differences."""
    return float(np.mean(values)), float(max(np.std(values), MIN_SPREAD))


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown > score of a known): 1.0 separates them perfectly."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The share of unknowns accepted at the threshold that keeps `tpr` of the knowns."""
    return float((unknown <= np.quantile(known, tpr)).mean())


def coverage_curve(path: Path, ood: np.ndarray, right: np.ndarray, threshold: float) -> None:
    """A PNG of accuracy on the images kept against the share kept, as the threshold moves
    over the known images' (N,) ood scores; `right`: (N,) top-1 correct; the shipped
    threshold is marked."""
    from petal.metrics import new_axes, save_png

    order = np.argsort(ood, kind="stable")  # most known-like first: keeping the first n of them
    n = np.arange(1, len(ood) + 1)
    coverage, accuracy = n / len(ood), np.cumsum(right[order]) / n
    fig, ax = new_axes(5, 4)
    ax.plot(coverage, accuracy, label="accuracy on kept images")
    kept = ood <= threshold
    if kept.any():
        ax.scatter([kept.mean()], [right[kept].mean()], color="C3", zorder=3,
                   label=f"shipped threshold: {kept.mean():.1%} kept")
    ax.set_xlabel("share of known images kept")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower left")
    ax.set_title("coverage vs accuracy")
    save_png(fig, path)
