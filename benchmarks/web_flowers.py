"""The exported web page (`petal export RUN --web DIR`) in headless Chromium, against Python.

    python benchmarks/web_flowers.py RUN [--ort-dir DIR] [--repeat 3]

RUN is a finished `petal train` run (e.g. of tf_flowers). The page is exported to a temporary
folder, served from loopback, and driven through its file input. Prints:
- page weight: the folder's bytes (and gzipped, as a compressing server sends them), the model's;
- time to first prediction: navigation start to the first answer on screen, measured in the
  browser, a fresh browser context each time (nothing cached), median of --repeat; the image is
  chosen as soon as the page has its file input, so model download and compile are included;
- agreement: top-1 (and "unknown") of the page vs `petal.load(RUN/model).predict` on every image
  of the run's eval split, with the page's speed and both accuracies; and on --large of them
  re-saved 8x larger (phone-photo sized JPEGs, where Python's decode takes a shortcut, draft mode,
  that the browser's does not).
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


def large_jpegs(uris: list[str], folder: Path, factor: int = 8) -> list[str]:
    """The images re-saved `factor` times larger as JPEG, phone-photo sized: Python decodes them
    at reduced scale (Pillow's draft mode), the browser whole."""
    from PIL import Image

    out = []
    for i, uri in enumerate(uris):
        img = Image.open(uri).convert("RGB")
        path = folder / f"{i}.jpg"
        img.resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC).save(path, quality=92)
        out.append(str(path))
    return out


def agreement(web: list[dict], python: list) -> str:
    same = sum(w["label"] == p.label for w, p in zip(web, python))
    same_unknown = sum(w["unknown"] == p.unknown for w, p in zip(web, python))
    return (f"{same}/{len(web)} = {100 * same / len(web):.2f}% "
            f"(unknown flag: {100 * same_unknown / len(web):.2f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--ort-dir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--large", type=int, default=50, help="also compare on this many eval images made 8x larger")
    args = ap.parse_args()
    rows = [r for r in Run.open(args.run).split_rows() if r["split"] == EVAL]
    uris = [r["uri"] for r in rows]
    missing = [u for u in uris if not Path(u).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} eval images not found from here, e.g. {missing[0]} (run from where RUN was "
                         "trained)")
    with tempfile.TemporaryDirectory(prefix="petal-web-") as tmp:
        page_dir = export_web(args.run, Path(tmp) / "site", args.ort_dir).path
        (total, zipped), (runtime, _) = weight(page_dir), weight(page_dir / "ort")
        model_mb = (page_dir / "model.onnx").stat().st_size / 1e6
        print(f"page weight: {total / 1e6:.1f} MB ({zipped / 1e6:.1f} MB gzipped): model.onnx {model_mb:.1f} MB, "
              f"runtime {runtime / 1e6:.1f} MB")
        large = large_jpegs(uris[:args.large], Path(tmp))
        model = Model(page_dir)
        python, python_large = model.predict(uris), model.predict(large)
        with serve_folder(page_dir) as url, chromium() as browser:
            times = [first_prediction_ms(browser, url, uris[0]) for _ in range(args.repeat)]
            ready, first = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
            print(f"time to first prediction: {first:.0f} ms (model loaded at {ready:.0f} ms; median of {args.repeat})")
            page = open_page(browser, url)
            t0 = time.perf_counter()
            web = classify(page, uris)
            seconds = time.perf_counter() - t0
            web_large = classify(page, large)
    print(f"top-1 agreement with the Python predictor, {len(uris)} eval images: {agreement(web, python)}")
    print(f"  on {len(large)} of them 8x larger (JPEG, Python decodes at 1/8 scale): "
          f"{agreement(web_large, python_large)}")
    right_web = sum(w["label"] == r["label"] for w, r in zip(web, rows))
    right_py = sum(p.label == r["label"] for p, r in zip(python, rows))
    print(f"accuracy: page {right_web / len(uris):.4f}, Python {right_py / len(uris):.4f}; "
          f"page speed {len(uris) / seconds:.1f} img/s (one thread, decode and resize included)")
    for w, p in zip(web + web_large, python + python_large):
        if w["label"] != p.label or w["error"]:
            print(f"  differs: {p.uri}: page {w['label'] or w['error']}, Python {p.label}")


if __name__ == "__main__":
    main()
