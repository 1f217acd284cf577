"""Predictions: the record, its top-k, and the rows every writer emits.

`petal predict`, `petal classify`, `petal.client`, the server and the Beam pipeline all
build a `Prediction` with `prediction()` and write it with `csv_row()` or `to_dict()`,
so a label, a score and a top-k list mean the same thing everywhere.

    p = prediction(["daisy", "rose"], "a.jpg", np.array([0.2, 0.8]), top_k=1)
    p.label, p.score, p.top            # "rose", 0.8, [("rose", 0.8)]
    p.unknown = True                   # like none of the classes (set by the unknown detector)
    p.label, p.score, p.nearest        # "unknown", 0.0, "rose"
    ranked(labels, probs, k)           # [(id, label, score)], best first
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from petal.errors import PetalError
from petal.storage import atomic_path, check_output, sheet_row

UNKNOWN = "unknown"  # the label of a prediction that is like none of the classes
# One meaning everywhere (library, CLI, CSV/JSONL, REST, KServe v2, pages): "label" is the answer,
# UNKNOWN for an unknown image, so that a script reading it is never told "tulips" for a cat;
# "nearest" is always the top-1 class; "score" is the answer's probability, 0 for an unknown image
# (so that sorting by score never puts a rejected image above a kept one).
FORMATS = ("csv", "jsonl")  # what `petal predict --output/--format` writes
CSV_HEADER = ["uri", "label", "score", "top", "unknown", "ood_score", "nearest"]


@dataclass(frozen=True)
class Scores:
    """What a bundle's graph gives for N images (or, indexed, for one)."""

    probabilities: np.ndarray  # (N, C), calibrated, in label-id order
    ood_score: np.ndarray | None = None  # (N,); None: the bundle has no unknown detection
    unknown: np.ndarray | None = None  # (N,) bool: ood_score above the bundle's threshold

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, i: int | slice) -> Scores:
        if self.ood_score is None:
            return Scores(self.probabilities[i])
        return Scores(self.probabilities[i], self.ood_score[i], self.unknown[i])

    @staticmethod
    def stack(rows: Sequence[Scores], num_classes: int) -> Scores:
        """One image's Scores each (`scores[i]`) -> the Scores of all of them."""
        if not rows:
            return Scores(np.zeros((0, num_classes), np.float32))
        if rows[0].ood_score is None:
            return Scores(np.stack([r.probabilities for r in rows]))
        return Scores(np.stack([r.probabilities for r in rows]), np.array([r.ood_score for r in rows], np.float32),
                      np.array([r.unknown for r in rows], bool))

    @staticmethod
    def concat(parts: Sequence[Scores], num_classes: int) -> Scores:
        if not parts:
            return Scores(np.zeros((0, num_classes), np.float32))
        has_ood = parts[0].ood_score is not None
        return Scores(np.concatenate([p.probabilities for p in parts]),
                      np.concatenate([p.ood_score for p in parts]) if has_ood else None,
                      np.concatenate([p.unknown for p in parts]) if has_ood else None)


@dataclass
class Prediction:
    uri: str
    nearest: str | None = None  # the top-1 class, also for an unknown image
    nearest_score: float | None = None  # its probability
    top: list[tuple[str, float]] = field(default_factory=list)  # top-k (label, probability), best first
    probabilities: np.ndarray | None = None  # (C,) in label-id order
    error: str | None = None  # why this input could not be predicted
    label_id: int | None = None  # the top-1 label's id (its line in labels.txt)
    unknown: bool = False  # like none of the training images: `label` is only the nearest class
    ood_score: float | None = None  # how unlike the known images (petal.unknown); None: not computed
    key: str | None = None  # sha256 of the image's bytes, where the predictor read them

    @property
    def label(self) -> str | None:
        """The answer: the top-1 class, or UNKNOWN for an image like none of them."""
        return UNKNOWN if self.unknown else self.nearest

    @property
    def score(self) -> float | None:
        """The answer's probability: the top-1 class's, or 0.0 for an unknown image."""
        return 0.0 if self.unknown else self.nearest_score

    def to_dict(self) -> dict:
        """The JSON row (`--output x.jsonl`, the upload endpoint, Beam)."""
        d = {"uri": self.uri}
        if self.error is not None:
            d["error"] = self.error
        else:
            d.update(label=self.label, score=self.score, top=self.top_rows(),
                     unknown=self.unknown, ood_score=self.ood_score, nearest=self.nearest)
        return d

    def top_rows(self) -> list[dict]:
        """The top-k as [{"label", "score"}], best first: the `top` of every output format."""
        return [{"label": k, "score": v} for k, v in self.top]


