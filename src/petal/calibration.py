"""Confidences that mean what they say: temperature scaling, fitted out of fold.

petal's default head is underconfident (label smoothing and dropout): on tf_flowers
its top softmax probability says 0.8 where it is right 0.9 of the time. One
temperature T, applied as softmax(logits / T), fixes most of that. T is fitted on
predictions the model did not train on and that are not the reported eval split:
out-of-fold logits on the training split, from K heads each trained on the other
folds (seconds on cached embeddings).

    T, record = choose_temperature(oof_logits, y)   # oof_logits: (N, C), y: (N,); T = 1.0: identity kept
    expected_calibration_error(probs, y)             # 15 equal-width confidence bins
    adaptive_ece(probs, y), ece_interval(probs, y)   # 15 equal-mass bins, and its bootstrap 95% interval

The calibrator is chosen out of fold too: the out-of-fold logits are split again, each
candidate (identity, temperature, and vector scaling for the record) is fitted on the
other parts and scored on the held part. The temperature is kept only when it lowers both
the NLL and the adaptive ECE of the identity there: calibration never makes things worse
where it can be measured. Vector scaling (a scale and a bias per class) is measured and
recorded, not shipped: on tf_flowers it loses to one temperature out of fold (docs/trust.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ECE_BINS = 15
FOLDS = 5
T_SEARCH = (1e-3, 1e3)  # where the temperature is looked for; the real lower bound is confidence_ceiling's
BOOTSTRAP = 1000  # resamples of the eval split for the ECE interval (fewer past BOOTSTRAP_ROWS images)
BOOTSTRAP_ROWS = 20_000
VECTOR_CAP = 2_000_000  # (N x C) held-out logits up to which vector scaling is measured


SOFTMAX_ROWS = 4096  # rows computed in float64 at once: 100,000 x 1000 classes whole would take 2.4 GB


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) float32 probabilities of softmax(logits / T), row block by row block."""
    logits = np.asarray(logits)
    out = np.empty(logits.shape, np.float32)
    for i in range(0, len(logits), SOFTMAX_ROWS):
        z = np.asarray(logits[i:i + SOFTMAX_ROWS], np.float64) / temperature
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        out[i:i + SOFTMAX_ROWS] = e / e.sum(1, keepdims=True)
    return out


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / T)."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def confidence_ceiling(correct: int, n: int) -> float:
    """The most mean top-1 confidence n held-out answers, `correct` of them right, support:
    Laplace's rule of succession, (correct + 1) / (n + 2). On separable data the NLL falls
    without end as T -> 0 (every answer right, every confidence -> 1); no finite sample
    shows a model that is never wrong, so T stops where the confidence reaches this."""
    return (correct + 1) / (n + 2)


def mean_confidence(logits: np.ndarray, temperature: float) -> float:
    return float(softmax(logits, temperature).max(1).mean())


def lowest_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The smallest T whose mean top-1 confidence on (N, C) logits stays within
    confidence_ceiling (confidence falls as T grows; bisection in log T)."""
    ceiling = confidence_ceiling(int((logits.argmax(1) == y).sum()), len(y))
    lo, hi = np.log(T_SEARCH)
    if mean_confidence(logits, float(np.exp(lo))) <= ceiling:
        return float(np.exp(lo))
    for _ in range(40):  # 40 halvings of a 14-wide log interval: T to 1e-10 relative
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mean_confidence(logits, float(np.exp(mid))) <= ceiling else (mid, hi)
    return float(np.exp(hi))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T that minimises the NLL of held-out (N, C) logits, no lower than
    lowest_temperature; 1.0 with no data. The NLL is convex in 1/T, so where the free
    minimum is too confident the bounded one sits on the bound."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    lo, hi = np.log(T_SEARCH)
    r = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(lo, hi), method="bounded")
    t = float(np.exp(r.x))
    ceiling = confidence_ceiling(int((logits.argmax(1) == y).sum()), len(y))
    return t if mean_confidence(logits, t) <= ceiling else lowest_temperature(logits, y)


def fit_vector_scaling(logits: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Vector scaling: a scale w (C,) and bias b (C,) per class, softmax(logits * w + b),
    fitted by NLL (a small L2 pull towards w = 1 / T, b = 0) from the fitted temperature."""
    from scipy.optimize import minimize

    z, c = np.asarray(logits, np.float64), logits.shape[1]
    w0 = 1.0 / fit_temperature(logits, y)
    onehot = np.eye(c)[y]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:c], theta[c:]
        s = z * w + b
        s -= s.max(1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)  # d NLL / d s, (N, C)
        value = -np.log(np.maximum(p[np.arange(len(y)), y], 1e-300)).mean()
        value += l2 * (((w - w0) ** 2).sum() + (b ** 2).sum())
        return value, np.r_[(g * z).sum(0) + 2 * l2 * (w - w0), g.sum(0) + 2 * l2 * b]

    r = minimize(loss, np.r_[np.full(c, w0), np.zeros(c)], jac=True, method="L-BFGS-B")
    return r.x[:c], r.x[c:]


