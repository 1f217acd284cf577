"""Acting on an audit: drop or relabel reviewed images for the next run, never touching files.

    petal audit flower_photos/ --out audit/           # audit/suspects.csv, duplicates.csv
    # keep the rows you agree with, then:
    petal train flower_photos/ --out runs/v2 --exclude audit/dropped.csv --relabel audit/suspects.csv

`--exclude FILE`: a CSV with a `uri` column (suspects.csv and duplicates.csv' `uri_a`
work as they are); those images are left out; a CSV with an `action` column (RUN/review.csv
of `petal review`) leaves out its rows whose action is "exclude". `--relabel FILE`: a CSV with `uri` and
`suggested` (as suspects.csv has) or `label`; those images get that label, which must be
one of the classes. Matching is by path, so a warm cache makes the rerun take seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from petal.data import Dataset, Example
from petal.errors import DataError
from petal.progress import Reporter
from petal.storage import is_local, read_csv


def _same(uri: str) -> str:
    """A URI as compared here: local paths made absolute, others as they are."""
    return os.path.normpath(os.path.abspath(uri)) if is_local(uri) else uri


def _rows(path: str | Path, option: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        rows = read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{option}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{option}: cannot read {path}: {e}") from None
    header = set(rows[0]) if rows else set()
    if rows and not header & set(columns):
        raise DataError(f"{option}: {path} has no {' or '.join(map(repr, columns))} column (it has "
                        f"{', '.join(sorted(header))})")
    return rows


def apply_review(ds: Dataset, exclude: str | Path | None = None, relabel: str | Path | None = None,
                 reporter: Reporter | None = None) -> Dataset:
    """`ds` without the images listed in `exclude` and with those in `relabel` relabelled."""
    if exclude is None and relabel is None:
        return ds
    reporter = reporter or Reporter()
    # a review.csv (petal review) lists every decision: only its "exclude" rows are left out
    drop = {_same(r.get("uri") or r.get("uri_a", "")) for r in _rows(exclude, "exclude", ("uri", "uri_a"))
            if r.get("action", "exclude") == "exclude"} if exclude else set()
    new_label: dict[str, str] = {}
    for r in _rows(relabel, "relabel", ("uri",)) if relabel else []:
        # suspects.csv: "suggested" is the new label ("" for an outlier: nothing to relabel to)
        label = (r["suggested"] if "suggested" in r else r.get("label") or "").strip()
        if label and label not in ds.classes:
            raise DataError(f"relabel: {r['uri']}: {label!r} is not one of the classes {ds.classes}")
        if label:
            new_label[_same(r["uri"])] = label
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
    missing = (drop | set(new_label)) - found
    reporter.message(f"review: {len(ds.examples) - len(kept)} image(s) excluded, "
                     f"{changed} relabelled"
                     + (f"; warning: {len(missing)} listed image(s) are not in the data" if missing else ""))
    return Dataset(kept, ds.classes, ds.skipped, ds.warnings)