def ranked(labels: Sequence[str], probs: np.ndarray, k: int) -> list[tuple[int, str, float]]:
    """(C,) scores -> the k best as (id, label, score), best first; ties keep id order."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(int(i), labels[i], float(probs[i])) for i in order]


def prediction(labels: Sequence[str], uri: str, probs: np.ndarray, top_k: int = 5) -> Prediction:
    """(C,) probabilities in label-id order -> a Prediction with the top-k labels."""
    best = ranked(labels, probs, max(1, top_k))
    return Prediction(uri, best[0][1], best[0][2], [(name, p) for _, name, p in best], probs, label_id=best[0][0])


def scored_prediction(labels: Sequence[str], uri: str, s: Scores, top_k: int = 5,
                      reject_unknown: bool = True) -> Prediction:
    """One image's Scores -> a Prediction; `reject_unknown=False` never calls it unknown."""
    p = prediction(labels, uri, s.probabilities, top_k)
    if s.ood_score is not None:
        p.ood_score = float(s.ood_score)
        p.unknown = bool(s.unknown) and reject_unknown
    return p


def csv_row(p: Prediction) -> list[str]:
    """One prediction as the CSV row every writer (local or Beam) uses, safe to open in a
    spreadsheet (`storage.sheet_row`)."""
    ood = "" if p.ood_score is None else f"{p.ood_score:.6f}"
    top = json.dumps([{**t, "score": round(t["score"], 6)} for t in p.top_rows()])  # JSON's "top", as `score`
    return sheet_row([p.uri, p.label, f"{p.score:.6f}", top, str(p.unknown).lower(), ood, p.nearest])


def output_format(path: str | Path, fmt: str | None) -> str:
    """The format of `--output PATH` (`-`: stdout): `--format` if given, else PATH's suffix."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise PetalError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    kind = Path(path).suffix.lower().lstrip(".")
    if str(path) == "-" or kind not in FORMATS:
        raise PetalError(f"output: expected a .csv or .jsonl file name, or --format csv|jsonl, got {str(path)!r}")
    return kind


def write_rows(f: TextIO, preds: Iterable[Prediction], fmt: str) -> tuple[int, list[tuple[str, str]]]:
    """Predictions as CSV (with its header) or JSON lines to an open text file, as they come.
    Returns (rows written, [(uri, reason) failed]); failed images are not rows."""
    w = csv.writer(f) if fmt == "csv" else None
    n, failed = 0, []
    for p in preds:
        if p.error:
            failed.append((p.uri, p.error))
            continue
        n += 1
        if w:
            if n == 1:
                w.writerow(CSV_HEADER)  # with the first row: a run where nothing is read prints nothing
            w.writerow(csv_row(p))
        else:
            f.write(json.dumps(p.to_dict()) + "\n")
        f.flush()  # a reader on a pipe sees each row when it is ready
    return n, failed


def write_predictions(path: Path, preds: Iterable[Prediction], fmt: str | None = None) -> tuple[int, list]:
    """Many predictions to a .csv or .jsonl file (or `fmt`, any name), atomically: see `write_rows`.
    A device or a named pipe (/dev/null) is written to as it is."""
    fmt = output_format(path, fmt)
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/null, /dev/stderr, a named pipe:
        with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:  # written to, never
            return write_rows(f, preds, fmt)  # replaced by a renamed file
    check_output(path, "output")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        return write_rows(f, preds, fmt)
