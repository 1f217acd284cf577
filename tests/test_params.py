"""Declared parameter checks: every estimator and config refuses a bad value, of any
type, with a PetalError (a ValueError) that names the parameter, the expectation and
the value."""

import math

import numpy as np
import pytest

from petal.errors import PetalError
from petal.finetune.config import AugmentConfig, FinetuneConfig
from petal.head import HeadClassifier
from petal.params import Int, OneOf, Real, check_param, env_int
from petal.serve.config import Batching, Limits, ServeConfig


@pytest.mark.parametrize("make, message", [
    (lambda: HeadClassifier(lr="x")._check_params(), r"lr: expected a number > 0, got 'x'"),
    (lambda: HeadClassifier(dropout=None)._check_params(), r"dropout: expected a number in \[0, 1\), got None"),
    (lambda: HeadClassifier(epochs=True)._check_params(), r"epochs: expected an integer >= 1, got True"),
    (lambda: HeadClassifier(hidden=2.5)._check_params(), r"hidden: expected an integer >= 0, got 2.5"),
    (lambda: HeadClassifier(lr=math.nan)._check_params(), r"lr: expected a number > 0, got nan"),
    (lambda: HeadClassifier(class_weight="even")._check_params(),
     r"class_weight: expected one of None, 'balanced', got 'even'"),
    (lambda: FinetuneConfig(lr="x").check(), r"lr: expected a number > 0, got 'x'"),
    (lambda: FinetuneConfig(warmup_epochs=20, epochs=5).check(), r"warmup_epochs: expected a number in \[0, 5\]"),
    (lambda: FinetuneConfig(amp="yes").check(), r"amp: expected True or False, got 'yes'"),
    (lambda: FinetuneConfig(augment=AugmentConfig(random_color="20")).check(),
     r"random_color: expected a percentage in \[0, 100\), got '20'"),
    (lambda: Limits(timeout_s="5"), r"timeout_s: expected a number > 0, got '5'"),
    (lambda: Batching(max_batch=0), r"max_batch: expected an integer >= 1, got 0"),
    (lambda: ServeConfig({"m": "x"}, threads=0), r"threads: expected an integer >= 1 or None, got 0"),
])
def test_bad_values_of_any_type_name_the_parameter(make, message):
    with pytest.raises(PetalError, match=message) as e:
        make()
    assert isinstance(e.value, ValueError)


def test_good_values_pass_and_come_back():
    HeadClassifier()._check_params()
    FinetuneConfig().check()
    assert check_param("n", np.int64(3), Int(1)) == 3  # numpy integers are integers
    assert check_param("x", None, Real(0, none_ok=True)) is None
    assert check_param("mode", "onnx", OneOf("auto", "onnx")) == "onnx"
    with pytest.raises(PetalError, match="mode: expected one of 1, got True"):
        check_param("mode", True, OneOf(1))  # True == 1, but it is not the declared value


def test_head_fit_refuses_class_ids_out_of_range():
    X = np.zeros((4, 3), np.float32)
    with pytest.raises(PetalError, match=r"y: expected class ids in \[0, 2\), got 0..3"):
        HeadClassifier(epochs=1).fit(X, [0, 1, 2, 3], num_classes=2)


def test_env_int_names_the_variable(monkeypatch):
    monkeypatch.setenv("PETAL_ORT_THREADS", "two")
    with pytest.raises(PetalError, match="PETAL_ORT_THREADS: expected an integer >= 0, got 'two'"):
        env_int("PETAL_ORT_THREADS", 0, low=0)
    monkeypatch.setenv("PETAL_ORT_THREADS", " 3 ")
    assert env_int("PETAL_ORT_THREADS", 0, low=0) == 3
    monkeypatch.delenv("PETAL_ORT_THREADS")
    assert env_int("PETAL_ORT_THREADS", 7) == 7
