"""One meaning of "unknown" in every output (issue 22 item 3): `label` is the answer ("unknown"
when rejected), `nearest` the closest class, and a rejected row's score never sorts it above a kept one."""

from __future__ import annotations

import csv
import io
from types import SimpleNamespace

import numpy as np

from petal.predictions import Scores, csv_row, scored_prediction, write_rows
from petal.serve.protocol import prediction_row
from petal.serve.v2 import infer_response

LABELS = ["daisy", "rose"]
REQUEST = SimpleNamespace(outputs=None, id=None)  # a v2 request that asks for every output
# two images: a rose kept (0.6), an image like neither rejected although its nearest class scores 0.9
SCORES = Scores(np.array([[0.4, 0.6], [0.1, 0.9]], np.float32), np.array([0.2, 3.0], np.float32),
                np.array([False, True]))


def predictions(reject_unknown: bool = True):
    return [scored_prediction(LABELS, f"{i}.jpg", SCORES[i], 2, reject_unknown) for i in range(2)]


def test_the_library_row_says_unknown_and_nearest():
    kept, rejected = predictions()
    assert (kept.label, kept.nearest, kept.score) == ("rose", "rose", np.float32(0.6))
    assert (rejected.label, rejected.nearest, rejected.unknown) == ("unknown", "rose", True)
    assert rejected.score < kept.score  # sorting by score puts the rejected image last
    assert rejected.top[0] == ("rose", np.float32(0.9))  # the nearest class's probability is still there


def test_every_output_format_agrees():
    kept, rejected = predictions()
    assert [prediction_row((False, None), p)["label"] for p in (kept, rejected)] == ["rose", "unknown"]
    rest = prediction_row((False, None), rejected)
    assert rest["nearest"] == "rose" and rest["prediction"] is None and rest["unknown"] is True
    assert rejected.to_dict()["label"] == "unknown" and rejected.to_dict()["nearest"] == "rose"
    f = io.StringIO()
    write_rows(f, [kept, rejected], "csv")
    rows = list(csv.DictReader(io.StringIO(f.getvalue())))
    assert [r["label"] for r in rows] == ["rose", "unknown"] and float(rows[1]["score"]) < float(rows[0]["score"])
    v2 = {o["name"]: o["data"] for o in infer_response("m", "1", REQUEST, SCORES, LABELS)["outputs"]}
    assert v2["labels"] == ["rose", "unknown"] and v2["nearest"] == ["rose", "rose"] and v2["unknown"] == [False, True]
    assert csv_row(rejected)[1] == "unknown" and csv_row(rejected)[-1] == "rose"


def test_without_rejection_the_old_shape_comes_back():
    kept, nearest = predictions(reject_unknown=False)
    assert (nearest.label, nearest.unknown, nearest.score) == ("rose", False, np.float32(0.9))
    assert prediction_row((False, None), nearest)["prediction"] == 1
    doc = infer_response("m", "1", REQUEST, SCORES, LABELS, reject_unknown=False)
    v2 = {o["name"]: o["data"] for o in doc["outputs"]}
    assert v2["labels"] == ["rose", "rose"] and v2["unknown"] == [False, False]


def test_output_to_a_device_with_format(tmp_path):
    """Issue 22 item 19: --output /dev/null was refused for lack of a suffix; with --format any path goes,
    and a device is written to, never replaced by a renamed file."""
    import os
    import stat
    from pathlib import Path

    import pytest

    from petal.errors import PetalError
    from petal.predictions import write_predictions

    assert write_predictions(Path(os.devnull), predictions(), "csv") == (2, [])
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert write_predictions(tmp_path / "preds.out", predictions(), "jsonl")[0] == 2
    assert (tmp_path / "preds.out").read_text().count("\n") == 2
    with pytest.raises(PetalError, match="or --format csv|jsonl"):
        write_predictions(tmp_path / "preds.out", predictions())
