"""--exclude / --relabel CSVs: what a hand-edited or hostile file gets."""

import pytest

from petal.data import EVAL, TRAIN, Dataset, Example
from petal.errors import DataError
from petal.review import apply_review
from petal.storage import atomic_write_csv


def data(tmp_path) -> Dataset:
    return Dataset([Example(str(tmp_path / f"{n}.png"), "cat" if n < 2 else "dog", "train") for n in range(4)],
                   ["cat", "dog"])


def test_relabel_and_exclude_as_written_by_petal(tmp_path):
    ds = data(tmp_path)
    atomic_write_csv(tmp_path / "fix.csv", ["uri", "label", "suggested"],
                     [(ds.examples[0].uri, "cat", "dog"), (ds.examples[0].uri, "cat", "dog")])  # a repeat is fine
    atomic_write_csv(tmp_path / "drop.csv", ["uri_a", "uri_b"], [(ds.examples[3].uri, "x")])
    out = apply_review(ds, exclude=tmp_path / "drop.csv", relabel=tmp_path / "fix.csv")
    assert [(e.uri[-5:], e.label) for e in out.examples] == [("0.png", "dog"), ("1.png", "cat"), ("2.png", "dog")]


def test_a_field_over_the_csv_limit_is_a_clear_error(tmp_path):
    ds = data(tmp_path)
    (tmp_path / "big.csv").write_text("uri,label\n" + "x" * 131073 + ",cat\n")
    for option in ("exclude", "relabel"):
        with pytest.raises(DataError, match=rf"{option}: .*big.csv: not a valid CSV \(line 2: field larger than"):
            apply_review(ds, **{option: tmp_path / "big.csv"})


def test_a_csv_without_a_header_is_refused(tmp_path):
    ds = data(tmp_path)
    (tmp_path / "one.csv").write_text(f"{ds.examples[0].uri},dog\n")  # one line, no header: did nothing
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"relabel: .*one.csv has no header naming a 'uri' column "
                                        r"\(its first line reads .*0.png, dog'\); expected a header such as uri,label"):
        apply_review(ds, relabel=tmp_path / "one.csv")
    with pytest.raises(DataError, match=r"exclude: .*empty.csv has no header naming a 'uri' or 'uri_a' column "
                                        r"\(it is empty\)"):
        apply_review(ds, exclude=tmp_path / "empty.csv")


def test_conflicting_relabel_rows_are_reported(tmp_path):
    ds = data(tmp_path)
    uri = ds.examples[0].uri
    (tmp_path / "fix.csv").write_text(f"uri,label\n{uri},dog\n{ds.examples[1].uri},dog\n{uri},cat\n")
    with pytest.raises(DataError, match=r"relabel: .*fix.csv: .*0.png is given 'dog' on line 2 and 'cat' on line 4"):
        apply_review(ds, relabel=tmp_path / "fix.csv")


def test_relabel_that_empties_a_class_says_so(tmp_path):
    """Issue 22 item 6: it was blamed on unreadable images."""
    ds = Dataset([Example(str(tmp_path / f"big{i}.jpg"), "big") for i in range(4)]
                 + [Example(str(tmp_path / f"tiny{i}.jpg"), "tiny") for i in range(2)]
                 + [Example(str(tmp_path / "tiny9.jpg"), "tiny", EVAL)], ["big", "tiny"])
    (tmp_path / "fix.csv").write_text("uri,label\n" + "".join(f"{tmp_path / f'tiny{i}.jpg'},big\n" for i in range(2)))
    with pytest.raises(DataError, match=r"--relabel leave these classes with no training image: "
                                        r"'tiny' \(relabelled to 'big'\)"):
        apply_review(ds, relabel=tmp_path / "fix.csv")
    (tmp_path / "drop.csv").write_text("uri\n" + "".join(f"{tmp_path / f'tiny{i}.jpg'}\n" for i in range(2)))
    with pytest.raises(DataError, match=r"'tiny' \(all excluded\)"):
        apply_review(ds, exclude=tmp_path / "drop.csv")
    (tmp_path / "one.csv").write_text(f"uri\n{tmp_path / 'tiny0.jpg'}\n")
    kept = apply_review(ds, exclude=tmp_path / "one.csv")
    assert [e.label for e in kept.split(TRAIN)].count("tiny") == 1
