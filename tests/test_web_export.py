"""`petal export RUN --web DIR`: the folder it writes, its errors, and the page in headless Chromium.

The browser tests need Playwright and Debian's chromium (as test_web.py); the page's own test
also needs onnxruntime-web (`npm install --prefix ~/.cache/petal/onnxruntime-web onnxruntime-web@1.30.0`,
as .ci/run does). Each skips, saying why, without them.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petal.errors import PetalError
from petal.webpage import ORT_FILES, export_web, find_ort, install_command
from petal.webpage.browser import chromium_path


@pytest.fixture
def fake_ort(tmp_path):
    """An npm prefix holding stand-ins for the runtime's files (export only copies them)."""
    dist = tmp_path / "npm" / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    for name in ORT_FILES:
        (dist / name).write_text(f"// {name}\n")
    (dist.parent / "package.json").write_text('{"name": "onnxruntime-web", "version": "9.9.9"}')
    return tmp_path / "npm"


def test_export_writes_page_bundle_and_runtime(tmp_path, trained_run, fake_ort):
    out = tmp_path / "site"
    page = export_web(trained_run.run_dir, out, ort_dir=fake_ort)  # a run folder: its RUN/model
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["app.js", "cards.css", "cards.js", "index.html", "labels.txt", "model.onnx", "ort/NOTICE.txt",
                     *sorted(f"ort/{f}" for f in ORT_FILES), "petal.json", "preprocess.js"]
    model = trained_run.model_dir
    assert (out / "model.onnx").read_bytes() == (model / "model.onnx").read_bytes()
    assert page.model_bytes == (model / "model.onnx").stat().st_size
    assert page.total_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert page.ort_version == "9.9.9" and "9.9.9" in (out / "ort" / "NOTICE.txt").read_text()
    html = (out / "index.html").read_text()
    assert "http" not in html.replace("http.server", "")  # no CDN, no other site
    # a bundle folder works too, and replaces the earlier page whole
    (out / "stale.txt").write_text("old")
    export_web(model, out, ort_dir=fake_ort / "node_modules" / "onnxruntime-web")
    assert not (out / "stale.txt").exists()


