"""Reading URIs and writing files safely.

Reads go through fsspec, so local paths, file://, gs:// and s3:// all work; a
cloud scheme whose fsspec driver is missing gets a message naming the package.
http(s):// goes through `petal.http_reader`, which refuses private addresses.

Writes are atomic: a temp file in the same folder, then rename, so a reader
never sees a half-written file, even after kill -9.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petal.errors import ImageError, PetalError

# scheme -> the package that gives fsspec that scheme
SCHEME_PACKAGES = {
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "s3": "s3fs",
    "s3a": "s3fs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hf": "huggingface_hub",
}


HTTP_SCHEMES = ("http", "https")  # read by petal.http_reader, not fsspec
# The schemes petal reads, and no other: fsspec knows dozens (ftp://, webhdfs://, local://,
# zip://...::file://), which would skip the URI policy or reach the machine's own files.
READ_SCHEMES = frozenset({"", "file", *HTTP_SCHEMES, *SCHEME_PACKAGES})


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and len(head) > 1 else ""


def is_local(uri: str) -> bool:
    return scheme_of(uri) in ("", "file")


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.lower().startswith("file://") else uri


def absolute(uri: str | os.PathLike) -> str:
    """A local path made absolute, so that it names the same file from any folder (a run
    folder keeps such names); other URIs as they are."""
    uri = str(uri)
    return os.path.abspath(local_path(uri)) if is_local(uri) else uri


def scheme_problem(uri: str) -> str | None:
    """Why petal does not read `uri` whatever the machine has installed, or None."""
    scheme = scheme_of(uri)
    if scheme not in READ_SCHEMES:
        return (f"{scheme}:// URIs are not read (petal reads local paths, http(s):// and cloud storage: "
                f"{', '.join(s + '://' for s in SCHEME_PACKAGES)})")
    if "::" in uri and not is_local(uri) and scheme not in HTTP_SCHEMES:
        return "chained URIs (A::B) are not read"
    return None


def check_scheme(uri: str) -> None:
    """Raise PetalError early if the URI's scheme is not read by petal or cannot be read here."""
    if why := scheme_problem(uri):
        raise PetalError(why)
    scheme = scheme_of(uri)
    if is_local(uri) or scheme in HTTP_SCHEMES:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        pkg = SCHEME_PACKAGES.get(scheme)
        hint = f": pip install {pkg}" if pkg else ""
        raise PetalError(f"cannot read {scheme}:// URIs ({e}){hint}") from None


# A file over this many MiB is refused unread: each decode thread holds a whole file, so the
# cap times --workers bounds that memory. 256 MiB holds any photo; only an uncompressed 16-bit
# image near the 64 MP pixel limit (see petal.images) is larger, and PETAL_MAX_FILE_MB lifts it.
MAX_FILE_ENV = "PETAL_MAX_FILE_MB"
DEFAULT_MAX_FILE_MB = 256
TOO_LARGE_HINT = f"(raise it with {MAX_FILE_ENV} or `petal --max-file-mb`)"


