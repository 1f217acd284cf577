"""Labeled data in: a folder of class folders, or a CSV of uri,label rows.

`load_dataset` returns a `Dataset`: every usable example with its label and
split, the class list (ids are list positions), what was skipped and why, and
warnings. It reads no image bytes; that is the embed step's job.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import posixpath
import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from petal.errors import DataError, ImageError, PetalError
from petal.images import IMAGE_EXTENSIONS
from petal.params import Real, check_param
from petal.progress import Reporter
from petal.storage import (
    HTTP_SCHEMES,
    absolute,
    check_scheme,
    is_local,
    local_path,
    read_bytes,
    scheme_of,
    scheme_problem,
    sheet_value,
)

TRAIN, EVAL = "train", "eval"
CALIBRATION = "calibration"  # set aside from train by `petal finetune`: held out, never trained on
TEST = "test"  # given by the data (a test/ folder, a CSV split column): evaluated on its own
# a split a dataset gives -> petal's; "calibration" (a run's own split.csv as data) is training data again
SPLIT_NAMES = {"train": TRAIN, "training": TRAIN, "val": EVAL, "valid": EVAL, "validation": EVAL, "dev": EVAL,
               "eval": EVAL, "test": TEST, "testing": TEST, "calibration": TRAIN}
SPLIT_WORDS = ("split", "subset", "set", "fold", "partition", "stage")  # a CSV's split column, by header name
NO_SPLIT = ""  # Columns.split for "this CSV has no split column", whatever its header says
LIST_THREADS = 8  # class folders listed at once
MIN_CALIBRATION = 10  # fewer images than this calibrate nothing
HEADER_WORDS = {"uri", "url", "path", "image", "image_uri", "image_path", "file", "filename", "filepath",
                "image_file", "image_name"}


@dataclass(frozen=True)
class Columns:
    """A CSV's image, label and split columns as the user names them (--uri-column, --label-column,
    --split-column); None: found by the usual header names (uri/path/filename/..., label/class/category,
    split/subset/set/fold/partition/stage)."""
    uri: str | None = None
    label: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Example:
    uri: str
    label: str
    split: str = TRAIN


@dataclass
class Dataset:
    examples: list[Example]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or row, reason)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # information, not a problem: "split folders: train, val"

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """class -> {"train": n, "eval": n, "calibration": n, "test": n}"""
        out = {c: {TRAIN: 0, EVAL: 0, CALIBRATION: 0, TEST: 0} for c in self.classes}
        for e in self.examples:
            out[e.label][e.split] += 1
        return out

    def skipped_reasons(self) -> Counter:
        return Counter(reason for _, reason in self.skipped)

    def label_id(self, label: str) -> int:
        return self.classes.index(label)


# --------------------------------------------------------------------------- split

def eval_hash_percent(uri: str, salt: str = "", group: re.Pattern | None = None) -> float:
    """A stable number in [0, 100) from the file name, as in TF's retrain.py.

    Only the base name counts (with any `_nohash_` suffix removed), so moving the
    folder or adding images never moves an image across the split. Another `salt`
    gives an independent number (for a second split). With `group`, names it matches
    hash by its first captured group (or whole match): a burst of photos from one shoot
    stays on one side.
    """
    name = re.sub(r"_nohash_.*$", "", os.path.basename(uri.rstrip("/")))
    if group is not None and (m := group.search(name)):
        name = (m.group(1) if m.groups() else None) or m.group(0) or name  # an empty capture: the name itself
    name = salt + name
    # surrogateescape: a file name that is not valid UTF-8 hashes as its raw bytes
    h = int(hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest(), 16)
    return (h % 10_000) / 100.0


def assign_split(uri: str, eval_percent: float, group: re.Pattern | None = None) -> str:
    return EVAL if eval_hash_percent(uri, group=group) < eval_percent else TRAIN


def set_aside(ds: Dataset, percent: float) -> Dataset:
    """A copy of `ds` with about `percent`% of its training images moved to the CALIBRATION
    split, by a stable hash independent of the eval split. A class keeps at least one
    training image; with fewer than MIN_CALIBRATION images to set aside, none are."""
    picked = {e.uri for e in ds.split(TRAIN) if eval_hash_percent(e.uri, "calibration:") < percent}
    for c in ds.classes:
        train = [e.uri for e in ds.split(TRAIN) if e.label == c]
        if train and all(u in picked for u in train):
            picked.discard(train[0])
    if len(picked) < MIN_CALIBRATION:
        return ds
    examples = [Example(e.uri, e.label, CALIBRATION) if e.uri in picked else e for e in ds.examples]
    return Dataset(examples, ds.classes, ds.skipped, ds.warnings, ds.notes)


# --------------------------------------------------------------------------- labels

def read_labels_file(path: str | Path) -> tuple[list[str], list[str]]:
    """dict.txt: one label per line; line order gives ids. Returns (labels, warnings)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"labels file {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"labels file {path}: expected UTF-8 text, got {e}") from None
    labels, warnings, seen = [], [], {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        label = raw.strip()
        if not label:
            warnings.append(f"labels file {path}: blank line {lineno} ignored")
            continue
        problem = label_problem(label)
        if problem:
            raise DataError(f"labels file {path}: line {lineno}: {problem}")
        if label in seen:
            raise DataError(
                f"labels file {path}: line {lineno} repeats label {label!r} from line {seen[label]}"
            )
        seen[label] = lineno
        labels.append(label)
    if not labels:
        raise DataError(f"labels file {path}: no labels in it")
    return labels, warnings


# --------------------------------------------------------------------------- sources

def label_problem(label: str) -> str | None:
    """Why `label` cannot be a class name, or None if it can.

    Labels end up one per line in the bundle's labels.txt, read back with
    str.splitlines(), so anything that splits a line there would shift every id.
    """
    if not label:
        return "empty label"
    if any(unicodedata.category(ch) == "Cs" for ch in label):
        return f"label is not valid UTF-8 ({label!r})"
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in label):
        return f"label contains a line break or control character ({label!r})"
    return None