def test_export_refuses_what_it_cannot_use(tmp_path, trained_run, fake_ort, monkeypatch):
    monkeypatch.setenv("PETAL_ORT_WEB", str(tmp_path / "nowhere"))
    with pytest.raises(PetalError, match=r"\$PETAL_ORT_WEB: .*nowhere holds no onnxruntime-web build"):
        find_ort()
    monkeypatch.delenv("PETAL_ORT_WEB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(PetalError, match="npm install --prefix .*empty-cache.* onnxruntime-web@1.30.0"):
        find_ort()
    with pytest.raises(PetalError, match="--ort-dir: .*holds no onnxruntime-web build"):
        find_ort(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(PetalError, match="--web: .*mine is a folder that is not a petal web page"):
        export_web(trained_run.run_dir, mine, ort_dir=fake_ort)
    assert (mine / "thesis.tex").read_text() == "keep me"
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text("{}")
    with pytest.raises(PetalError, match="has no exported model; export it first: petal export"):
        export_web(run, tmp_path / "site", ort_dir=fake_ort)


def test_cli_export_web(tmp_path, trained_run, fake_ort, monkeypatch):
    monkeypatch.delenv("PETAL_ORT_WEB", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # no runtime installed there
    monkeypatch.setenv("COLUMNS", "400")
    cmd = [sys.executable, "-m", "petal.cli", "export", str(trained_run.run_dir), "--web", str(tmp_path / "site")]
    r = subprocess.run(cmd + ["--ort-dir", str(fake_ort)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "web page: " in r.stdout and "http.server" in r.stdout and (tmp_path / "site" / "index.html").is_file()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and install_command() in r.stderr, r.stderr  # says exactly what to run


# ------------------------------------------------------------------------------------ in the browser

browser_only = pytest.mark.skipif(not chromium_path(), reason="no Chromium browser found "
                                  "(apt-get install chromium, or set PETAL_CHROMIUM)")


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from petal.webpage.browser import FAKE_CAMERA, chromium

    with chromium(FAKE_CAMERA) as b:
        yield b


@browser_only
def test_browser_preprocessing_is_load_pixels_exactly(browser, tmp_path):
    """preprocess.js in Chromium gives load_pixels' very pixels: decode (PNG; EXIF rotation;
    transparency on white), crop and Pillow's resize, for contracts other than the default."""
    from importlib import resources

    from petal.images import load_pixels
    from petal.preprocess import Preprocess

    rng = np.random.default_rng(0)
    page = browser.new_page()
    page.add_script_tag(content=resources.files("petal.webpage").joinpath("page/preprocess.js").read_text())
    cases = [(Preprocess(224, 0.875), (500, 333), "RGB"), (Preprocess(240, 0.882, "bilinear"), (97, 130), "RGB"),
             (Preprocess(64, 1.0), (700, 450), "RGBA"), (Preprocess(260, 0.9), (321, 321), "RGB")]
    for i, (pre, size, mode) in enumerate(cases):
        smooth = Image.fromarray(rng.integers(0, 256, (8, 8, len(mode)), np.uint8), mode).resize(size)
        noisy = np.asarray(smooth).astype(int) + rng.integers(-40, 40, (size[1], size[0], len(mode)))
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode)
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 1  # orientation: rotated 90 degrees in every other case
        path = tmp_path / f"{i}.png"
        img.save(path, exif=exif)
        data = path.read_bytes()
        got = page.evaluate("""async ([b64, pre]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const px = await PetalPreprocess.fromBlob(new Blob([bytes], {type: 'image/png'}), pre);
            return btoa(Array.from(px, b => String.fromCharCode(b)).join(''));
        }""", [base64.b64encode(data).decode(), pre.to_dict()])
        want = load_pixels(data, pre)
        assert np.array_equal(np.frombuffer(base64.b64decode(got), np.uint8).reshape(want.shape), want), (pre, mode)
    page.close()


@browser_only
def test_exported_page_answers_as_the_python_predictor(browser, tmp_path, trained_run, dataset):
    """The real page and runtime, from a static server on loopback: every top-1 and "unknown"
    is the Python predictor's; a bad file is reported on its card; nothing comes from elsewhere."""
    from petal.bundle import Model
    from petal.synthetic import foreign_photos
    from petal.webpage.browser import classify, open_page, serve_folder

    try:
        find_ort()
    except PetalError:
        pytest.skip(f"onnxruntime-web is not installed ({install_command()})")
    export_web(trained_run.run_dir, tmp_path / "site")
    images = sorted(dataset.glob("*/*_00[0-3].*")) + foreign_photos(tmp_path, ("chelsea", "coffee"))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    want = Model(trained_run.model_dir).predict([str(p) for p in images])
    with serve_folder(tmp_path / "site") as url:
        requested, problems = [], []
        page = open_page(browser, url, requests=requested)
        page.on("pageerror", lambda e: problems.append(str(e)))
        got = classify(page, [*images, bad])
        assert [g["name"] for g in got] == [Path(p).name for p in images] + ["notes.txt"]
        assert [(g["label"], g["unknown"]) for g in got[:-1]] == [(p.label, p.unknown) for p in want]
        assert any(p.unknown for p in want) and not all(p.unknown for p in want)  # both kinds were shown
        assert got[-1]["error"] == "not an image this browser can decode" and got[-1]["label"] is None
        notes = page.eval_on_selector_all("#results .unknown", "els => els.map(e => e.textContent)")
        assert len(notes) == sum(p.unknown for p in want)
        assert all(n.startswith("not one of: " + ", ".join(Model(trained_run.model_dir).labels)) for n in notes)

        # the camera (Chromium's fake one here): a frame is classified like a chosen file
        page.click("#camera")
        page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=30_000)
        page.click("#snap")
        frame = classify(page, [], until=len(got) + 1)[0]
        assert frame["name"].startswith("camera ") and frame["error"] is None
        assert frame["label"] in [*Model(trained_run.model_dir).labels, "unknown"]  # a camera test pattern: any

        assert url + "ort/ort-wasm-simd-threaded.wasm" in requested  # the vendored runtime, from this server
        assert all(u.startswith((url, "blob:")) for u in requested), requested
        assert problems == []
        page.close()

    # opened as a file, it says how to serve it instead of failing silently
    page = browser.new_page()
    page.goto((tmp_path / "site" / "index.html").as_uri())
    page.wait_for_selector("#status.bad")
    assert "python3 -m http.server" in page.inner_text("#status")
    page.close()


def test_export_refuses_a_bundle_with_links_or_a_graph_that_does_not_load(tmp_path, trained_run, fake_ort):
    """`labels.txt -> /etc/passwd` would publish that file in the page; a bundle is loaded before
    it is copied, so a model.onnx that is no graph is refused too."""
    import os
    import shutil

    from petal.bundle import Model

    secret = tmp_path / "secret.txt"
    secret.write_text("\n".join(f"secret{i}" for i in range(3)) + "\n")  # as many lines as classes
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_run.run_dir / "model", bundle)
    (bundle / "labels.txt").unlink()
    os.symlink(secret, bundle / "labels.txt")
    for load in (lambda: export_web(bundle, tmp_path / "site", ort_dir=fake_ort), lambda: Model(bundle)):
        with pytest.raises(PetalError, match="labels.txt is a symbolic link"):
            load()
    assert not (tmp_path / "site").exists()
    (bundle / "labels.txt").unlink()
    shutil.copyfile(trained_run.run_dir / "model" / "labels.txt", bundle / "labels.txt")
    (bundle / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(PetalError, match="damaged bundle"):
        export_web(bundle, tmp_path / "site", ort_dir=fake_ort)
    assert not (tmp_path / "site").exists()
    (bundle / "model.onnx").unlink()
    os.mkfifo(bundle / "model.onnx")
    with pytest.raises(PetalError, match="model.onnx is not a regular file"):
        Model(bundle)
