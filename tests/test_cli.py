"""The `petal` command as a user runs it: real subprocesses, exit codes, output files."""

import json
import os
import subprocess
import sys

import pytest

PETAL = [sys.executable, "-m", "petal.cli"]


def petal(*args, check=True, cwd=None):
    r = subprocess.run([*PETAL, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "COLUMNS": "200"})
    if check and r.returncode != 0:
        raise AssertionError(f"petal {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def test_embed_json_summary_and_errors_file(tmp_path, dataset, cache_dir):
    bad = tmp_path / "data"
    import shutil

    shutil.copytree(dataset, bad)
    (bad / "circles" / "broken.jpg").write_bytes(b"not a jpeg")
    r = petal("embed", bad, "--json", "--errors", tmp_path / "errors.csv")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 1 and summary["embedded"] + summary["cached"] == 48
    assert "broken.jpg" in (tmp_path / "errors.csv").read_text()
    again = json.loads(petal("embed", bad, "--json").stdout.strip().splitlines()[-1])
    assert again["embedded"] == 0 and again["cached"] == 48


def test_unreadable_cache_shard_is_a_warning_line(tmp_path, dataset, cache_dir):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir / "models", cache / "models")  # the exported backbone, not re-exported
    petal("embed", dataset, "--cache", cache)
    shard = next((cache / "embeddings").glob("*/shard-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])  # half-copied outside petal
    r = petal("embed", dataset, "--cache", cache, "--json")
    assert f"warning: embedding cache: unreadable shard {shard}" in r.stderr.replace("\n", "")
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["embedded"] > 0 and summary["embedded"] + summary["cached"] == 48


def test_train_predict_classify(tmp_path, dataset, cache_dir):
    r = petal("train", dataset, "--out", tmp_path / "run", "--epochs", "5", "--hidden", "0",
              "--eval-percent", "25")
    assert "accuracy" in r.stdout and (tmp_path / "run" / "model" / "model.onnx").exists()
    model = tmp_path / "run" / "model"
    one = next(dataset.glob("squares/*.jpg"))
    r = petal("predict", model, one)
    assert "squares" in r.stdout
    petal("predict", model, dataset, "--output", tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {"uri", "label", "score", "top"} <= set(rows[0])
    petal("predict", model, str(dataset / "*" / "*.png"), "--output", tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().startswith("uri,label,score,top")


def test_classify_imagenet_names(tmp_path, cache_dir):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.jpg")
    r = petal("classify", tmp_path / "coffee.jpg", "--top-k", "3")
    assert "espresso" in r.stdout.splitlines()[1]


def test_bad_input_is_one_line_not_a_traceback(tmp_path, cache_dir):
    (tmp_path / "one" / "x").mkdir(parents=True)
    r = petal("train", tmp_path / "one", "--out", tmp_path / "run", check=False)
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    r = petal("train", tmp_path / "nope", "--out", tmp_path / "run", "--dropout", "2", check=False)
    assert r.returncode == 2 and "dropout: expected" in r.stderr
    r = petal("predict", tmp_path / "no-model", tmp_path / "x.jpg", check=False)
    assert r.returncode == 2 and "not a petal model bundle" in r.stderr


def test_all_images_corrupt_exits_nonzero(tmp_path, cache_dir):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "d" / c / f"{i}.jpg").write_bytes(b"garbage")
    r = petal("train", tmp_path / "d", "--out", tmp_path / "run", check=False)
    assert r.returncode == 2 and "none of the 6 images could be read" in r.stderr


def test_cli_predict_never_imports_torch(model_dir, dataset):
    code = ("import sys\nfrom petal.cli import main\nsys.argv = ['petal', 'predict', sys.argv[1], sys.argv[2]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    one = next(dataset.glob("circles/*.jpg"))
    r = subprocess.run([sys.executable, "-c", code, str(model_dir), str(one)], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "circles" in r.stdout
