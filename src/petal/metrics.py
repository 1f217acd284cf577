"""Evaluation: top-1/top-5, per-class metrics, confusion matrix, misclassified list.

Readable at 1000 classes: `per_class` is ordered worst first (lowest f1, then recall),
`most_confused` lists the (true, predicted) pairs with the most errors, the confusion
matrix is in full in confusion_matrix.csv (and inline in metrics.json up to
`INLINE_CLASSES` classes), and confusion_matrix.png shows the `PLOT_CLASSES` classes
with the most errors. `precision_at_1` and `recall_at_5` are the Inception eval's names
(inception_eval.py): the share of images whose label is the top-1 prediction, and the
share whose label is among the top 5, so for one label per image they equal top-1 and
top-5 accuracy; they are reported under both names for comparison with published runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from petal.storage import OutputFolder, atomic_path, atomic_write_csv, atomic_write_text, read_csv

INLINE_CLASSES = 100  # up to this many classes the full confusion matrix is also in metrics.json
PLOT_CLASSES = 30  # classes in confusion_matrix.png: those with the most errors
CONFUSED_PAIRS = 20  # (true, predicted) pairs listed in most_confused


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """y_true: (N,) ids; probs: (N, C). Returns a JSON-ready dict."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.asarray(y_true)
    n, c = probs.shape
    pred = probs.argmax(1)
    labels = list(range(c))
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    cm = confusion_counts(y_true, pred, c)  # (C, C): rows true, columns predicted
    top1 = float((pred == y_true).mean()) if n else None
    top5 = float(in_top_k(probs, y_true, min(5, c)).mean()) if n else None
    worst_first = sorted(range(c), key=lambda i: (f[i], r[i], classes[i]))
    return {
        "accuracy": top1,
        "top5_accuracy": top5,
        "precision_at_1": top1,  # the Inception eval's names for the same two figures (module docstring)
        "recall_at_5": top5,
        "num_eval": int(n),
        "per_class": {
            classes[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i in worst_first
        },
        "macro_f1": float(f.mean()),
        "most_confused": most_confused(cm, classes),
        **({"confusion_matrix": cm.tolist()} if c <= INLINE_CLASSES else {}),
    }


def in_top_k(probs: np.ndarray, y_true: np.ndarray, k: int, rows: int = 8192) -> np.ndarray:
    """(N,) bool: the label is among the k most probable classes; a block of rows at a time."""
    hit = np.empty(len(y_true), bool)
    for i in range(0, len(y_true), rows):
        top = np.argpartition(-probs[i:i + rows], k - 1, axis=1)[:, :k]  # (rows, k), unordered
        hit[i:i + rows] = (top == y_true[i:i + rows, None]).any(1)
    return hit


def most_confused(cm: np.ndarray, classes: list[str], limit: int = CONFUSED_PAIRS) -> list[dict]:
    """The (true, predicted) pairs of different classes with the most errors, most first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:limit]
    return [{"true": classes[i], "predicted": classes[j], "count": int(off[i, j])}
            for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j]]


def confusion_counts(y_true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows true class, columns predicted."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(pred)), 1)
    return cm


# `petal evaluate --out`: write_report's files, errors.csv, and with --unknown unknown.json and coverage.png;
# metrics.json (with a confusion matrix) marks an earlier one
EVALUATION_OUTPUT = OutputFolder(
    frozenset({"metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "misclassified.csv", "errors.csv",
               "unknown.json", "coverage.png"}), "metrics.json", ("confusion_matrix", "num_eval"))


def write_report(out: Path, metrics: dict, classes: list[str], uris: list[str],
                 y_true: np.ndarray, probs: np.ndarray) -> None:
    """metrics.json, confusion_matrix.csv and .png, and misclassified.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    pred = probs.argmax(1)
    cm = confusion_counts(y_true, pred, len(classes))
    atomic_write_csv(out / "confusion_matrix.csv", ["true \\ predicted", *classes],
                     ([name, *row] for name, row in zip(classes, cm.tolist())))
    plot_confusion(cm, classes, out / "confusion_matrix.png")
    atomic_write_csv(out / "misclassified.csv", ["uri", "true_label", "predicted_label", "confidence"],
                     ([uris[i], classes[y_true[i]], classes[pred[i]], f"{probs[i, pred[i]]:.4f}"]
                      for i in np.flatnonzero(pred != y_true)))


def new_axes(width: float, height: float):
    """(figure, axes) for one plot. A Figure with its own Agg canvas: no pyplot, so the host
    program's matplotlib backend is neither chosen nor changed, and no figure is left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """The matrix as an image; past PLOT_CLASSES classes, those with the most errors (in or out)."""
    if len(classes) > PLOT_CLASSES:
        errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
        shown = np.sort(np.argsort(-errors, kind="stable")[:PLOT_CLASSES])
        cm, title = cm[np.ix_(shown, shown)], f"confusion matrix (eval): the {PLOT_CLASSES} of {len(classes)} " \
                                              "classes with the most errors"
        classes = [classes[i] for i in shown]
    else:
        title = "confusion matrix (eval)"
    n = len(classes)
    size = min(4 + 0.4 * n, 30)
    fig, ax = new_axes(size, size)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > thresh else "black", fontsize=8)
    ax.set_title(title)
    save_png(fig, path)


def plot_learning_curve(history_csv: Path, path: Path) -> Path | None:
    """A fine-tuning run's history.csv (one row per epoch) -> loss and accuracy per epoch, train and
    eval, at `path`; None without a history (a head run) or with a damaged one."""
    try:
        rows = read_csv(history_csv)
        epochs = [int(r["epoch"]) for r in rows]
        series = {k: [float(r[k]) for r in rows] for k in ("train_loss", "eval_loss", "train_accuracy",
                                                           "eval_accuracy") if rows and all_have(rows, k)}
    except (OSError, KeyError, ValueError, csv.Error):
        return None
    if not epochs or not series:
        return None
    fig, ax = new_axes(6, 3.5)
    right = ax.twinx()
    for key, values in series.items():
        side, style = (ax, "-") if key.endswith("loss") else (right, "--")
        side.plot(epochs, values, style, marker="o", label=key.replace("_", " "))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    right.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="center right")
    ax.set_title("learning curve")
    save_png(fig, path)
    return path


def all_have(rows: list[dict], key: str) -> bool:
    """Every row has a number under `key` (eval_* are missing without eval images)."""
    return all(r.get(key) not in (None, "") for r in rows)