def _from_folder(root: Path, reporter: Reporter | None = None) -> tuple[list[tuple[str, str]], list, list]:
    rows, skipped, warnings = [], [], []
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise DataError(f"data: cannot list folder {root} ({e.strerror or e})") from None
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    root_stat = root.stat()
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose and not class_dirs:
        raise DataError(f"{root} holds {len(loose)} image(s) but no class folders: put each class's images in "
                        f"a folder named after the class, e.g. {root / 'roses' / loose[0].name} and "
                        f"{root / 'tulips' / 'another.jpg'}, or give a CSV of uri,label rows")
    if loose:
        warnings.append(f"{len(loose)} image(s) directly in {root} ignored: images must be in class folders")
    # class folders listed on a thread pool (listing waits on the disk, not the GIL), shown as they finish
    with ((reporter or Reporter()).progress(f"listing {root}", len(class_dirs)) as advance,
          ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="petal-list") as pool):
        for r, s, w in pool.map(lambda d: _from_class_folder(d, root_stat, os.path.realpath(root)), class_dirs):
            rows += r
            skipped += s
            warnings += w
            advance(1)
    return rows, skipped, warnings


def _from_class_folder(d: Path, root_stat: os.stat_result, root_real: str) -> tuple[list[tuple[str, str]], list, list]:
    """(path, class) rows, skipped and warnings of one class folder, walked down. Images reached
    through symbolic links that lead out of the data folder (`root_real`) are read, and said."""
    rows, skipped, outside = [], [], []
    problem = label_problem(d.name)
    if problem:
        warning = f"class folder {str(d)!r} left out: {problem}"
        return [], [(str(d), f"class folder name unusable: {problem}")], [warning]

    def unlistable(e: OSError) -> None:
        # os.walk silently drops a folder it cannot list unless told; say so instead
        skipped.append((str(e.filename), f"cannot list folder ({e.strerror or e})"))

    # (device, inode) of folders walked: a symlink loop, or a link back up to the
    # data folder (which would pull the other classes into this one), is not followed
    seen_dirs = {(root_stat.st_dev, root_stat.st_ino)}
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True, onerror=unlistable):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue  # vanished while walking
        if (st.st_dev, st.st_ino) in seen_dirs:
            skipped.append((dirpath, "folder already listed (symbolic link loop or repeat)"))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        dir_outside = not _inside(os.path.realpath(dirpath), root_real)  # reached through a folder link
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            if fn.startswith("."):
                continue
            if Path(fn).suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((path, "not an image file extension"))
                continue
            if dir_outside or (os.path.islink(path) and not _inside(os.path.realpath(path), root_real)):
                outside.append(path)
            rows.append((path, d.name))
    warnings = [] if rows else [f"class folder {d.name!r} has no images; class left out"]
    if outside:
        warnings.append(f"{len(outside)} image(s) of class {d.name!r} are reached through symbolic links that "
                        f"lead out of the data folder (e.g. {outside[0]} -> {os.path.realpath(outside[0])}); "
                        "they are read")
    return rows, skipped, warnings


