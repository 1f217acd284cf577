"""The review's decisions on disk: RUN/review.csv and RUN/labeled.csv, one row per decision.

    review.csv   uri, label, action, was, card, step
                 action "relabel" (label: the new one), "keep" (label: the one it had) or
                 "exclude" (label empty); `petal train --relabel` reads uri,label and
                 `--exclude` the rows whose action is "exclude" (petal.review)
    labeled.csv  uri, label, card, step
                 a label given to a new photo; an empty label: skipped (not one of the classes
                 and no new class named). `petal train --labeled` adds the labeled rows.

Every decision rewrites the file atomically (petal.storage), so a killed server or a closed
tab loses nothing; `step` numbers the user's actions, so that undo removes one action
(a whole map selection at once). Reopening reads the file and goes on where it stopped.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections import Counter
from pathlib import Path

from petal.data import TRAIN, Dataset, Example
from petal.errors import DataError
from petal.progress import Reporter
from petal.storage import absolute, atomic_write_text, read_csv

REVIEW_FILE, LABELED_FILE = "review.csv", "labeled.csv"
REVIEW_COLUMNS = ["uri", "label", "action", "was", "card", "step"]
LABELED_COLUMNS = ["uri", "label", "card", "step"]
RELABEL, KEEP, EXCLUDE, SKIP = "relabel", "keep", "exclude", "skip"
LABEL_NAME = re.compile(r"^(?!\.{1,2}$)[^/\\\x00-\x1f]{1,100}$")  # a class name that is a folder name anywhere


def check_label_name(label: str, option: str = "label") -> str:
    """A new class's name: 1 to 100 characters, no '/', '\\' or control characters, not '.' or '..'."""
    if not LABEL_NAME.match(label):
        raise DataError(f"{option}: a class name is 1 to 100 characters, no '/' or '\\', not '.' or '..'; "
                        f"got {label!r}")
    return label


class DecisionLog:
    """One CSV of decisions, rows in the order they were made; rewritten whole on each change.

    What the page asks after every answer is kept up to date as rows come (`latest`, `decided`,
    `tally`) and the file's lines are formatted once each, so that an answer costs the same with
    10,000 rows in the file as with none: one write and its fsync."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path, self.columns = Path(path), columns
        self.rows: list[dict[str, str]] = self._read() if self.path.exists() else []
        self._recount()

    def _read(self) -> list[dict[str, str]]:
        try:
            rows = read_csv(self.path)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"review: cannot read {self.path}: {e}") from None
        missing = [c for c in ("uri", "label", "card", "step") if rows and c not in rows[0]]
        if missing:
            raise DataError(f"review: {self.path} lacks the column(s) {', '.join(missing)}: it was not "
                            "written by petal review; move it away to start a new review")
        return rows

    def _recount(self) -> None:
        self.lines = [self._line(r) for r in self.rows]
        self.latest: dict[str, dict[str, str]] = {}  # uri -> its last decision
        self.decided: set[str] = set()  # card ids
        self.tally: Counter[str] = Counter()  # what the latest decisions change: relabelled, excluded, labeled
        for r in self.rows:
            self._count(r)

    def _line(self, row: dict[str, str]) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerow([row.get(c, "") for c in self.columns])
        return buf.getvalue()

    def _count(self, row: dict[str, str]) -> None:
        old = self.latest.get(row["uri"])
        if old is not None:
            self.tally[change(old)] -= 1
        self.latest[row["uri"]] = row
        self.tally[change(row)] += 1
        self.decided.add(row["card"])

    def add(self, rows: list[dict[str, str]], step: int) -> None:
        """Record one action (one or more rows, numbered `step`) and save."""
        for r in rows:
            row = {**r, "step": str(step)}
            self.rows.append(row)
            self.lines.append(self._line(row))
            self._count(row)
        self.save()

    def undo(self) -> list[dict[str, str]]:
        """Remove the last action's rows and save; returns them ([] when there is none)."""
        if not self.rows:
            return []
        last = self.rows[-1]["step"]
        gone = [r for r in self.rows if r["step"] == last]
        self.rows = [r for r in self.rows if r["step"] != last]
        self._recount()
        self.save()
        return gone

    def save(self) -> None:
        atomic_write_text(self.path, self._line(dict(zip(self.columns, self.columns))) + "".join(self.lines))

    def last_step(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0


def change(row: dict[str, str]) -> str:
    """What a decision changes: "relabelled", "excluded", "labeled" (a new photo) or ""."""
    action = row.get("action")
    if action is None:  # labeled.csv
        return "labeled" if row["label"] else ""
    if action == EXCLUDE:
        return "excluded"
    return "relabelled" if action == RELABEL and row["label"] != row.get("was") else ""


def labeled_rows(path: str | Path) -> list[tuple[str, str]]:
    """(uri, label) of every labeled row of a labeled.csv (or any CSV with uri and label
    columns); skipped photos (an empty label) are left out."""
    try:
        rows = read_csv(path)
    except FileNotFoundError:
        raise DataError(f"labeled: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"labeled: cannot read {path}: {e}") from None
    if rows and not {"uri", "label"} <= set(rows[0]):
        raise DataError(f"labeled: {path} needs 'uri' and 'label' columns (it has {', '.join(rows[0])})")
    return [(r["uri"], r["label"].strip()) for r in rows if r["label"].strip()]


def add_labeled(ds: Dataset, path: str | Path | None, reporter: Reporter | None = None) -> Dataset:
    """`ds` plus the labeled rows of `path` as training images (a new label: a new class, after
    the others so that old class ids stay). Photos already in the data are not added twice."""
    if path is None:
        return ds
    have = {absolute(e.uri) for e in ds.examples}
    rows = [(u, lab) for u, lab in labeled_rows(path) if absolute(u) not in have]
    classes = ds.classes + sorted({lab for _, lab in rows} - set(ds.classes))
    extra = [Example(u, lab, TRAIN) for u, lab in rows]
    (reporter or Reporter()).message(
        f"labeled: {len(extra)} new image(s) added for training from {path}"
        + (f", new class(es): {', '.join(classes[len(ds.classes):])}" if len(classes) > len(ds.classes) else ""))
    return Dataset(ds.examples + extra, classes, ds.skipped, ds.warnings)


def copy_labeled(path: str | Path, data_dir: str | Path) -> list[Path]:
    """Copy the labeled photos of a labeled.csv into DATA/<label>/ (a class folder each), never
    moving or overwriting a file: a name taken by other bytes gets a -2, -3... suffix; a copy
    already there is left alone. Returns the files written."""
    written = []
    for uri, label in labeled_rows(path):
        src = Path(uri)
        folder = Path(data_dir) / check_label_name(label, f"labeled: {path}")
        folder.mkdir(parents=True, exist_ok=True)
        dest, n = folder / src.name, 1
        while dest.exists() and dest.read_bytes() != src.read_bytes():
            n += 1
            dest = folder / f"{src.stem}-{n}{src.suffix}"
        if not dest.exists():
            shutil.copy2(src, dest)
            written.append(dest)
    return written
