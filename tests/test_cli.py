"""The `petal` command as a user runs it: real subprocesses, exit codes, output files."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest

PETAL = [sys.executable, "-m", "petal.cli"]


def petal(*args, check=True, cwd=None, env=None):
    r = subprocess.run([*PETAL, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "COLUMNS": "200", **(env or {})})
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
    r = petal("predict", model, one, env={"TTY_COMPATIBLE": "1"})  # a terminal: a table
    assert "squares" in r.stdout and "runners-up" in r.stdout
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
             "labels.txt": (b"circles\nsquares\n", "labels.txt disagrees with petal.json from line 3")}
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


def test_help_names_values_plainly_and_describes_every_option():
    import typer

    from petal.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        assert all(p.help for p in command.params), f"petal {name}: an option without a description"
        text = petal(name, "--help").stdout
        assert not re.search(r"<\w|\{\w", text), f"petal {name} --help shows a Python placeholder:\n{text}"
    text = petal("--help").stdout
    assert not re.search(r"<\w|\{\w", text) and "--debug" in text, text
    assert "a folder of labeled images in,\n" not in text  # the command list: one whole sentence each
    text = " ".join(petal("predict", "--help").stdout.split())
    assert "predict [OPTIONS] [MODEL] [INPUTS]..." in text and "--top-k INT" in text
    assert re.search(r"--overwrite\s+Replace", " ".join(petal("train", "--help").stdout.split()))  # a flag: no type
    r = petal("predict", check=False)
    assert r.returncode == 2 and "give a model folder (RUN/model), or --url" in r.stderr
    finetune = " ".join(petal("finetune", "--help").stdout.split())
    assert finetune.count("half the cores") == 1  # --loader-workers' default, stated once


def test_predict_rows_for_scripts(model_dir, dataset, tmp_path):
    uris = sorted(str(p) for p in dataset.rglob("*.png"))[:3]
    piped = petal("predict", model_dir, *uris)  # stdout is a pipe here: CSV rows, no table
    rows = list(csv.DictReader(io.StringIO(piped.stdout)))
    assert [r["uri"] for r in rows] == uris and "━" not in piped.stdout and "│" not in piped.stdout
    lines = petal("predict", model_dir, *uris, "--output", "-", "--format", "jsonl").stdout.splitlines()
    as_json = [json.loads(line) for line in lines]
    for r, d in zip(rows, as_json, strict=True):  # one top structure: [{label, score}], best first
        top = json.loads(r["top"])
        assert [t["label"] for t in top] == [t["label"] for t in d["top"]]
        assert [t["score"] for t in top] == pytest.approx([t["score"] for t in d["top"]], abs=1e-6)
    assert set(as_json[0]["top"][0]) == {"label", "score"}
    petal("predict", model_dir, *uris, "--output", tmp_path / "p.out", "--format", "csv")
    assert (tmp_path / "p.out").read_text().splitlines()[0].startswith("uri,label,score,top")
    r = petal("predict", model_dir, *uris, "--output", tmp_path / "p.txt", check=False)
    assert r.returncode == 2 and "or --format csv|jsonl" in r.stderr


def test_predict_shows_progress_on_many_inputs(model_dir, dataset, tmp_path):
    uris = sorted(str(p) for p in dataset.rglob("*.*"))
    many = (uris * 2)[:70]  # past the bar's threshold
    r = petal("predict", model_dir, *many, "--output", tmp_path / "p.csv", env={"TTY_COMPATIBLE": "1"})
    assert "predicting" in r.stderr and "70/70" in r.stderr
    r = petal("predict", model_dir, *many[:5], "--output", tmp_path / "q.csv", env={"TTY_COMPATIBLE": "1"})
    assert "predicting" not in r.stderr


def test_embed_bar_and_summary_report_one_rate(dataset, cache_dir):
    petal("embed", dataset)
    r = petal("embed", dataset, "--json", env={"TTY_COMPATIBLE": "1"})  # warm: every image cached
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    shown = float(re.findall(r"([\d.]+)/s", r.stderr)[-1])  # the bar's last rate
    assert summary["images_per_second"] > 0 and shown == pytest.approx(summary["images_per_second"], rel=0.3)


def test_encode_request_warns_and_splits(tmp_path, dataset):
    imgs = sorted(str(p) for p in dataset.rglob("*.*"))
    many = [*imgs, *imgs][:70]  # over the 64 images `petal serve` takes by default
    r = petal("encode-request", *many)
    assert "request 1 holds 70 images" in r.stderr and "--max-per-request 64" in r.stderr
    assert len(json.loads(r.stdout)["instances"]) == 70
    r = petal("encode-request", *many, "--max-per-request", "30", "--output", tmp_path / "req.json")
    sizes = [len(json.loads((tmp_path / f"req-{i}.json").read_text())["instances"]) for i in (1, 2, 3)]
    assert sizes == [30, 30, 10] and "warning" not in r.stderr and not (tmp_path / "req.json").exists()
    lines = petal("encode-request", *many, "--max-per-request", "64").stdout.splitlines()
    assert [len(json.loads(line)["instances"]) for line in lines] == [64, 6]


def test_errors_name_options_and_outputs_are_proved_before_the_data_scan(tmp_path, dataset):
    r = petal("train", dataset, "--out", tmp_path / "r", "--eval-percent", "150", check=False)
    assert r.returncode == 2 and "error: --eval-percent: expected a number in [0, 100)" in r.stderr
    r = petal("train", tmp_path / "nowhere", "--out", tmp_path / "r", check=False)
    assert "error: DATA: no such folder or CSV file" in r.stderr
    r = petal("train", dataset, "--out", tmp_path / "r", "--class-weight", "foo", check=False)
    assert "'foo' is not one of 'balanced'" in r.stderr and "Value error" not in r.stderr
    r = petal("train", dataset, "--out", "/proc/petal-run", check=False)  # root may, /proc refuses
    assert r.returncode == 2 and "--out: cannot create /proc/petal-run" in r.stderr and r.stdout == ""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    r = petal("train", dataset, "--out", notes, check=False)
    assert r.returncode == 2 and "holds files of its own (todo.txt) and no petal run" in r.stderr
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]


def test_predict_prints_nothing_when_no_image_is_read(model_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = petal("predict", model_dir, bad, check=False)
    assert r.returncode == 2 and r.stdout == "" and "no image could be read" in r.stderr


def test_class_lists_in_warnings_say_how_many_more():
    from petal.cli.render import names

    assert names(["a", "b"]) == "a, b"
    assert names([f"c{i}" for i in range(8)]) == "c0, c1, c2, c3, c4 and 3 more"


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


@pytest.mark.parametrize("typo,meant", [(["--ouput", "p.csv"], "--output"), (["--topk", "3"], "--top-k"),
                                        (["--no-unknwn"], "--no-unknown")])
def test_predict_refuses_a_misspelled_option(tmp_path, typo, meant):
    """Issue 22 item 4: `petal predict` took misspelled options as file names and exited 0."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    r = petal("predict", tmp_path / "model", tmp_path / "a.jpg", *typo, check=False, cwd=tmp_path)
    assert r.returncode == 2 and f"No such option: {typo[0]}" in r.stderr and meant in r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_beam_options_among_inputs_go_to_beam(tmp_path):
    from petal.cli.command import split_options

    (tmp_path / "b.jpg").write_bytes(b"x")
    b = str(tmp_path / "b.jpg")  # an existing file after a flag is an input, not the flag's value
    values = ["a.jpg", "--project", "p1", "--region=eu", "--save_main_session", b]
    assert split_options(values, beam=True) == (["a.jpg", b], ["--project", "p1", "--region=eu",
                                                                "--save_main_session"])
    assert split_options(values, beam=False) == (["a.jpg", "p1", b], ["--project", "--region=eu",
                                                                       "--save_main_session"])


