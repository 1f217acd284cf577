"""Fine-tuning (`petal finetune`; the two-process test goes through the old
`petal train --finetune` alias) on tiny synthetic sets (14 to 36 training images,
1-2 epochs, small batches, one unfrozen block; the input stays 224 px).
Covers the trunk/top split against the ImageNet graph, augmentation, export with
parity, resume after a stop, 2 data-parallel CPU processes vs 1, and training
from scratch."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from petal.backbones import get_backbone
from petal.errors import PetalError
from petal.runs.finetune import AugmentConfig, FinetuneConfig, finetune
from petal.runs.finetune.data import EpochBatches, augment_image, center_view
from petal.runs.finetune.model import FineTuneNet, OnnxTrunk, trunk_onnx_path
from petal.runs.finetune.train import check_same_run, lr_factor
from petal.runs.reexport import export_run
from petal.runs.retrain import stored_spec
from petal.spec import DataSpec, RunSpec

CFG = get_backbone("efficientnet_lite0")
TINY = dict(epochs=1, batch_size=4, unfreeze=1, dropout=0.0)  # dropout off: runs compare exactly


@pytest.fixture(scope="module")
def ft_cache(tmp_path_factory):
    """A cache for the frozen trunk's ONNX graph (exported once, ~10 s)."""
    return tmp_path_factory.mktemp("ft-cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 classes x 6 images: 14 train, 4 eval at --eval-percent 25."""
    from petal.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tiny") / "shapes", per_class=6, seed=2)


def spec(data, out, config: FinetuneConfig, cache) -> RunSpec:
    """A fine-tuning run of `data` (a quarter in eval) into `out`."""
    return RunSpec(DataSpec(data, eval_percent=25), out, cache_dir=cache, trainer=config)


def last_state(run) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=k)


# --------------------------------------------------------------------------- pieces


def test_split_model_reproduces_the_imagenet_predictions(ft_cache):
    """Frozen trunk in ONNX Runtime + top in torch = the shipped weights' ImageNet predictions.
    (tests/test_backbone.py checks the whole torch backbone against the ONNX backbone graph.)"""
    skimage_data = pytest.importorskip("skimage.data")
    from petal.backbones import imagenet_classes
    from petal.images import load_pixels
    from petal.models import Preprocess, build_backbone

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    pre = CFG.preprocess
    photos = np.stack([load_pixels(png(skimage_data.chelsea()), pre), load_pixels(png(skimage_data.coffee()), pre)])
    net = build_backbone(CFG)
    model = FineTuneNet(CFG, 1000, unfreeze=1).eval()
    model.top[-1].fc.load_state_dict(net._fc.state_dict())  # the ImageNet classifier
    trunk = OnnxTrunk(trunk_onnx_path(model, ft_cache), 2)
    x = torch.from_numpy(photos)
    with torch.no_grad():
        split = model.top(trunk(x)).softmax(-1).numpy()
        eager = model(x).softmax(-1).numpy()
        reference = net(Preprocess(CFG)(x)).softmax(-1).numpy()
    assert list(split.argmax(1)) == list(eager.argmax(1)) == list(reference.argmax(1))
    names = imagenet_classes()
    assert names[split[0].argmax()] in {"tiger cat", "Egyptian cat", "tabby"} and names[split[1].argmax()] == "espresso"
    np.testing.assert_allclose(split, reference, atol=1e-4)


def test_augmentation_is_seeded_per_image_and_off_means_the_eval_view():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    aug = AugmentConfig()
    a = augment_image(square, 224, CFG.preprocess.crop_pct, aug, np.random.default_rng([0, 1, 5]))
    b = augment_image(square, 224, CFG.preprocess.crop_pct, aug, np.random.default_rng([0, 1, 5]))
    c = augment_image(square, 224, CFG.preprocess.crop_pct, aug, np.random.default_rng([0, 2, 5]))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    still = AugmentConfig(flip=False, random_scale=0, random_crop=0, random_brightness=0, random_color=0)
    plain = augment_image(square, 224, CFG.preprocess.crop_pct, still, np.random.default_rng(1))
    assert np.abs(plain.astype(int) - center_view(square, 224)).max() <= 1  # the central 87.5%


