"""DataSpec and RunSpec (petal.spec): one record of what a run is, the same from any folder."""

import json

import pytest

from petal.errors import PetalError
from petal.head import HeadClassifier
from petal.runs.finetune.config import FinetuneConfig
from petal.spec import DataSpec, RunSpec


def test_paths_are_made_absolute_and_the_cache_is_resolved_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PETAL_CACHE_DIR", str(tmp_path / "cache"))
    data = DataSpec("photos", exclude="review/drop.csv", group=r"^(\w+)_\d+")
    assert data.source == str(tmp_path / "photos") and data.exclude == str(tmp_path / "review" / "drop.csv")
    assert data.group == r"^(\w+)_\d+" and data.relabel is None  # a regex is not a path
    spec = RunSpec(data, "runs/a")
    assert spec.out == str(tmp_path / "runs" / "a") and spec.cache_dir == str(tmp_path / "cache")
    monkeypatch.setenv("PETAL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # the folder it was made with
    assert spec.kind == "head" and spec.trainer == HeadClassifier()


def test_a_spec_round_trips_through_json_for_both_trainers(tmp_path):
    data = DataSpec(tmp_path / "d", eval_percent=20.0, relabel=tmp_path / "fix.csv")
    for trainer in (HeadClassifier(hidden=0, epochs=3), FinetuneConfig(epochs=2, loader_workers=1)):
        spec = RunSpec(data, tmp_path / "r", keep=0.9, cache_dir=tmp_path / "c", trainer=trainer)
        assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_what_does_not_make_a_run_is_refused_by_name(tmp_path):
    data = DataSpec(tmp_path)
    with pytest.raises(PetalError, match=r"^precision: fine-tuning trains in fp32; expected 'fp32', got 'int8'"):
        RunSpec(data, tmp_path / "r", precision="int8", trainer=FinetuneConfig())
    with pytest.raises(PetalError, match=r"^trainer: expected a HeadClassifier or a FinetuneConfig, got 'mlp'"):
        RunSpec(data, tmp_path / "r", trainer="mlp")
    with pytest.raises(PetalError, match=r"^eval_percent: expected a number in \[0, 100\), got 100"):
        DataSpec(tmp_path, eval_percent=100)
    with pytest.raises(PetalError, match=r"^kind: expected 'head' or 'finetune', got 'svm'"):
        RunSpec.from_dict({**RunSpec(data, tmp_path / "r").to_dict(), "kind": "svm", "svm": {}})