def vector_softmax(logits: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, C) probabilities of softmax(logits * w + b); temperature 1 on the rescaled logits."""
    return softmax(np.asarray(logits, np.float64) * w + b)


def held_out_calibration(logits: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0
                         ) -> dict[str, np.ndarray]:
    """{method: (N, C) probabilities} for identity, temperature and vector scaling (up to
    VECTOR_CAP logits: its 2C parameters cost minutes on a million), each row
    calibrated by a calibrator fitted on the other folds of the (N, C) held-out logits."""
    from sklearn.model_selection import KFold

    methods = ["temperature"] + (["vector"] if logits.size <= VECTOR_CAP else [])
    out = {"identity": softmax(logits), **{m: np.zeros(logits.shape, np.float32) for m in methods}}
    for fit, held in KFold(n_splits=folds, shuffle=True, random_state=seed).split(logits):
        out["temperature"][held] = softmax(logits[held], fit_temperature(logits[fit], y[fit]))
        if "vector" in out:
            out["vector"][held] = vector_softmax(logits[held], *fit_vector_scaling(logits[fit], y[fit]))
    return out


def choose_temperature(logits: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0
                       ) -> tuple[float, dict]:
    """(T, record) from held-out (N, C) logits: the fitted temperature where it beats the
    identity out of fold on both NLL and adaptive ECE, else 1.0 (the identity). The record
    (for metrics.json and petal.json) has each candidate's out-of-fold figures."""
    y = np.asarray(y)
    if len(y) < 2 * folds:  # too few to split again: trust the NLL fit alone, as before
        t = fit_temperature(logits, y)
        return t, {"method": "temperature" if len(y) else "identity", "temperature": t, "out_of_fold": None}
    probs = held_out_calibration(logits, y, folds, seed)
    figures = {m: {"nll": round(probability_nll(p, y), 5), "ece_adaptive": round(adaptive_ece(p, y), 5)}
               for m, p in probs.items()}
    ident, temp = figures["identity"], figures["temperature"]
    better = temp["nll"] < ident["nll"] and temp["ece_adaptive"] < ident["ece_adaptive"]
    t = fit_temperature(logits, y) if better else 1.0
    return t, {"method": "temperature" if better else "identity", "temperature": t, "out_of_fold": figures}


def probability_nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean -log p(true class) of (N, C) probabilities (clipped at 1e-12)."""
    return float(-np.log(np.maximum(probs[np.arange(len(y)), y].astype(np.float64), 1e-12)).mean())


def out_of_fold_logits(fit_logits: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                       X: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0,
                       on_fold: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """(N, C) logits where row i comes from a model that never saw example i.

    `fit_logits(X_train, y_train, X_held_out)` trains a fresh model and returns its
    logits on X_held_out. Folds are stratified; a class with fewer examples than
    folds is spread over as many folds as it has. `on_fold(1)` after each fold."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    k = int(min(folds, max(2, np.bincount(y).max())))
    with warnings.catch_warnings():  # a class with fewer members than folds is expected here
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y))
    out: np.ndarray | None = None
    for train_idx, held_idx in splits:
        z = fit_logits(X[train_idx], y[train_idx], X[held_idx])
        if out is None:
            out = np.zeros((len(X), z.shape[1]), np.float32)
        out[held_idx] = z
        on_fold(1)
    return out


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-1 ECE: the |accuracy - confidence| gap per equal-width confidence bin, weighted by
    the bin's share of examples. probs: (N, C), y: (N,) ids."""
    if len(y) == 0:
        return 0.0
    conf, right = probs.max(1), (probs.argmax(1) == y)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            gap += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(gap)


