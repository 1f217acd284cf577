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
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
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
    "hf": "huggingface_hub",
}


HTTP_SCHEMES = ("http", "https")  # read by petal.http_reader, not fsspec


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


def check_scheme(uri: str) -> None:
    """Raise PetalError early if the URI's scheme cannot be read here."""
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


# No image petal accepts (64 MP, see petal.images) needs more bytes than this even
# uncompressed at 16 bits x 4 channels (512 MB); a larger file is refused unread.
MAX_FILE_BYTES = 1 << 30


def read_bytes(uri: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole file. Raises ImageError (the item's problem) if it cannot be read."""
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
                raise ImageError(f"file too large: {st.st_size:,} bytes, limit {max_bytes:,}")
            with open(path, "rb") as f:
                return f.read()
        if scheme_of(uri) in HTTP_SCHEMES:  # under petal's URI policy: public hosts, time-outs
            from petal.http_reader import http_read

            return http_read(uri, max_bytes)
        import fsspec

        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)  # no more than the limit, whatever the server sends
        if len(data) > max_bytes:
            raise ImageError(f"file too large: over {max_bytes:,} bytes")
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
    for f in files:
        target = dest / os.path.relpath(f, root)
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


def check_output(path: str | os.PathLike, option: str, *, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder
    is wanted or the reverse, a parent that is a file, or a folder we may not write in."""
    path = Path(path)
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


def atomic_write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """A CSV with a header, as written by `atomic_write_csv`, as one dict per row."""
    # surrogateescape: file names that are not UTF-8 come back as they were written
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.DictReader(f))


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
