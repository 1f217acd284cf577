"""Output folders: petal replaces or removes only what it wrote."""

import json

import pytest

from petal.errors import PetalError
from petal.run import Run


def user_files(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("the user's")


def a_run(path) -> Run:
    """A run folder with the settings.json of a petal 0.1 run (format 2), which petal still reads."""
    run = Run(path).make()
    run.settings_path.write_text(json.dumps({
        "format": 2, "kind": "head", "data": "/d", "eval_data": None, "labels_file": None, "eval_percent": 10.0,
        "backbone": {"name": "efficientnet_lite0", "feature_dim": 1280}, "cache_dir": "/c", "classes": ["a", "b"],
        "head": {}}))
    assert run.is_run
    return run


def test_a_folder_with_a_model_and_test_folder_of_the_users_is_no_run(tmp_path):
    """`mkdir -p proj/model proj/test` with the user's files: not "a finished run", and never cleared."""
    proj = tmp_path / "proj"
    user_files(proj, "model/weights.bin", "test/notes.txt")
    for overwrite in (False, True):
        with pytest.raises(PetalError, match=r"out: .*proj holds files of its own \(model/weights.bin, "
                                             r"test/notes.txt\) and no petal run"):
            Run.create(proj, data=tmp_path / "data", overwrite=overwrite)
    assert (proj / "model" / "weights.bin").exists() and (proj / "test" / "notes.txt").exists()
    other = tmp_path / "app"
    user_files(other, "settings.json")  # another program's settings
    with pytest.raises(PetalError, match=r"holds files of its own \(settings.json\)"):
        Run.create(other, data=tmp_path / "data", overwrite=True)


def test_overwrite_removes_only_what_petal_wrote(tmp_path):
    run = a_run(tmp_path / "run")
    user_files(run.path, "metrics.json", "report.html", "notes.txt", "test/metrics.json", "test/notes.txt",
               "tensorboard/events.out.tfevents.1.host.2.0", "tensorboard/README")
    assert Run.create(run.path, data=tmp_path / "data", overwrite=True) and run.finished
    run.make(clear=True)
    left = sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file())
    assert left == ["notes.txt", "settings.json", "tensorboard/README", "test/notes.txt"]


def test_a_killed_run_without_settings_is_taken_up_again(tmp_path):
    path = tmp_path / "run"
    user_files(path, "split.csv", "errors.csv", "tensorboard/events.out.tfevents.1.host.2.0")
    assert not Run.create(path, data=tmp_path / "data", overwrite=False).finished


def test_the_export_does_not_replace_a_model_folder_holding_the_users_files(tmp_path):
    run = a_run(tmp_path / "run")
    user_files(run.path, "model/petal.json", "model/my-notes.md")
    with pytest.raises(PetalError, match=r"holds files petal did not write \(model/my-notes.md\) in a folder the "
                                         "export replaces whole"):
        Run.create(run.path, data=tmp_path / "data", overwrite=True)


def test_audit_and_evaluate_do_not_overwrite_the_users_files(tmp_path):
    from petal.runs.audit import audit_data
    from petal.runs.evaluate import evaluate_model
    from petal.spec import DataSpec

    mine, mine2 = tmp_path / "mine", tmp_path / "mine2"
    user_files(mine, "report.html", "audit.json")  # the names `petal audit` writes, but the user's
    user_files(mine2, "metrics.json", "misclassified.csv")  # the names `petal evaluate` writes
    with pytest.raises(PetalError, match=r"out: .*mine holds audit.json, report.html, not written by "
                                         r"petal \(no audit.json of petal's\)"):
        audit_data(DataSpec(str(tmp_path / "no-data")), mine)
    with pytest.raises(PetalError, match=r"out: .*mine2 holds .*not written by petal \(no metrics.json of petal's\)"):
        evaluate_model(tmp_path / "no-model", tmp_path / "no-data", mine2)
    notes = tmp_path / "notes"
    user_files(notes, "thesis.tex")
    with pytest.raises(PetalError, match=r"out: .*notes holds files of its own \(thesis.tex\)"):
        audit_data(DataSpec(str(tmp_path / "no-data")), notes)
    assert all(p.read_text() == "the user's" for p in [*mine.iterdir(), *mine2.iterdir()])
    earlier = tmp_path / "earlier"  # an earlier evaluation's folder is written again
    user_files(earlier, "misclassified.csv")
    (earlier / "metrics.json").write_text('{"confusion_matrix": [[1]], "num_eval": 1}')
    with pytest.raises(PetalError, match="model: .*no-model does not exist"):
        evaluate_model(tmp_path / "no-model", tmp_path / "no-data", earlier)
