"""`petal retrain RUN` (petal.runs.retrain): a run again from the spec its folder keeps, on the
data as it is now. The reviewed CSVs are read again and only new images are embedded."""

import csv
import json
import shutil

import pytest

from petal.errors import PetalError
from petal.head import HeadClassifier
from petal.runs.head import train
from petal.runs.retrain import stored_spec
from petal.spec import DataSpec, RunSpec
from petal.synthetic import make_dataset
from test_cli import petal


def split_labels(run) -> dict[str, str]:
    with open(run / "split.csv", newline="") as f:
        return {row["uri"]: row["label"] for row in csv.DictReader(f)}


def test_retrain_after_a_label_fix_rereads_the_review_and_embeds_only_new_images(tmp_path, dataset, cache_dir):
    data = shutil.copytree(dataset, tmp_path / "data")
    fix = tmp_path / "fix.csv"
    fix.write_text("uri,suggested\n")  # nothing reviewed yet
    spec = RunSpec(DataSpec(data, eval_percent=25.0, relabel=fix, group=r"^(\w+_\d+)\."), tmp_path / "r1",
                   cache_dir=cache_dir, trainer=HeadClassifier(epochs=5, seed=0))
    first = train(spec, export=False)
    # the user reviews: one circle was a square; and adds a new image
    wrong = sorted((data / "circles").glob("*.png"))[0]
    fix.write_text(f"uri,suggested\n{wrong},squares\n")
    new = data / "squares" / "squares_new.png"
    shutil.copy(next(make_dataset(tmp_path / "other", per_class=1, seed=7).glob("squares/*")), new)

    r = petal("retrain", first.run_dir, "--out", tmp_path / "r2", "--no-export")
    assert "images: 1 embedded, 48 cached, 0 failed" in r.stdout  # only the new image is embedded
    labels = split_labels(tmp_path / "r2")
    assert labels[str(wrong)] == "squares" and labels[str(new)] == "squares"
    assert split_labels(first.run_dir)[str(wrong)] == "circles"  # the first run is left as it was
    again, before = (json.loads((run / "settings.json").read_text())["spec"]
                     for run in (tmp_path / "r2", first.run_dir))
    assert {**again, "out": None} == {**before, "out": None} and again["out"] == str(tmp_path / "r2")
    assert before["data"]["group"] == r"^(\w+_\d+)\." and before["head"]["epochs"] == 5


def test_a_stored_spec_is_the_one_the_run_was_made_with(trained_run):
    spec = stored_spec(trained_run.run_dir)
    assert spec.kind == "head" and spec.out == str(trained_run.run_dir) and spec.trainer.epochs == 20
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(PetalError, match="is a head run .*expected a finetune run"):
        stored_spec(trained_run.run_dir, kind="finetune")