def all_commands():
    """(words after `petal`, click command) of every command, `petal cache ...` too."""
    import typer

    from petal.cli import app

    def walk(command, words):
        yield words, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*words, name])

    return list(walk(typer.main.get_command(app), []))


def test_brackets_in_help_are_shown_as_written(monkeypatch):
    """Issue 22 item 11: the console markup ate `[bf16]` in `pip install 'petal[bf16]'`."""
    from typer.testing import CliRunner

    from petal.cli import app

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a bracketed word
    checked = 0
    for words, command in all_commands():
        texts = [p.help for p in command.params if getattr(p, "help", None)] + [command.help or ""]
        brackets = {b for t in texts for b in re.findall(r"\[[^\]\s]*\]", t.replace("\\[", "["))}
        shown = CliRunner().invoke(app, [*words, "--help"]).output
        for b in brackets:
            assert b in shown, f"petal {' '.join(words)} --help lost {b}"
            checked += 1
    assert checked >= 2  # --precision of train and embed, at least


def test_a_forgotten_model_and_a_bundle_for_a_run_are_named(tmp_path, dataset, trained_run):
    """Issue 22 item 9: `petal predict newphotos` said "no input images"; `petal export RUN/model`
    said "settings.json is missing" without naming the run folder."""
    r = petal("predict", dataset / "circles", check=False)
    assert r.returncode == 2 and "the first argument must be a model bundle" in r.stderr
    assert f"petal predict RUN/model {dataset / 'circles'}" in " ".join(r.stderr.split())
    r = petal("predict", trained_run.run_dir, next((dataset / "circles").iterdir()), check=False)
    assert r.returncode == 2 and f"did you mean {trained_run.model_dir}" in r.stderr
    r = petal("export", trained_run.model_dir, check=False)
    assert r.returncode == 2 and f"did you mean {trained_run.run_dir}, the run folder?" in " ".join(r.stderr.split())


