"""storage: what a remote copy may write, which URIs are read, how large a file may be, what CSVs hold."""

import fsspec
import pytest

from petal.errors import PetalError
from petal.storage import copy_folder


def test_a_remote_folder_copy_stays_inside_its_destination(tmp_path):
    """An object key with `..` (a remote bundle for `petal serve gs://...`) is refused, not
    written outside the destination."""
    fs = fsspec.filesystem("memory")
    victim = tmp_path / "victim" / "pwned.txt"
    fs.pipe("/bucket/model/petal.json", b"{}")
    fs.pipe(f"/bucket/model/../../../../../../../..{victim}", b"owned")
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        with pytest.raises(PetalError, match="leads out of the folder"):
            copy_folder("memory://bucket/model", dest)
        assert not victim.exists()
    finally:
        fs.rm("/bucket", recursive=True)
        fs.store.clear()
    fs.pipe("/bucket/model/petal.json", b"{}")
    fs.pipe("/bucket/model/sub/labels.txt", b"a\n")
    try:
        copy_folder("memory://bucket/model", dest)
        assert (dest / "sub" / "labels.txt").read_bytes() == b"a\n"
    finally:
        fs.store.clear()