def max_file_bytes() -> int:
    """The size cap on one file read, from $PETAL_MAX_FILE_MB (MiB) or the default."""
    value = os.environ.get(MAX_FILE_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_FILE_MB << 20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not 0 < mb < 2**40:
        raise PetalError(f"{MAX_FILE_ENV}: expected a size in MiB above 0 (e.g. 512), got {value!r}")
    return int(mb * (1 << 20))


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole file, at most `max_bytes` (default: `max_file_bytes()`), refused from its size
    before reading where the size is known. Raises ImageError (the item's problem) otherwise."""
    if why := scheme_problem(uri):
        raise ImageError(why)
    max_bytes = max_file_bytes() if max_bytes is None else max_bytes
    try:
        if is_local(uri):
            path = local_path(uri)
            # stat before open: opening a FIFO named .jpg would block, a device never end
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                raise ImageError("is a directory, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("not a regular file (a pipe, socket or device)")
            if st.st_size > max_bytes:
                raise ImageError(f"file too large: {st.st_size:,} bytes, limit {max_bytes:,} {TOO_LARGE_HINT}")
            with open(path, "rb") as f:
                return f.read()
        if scheme_of(uri) in HTTP_SCHEMES:  # under petal's URI policy: public hosts, time-outs
            from petal.http_reader import http_read

            return http_read(uri, max_bytes, TOO_LARGE_HINT)
        import fsspec

        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)  # no more than the limit, whatever the server sends
        if len(data) > max_bytes:
            raise ImageError(f"file too large: over {max_bytes:,} bytes {TOO_LARGE_HINT}")
        return data
    except ImageError:
        raise
    except FileNotFoundError:
        if os.path.islink(local_path(uri)):
            raise ImageError("dangling symbolic link") from None
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except ImportError as e:
        raise ImageError(f"cannot read this URI scheme: {e}") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    except ValueError as e:  # e.g. "embedded null byte" in a path from a CSV
        raise ImageError(f"invalid path or URI: {e}") from None
    except Exception as e:  # noqa: BLE001 - fsspec drivers raise their own types (HTTP, auth...)
        if is_local(uri):
            raise  # a local read has no other failure mode: this is a bug
        raise ImageError(f"cannot read: {type(e).__name__}: {e}") from None


def copy_folder(uri: str, dest: Path) -> Path:
    """Copy the files of a remote folder (gs://, s3://, http(s)://...) into `dest` through fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    try:
        files = [f for f in fs.find(root) if not fs.isdir(f)]
    except Exception as e:  # noqa: BLE001 - each fsspec driver raises its own types
        raise PetalError(f"model: cannot list {uri} ({type(e).__name__}: {e})") from None
    if not files:
        raise PetalError(f"model: no files at {uri}")
    inside = Path(dest).resolve()
    for f in files:
        # a key holding `..` (`model/../../../tmp/x`) would be written outside `dest`
        target = (inside / os.path.relpath(f, root)).resolve()
        if not target.is_relative_to(inside) or target == inside:
            raise PetalError(f"model: {uri} holds {f!r}, which leads out of the folder; refused")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(f, str(target))
    return dest


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a shared cache needs the usual mode
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@dataclass(frozen=True)
class OutputFolder:
    """What a command writes into its --out folder: `names`; an earlier output of it holds
    `marker`, a JSON object with `keys`. Anything else there is the user's."""

    names: frozenset[str]
    marker: str
    keys: tuple[str, ...]

    def problem(self, folder: Path) -> str | None:
        """Why writing into `folder` could overwrite or mix with the user's files, or None."""
        if not folder.is_dir():
            return None
        present = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if not present:
            return None
        others = [n for n in present if n not in self.names]
        if others:
            return f"holds files of its own ({', '.join(others[:3])})"
        try:
            earlier = json.loads((folder / self.marker).read_text("utf-8"))
            if isinstance(earlier, dict) and all(k in earlier for k in self.keys):
                return None
        except (OSError, ValueError):
            pass
        return f"holds {', '.join(present[:3])}, not written by petal (no {self.marker} of petal's)"


def check_output(path: str | os.PathLike, option: str, *, folder: bool = False,
                 owned: OutputFolder | None = None) -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder
    is wanted or the reverse, a parent that is a file, or a folder we may not write in;
    with `owned`, a folder holding files that are not an earlier output of the command."""
    path = Path(path)
    if owned is not None and (why := owned.problem(path)):
        raise PetalError(f"{option}: {path} {why}; petal would overwrite or mix with them: "
                         "choose an empty or new folder")
    want = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise PetalError(f"{option}: {path} is {'a file' if folder else 'a folder'}; expected a {want}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PetalError(f"{option}: cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PetalError(f"{option}: cannot create {path}: no permission to write in {ancestor}")
    try:  # the one proof that works everywhere (root on a read-only or special filesystem: /proc)
        tempfile.TemporaryDirectory(prefix=".petal-probe-", dir=ancestor).cleanup()
    except OSError as e:
        raise PetalError(f"{option}: cannot create {path}: {ancestor} refuses new files ({e.strerror or e})") from None
    return path


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (folders: where the OS allows)."""
    if path.is_symlink():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. a folder on Windows
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some filesystems refuse fsync on folders; files must sync
            raise
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask. Linux tells it in /proc; elsewhere it is read once by setting
    and restoring it (a file another thread made in that instant could get mode 0666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # surrogateescape: a file name that is not valid UTF-8 (os.fsdecode gives it
    # surrogates) is written as its original bytes instead of crashing the write
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


# A cell a spreadsheet would run as a formula (=, +, -, @; tab and CR too) is written with a
# leading apostrophe, which spreadsheets show as text; `sheet_value` takes it off again, so
# petal's own CSVs read back exactly (a label "-x", "=HYPERLINK(...)" or "'=x" alike).
FORMULA_START = frozenset("=+-@\t\r")


def _formula_like(cell: str) -> bool:
    """Would `cell` be written with an apostrophe? Numbers (-0.5) are read as numbers: not."""
    if cell[:1] == "'":
        return _formula_like(cell[1:])  # "'=x" gets its own apostrophe, or it would read back as "=x"
    if cell[:1] not in FORMULA_START:
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False


def sheet_row(cells: Iterable[Any]) -> list[Any]:
    """One CSV row, each text cell safe to open in a spreadsheet (formula injection)."""
    return ["'" + c if isinstance(c, str) and _formula_like(c) else c for c in cells]


def sheet_value(cell: str) -> str:
    """A cell as `sheet_row` wrote it -> the value it was given."""
    return cell[1:] if cell[:1] == "'" and _formula_like(cell[1:]) else cell


def atomic_write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A CSV file users may open in a spreadsheet: every row goes through `sheet_row`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(map(sheet_row, rows))
    atomic_write_text(path, buf.getvalue())


def read_csv_lines(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line, row)]) of a CSV with a header, as written by `atomic_write_csv`; `line`
    is where the row starts. A row the csv module refuses raises csv.Error naming its line."""
    # surrogateescape: file names that are not UTF-8 come back as they were written
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        rows, line = [], 1
        try:
            header = list(reader.fieldnames or [])  # reads the header
            while True:
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return header, rows
                rows.append((line, {k: sheet_value(v) if isinstance(v, str) else v for k, v in row.items()}))
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise csv.Error(f"line {line}: {e}") from None  # where the row starts


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """A CSV with a header, as written by `atomic_write_csv`, as one dict per row."""
    return [row for _, row in read_csv_lines(path)[1]]


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a served bundle needs the usual mode
    try:
        yield tmp
        for p in (*tmp.rglob("*"), tmp):  # contents on disk before the swap makes them visible
            _fsync(p)
        swapped = path.exists() and _exchange(tmp, path)  # then `tmp` holds the old folder
        if not swapped:
            # No atomic swap here (not Linux, or an old kernel/filesystem): move the
            # old folder aside, then the new one in. `path` is missing between the
            # two renames, for microseconds (or after a kill just there).
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old.{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def user_cache_dir() -> Path:
    """petal's folder in the user's cache dir, e.g. ~/.cache/petal."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("petal"))


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedding cache folder: `cache_dir` if given, else default_cache_dir()."""
    return Path(cache_dir) if cache_dir else default_cache_dir()


def default_cache_dir() -> Path:
    env = os.environ.get("PETAL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return user_cache_dir()
