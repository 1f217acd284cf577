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
    out = " ".join(r.stdout.split())
    assert "accuracy: eval" in out and ", train " in out and "top-5" not in out  # 3 classes: no top-5
    assert f"report: {tmp_path / 'run' / 'report.html'}" in out and "next: petal predict" in out
    assert "the eval split is small (12 images" in " ".join(r.stderr.split())
    model = tmp_path / "run" / "model"
    one = next(dataset.glob("squares/*.jpg"))
    r = petal("predict", model, one)
    assert "squares" in r.stdout
    petal("predict", model, dataset, "--output", tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {"uri", "label", "score", "top"} <= set(rows[0])
    petal("predict", model, str(dataset / "*" / "*.png"), "--output", tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().startswith("uri,label,score,top")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    r = petal("predict", model, one, bad, "--errors", tmp_path / "failed.csv")  # one good image: exit 0
    assert "squares" in r.stdout
    assert (tmp_path / "failed.csv").read_text().splitlines()[1].startswith(f"{bad},not an image")


def test_classify_imagenet_names(tmp_path, cache_dir):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.jpg")
    r = petal("classify", tmp_path, "--top-k", "3")  # a folder: its images
    assert "coffee.jpg" in r.stdout.splitlines()[0] and "espresso" in r.stdout.splitlines()[1]
    r = petal("classify", tmp_path / "nothere.jpg", check=False)
    assert r.returncode == 2 and "nothere.jpg: error: file not found" in r.stderr
    assert "error: classify: no image could be read" in r.stderr


def test_bad_input_is_one_line_not_a_traceback(tmp_path, cache_dir):
    (tmp_path / "one" / "x").mkdir(parents=True)
    r = petal("train", tmp_path / "one", "--out", tmp_path / "run", check=False)
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    r = petal("train", tmp_path / "nope", "--out", tmp_path / "run", "--dropout", "2", check=False)
    assert r.returncode == 2 and "dropout: expected" in r.stderr
    r = petal("predict", tmp_path / "no-model", tmp_path / "x.jpg", check=False)
    assert r.returncode == 2 and "no-model does not exist" in r.stderr
    r = petal("predict", tmp_path / "one", tmp_path / "x.jpg", check=False)
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


def test_usage_errors_are_one_message_and_exit_2(tmp_path):
    for args, says in [(["trian", "x"], "No such command 'trian'"), (["train", "x"], "Missing option '--out'"),
                       (["predict", "m", "x.jpg", "--workers", "0"], "Invalid value for '--workers'")]:
        r = petal(*args, check=False)
        assert r.returncode == 2 and says in r.stdout + r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, dataset, model_dir):
    a_file = tmp_path / "afile.txt"
    a_file.write_text("keep me")
    a_folder = tmp_path / "d.csv"
    a_folder.mkdir()
    one = next(dataset.glob("circles/*.jpg"))
    for args, says in [
        (["train", dataset, "--out", a_file], f"out: {a_file} is a file; expected a folder"),
        (["train", dataset, "--out", dataset / "run"], "is inside the data folder"),
        (["predict", model_dir, one, "--output", a_file / "sub" / "p.csv"], f"{a_file} is a file, not a folder"),
        (["predict", model_dir, one, "--output", a_folder], f"output: {a_folder} is a folder; expected a file"),
        (["embed", dataset, "--errors", a_folder], f"errors: {a_folder} is a folder"),
        (["evaluate", model_dir, dataset, "--out", a_file], "is a file; expected a folder"),
    ]:
        r = petal(*args, check=False)
        assert r.returncode == 2 and says in r.stderr.replace("\n", ""), (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert a_file.read_text() == "keep me" and not (dataset / "run").exists()


def test_a_finished_run_is_not_overwritten_without_asking(trained_run, dataset):
    r = petal("train", dataset, "--out", trained_run.run_dir, check=False)
    assert r.returncode == 2 and "already holds a finished run; pass --overwrite" in r.stderr.replace("\n", "")


def test_damaged_bundles_are_named_not_tracebacks(tmp_path, model_dir, dataset):
    import shutil

    one = next(dataset.glob("circles/*.jpg"))
    cases = {"petal.json": (b"{bad", "damaged bundle (JSONDecodeError"),
             "model.onnx": (b"junk", "damaged bundle"),
             "labels.txt": (b"circles\nsquares\n", "labels.txt has 2 labels, model.onnx gives 3 scores")}
    for name, (content, says) in cases.items():
        broken = tmp_path / name
        shutil.copytree(model_dir, broken)
        (broken / name).write_bytes(content)
        r = petal("predict", broken, one, check=False)
        assert r.returncode == 2 and says in r.stderr.replace("\n", ""), (name, r.stderr)
        assert "Traceback" not in r.stderr
    r = petal("predict", model_dir.parent, one, check=False)  # the run folder, not its model
    assert r.returncode == 2 and f"did you mean {model_dir}" in r.stderr.replace("\n", "")


def test_cli_names_its_options_and_version():
    r = petal("train", "x", "--out", "y", "--class-weight", "foo", check=False)
    assert r.returncode == 2 and "--class-weight" in r.stderr and "'balanced'" in r.stderr
    assert petal("--version").stdout.startswith("petal ")
    text = " ".join(petal("--help").stdout.split())
    assert "--debug" in text and "--version" in text
    train = " ".join(petal("train", "--help").stdout.split())
    import re

    for option in ("--epochs", "--lr", "--batch-size", "--dropout", "--seed"):
        after = re.sub(r"<[^>]*>|[│╭╮╰╯─]", " ", train.split(option + " ", 1)[1]).split("[default")[0]
        assert re.search(r"[A-Za-z]{3}", after), f"{option} has no description"


def test_warm_embed_only_stats_files_and_rehash_reads_them(tmp_path, dataset, cache_dir):
    import shutil
    import time

    data = shutil.copytree(dataset, tmp_path / "data")
    past = time.time() - 60  # older than hashmemo.RACY_SECONDS, as photos are
    for p in data.rglob("*.*"):
        os.utime(p, (past, past))
    runs = [json.loads(petal("embed", data, "--json", *extra).stdout.strip().splitlines()[-1])
            for extra in ([], [], ["--rehash"])]
    assert [r["read"] for r in runs] == [48, 0, 48]
    assert runs[0]["embedded"] + runs[0]["cached"] == 48 and runs[1]["cached"] == runs[2]["cached"] == 48
