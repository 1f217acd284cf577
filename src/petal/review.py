"""Acting on an audit: drop or relabel reviewed images for the next run, never touching files.

    petal audit flower_photos/ --out audit/           # audit/suspects.csv, duplicates.csv
    # keep the rows you agree with, then:
    petal train flower_photos/ --out runs/v2 --exclude audit/dropped.csv --relabel audit/suspects.csv

`--exclude FILE`: a CSV with a `uri` column (suspects.csv and duplicates.csv' `uri_a`
work as they are); those images are left out. A CSV with an `action` column (RUN/review.csv of
`petal review`: one row per decision) counts each image's last row only, and --exclude leaves out
the images whose last action is "exclude". `--relabel FILE`: a CSV with `uri` and
`suggested` (as suspects.csv has) or `label`; those images get that label, which must be
one of the classes. Matching is by path, so a warm cache makes the rerun take seconds.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from petal.data import TRAIN, Dataset, Example
from petal.errors import DataError
from petal.progress import Reporter
from petal.storage import is_local, read_csv_lines


def _same(uri: str) -> str:
    """A URI as compared here: local paths made absolute, others as they are."""
    return os.path.normpath(os.path.abspath(uri)) if is_local(uri) else uri


def _rows(path: str | Path, option: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """[(line, row)] of the CSV `path` given to --`option`, whose header names one of `columns`."""
    try:
        header, rows = read_csv_lines(path)
    except FileNotFoundError:
        raise DataError(f"{option}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{option}: cannot read {path}: {e}") from None
    except csv.Error as e:  # e.g. a field over the csv module's limit of 131,072 characters
        raise DataError(f"{option}: {path}: not a valid CSV ({e})") from None
    if not set(header) & set(columns):
        first = f"its first line reads {', '.join(header)[:200]!r}" if header else "it is empty"
        raise DataError(f"{option}: {path} has no header naming a {' or '.join(map(repr, columns))} column "
                        f"({first}); expected a header such as uri,label")
    return rows


def _latest(rows: list[tuple[int, dict[str, str]]]) -> list[tuple[int, dict[str, str]]]:
    """A decision log's rows (an `action` column: RUN/review.csv) reduced to each image's last one;
    other CSVs as they are."""
    if not rows or "action" not in rows[0][1]:
        return rows
    return list({_same(r.get("uri") or ""): (line, r) for line, r in rows}.values())


def _relabels(path: str | Path, classes: list[str]) -> dict[str, str]:
    """uri -> new label from a --relabel CSV; a uri given two different labels is refused, naming both lines."""
    new_label: dict[str, tuple[str, int]] = {}
    for line, r in _latest(_rows(path, "relabel", ("uri",))):
        # suspects.csv: "suggested" is the new label ("" for an outlier: nothing to relabel to)
        label = ((r["suggested"] if "suggested" in r else r.get("label")) or "").strip()
        uri = r.get("uri") or ""
        if label and label not in classes:
            raise DataError(f"relabel: {path}:{line}: {uri}: {label!r} is not one of the classes {classes}")
        if not label:
            continue
        before = new_label.setdefault(_same(uri), (label, line))
        if before[0] != label:
            raise DataError(f"relabel: {path}: {uri} is given {before[0]!r} on line {before[1]} and {label!r} "
                            f"on line {line}; keep one")
    return {uri: label for uri, (label, _) in new_label.items()}


def apply_review(ds: Dataset, exclude: str | Path | None = None, relabel: str | Path | None = None,
                 reporter: Reporter | None = None) -> Dataset:
    """`ds` without the images listed in `exclude` and with those in `relabel` relabelled."""
    if exclude is None and relabel is None:
        return ds
    reporter = reporter or Reporter()
    drop = {_same(r.get("uri") or r.get("uri_a") or "") for _, r in _latest(_rows(exclude, "exclude", ("uri", "uri_a")))
            if r.get("action", "exclude") == "exclude"} if exclude else set()
    new_label = _relabels(relabel, ds.classes) if relabel else {}
    kept, found, changed = [], set(), 0
    for e in ds.examples:
        key = _same(e.uri)
        if key in drop:
            found.add(key)
            continue
        if key in new_label:
            found.add(key)
            changed += new_label[key] != e.label
            e = Example(e.uri, new_label[key], e.split)
        kept.append(e)
    refuse_emptied_classes(ds.examples, kept)
    missing = (drop | set(new_label)) - found
    reporter.message(f"review: {len(ds.examples) - len(kept)} image(s) excluded, "
                     f"{changed} relabelled"
                     + (f"; warning: {len(missing)} listed image(s) are not in the data" if missing else ""))
    return Dataset(kept, ds.classes, ds.skipped, ds.warnings, ds.notes)


def refuse_emptied_classes(before: list[Example], after: list[Example]) -> None:
    """A class whose training images --exclude and --relabel took away, said as that (not
    later as "after skipping unreadable images, ... no training image")."""
    had = {e.label for e in before if e.split == TRAIN}
    has = {e.label for e in after if e.split == TRAIN}
    emptied = sorted(had - has)
    if not emptied:
        return
    now = {e.uri: e.label for e in after}
    fates = []
    for c in emptied:
        moved = sorted({now[e.uri] for e in before if e.label == c and e.split == TRAIN and e.uri in now})
        fates.append(f"{c!r} (" + (f"relabelled to {', '.join(map(repr, moved))}" if moved else "all excluded")
                     + ")")
    raise DataError("--exclude/--relabel leave these classes with no training image: " + ", ".join(fates)
                    + "; keep some of their images, or leave the class out of the data")