def _inside(real_path: str, root_real: str) -> bool:
    return real_path == root_real or real_path.startswith(root_real.rstrip(os.sep) + os.sep)


def _join(base: str, uri: str) -> str:
    """Resolve a CSV's URI relative to the CSV's own location."""
    if scheme_of(uri):
        return uri
    if is_local(base):
        return os.path.normpath(os.path.join(os.path.dirname(local_path(base)), uri))
    return _remote_join(base, uri)[0]


def _remote_join(base: str, uri: str) -> tuple[str, str]:
    """A relative `uri` in the CSV at remote `base` -> (full URI, its key in the bucket or on the host)."""
    scheme, _, rest = base.partition("://")
    bucket, _, key = rest.partition("/")
    key = posixpath.normpath(posixpath.join(posixpath.dirname(key), uri))
    return f"{scheme}://{bucket}/{key}", key


def remote_row_problem(base: str, uri: str) -> str | None:
    """Why a row of the CSV at `base` may not name `uri`: a CSV from a bucket or a web server
    names files there, never on the machine that reads it (a Beam worker's disk, /etc/...)."""
    if is_local(base):
        return None
    if is_local(uri) and (scheme_of(uri) == "file" or uri.startswith(("/", "~", "\\"))):
        return f"{uri}: a remote CSV may not name local files"
    if not scheme_of(uri) and _remote_join(base, uri)[1].startswith(".."):
        return f"{uri}: climbs out of the CSV's bucket"
    return None


def _read_text(uri: str) -> str:
    check_scheme(uri)
    try:
        if is_local(uri):
            with open(local_path(uri), "rb") as f:
                raw = f.read()
        elif scheme_of(uri) in HTTP_SCHEMES:
            raw = read_bytes(uri)
        else:
            import fsspec

            with fsspec.open(uri, "rb") as f:
                raw = f.read()
    except ImageError as e:
        raise DataError(f"{uri}: cannot read ({e})") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")  # strips a BOM
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not UTF-8 text ({e})") from None


def _from_csv(uri: str, columns: Columns = Columns()) -> tuple[list[tuple[str, str]], list, list, dict[str, str]]:
    """(uri, label) rows, skipped rows, warnings, and {uri: split} where a third column gives it."""
    text = _read_text(uri)
    rows, skipped, warnings, given = [], [], [], {}
    seen: dict[str, tuple[str, int]] = {}
    duplicates: list[str] = []  # "line N repeats line M"
    reader = csv.reader(io.StringIO(text, newline=""))
    first, (ucol, lcol, scol) = True, (0, 1, None)  # without a header: uri, label (a split only by name)
    first_row = None  # the first row, when it was read as data
    while True:
        lineno = reader.line_num + 1  # the physical line this row starts on (quoted fields may span lines)
        try:
            row = next(reader, None)
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise DataError(f"{uri}: line {lineno}: not a valid CSV row ({e})") from None
        if row is None:
            break
        where = f"{uri}:{lineno}"
        cells = [sheet_value(c.strip()) for c in row]  # petal's own CSVs (split.csv...) as written
        if not any(cells):
            continue  # blank line
        if first:
            first = False
            if found := header_columns(cells, uri, columns):
                ucol, lcol, scol = found
                warnings += unused_columns(uri, cells, found)
                continue  # header
            first_row = cells
        parsed = parse_row(cells, (ucol, lcol, scol), uri)
        if isinstance(parsed, str):
            skipped.append((where, parsed))
            continue
        path, label, split = parsed
        full = _join(uri, path)
        if full in seen:
            first_label, first_line = seen[full]
            if first_label == label:
                duplicates.append(f"line {lineno} repeats line {first_line}")
            else:
                skipped.append((where, f"{path} already labeled {first_label!r} on line {first_line}"))
            continue
        seen[full] = (label, lineno)
        rows.append((full, label))
        if split:
            given[full] = SPLIT_NAMES[split]
    if duplicates:
        more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
        warnings.append(f"{uri}: {len(duplicates)} duplicate row(s) ignored: "
                        + ", ".join(duplicates[:3]) + more)
    refuse_unnamed_header(uri, first_row, [u for u, _ in rows])
    return rows, skipped, warnings, given