def test_ctrl_c_says_what_is_kept(monkeypatch, capsys, tmp_path):
    """Issue 22 item 13: Ctrl-C exited 130 and printed nothing."""
    import petal.data
    from petal.cli.app import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(petal.data, "expand_inputs", interrupted)
    monkeypatch.setattr(sys, "argv", ["petal", "classify", str(tmp_path / "a.jpg")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 130
    assert "interrupted: the images embedded so far are kept" in capsys.readouterr().err


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_dir):
    """`petal train` as a new user runs it: train/ and test/ folders without val/, a class of 2
    images, output piped into a narrow terminal."""
    import shutil

    from petal.synthetic import make_dataset

    root = tmp_path_factory.mktemp("first") / "photos"
    make_dataset(root / "train", per_class=12, seed=1, classes=2)
    make_dataset(root / "test", per_class=4, seed=2, classes=2)
    spare = make_dataset(tmp_path_factory.mktemp("spare"), per_class=2, seed=3, classes=3)
    shutil.copytree(spare / "triangles", root / "train" / "tiny")
    out = tmp_path_factory.mktemp("runs") / "first"
    return petal("train", root, "--out", out, "--epochs", "5", env={"COLUMNS": "50"})


def test_a_class_without_eval_images_is_said_not_scored_zero(first_run):
    """Issue 22 item 7: `tiny 0.000 0.000 0.000 0` read as a failed class; the imbalance advice
    was only in audit.json."""
    tiny = next(line for line in first_run.stdout.splitlines() if "tiny" in line and "no eval" in line)
    assert "0.000" not in tiny
    assert "warning: classes are imbalanced" in " ".join(first_run.stderr.split())


def test_split_folders_are_one_info_line(first_run):
    """Issue 22 items 2 and 8: train/ + test/ is a split layout, said once, as information."""
    assert first_run.stderr.count("split folders in") == 1 and "warning: split folders" not in first_run.stderr
    assert "the test images are the eval split" in " ".join(first_run.stderr.split())


def test_the_summary_never_wraps_mid_phrase(first_run):
    """Issue 22 item 15: `test: \\naccuracy 1.0000` in a narrow or piped terminal."""
    lines = first_run.stdout.splitlines()
    accuracy = [line for line in lines if line.startswith("accuracy")]
    assert accuracy and all(re.fullmatch(r"accuracy.*\d\.\d{4}", line) for line in accuracy), lines
    assert any(re.fullmatch(r"eval images \d+, train images \d+", line) for line in lines), lines
    assert any(re.fullmatch(r"next: petal predict \S+ IMAGE\.\.\.", line) for line in lines), lines
    assert any(re.fullmatch(r" +petal evaluate \S+ DATA", line) for line in lines), lines
    assert all(not line.endswith(",") for line in lines), lines  # "most confused: a -> b (1), ..." whole