def test_processes_split_each_global_batch():
    one = list(EpochBatches(37, 8, seed=3))
    two = [list(EpochBatches(37, 8, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(one) == 4 and all(len(b) == 8 for b in one)  # the partial batch is dropped
    assert [a + b for a, b in zip(*two)] == one
    with pytest.raises(PetalError, match="batch_size: expected"):
        EpochBatches(37, 1, seed=0, world=2)


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine_to_zero():
    f = [lr_factor(s, 4, 10) for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # step s of the warmup: (s + 1) / warmup
    assert f[4] == 1.0 and f[7] == pytest.approx(0.5) and f[10] == pytest.approx(0.0)  # half way: half
    assert all(a > b for a, b in zip(f[4:10], f[5:11])) and f[11] == pytest.approx(0.0)  # past the end: stays 0
    assert lr_factor(0, 0, 10) == 1.0 and lr_factor(5, 0, 10) == pytest.approx(0.5)  # no warmup: decay at once


def test_a_checkpoint_of_other_settings_or_data_is_refused_naming_what_differs():
    saved = {"format": 1, "finetune": {"lr": 0.001, "epochs": 12}, "classes": ["a", "b"], "train": "x1"}
    check_same_run(saved, json.loads(json.dumps(saved)))  # the same run: no complaint
    with pytest.raises(PetalError, match=r"\(finetune\.lr differ\)"):
        check_same_run(saved, {**saved, "finetune": {"lr": 0.01, "epochs": 12}})
    with pytest.raises(PetalError, match=r"\(classes, train, finetune\.epochs differ\); use the same options"):
        check_same_run(saved, {**saved, "classes": ["a"], "train": "x2", "finetune": {"lr": 0.001, "epochs": 3}})


def test_errors_name_the_parameter():
    with pytest.raises(PetalError, match=r"unfreeze: expected -1 \(all\) .* got -2"):
        FinetuneConfig(unfreeze=-2)
    with pytest.raises(PetalError, match="random_crop: expected a percentage"):
        AugmentConfig(random_crop=150)
    assert FinetuneConfig(pretrained=False).unfreeze == -1


# --------------------------------------------------------------------------- runs


def test_finetune_exports_a_bundle_that_matches(tmp_path, dataset, ft_cache):
    import petal

    run = tmp_path / "run"
    config = FinetuneConfig(**{**TINY, "epochs": 2, "batch_size": 8, "dropout": 0.2, "calibration_percent": 40})
    r = finetune(spec(dataset, run, config, ft_cache))
    assert r.epochs_done == 2 and r.best_epoch in (1, 2) and len(r.history) == 2
    assert r.metrics["accuracy"] >= 0.75 and r.metrics["num_eval"] == 12
    assert 0 <= r.metrics["ece"] <= 1 and r.metrics["unknown"]["kept_eval"] > 0  # calibrated on the set-aside images
    split = (run / "split.csv").read_text()
    assert split.count(",calibration,") >= 10 and split.count(",train,") + split.count(",calibration,") == 36
    meta = json.loads((run / "model" / "petal.json").read_text())
    assert meta["input"]["shape"] == ["batch", 224, 224, 3] and meta["training"]["best_epoch"] == r.best_epoch
    assert meta["training"]["kind"] == "finetune" and meta["training"]["finetune"]["unfreeze"] == 1
    assert meta["calibration"]["temperature"] > 0 and meta["unknown"]["threshold"] is not None
    preds = petal.load(run / "model").predict([str(p) for p in sorted(dataset.glob("squares/*"))[:4]])
    assert all(p.label == "squares" for p in preds) and all(p.ood_score is not None for p in preds)
    assert {"metrics.json", "confusion_matrix.png", "history.csv", "split.csv", "settings.json", "audit.json",
            "suspects.csv", "duplicates.csv"} <= {p.name for p in run.iterdir()}  # audited as a head run is
    assert 'id="audit-line"' in (run / "report.html").read_text()
    assert (run / "checkpoints" / "best.pt").exists() and not (run / "pixels").exists()
    assert list((run / "tensorboard").glob("events.*"))
    with pytest.raises(PetalError, match="already holds a finished run; pass --overwrite"):
        finetune(spec(dataset, run, FinetuneConfig(**TINY), ft_cache))
    # `petal export RUN` re-exports a fine-tuning run too, through the run folder alone
    first = json.loads((run / "model" / "petal.json").read_text())
    shutil.rmtree(run / "model")
    again = export_run(run)
    meta = json.loads((again / "petal.json").read_text())
    assert meta["training"] == first["training"] and meta["metrics"] == first["metrics"]
    assert [p.label for p in petal.load(again).predict([str(p) for p in sorted(dataset.glob("squares/*"))[:4]])
            ] == [p.label for p in preds]
    with pytest.raises(PetalError, match=r"finetune\.lr"):  # other settings: refused before any work
        finetune(spec(dataset, run, FinetuneConfig(**{**TINY, "epochs": 2, "batch_size": 8, "dropout": 0.2,
                                                        "calibration_percent": 40,
                                                        "lr": 1.0}), ft_cache),
                 resume=True)


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, tiny, ft_cache):
    config = FinetuneConfig(**{**TINY, "epochs": 2, "dropout": 0.2})  # dropout on: seeded per epoch
    whole = finetune(spec(tiny, tmp_path / "whole", config, ft_cache), export=False)
    part = finetune(spec(tiny, tmp_path / "part", config, ft_cache), export=False, stop_after=1)
    assert part.epochs_done == 1 and part.model_dir is None and not part.metrics
    done = finetune(stored_spec(tmp_path / "part"), export=False, resume=True)  # the run's own spec, nothing else
    assert done.epochs_done == 2 and done.best_epoch == whole.best_epoch
    assert_same_weights(last_state(tmp_path / "whole"), last_state(tmp_path / "part"))
    assert [h["train_loss"] for h in done.history] == [h["train_loss"] for h in whole.history]


def test_cli_resume_needs_only_the_run_and_keeps_its_settings(tmp_path, tiny, ft_cache):
    """`petal finetune DATA --out R --exclude x.csv --group REGEX ...` stopped after an epoch, then
    `petal finetune --resume R` and nothing else finishes it with the same settings."""
    from test_cli import petal

    left_out = sorted(tiny.glob("circles/*"))[0]
    (tmp_path / "drop.csv").write_text(f"uri\n{left_out}\n")
    run, env = tmp_path / "r", {"PETAL_CACHE_DIR": str(ft_cache)}
    petal("finetune", tiny, "--out", run, "--epochs", "2", "--batch-size", "4", "--unfreeze", "1", "--dropout", "0",
          "--eval-percent", "25", "--exclude", tmp_path / "drop.csv", "--group", r"^(\w+_\d+)\.", "--stop-after", "1",
          env=env)
    before = json.loads((run / "settings.json").read_text())
    r = petal("finetune", "--resume", run, "--epochs", "3", env=env, check=False)
    assert r.returncode == 2 and "leave out --epochs" in r.stderr  # the run keeps its own settings
    r = petal("finetune", "--resume", run, env=env)
    assert "resuming after epoch 1 of 2" in r.stderr and "epochs 2, best" in r.stdout
    after = json.loads((run / "settings.json").read_text())
    assert after == before and after["format"] == 3
    data = after["spec"]["data"]
    assert data["exclude"] == str(tmp_path / "drop.csv") and data["group"] == r"^(\w+_\d+)\."
    assert after["spec"]["finetune"]["epochs"] == 2 and str(left_out) not in (run / "split.csv").read_text()
    assert (run / "model" / "petal.json").exists()


def test_two_cpu_processes_match_one(tmp_path, tiny, ft_cache):
    """`--nproc 2` (torchrun, gloo) and 1 process, same global batch: the same weights."""
    finetune(spec(tiny, tmp_path / "one", FinetuneConfig(**TINY), ft_cache), export=False)
    cmd = [sys.executable, "-m", "petal", "train", str(tiny), "--out", str(tmp_path / "two"), "--finetune",
           "--epochs", "1", "--batch-size", "4", "--unfreeze", "1", "--dropout", "0", "--eval-percent", "25",
           "--no-export", "--nproc", "2"]
    env = {**os.environ, "PETAL_CACHE_DIR": str(ft_cache), "COLUMNS": "200"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["world_size"] == 2
    # allclose, not equal: the processes sum gradients in another order, and Adam turns a
    # float-noise-sized gradient into a step of +-lr, so a rare weight differs by ~lr/10
    assert_same_weights(last_state(tmp_path / "one"), last_state(tmp_path / "two"), atol=1e-4)
    losses = [torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["history"][0]["train_loss"]
              for r in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the mean over both processes' samples


def test_from_scratch_learns_batchnorm_statistics(tmp_path, tiny, ft_cache):
    config = FinetuneConfig(epochs=1, batch_size=6, pretrained=False, augment=AugmentConfig(enabled=False))
    r = finetune(spec(tiny, tmp_path / "scratch", config, ft_cache), export=False)
    assert r.epochs_done == 1 and np.isfinite(r.history[0]["train_loss"])
    state = last_state(tmp_path / "scratch")
    assert not torch.equal(state["top.0.bn.running_mean"], torch.zeros(32))  # the stem is trained


def test_the_decode_bar_ends_at_its_total_with_a_test_split(tmp_path, ft_cache):
    """Issue 22 item 21: with a test/ folder, finetune's decode bar stopped at 85% in a log."""
    from contextlib import contextmanager

    from petal.progress import Reporter
    from petal.synthetic import make_dataset

    class Bars(Reporter):
        def __init__(self):
            self.bars = {}

        @contextmanager
        def progress(self, description, total):
            self.bars[description] = [0, total]

            def advance(n):
                self.bars[description][0] += n

            yield advance

    root = tmp_path / "layout"
    for split, n, seed in (("train", 6, 1), ("val", 2, 2), ("test", 2, 3)):
        make_dataset(root / split, per_class=n, seed=seed)
    bars = Bars()
    r = finetune(spec(root, tmp_path / "run", FinetuneConfig(**TINY), ft_cache), export=False, reporter=bars)
    done, total = bars.bars["decoding images"]
    assert done == total > 0
    assert (tmp_path / "run" / "learning_curve.png").is_file()  # item 14: in the report too
    assert 'alt="learning_curve"' in (tmp_path / "run" / "report.html").read_text()
    assert r.metrics["test"]["num_eval"] == 6  # item 12: test/ evaluated on its own