def parse_row(cells: list[str], columns: tuple[int, int, int | None], source: str) -> tuple[str, str, str | None] | str:
    """A CSV row -> (uri as written, label, split or None), or why the row is skipped."""
    ucol, lcol, scol = columns
    if len(cells) <= max(ucol, lcol):
        return "row has no label column"
    path, label = cells[ucol], cells[lcol]
    split = cells[scol].lower() if scol is not None and len(cells) > scol and cells[scol] else None
    if split is not None and split not in SPLIT_NAMES:
        return f"split {cells[scol]!r} is not one of {', '.join(SPLIT_NAMES)}"
    if not path:
        return "empty uri"
    if "\n" in path or "\r" in path:
        return "uri contains a line break (an unbalanced quote?)"
    why = scheme_problem(path)
    return label_problem(label) or (why and f"{path}: {why}") or remote_row_problem(source, path) \
        or (path, label, split)


def refuse_unnamed_header(source: str, first_row: list[str] | None, uris: list[str]) -> None:
    """A first row read as data whose "path" names no image file while the other rows do is a
    header with names petal does not know (e.g. picture_loc,flower_kind): say so, instead of
    training a class named after a column."""
    def image_name(u: str) -> bool:
        return Path(u).suffix.lower() in IMAGE_EXTENSIONS

    if first_row is None or not uris or image_name(first_row[0]) or sum(map(image_name, uris)) * 2 <= len(uris):
        return
    raise DataError(f"{source}: the first row {first_row} looks like a header, but names no image column "
                    "(uri, path, filename, image, file) or no label column (label, class, category): rename "
                    "them, or give --uri-column and --label-column")


LABEL_WORDS = {"label", "class", "category", "labels", "class_name", "classname"}


def named_column(names: list[str], given: str, option: str, source: str) -> int:
    if given.lower() not in names:
        raise DataError(f"{option}: {source} has no column {given!r}; its first row is {names}")
    return names.index(given.lower())


def unused_columns(source: str, cells: list[str], used: tuple[int, int, int | None]) -> list[str]:
    """A warning naming the header's columns petal does not read (a split column under a name it
    does not know would otherwise be ignored without a word)."""
    unused = [c for i, c in enumerate(cells) if i not in used and c and c != "key"]  # key: a run's split.csv
    if not unused:
        return []
    split = "" if used[2] is not None else (
        "; if one of them gives the split (train/val/test), name it with --split-column")
    return [f"{source}: column(s) {', '.join(map(repr, unused))} not used (petal reads the image, label and "
            f"split columns){split}"]


def header_columns(cells: list[str], source: str, given: Columns = Columns()) -> tuple[int, int, int | None] | None:
    """A header row -> (uri column, label column, split column or None), matched by name
    (e.g. label,uri,subset or id,filename,class, or the names `given`); None when the row is no header."""
    names = [c.lower() for c in cells]
    ucol = next((i for i, n in enumerate(names) if n in HEADER_WORDS), None)
    lcol = next((i for i, n in enumerate(names) if n in LABEL_WORDS), None)
    if given.uri:
        ucol = named_column(names, given.uri, "--uri-column", source)
    if given.label:
        lcol = named_column(names, given.label, "--label-column", source)
    scol = next((names.index(w) for w in SPLIT_WORDS if w in names), None)
    if given.split is not None:  # NO_SPLIT: none
        scol = named_column(names, given.split, "--split-column", source) if given.split else None
    if ucol is None and lcol is None:
        return None
    if ucol is None or lcol is None:
        missing = "image column (uri, path, filename, image, file)" if ucol is None else \
            "label column (label, class, category)"
        raise DataError(f"{source}: the header {cells} has no {missing}; name the columns in the header, "
                        "or give --uri-column and --label-column")
    return ucol, lcol, scol


