"""One machine, a million images: wall time and peak RSS per phase of a warm `petal train`.

    python benchmarks/scale.py --images 1000000 --classes 1000 [--epochs E] [--work /tmp/petal-scale]
    python benchmarks/scale.py --flowers FOLDER      # accuracy with float16 features, bfloat16 training

Makes N distinct tiny BMPs in C classes (petal.tiny.make_images; kept in --work for the
next run), embeds them cold with the test-only tiny backbone (petal.tiny: a random
projection to 1280-D, so the features have the real size), then runs `petal train` warm
in a fresh process, through the real CLI, and prints per phase (listing, hashing, cache
load, audit, head training, calibration, evaluation, export) its wall time, the peak RSS
while it ran, and how many image files it opened. Opens are counted with a Python audit
hook on every `open` of a path under the data folder: PIL, hashing and the report all open
files through it. A warm run over unchanged files should open none before the export,
whose parity check and the report's thumbnails decode a sample of images by design.

The tiny backbone stands in for the backbone only: a cold run with EfficientNet-Lite0 costs
N / (its embedding rate) more, which this prints as a projection from --lite0-rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

CHUNK = 10_000  # images per generator task
PHASES = {"listing": "listing", "hashing": "hashing", "loading cached": "cache load", "auditing": "audit",
          "training head": "head training", "calibrating": "calibration", "evaluating": "evaluation",
          "exporting": "export"}


def make_data(root: Path, images: int, classes: int) -> float:
    """The data folder (made once per N and C; reused when complete). Returns seconds spent."""
    from petal.tiny import make_images

    done = root / f".complete-{images}-{classes}"
    if done.exists():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    per_class = -(-images // classes)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_images, *zip(*[(root, classes, i, min(CHUNK, images - i), per_class)
                                          for i in range(0, images, CHUNK)])))
    # older than petal.hashmemo.RACY_SECONDS, as real photos are: their hashes may be memoized
    past = time.time() - 60
    for d in root.iterdir():
        for f in os.scandir(d):
            os.utime(f.path, (past, past))
    done.touch()
    return time.perf_counter() - start


def run_child(argv: list[str], log: Path, phases: Path) -> dict:
    """`petal ARGV` in a fresh process with the tiny backbone; its wall time and peak RSS."""
    cmd = [sys.executable, __file__, "--child", str(phases), "--", *argv]
    start = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"petal {' '.join(argv)} failed; see {log}")
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


class PhaseLog:
    """Wall time, peak RSS (sampled every 50 ms) and image opens, per phase of this process."""

    def __init__(self, data_root: str) -> None:
        self.data_root = data_root
        self.phases: dict[str, dict] = {}
        self.name, self.started = "start-up", time.perf_counter()
        self.phases[self.name] = {"wall_s": 0.0, "peak_rss_gb": 0.0, "image_opens": 0}
        threading.Thread(target=self._sample, daemon=True).start()

    def start(self, name: str) -> None:
        if name != self.name:
            self.stop()
            self.name, self.started = name, time.perf_counter()
            self.phases.setdefault(name, {"wall_s": 0.0, "peak_rss_gb": 0.0, "image_opens": 0})

    def stop(self) -> None:
        self.phases[self.name]["wall_s"] += round(time.perf_counter() - self.started, 1)
        self.started = time.perf_counter()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm", "rb") as f:
                rss = int(f.read().split()[1]) * page / 2**30
            p = self.phases[self.name]
            p["peak_rss_gb"] = round(max(p["peak_rss_gb"], rss), 2)
            time.sleep(0.05)

    def audit(self, event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(self.data_root):
            self.phases[self.name]["image_opens"] += 1


def child(phases_path: str, argv: list[str]) -> None:
    """Run the petal CLI on argv with the tiny backbone registered, logging phases."""
    from petal import cli, tiny
    from petal.cli import data, train

    tiny.register(argv[argv.index("--cache") + 1])
    log = PhaseLog(str(Path(argv[1]).resolve()))
    sys.addaudithook(log.audit)

    class PhaseReporter(train.RichReporter):
        def message(self, text: str) -> None:
            if text.startswith("exporting"):
                log.start("export")
            super().message(text)

        @contextmanager
        def progress(self, description: str, total: int):
            log.start(next((v for k, v in PHASES.items() if description.startswith(k)), description))
            with super().progress(description, total) as advance:
                yield advance

    train.RichReporter = data.RichReporter = PhaseReporter  # what `petal train` and `petal embed` draw with
    try:
        cli.app(argv, standalone_mode=False)
    finally:
        log.stop()
        Path(phases_path).write_text(json.dumps(log.phases, indent=2))


def flowers(folder: Path, work: Path) -> None:
    """Eval accuracy on real data (default seed) with float32 and float16-stored embeddings,
    and with bfloat16 training products: what the large-data defaults would do to flowers."""
    from petal.head import HeadClassifier
    from petal.runs.head import train
    from petal.spec import DataSpec, RunSpec

    for name, dtype, compute in (("float32", "float32", "float32"), ("float16 storage", "float16", "float32"),
                                 ("bfloat16 compute", "float32", "bfloat16"), ("both", "float16", "bfloat16")):
        spec = RunSpec(DataSpec(folder), work / "flowers" / name.replace(" ", "-"), overwrite=True,
                       trainer=HeadClassifier(compute=compute))
        r = train(spec, feature_dtype=dtype, export=False)
        print(f"flowers, {name:<17}: eval accuracy {r.metrics['accuracy']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None, help="Head epochs (default: petal's own, auto_epochs)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/petal-scale"))
    ap.add_argument("--lite0-rate", type=float, default=171.0, help="Lite0 images/s, for the cold projection")
    ap.add_argument("--warm-only", action="store_true", help="Keep the cache of an earlier run: no cold embed")
    ap.add_argument("--flowers", type=Path, help="Instead: flowers accuracy with float16 features / bfloat16 compute")
    args = ap.parse_args()
    if args.flowers:
        return flowers(args.flowers, args.work)
    work = args.work / f"n{args.images}-c{args.classes}"
    data, cache, out = work / "data", work / "cache", work / "run"
    made = make_data(data, args.images, args.classes)
    print(f"data: {args.images} images in {args.classes} classes in {data}"
          + (f" (made in {made:.0f} s)" if made else ""))
    cold = None
    if not (args.warm_only and cache.is_dir()):
        shutil.rmtree(cache, ignore_errors=True)
        cold = run_child(["embed", str(data), "--backbone", "tiny_test", "--cache", str(cache), "--json"],
                         work / "cold.log", work / "cold-phases.json")
        print(f"cold embed (tiny backbone): {cold['wall_s']} s, peak RSS {cold['peak_rss_gb']} GB; with Lite0 at "
              f"{args.lite0_rate:g} img/s the backbone alone would take {args.images / args.lite0_rate / 3600:.1f} h")
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    warm = run_child(["train", str(data), "--out", str(out), "--backbone", "tiny_test", "--cache", str(cache),
                      *epochs, "--overwrite"], work / "warm.log", work / "warm-phases.json")
    phases = json.loads((work / "warm-phases.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"warm petal train ({args.epochs or 'default'} epochs): {warm['wall_s']} s wall, "
          f"peak RSS {warm['peak_rss_gb']} GB, "
          f"eval accuracy {metrics['accuracy']:.4f}, files read {metrics['embed']['read']}")
    print(f"{'phase':<16}{'wall s':>9}{'peak RSS GB':>13}{'image opens':>13}")
    for name, p in phases.items():
        print(f"{name:<16}{p['wall_s']:>9.1f}{p['peak_rss_gb']:>13.2f}{p['image_opens']:>13}")
    (work / "result.json").write_text(json.dumps({"cold": cold, "warm": warm, "phases": phases,
                                                  "accuracy": metrics["accuracy"]}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
