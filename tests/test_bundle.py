"""Loading a bundle that may come from anyone (issue 21, item 16): every file is a regular file
read within a bound, labels.txt agrees with petal.json, and the graph takes what petal.json says.
Each refusal is one PetalError naming the file, before anything is served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from petal.bundle import Model
from petal.errors import PetalError


@pytest.fixture
def bundle(tmp_path, model_dir) -> Path:
    """A copy of the session's bundle, to damage."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def load_in_subprocess(path: Path, timeout: float = 60) -> str:
    """Load `path` in a child process (a hang or a runaway read must not take the tests with it):
    its stderr, or 'hung' past `timeout`."""
    code = ("import sys, resource; resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30)); "
            "from petal.bundle import Model\n"
            "try:\n    Model(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e, file=sys.stderr)")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        return "hung"
    return done.stderr


def test_a_fifo_for_labels_is_refused_not_waited_on(bundle):
    (bundle / "labels.txt").unlink()
    os.mkfifo(bundle / "labels.txt")
    assert "PetalError" in (err := load_in_subprocess(bundle, timeout=30)), err
    assert "labels.txt is not a regular file" in err


@pytest.mark.parametrize("name", ["labels.txt", "model.onnx", "petal.json"])
def test_bundle_files_linked_elsewhere_are_refused(bundle, name):
    (bundle / name).rename(bundle / f"real-{name}")
    (bundle / name).symlink_to(bundle / f"real-{name}")
    with pytest.raises(PetalError, match=f"{name} is a symbolic link"):
        Model(bundle)


@pytest.mark.parametrize("name", ["labels.txt", "model.onnx"])
def test_bundle_files_linked_to_dev_zero_are_refused_unread(bundle, name):
    (bundle / name).unlink()
    (bundle / name).symlink_to("/dev/zero")
    err = load_in_subprocess(bundle)
    assert f"PetalError model: {bundle} is refused: {name} is a symbolic link" in err, err


def test_labels_that_disagree_with_petal_json_are_refused(bundle):
    labels = (bundle / "labels.txt").read_text().splitlines()
    (bundle / "labels.txt").write_text("\n".join(reversed(labels)) + "\n")
    with pytest.raises(PetalError, match="labels.txt disagrees with petal.json from line 1"):
        Model(bundle)


def test_an_input_size_the_graph_does_not_take_is_refused_at_load(bundle):
    meta = json.loads((bundle / "petal.json").read_text())
    meta["preprocess"]["input_size"] = 200
    (bundle / "petal.json").write_text(json.dumps(meta))
    with pytest.raises(PetalError, match=r"petal.json says model.onnx takes 'images' \[N, 200, 200, 3\]"):
        Model(bundle)


def test_a_server_never_reports_ready_with_a_bundle_it_cannot_run(bundle, monkeypatch):
    """A bundle that loads but fails its first inference stops the start (never ready, then 500)."""
    pytest.importorskip("fastapi")
    from petal.serve.config import ServeConfig
    from petal.serve.service import Service

    monkeypatch.setattr(Model, "scores", lambda self, pixels, batch_size=32: 1 / 0)
    service = Service(ServeConfig({"m": bundle}))
    try:
        with pytest.raises(PetalError, match="loads but cannot predict"):
            service.load()
        assert not service.ready
    finally:
        service.close()
