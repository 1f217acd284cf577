"""Evaluation: top-1/top-5, per-class metrics, confusion matrix, misclassified list."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from petal.storage import atomic_path, atomic_write_text


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """y_true: (N,) ids; probs: (N, C). Returns a JSON-ready dict."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    n, c = probs.shape
    pred = probs.argmax(1)
    k = min(5, c)
    topk = np.argsort(-probs, axis=1)[:, :k]
    labels = list(range(c))
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    return {
        "accuracy": float((pred == y_true).mean()) if n else None,
        "top5_accuracy": float((topk == y_true[:, None]).any(1).mean()) if n else None,
        "num_eval": int(n),
        "per_class": {
            cls: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, cls in enumerate(classes)
        },
        "macro_f1": float(f.mean()),
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }


def write_report(out: Path, metrics: dict, classes: list[str], uris: list[str],
                 y_true: np.ndarray, probs: np.ndarray) -> None:
    """metrics.json, confusion_matrix.png and misclassified.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    plot_confusion(np.array(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png")
    pred = probs.argmax(1)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["uri", "true_label", "predicted_label", "confidence"])
    for i in np.flatnonzero(pred != y_true):
        w.writerow([uris[i], classes[y_true[i]], classes[pred[i]], f"{probs[i, pred[i]]:.4f}"])
    atomic_write_text(out / "misclassified.csv", buf.getvalue())


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
    n = len(classes)
    size = min(4 + 0.4 * n, 30)
    fig, ax = new_axes(size, size)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > thresh else "black", fontsize=8)
    ax.set_title("confusion matrix (eval)")
    save_png(fig, path)
