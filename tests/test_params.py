"""Declared parameter checks: every estimator and config refuses a bad value, of any
type, with a PetalError (a ValueError) that names the parameter, the expectation and
the value."""

import dataclasses
import importlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import petal
from petal.errors import PetalError
from petal.head import HeadClassifier
from petal.params import Instance, Int, OneOf, Real, Rule, Validated, check_param, env_int
from petal.runs.finetune.config import AugmentConfig, FinetuneConfig
from petal.serve.config import Batching, Limits, ServeConfig
from petal.spec import DataSpec

SRC = Path(petal.__file__).parent
# what a class needs to be built at all, for those whose fields are not all defaulted
REQUIRED: dict[str, dict[str, Any]] = {"ServeConfig": {"models": {"m": Path("m")}},
                                     "Preprocess": {"input_size": 224, "crop_pct": 0.875},
                                     "DataSpec": {"source": "data"},
                                     "RunSpec": {"data": DataSpec("data"), "out": "run"}}


def rule_declaring_classes() -> list[type[Validated]]:
    """Every Validated subclass in petal: each module that mentions Validated is imported."""
    for path in SRC.rglob("*.py"):
        if path.name != "params.py" and "Validated" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(SRC.parent).with_suffix("").parts
            importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    found, todo = set(), list(Validated.__subclasses__())
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return sorted((c for c in found if c.__module__.startswith("petal.")), key=lambda c: c.__qualname__)


def wrong_values(rule: Rule) -> list[Any]:
    """A string (a number where a string is expected), and a value past each bound the rule has."""
    values: list[Any] = [5 if isinstance(rule, Instance) and rule.cls is str else "x"]
    if isinstance(rule, (Int, Real)):
        values += [v for v in (rule.low - 1 if rule.low is not None else None,
                               rule.high + 1 if rule.high is not None else None) if v is not None]
    return values


def test_every_config_class_is_found():
    names = {c.__name__ for c in rule_declaring_classes()}
    assert {"HeadClassifier", "FinetuneConfig", "AugmentConfig", "Limits", "Batching", "ServeConfig",
            "Preprocess", "DataSpec", "RunSpec"} <= names


@pytest.mark.parametrize("cls", rule_declaring_classes(), ids=lambda c: c.__name__)
def test_declared_rules_are_checked_on_construction(cls):
    """The defaults pass; each declared parameter refuses a wrong value, naming itself."""
    required = REQUIRED.get(cls.__name__, {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    undefaulted = {n for n, f in fields.items()
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert undefaulted <= set(required), f"add {cls.__name__}'s required fields to REQUIRED"
    assert cls.PARAMS and set(cls.PARAMS) <= set(fields), "rules for parameters the class does not have"
    cls(**required).validate()
    for name, rule in cls.PARAMS.items():
        for bad in wrong_values(rule):
            assert not rule.ok(bad)
            with pytest.raises(PetalError, match=rf"^{name}: expected .+, got {re.escape(repr(bad))}$"):
                cls(**{**required, name: bad})


@pytest.mark.parametrize("make, message", [
    (lambda: HeadClassifier(lr="x"), r"lr: expected a number > 0, got 'x'"),
    (lambda: HeadClassifier(dropout=None), r"dropout: expected a number in \[0, 1\), got None"),
    (lambda: HeadClassifier(epochs=True), r"epochs: expected an integer >= 1 or None, got True"),
    (lambda: HeadClassifier(hidden=2.5), r"hidden: expected an integer >= 0, got 2.5"),
    (lambda: HeadClassifier(lr=math.nan), r"lr: expected a number > 0, got nan"),
    (lambda: HeadClassifier(class_weight="even"), r"class_weight: expected one of None, 'balanced', got 'even'"),
    (lambda: FinetuneConfig(lr="x"), r"lr: expected a number > 0, got 'x'"),
    (lambda: FinetuneConfig(warmup_epochs=20, epochs=5), r"warmup_epochs: expected a number in \[0, 5\]"),
    (lambda: FinetuneConfig(amp="yes"), r"amp: expected True or False, got 'yes'"),
    (lambda: FinetuneConfig(pretrained=False, unfreeze=2), r"unfreeze: training from scratch .* expected -1, got 2"),
    (lambda: FinetuneConfig(augment={"flip": False}), r"augment: expected an AugmentConfig, got \{'flip': False\}"),
    (lambda: AugmentConfig(random_color="20"), r"random_color: expected a percentage in \[0, 100\), got '20'"),
    (lambda: Limits(timeout_s="5"), r"timeout_s: expected a number > 0, got '5'"),
    (lambda: Batching(max_batch=0), r"max_batch: expected an integer >= 1, got 0"),
    (lambda: ServeConfig({"m": "x"}, threads=0), r"threads: expected an integer >= 1 or None, got 0"),
    (lambda: ServeConfig({}), r"serve: expected at least one model"),
])
def test_bad_values_of_any_type_name_the_parameter(make, message):
    with pytest.raises(PetalError, match=message) as e:
        make()
    assert isinstance(e.value, ValueError)


def test_good_values_pass_and_come_back():
    HeadClassifier().validate()
    FinetuneConfig().validate()
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
