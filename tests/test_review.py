"""Acting on a reviewed audit: --exclude and --relabel."""

from __future__ import annotations

import pytest

from petal.data import EVAL, TRAIN, Dataset, Example
from petal.errors import DataError
from petal.review import apply_review


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
