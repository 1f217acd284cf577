"""The exported web page (`petal export RUN --web DIR`) in headless Chromium, against Python.

    python benchmarks/web_flowers.py RUN [--ort-dir DIR] [--repeat 3]

RUN is a finished `petal train` run (e.g. of tf_flowers). The page is exported to a temporary
folder, served from loopback, and driven through its file input. Prints:
- page weight: the folder's bytes (and gzipped, as a compressing server sends them), the model's;
- time to first prediction: navigation start to the first answer on screen, measured in the
  browser, a fresh browser context each time (nothing cached), median of --repeat; the image is
  chosen as soon as the page has its file input, so model download and compile are included;
- agreement: top-1 (and "unknown") of the page vs `petal.load(RUN/model).predict` on every image
  of the run's eval split, with the page's speed and both accuracies.
Needs Playwright, Chromium and onnxruntime-web (see docs/web.md).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
import time
from pathlib import Path

from petal.bundle import Model
from petal.data import EVAL
from petal.run import Run
from petal.webpage import export_web
from petal.webpage.browser import chromium, classify, open_page, serve_folder


def weight(folder: Path) -> tuple[int, int]:
    """(bytes, gzipped bytes) of every file in `folder`."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(len(gzip.compress(p.read_bytes(), 6)) for p in files)


def first_prediction_ms(browser, url: str, image: str) -> tuple[float, float]:
    """(model ready, first answer) in ms since navigation start, in a fresh context."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.set_input_files("#files", image)
    page.wait_for_function("window.petalTimes && window.petalTimes.first", timeout=300_000)
    times = page.evaluate("window.petalTimes")
    context.close()
    return times["ready"], times["first"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--ort-dir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = [r for r in Run.open(args.run).split_rows() if r["split"] == EVAL]
    uris = [r["uri"] for r in rows]
    missing = [u for u in uris if not Path(u).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} eval images not found from here, e.g. {missing[0]} (run from where RUN was "
                         "trained)")
    with tempfile.TemporaryDirectory(prefix="petal-web-") as tmp:
        page_dir = export_web(args.run, Path(tmp) / "site", args.ort_dir).path
        total, zipped = weight(page_dir)
        model_bytes = (page_dir / "model.onnx").stat().st_size
        print(f"page weight: {total / 1e6:.1f} MB ({zipped / 1e6:.1f} MB gzipped); model.onnx {model_bytes / 1e6:.1f} MB, "
              f"runtime {weight(page_dir / 'ort')[0] / 1e6:.1f} MB")
        python = Model(page_dir).predict(uris)
        with serve_folder(page_dir) as url, chromium() as browser:
            times = [first_prediction_ms(browser, url, uris[0]) for _ in range(args.repeat)]
            ready, first = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
            print(f"time to first prediction: {first:.0f} ms (model loaded at {ready:.0f} ms; median of {args.repeat})")
            page = open_page(browser, url)
            t0 = time.perf_counter()
            web = classify(page, uris)
            seconds = time.perf_counter() - t0
    same = sum(w["label"] == p.label for w, p in zip(web, python))
    same_unknown = sum(w["unknown"] == p.unknown for w, p in zip(web, python))
    right_web = sum(w["label"] == r["label"] for w, r in zip(web, rows))
    right_py = sum(p.label == r["label"] for p, r in zip(python, rows))
    print(f"top-1 agreement with the Python predictor: {same}/{len(uris)} = {100 * same / len(uris):.2f}% "
          f"(unknown flag: {100 * same_unknown / len(uris):.2f}%)")
    print(f"accuracy: page {right_web / len(uris):.4f}, Python {right_py / len(uris):.4f}; "
          f"page speed {len(uris) / seconds:.1f} img/s (one thread, decode and resize included)")
    for w, p in zip(web, python):
        if w["label"] != p.label or w["error"]:
            print(f"  differs: {p.uri}: page {w['label'] or w['error']}, Python {p.label}")


if __name__ == "__main__":
    main()
