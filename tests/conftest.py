"""Shared fixtures: a synthetic labeled set, one embedding cache and one trained
run per test session (the backbone export and embedding are the slow parts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from petal.synthetic import make_dataset


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session, with the backbone graph exported once (~15 s)."""
    from petal.backbones import get_backbone
    from petal.onnx_graphs import backbone_onnx_path

    path = tmp_path_factory.mktemp("cache")
    os.environ["PETAL_CACHE_DIR"] = str(path)  # also for CLI subprocesses
    backbone_onnx_path(get_backbone("efficientnet_lite0"), path)
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """3 classes x 16 images (PNG and JPEG), 96 px."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", per_class=16, seed=1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, dataset, cache_dir):
    """A finished `petal train` run on the synthetic set (TrainResult)."""
    from petal.head import HeadClassifier
    from petal.runs.head import train
    from petal.spec import DataSpec, RunSpec

    out = tmp_path_factory.mktemp("runs") / "shapes"
    return train(RunSpec(DataSpec(dataset, eval_percent=25.0), out, cache_dir=cache_dir,
                         trainer=HeadClassifier(epochs=20, seed=0)))


@pytest.fixture(scope="session")
def model_dir(trained_run) -> Path:
    return trained_run.model_dir