def refuse_paths_from_elsewhere(source: str, rows: list[tuple[str, str]], sample: int = 20) -> None:
    """A CSV's relative paths are read from the CSV's folder. When none of the first `sample`
    exists there but they all do from the current folder, the CSV was written from there:
    say so, instead of failing every image with "file not found"."""
    if not is_local(source) or not rows:
        return
    folder = os.path.dirname(os.path.abspath(local_path(source)))
    local = [u for u, _ in rows[:sample] if is_local(u) and not scheme_of(u)]
    if not local or any(os.path.exists(u) for u in local):
        return
    written = [os.path.relpath(u, folder) for u in local]
    if folder != os.getcwd() and all(os.path.exists(w) for w in written):
        raise DataError(f"{source}: its relative paths are read from the CSV's folder ({folder}), where none of "
                        f"them exists (e.g. {os.path.abspath(local[0])}); they exist from the current folder: "
                        "write them relative to the CSV's folder, or absolute")


def refuse_path_like_labels(source: str, rows: list[tuple[str, str]]) -> None:
    """Labels that look like file names mean the columns were read the wrong way round."""
    pathy = [lab for _, lab in rows if "/" in lab or Path(lab).suffix.lower() in IMAGE_EXTENSIONS]
    if rows and len(pathy) * 2 >= len(rows):
        raise DataError(f"{source}: {len(pathy)} of {len(rows)} labels look like file paths (e.g. {pathy[0]!r}): "
                        "are the columns swapped? Give a header naming them (e.g. uri,label), "
                        "or --uri-column and --label-column")


def _check_schemes(source: str, rows: list[tuple[str, str]]) -> None:
    """Refuse up front URIs whose scheme has no fsspec driver here, naming the package."""
    counts = Counter(scheme_of(u) for u, _ in rows)
    for scheme, n in counts.items():
        if scheme not in ("", "file"):
            example = next(u for u, _ in rows if scheme_of(u) == scheme)
            try:
                check_scheme(example)
            except PetalError as e:
                raise DataError(f"{source}: {n} row(s) use {scheme}:// URIs: {e}") from None


def _split_folders(root: Path) -> dict[str, Path]:
    """train/ (or training/) beside val/ (valid/, validation/, dev/, eval/) or test/ (testing/), each
    holding class folders: the Ultralytics and Hugging Face imagefolder layout. {} when `root` is not
    laid out so."""
    subs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    kinds = {SPLIT_NAMES[name] for name in subs if name in SPLIT_NAMES and name != "calibration"}
    if TRAIN not in kinds or not {EVAL, TEST} & kinds:
        return {}
    return {name: path for name, path in subs.items() if name in SPLIT_NAMES and name != "calibration"}


def _from_split_folders(root: Path, parts: dict[str, Path], reporter: Reporter | None
                        ) -> tuple[list[tuple[str, str]], list, list, dict[str, str], list[str]]:
    """(uri, label) rows, skipped, warnings, {uri: split} and notes of a train/ val/ test/ layout."""
    notes = [f"split folders in {root}: {', '.join(sorted(parts))}"]
    rows, skipped, warnings, given = [], [], [], {}
    for name, path in sorted(parts.items()):
        r, s, w = _from_folder(path, reporter)
        rows, skipped, warnings = rows + r, skipped + s, warnings + w
        given.update((u, SPLIT_NAMES[name]) for u, _ in r)
    return rows, skipped, warnings, given, notes