def adaptive_ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-1 ECE over equal-mass bins: the images sorted by confidence and cut into `bins`
    groups of (nearly) equal size, so no bin is a handful of images; weighted by size."""
    if len(y) == 0:
        return 0.0
    conf = probs.max(1).astype(np.float64)
    right = (probs.argmax(1) == y).astype(np.float64)
    return confidence_gap(conf, right, bins)


def confidence_gap(conf: np.ndarray, right: np.ndarray, bins: int) -> float:
    """The equal-mass-bin ECE of (N,) confidences and (N,) 0/1 correctness."""
    order = np.argsort(conf, kind="stable")
    groups = np.array_split(order, min(bins, len(conf)))
    return float(sum(len(g) * abs(right[g].mean() - conf[g].mean()) for g in groups) / len(conf))


def ece_interval(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """A bootstrap percentile interval of adaptive_ece: the eval images resampled with
    replacement BOOTSTRAP times (200 past BOOTSTRAP_ROWS images), shifted by the bootstrap's
    bias (ECE on a resample is larger than on the sample: the plain percentile interval can
    lie wholly above the figure it is for)."""
    if len(y) == 0:
        return 0.0, 0.0
    conf = probs.max(1).astype(np.float64)
    right = (probs.argmax(1) == y).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = BOOTSTRAP if len(y) <= BOOTSTRAP_ROWS else 200
    values = []
    for _ in range(draws):
        i = rng.integers(0, len(y), len(y))
        values.append(confidence_gap(conf[i], right[i], bins))
    bias = float(np.mean(values)) - confidence_gap(conf, right, bins)  # resamples repeat images: ECE grows
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) - bias
    return max(float(lo), 0.0), float(hi)


def ece_floor(probs: np.ndarray, draws: int = 200, bins: int = ECE_BINS, seed: int = 0) -> float:
    """The adaptive ECE a perfectly calibrated model would show on these N images: the mean
    over `draws` simulations where each answer is right with its own confidence. An eval
    split of a few hundred images cannot tell calibration errors much below this apart."""
    if len(probs) == 0:
        return 0.0
    conf = probs.max(1).astype(np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([confidence_gap(conf, (rng.random(len(conf)) < conf).astype(np.float64), bins)
                          for _ in range(draws)]))


def calibration_figures(probs: np.ndarray, uncalibrated: np.ndarray, y: np.ndarray) -> dict:
    """metrics.json's calibration figures on eval: ECE over 15 equal-width and 15 equal-mass
    bins, the latter's bootstrap interval, each before and after calibration, and the
    adaptive ECE sampling noise alone would give (ece_floor)."""
    return {"ece": expected_calibration_error(probs, y),
            "ece_uncalibrated": expected_calibration_error(uncalibrated, y),
            "ece_adaptive": adaptive_ece(probs, y), "ece_adaptive_interval": list(ece_interval(probs, y)),
            "ece_adaptive_uncalibrated": adaptive_ece(uncalibrated, y), "ece_adaptive_floor": ece_floor(probs)}


def ece_line(metrics: dict) -> str:
    """The terminal's calibration figures, e.g. 'calibration error (ECE, 15 equal-mass bins)
    0.012 [0.008, 0.031] (uncalibrated 0.095); 15 equal-width bins 0.020 (0.101)'; '' without."""
    if metrics.get("ece") is None:
        return ""
    if "ece_adaptive" not in metrics:  # a bundle's evaluation, or metrics of an older run
        return f"calibration error (ECE) {metrics['ece']:.3f}" + (
            f" (uncalibrated {metrics['ece_uncalibrated']:.3f})" if "ece_uncalibrated" in metrics else "")
    lo, hi = metrics["ece_adaptive_interval"]
    line = f"calibration error (ECE, {ECE_BINS} equal-mass bins) {metrics['ece_adaptive']:.3f} [{lo:.3f}, {hi:.3f}]"
    if "ece_adaptive_uncalibrated" in metrics:
        line += f" (uncalibrated {metrics['ece_adaptive_uncalibrated']:.3f})"
    if "ece_adaptive_floor" in metrics:
        line += f", noise floor {metrics['ece_adaptive_floor']:.3f}"
    line += f"; {ECE_BINS} equal-width bins {metrics['ece']:.3f}"
    return line + (f" ({metrics['ece_uncalibrated']:.3f})" if "ece_uncalibrated" in metrics else "")


def format_score(p: float, digits: int = 3) -> str:
    """A probability with `digits` decimals, more where those would round it to 1 or 0
    (0.9996 prints 0.9996, not 1.000), up to 6."""
    for d in range(digits, 7):
        text = f"{p:.{d}f}"
        if (0 < float(text) < 1) or p <= 0 or p >= 1:
            return text
    return text


def reliability_diagram(path: Path, y: np.ndarray, curves: dict[str, np.ndarray], bins: int = ECE_BINS) -> None:
    """A PNG of accuracy against confidence per bin, one line per {name: (N, C) probs}."""
    from petal.metrics import new_axes, save_png

    fig, ax = new_axes(5, 5)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for name, probs in curves.items():
        conf, right = probs.max(1), probs.argmax(1) == y
        which = np.minimum((conf * bins).astype(int), bins - 1)
        xs = [conf[which == b].mean() for b in range(bins) if (which == b).any()]
        ys = [right[which == b].mean() for b in range(bins) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {expected_calibration_error(probs, y, bins):.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("reliability (eval)")
    save_png(fig, path)
