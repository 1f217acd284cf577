"""`petal export RUN --web DIR`: a static page that classifies photos in the browser.

    DIR/
      index.html, app.js, preprocess.js   the page (this package's page/ folder)
      cards.js, cards.css                 its parts shared with petal serve's page
      model.onnx, petal.json, labels.txt  the bundle, copied as exported
      ort/                                onnxruntime-web's WebAssembly build (ort.wasm.min.js,
                                          ort-wasm-simd-threaded.mjs and .wasm) and NOTICE.txt

The page reads its preprocessing contract (size, crop, resampling) from petal.json and resizes
exactly as `petal.images.load_pixels` does (preprocess.js ports Pillow's resampling), so its
answers are the Python predictor's. It loads nothing from any other site.

petal does not ship the runtime (14 MB): it is vendored at export time from the npm package
`onnxruntime-web`, found at `--ort-dir`, else `$PETAL_ORT_WEB`, else `ort_prefix()`, where
`npm install --prefix PREFIX onnxruntime-web@ORT_WEB_VERSION` puts it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from petal.bundle import Model, check_bundle_file, read_info
from petal.errors import PetalError
from petal.storage import atomic_dir, check_output, user_cache_dir

ORT_WEB_VERSION = "1.30.0"  # the onnxruntime-web release the page is tested with
ORT_ENV = "PETAL_ORT_WEB"
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = ("index.html", "app.js", "preprocess.js", "cards.js", "cards.css")  # cards.*: shared with serve
BUNDLE_FILES = ("model.onnx", "petal.json", "labels.txt")


@dataclass(frozen=True)
class WebPage:
    """What `export_web` wrote: the folder, its total size and the model's, the runtime's version."""

    path: Path
    total_bytes: int
    model_bytes: int
    ort_version: str

    def summary(self) -> str:
        mb = 1e6
        return (f"web page: {self.path} ({self.total_bytes / mb:.1f} MB: the model {self.model_bytes / mb:.1f} MB, "
                f"onnxruntime-web {self.ort_version})\n"
                f"open it through any static web server, e.g. python3 -m http.server -d {self.path} 8000, "
                "then http://localhost:8000/ (browsers do not run it from a file:// address)")


def ort_prefix() -> Path:
    """Where the missing-runtime error tells users to install onnxruntime-web."""
    return user_cache_dir() / "onnxruntime-web"


def install_command() -> str:
    return f"npm install --prefix {ort_prefix()} onnxruntime-web@{ORT_WEB_VERSION}"


def find_ort(ort_dir: str | Path | None = None) -> Path:
    """The folder holding onnxruntime-web's WebAssembly build. `ort_dir` (else $PETAL_ORT_WEB,
    else `ort_prefix()`) may be that folder, the npm package's folder or an npm prefix."""
    given = ort_dir or os.environ.get(ORT_ENV)
    base = Path(given).expanduser() if given else ort_prefix()
    for d in (base, base / "dist", base / "node_modules" / "onnxruntime-web" / "dist"):
        if all((d / f).is_file() for f in ORT_FILES):
            return d
    if given:
        source = "--ort-dir" if ort_dir else f"${ORT_ENV}"
        raise PetalError(f"{source}: {base} holds no onnxruntime-web build: expected {', '.join(ORT_FILES)} in it, "
                         "in its dist/ or in node_modules/onnxruntime-web/dist/; "
                         f"install one with: {install_command()}")
    raise PetalError(f"--web: the page needs onnxruntime-web (the npm package, {ORT_WEB_VERSION}), which petal "
                     f"does not ship; fetch it once with npm (Node.js): {install_command()} "
                     f"(or point --ort-dir or ${ORT_ENV} at an onnxruntime-web folder)")


def ort_version(dist: Path) -> str:
    """The npm package's version, from its package.json beside dist/ ('unknown' without one)."""
    try:
        return str(json.loads((dist.parent / "package.json").read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def bundle_of(run_or_bundle: str | Path) -> Path:
    """A bundle folder, or a run folder's RUN/model, loaded (the graph, its labels) as
    `petal predict` would: what the page publishes is a bundle that works."""
    path = Path(run_or_bundle)
    if (path / "settings.json").is_file() and not (path / "model" / "petal.json").is_file():
        raise PetalError(f"run: {path} has no exported model; export it first: petal export {path}")
    bundle = path if (path / "petal.json").is_file() or not (path / "model").is_dir() else path / "model"
    read_info(bundle)  # a clear error for a missing, damaged or newer bundle
    for name in BUNDLE_FILES:
        check_bundle_file(bundle, name)  # not a link to a file elsewhere (it would be published)
    Model(bundle)  # refuses a graph that does not load or labels that do not match it
    return bundle


def check_web_dir(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier web export (DIR is replaced whole)."""
    check_output(out, "--web", folder=True)
    if out.is_dir() and any(out.iterdir()) and not all((out / f).is_file() for f in ("index.html", "petal.json")):
        raise PetalError(f"--web: {out} is a folder that is not a petal web page, and it would be replaced "
                         "whole; give a new or empty folder")


def export_web(run_or_bundle: str | Path, out: str | Path, ort_dir: str | Path | None = None) -> WebPage:
    """Write the static page for a bundle (or RUN/model) to `out`, replacing an earlier one whole."""
    out = Path(out)
    bundle = bundle_of(run_or_bundle)
    check_web_dir(out)
    dist = find_ort(ort_dir)
    version = ort_version(dist)
    page = resources.files("petal.webpage").joinpath("page")
    with atomic_dir(out) as tmp:
        for name in PAGE_FILES:
            (tmp / name).write_bytes(page.joinpath(name).read_bytes())
        for name in BUNDLE_FILES:
            shutil.copyfile(check_bundle_file(bundle, name), tmp / name)
        (tmp / "ort").mkdir()
        for name in ORT_FILES:
            shutil.copyfile(dist / name, tmp / "ort" / name)
        (tmp / "ort" / "NOTICE.txt").write_text(
            f"onnxruntime-web {version}, from the npm package onnxruntime-web (MIT License, "
            "Copyright (c) Microsoft Corporation): its WebAssembly build, unchanged.\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return WebPage(out, total, (out / "model.onnx").stat().st_size, version)