def refuse_one_level_up(root: Path, classes: list[str]) -> None:
    """Training data/ holding only flowers/, which holds roses/ and tulips/: the classes are one level
    down. (Evaluating one class with albums in it is fine.)"""
    if len(classes) != 1 or not (root / classes[0]).is_dir():
        return
    inner = sorted(p.name for p in (root / classes[0]).iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(inner) >= 2:
        raise DataError(f"{root} holds one class folder, {classes[0]!r}, which holds folders {', '.join(inner[:5])}"
                        f"{' ...' if len(inner) > 5 else ''}: if those are the classes, give {root / classes[0]}")


def nested_splits(root: Path, rows: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """The class-first layout, roses/train/..., roses/val/..., roses/test/...: {uri: split} of the
    images in split subfolders of their class folder, and a note saying so ({}, [] when there are
    none)."""
    found = {}
    for uri, _ in rows:
        parts = Path(uri).relative_to(root).parts  # (class, maybe a split folder, ..., file)
        if len(parts) > 2 and parts[1].lower() in SPLIT_NAMES and parts[1].lower() != "calibration":
            found[uri] = SPLIT_NAMES[parts[1].lower()]
    if TRAIN not in found.values() or not {EVAL, TEST} & set(found.values()):
        return {}, []
    return found, [f"split folders inside the class folders of {root} (e.g. {Path(next(iter(found))).parent}): "
                   "they give the split"]


def refuse_split_names_as_classes(source: str, classes: list[str]) -> None:
    """Class folders that are all split names (train/ test/ alone, nothing in them recognised as a
    layout) would train a model whose labels are "train" and "test"."""
    if classes and all(c.lower() in SPLIT_NAMES for c in classes):
        raise DataError(f"{source}: the class folders {', '.join(map(repr, classes))} are split names, not "
                        "classes: give a train/ folder beside a val/ or test/ folder, each holding one folder "
                        "per class (train/roses/..., val/roses/...)")


def _read_source(source: str, what: str = "data", columns: Columns = Columns(), reporter: Reporter | None = None
                 ) -> tuple[list[tuple[str, str]], list, list, dict[str, str], list[str]]:
    """(uri, label) rows, skipped rows, warnings, {uri: split} for splits the data gives, and notes."""
    if is_local(source) and Path(local_path(source)).is_dir():
        if columns != Columns():
            raise DataError(f"{what}: --uri-column, --label-column and --split-column name CSV columns; "
                            f"{source} is a folder")
        root = Path(local_path(source))
        parts = _split_folders(root)
        if parts:
            return _from_split_folders(root, parts, reporter)
        rows, skipped, warnings = _from_folder(root, reporter)
        refuse_split_names_as_classes(source, sorted({lab for _, lab in rows}))
        given, notes = nested_splits(root, rows)
        return rows, skipped, warnings, given, notes
    if is_local(source) and not Path(local_path(source)).exists():
        raise DataError(f"{what}: no such folder or CSV file: {source}")
    rows, skipped, warnings, splits = _from_csv(source, columns)
    bad = [reason for _, reason in skipped if reason.startswith("split ")]
    if columns.split is None and bad and not splits:  # a guessed column (e.g. fold: 0..4) that gives no split
        rows, skipped, warnings, splits = _from_csv(source, dataclasses.replace(columns, split=NO_SPLIT))
        warnings.append(f"{source}: the split column holds no split names ({bad[0].split(' is not')[0]}, ...), so "
                        "it is not used: the split is made by hash (name the split column with --split-column)")
    refuse_path_like_labels(source, rows)
    refuse_paths_from_elsewhere(source, rows)
    _check_schemes(source, rows)
    return rows, skipped, warnings, splits, []


def compile_group(group: str | None) -> re.Pattern | None:
    if group is None:
        return None
    try:
        return re.compile(group)
    except re.error as e:
        raise DataError(f"group: expected a regular expression, got {group!r} ({e})") from None


def load_dataset(
    source: str | Path,
    *,
    labels_file: str | Path | None = None,
    eval_source: str | Path | None = None,
    eval_percent: float = 10.0,
    require_train: bool = True,
    group: str | None = None,
    columns: Columns = Columns(),
    reporter: Reporter | None = None,
) -> Dataset:
    """Find the labeled examples and assign each to train, eval (or test).

    A split the data gives (train/ val/ test/ folders, a CSV split column) is kept. With
    `eval_source`, that data is the eval split and `source` is all train; otherwise a
    stable hash of each file name (or of its `group` regex capture) puts `eval_percent`%
    in eval. Class folders are listed in parallel, with progress shown to `reporter`.
    """
    check_param("eval_percent", eval_percent, Real(0, 100, high_open=True))
    pattern = compile_group(group)
    rows, skipped, warnings, given, notes = _read_source(str(source), columns=columns, reporter=reporter)
    if eval_source is None and given and EVAL not in given.values() and TEST in given.values():
        given = {u: EVAL if split == TEST else split for u, split in given.items()}
        notes.append(f"no val split in {source}: the test images are the eval split")
    tagged = [(u, lab, given.get(u) or assign_split(u, eval_percent, pattern)) for u, lab in rows]
    if eval_source is not None:
        erows, eskipped, ewarnings, _, enotes = _read_source(str(eval_source), "eval", columns, reporter)
        tagged = ([(u, lab, TEST if given.get(u) == TEST else TRAIN) for u, lab in rows]
                  + [(u, lab, EVAL) for u, lab in erows])
        skipped += eskipped
        warnings += ewarnings
        notes += enotes

    if labels_file is not None:
        classes, lw = read_labels_file(labels_file)
        warnings += lw
        known = set(classes)
        unknown = Counter(lab for _, lab, _ in tagged if lab not in known)
        for u, lab, _ in tagged:
            if lab not in known:
                skipped.append((u, f"label {lab!r} not in the labels file"))
        tagged = [t for t in tagged if t[1] in known]
        if unknown:
            warnings.append(
                f"{sum(unknown.values())} row(s) with labels not in {labels_file} skipped: "
                + ", ".join(f"{k!r} ({v})" for k, v in unknown.most_common(5))
            )
    else:
        classes = sorted({lab for _, lab, _ in tagged})

    # local paths absolute: a run folder names its images so that it works from any folder
    examples = [Example(absolute(u), lab, s) for u, lab, s in tagged]
    ds = Dataset(examples, classes, skipped, warnings, notes)
    if require_train:
        if is_local(str(source)) and Path(local_path(str(source))).is_dir():
            refuse_one_level_up(Path(local_path(str(source))), sorted({e.label for e in examples}))
        check_trainable(ds, eval_given=eval_source is not None, split_given=bool(given))
    elif not examples:
        raise DataError(f"no labeled images found in {source}")
    return ds


def check_trainable(ds: Dataset, eval_given: bool = False, split_given: bool = False) -> None:
    """Refuse data that cannot train a classifier, saying exactly why (and what to do)."""
    present = {e.label for e in ds.examples}
    if len(present) < 2:
        found = ", ".join(repr(c) for c in sorted(present)) or "none"
        raise DataError(f"need at least 2 classes with images, found {len(present)} ({found})")
    counts = ds.counts()
    empty = [c for c in ds.classes if counts[c][TRAIN] == 0]
    if empty:
        advice = ("add training images of them to the training data, or leave them out of --eval" if eval_given
                  else "add images of them to the training split (the train/ folder, or 'train' rows)"
                  if split_given else "add images, or lower --eval-percent")
        trained = {c.lower(): c for c in ds.classes if counts[c][TRAIN]}
        twins = [f"{c!r} vs {trained[c.lower()]!r}" for c in empty if c.lower() in trained]
        if twins:  # val/Watch beside train/watch: one class spelled two ways
            advice = f"class names differ only in case: {', '.join(twins)}; name the folders alike"
        raise DataError("these classes have no training image: " + ", ".join(repr(c) for c in empty)
                        + f" ({advice})")


# --------------------------------------------------------------------------- predict inputs

def csv_uris(source: str, uri_column: str | None = None) -> list[str]:
    """The image URIs of a CSV, read as `petal train` reads it: the column named `uri_column`, or
    found by header name (uri, path, filename, image, file, ...), or the first column of a CSV
    without a header; relative paths from the CSV's folder."""
    reader = csv.reader(io.StringIO(_read_text(source), newline=""))
    rows = [[c.strip() for c in r] for r in reader if any(c.strip() for c in r)]
    if not rows:
        return []
    names = [c.lower() for c in rows[0]]
    col = named_column(names, uri_column, "--uri-column", source) if uri_column else \
        next((i for i, n in enumerate(names) if n in HEADER_WORDS), None)
    if col is None:  # no header: the first column, unless the first row is a header of other names
        refuse_unnamed_header(source, rows[0], [r[0] for r in rows[1:]])
        col = 0
    else:
        rows = rows[1:]
    return [_join(source, sheet_value(r[col])) for r in rows if len(r) > col and r[col]]


def expand_inputs(inputs: list[str], uri_column: str | None = None) -> tuple[list[str], list[str]]:
    """Files, folders (searched recursively), CSVs (their image column, see `csv_uris`) and globs -> image URIs.

    Returns (uris, problems); a problem is an input that matched nothing.
    """
    import glob

    uris, problems = [], []
    for raw in inputs:
        if not is_local(raw):
            uris.append(raw)
            continue
        path = Path(local_path(raw))
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            uris += found
            if not found:
                problems.append(f"{raw}: no images in this folder")
        elif path.suffix.lower() == ".csv" and path.is_file():
            uris += csv_uris(str(path), uri_column)
        elif any(ch in raw for ch in "*?[") and not os.path.lexists(path):  # `p[1].jpg` is a file first
            found = sorted(glob.glob(raw, recursive=True))
            uris += found
            if not found:
                problems.append(f"{raw}: the pattern matched no file")
        else:
            uris.append(raw)  # a missing file is reported per image, with the reason
    return uris, problems
