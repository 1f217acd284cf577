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


def test_files_over_the_size_cap_are_refused_unread(tmp_path, monkeypatch):
    """Each decode thread holds a whole file: four sparse 1 GB files with --workers 4 took 4.3 GB.
    The cap (256 MiB, PETAL_MAX_FILE_MB or `petal --max-file-mb`) refuses from the size alone."""
    import builtins

    from petal import storage
    from petal.errors import ImageError

    monkeypatch.delenv(storage.MAX_FILE_ENV, raising=False)
    assert storage.max_file_bytes() == 256 << 20
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(300 << 20)  # sparse: no disk used
    real_open = builtins.open

    def no_open(path, *a, **kw):
        assert str(path) != str(big), "the file was opened"
        return real_open(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_open)
        with pytest.raises(ImageError, match=r"file too large: 314,572,800 bytes, limit 268,435,456 "
                                             r"\(raise it with PETAL_MAX_FILE_MB or `petal --max-file-mb`\)"):
            storage.read_bytes(str(big))
    monkeypatch.setenv(storage.MAX_FILE_ENV, "400")
    assert storage.max_file_bytes() == 400 << 20
    monkeypatch.setenv(storage.MAX_FILE_ENV, "lots")
    with pytest.raises(PetalError, match="PETAL_MAX_FILE_MB: expected a size in MiB above 0"):
        storage.read_bytes(str(big))


def test_the_cli_size_cap_names_the_file(tmp_path, cache_dir):
    from test_cli import petal

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    r = petal("--max-file-mb", "1", "classify", big, check=False)
    assert r.returncode == 2
    assert f"{big}: error: file too large: 2,097,152 bytes, limit 1,048,576" in r.stderr.replace("\n", "")


def test_csv_cells_a_spreadsheet_would_run_are_quoted_and_read_back(tmp_path):
    """A label `=HYPERLINK(...)` (or +, -, @) is a formula in a spreadsheet: written with an
    apostrophe; petal's readers (read_csv, data CSVs) take it off again."""
    import csv

    from petal.data import load_dataset
    from petal.storage import atomic_write_csv, read_csv

    labels = ['=HYPERLINK("http://x","y")', "+cmd", "-x", "@SUM(A1)", "'=already", "plain", "\tz"]
    rows = [(str(tmp_path / f"{i}.png"), lab, "-0.5") for i, lab in enumerate(labels)]
    atomic_write_csv(tmp_path / "rows.csv", ["uri", "label", "score"], rows)
    with open(tmp_path / "rows.csv", newline="") as f:
        raw = list(csv.reader(f))[1:]
    assert [r[1] for r in raw] == ["'" + lab if lab != "plain" else lab for lab in labels]
    assert all(r[2] == "-0.5" for r in raw)  # a number stays a number
    assert [(r["uri"], r["label"], r["score"]) for r in read_csv(tmp_path / "rows.csv")] == rows
    ds = load_dataset(tmp_path / "rows.csv", eval_percent=0, require_train=False)
    assert sorted(e.label for e in ds.examples) == sorted(labels[:-1])  # "\tz": a control character, refused
