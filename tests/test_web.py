"""The web page at `/`, in a real headless browser (Debian's chromium, driven by Playwright).

Needs `pip install playwright` and `apt-get install chromium` (never `playwright install`:
the system browser is used). PETAL_CHROMIUM may point at another Chromium binary.
"""

from __future__ import annotations

import base64
import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install playwright; the browser comes from apt: chromium)")

from petal.bundle import Model  # noqa: E402
from petal.serve.config import ServeConfig  # noqa: E402
from petal.webpage.browser import chromium, chromium_path  # noqa: E402
from serve_helpers import running  # noqa: E402

pytestmark = pytest.mark.skipif(not chromium_path(), reason="no Chromium browser found (apt-get install chromium, "
                                "or set PETAL_CHROMIUM)")


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def cards(page) -> list[dict]:
    """Each result card as {"name", "bars": [(label, width %, score text)], "error"}."""
    return page.eval_on_selector_all("#results .card", """cards => cards.map(c => ({
        name: c.querySelector('.name').textContent,
        error: c.querySelector('.error') ? c.querySelector('.error').textContent : null,
        pending: !!c.querySelector('.pending'),
        image: c.querySelector('img').naturalWidth > 0 || c.querySelector('img').src.startsWith('blob:'),
        bars: [...c.querySelectorAll('.bar')].map(b => [b.querySelector('.label').textContent,
            parseFloat(b.querySelector('.fill').style.width), b.querySelector('.score').textContent])}))""")


def test_page_predicts_chosen_and_dropped_images_offline(browser, model_dir, dataset, tmp_path):
    local = Model(model_dir)
    images = sorted(dataset.glob("*/*_00[0-1].*"))[:3]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with running(ServeConfig({"shapes": model_dir})) as (url, _):
        page = browser.new_page()
        requested, problems = [], []
        page.on("request", lambda r: requested.append(r.url))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.eval_on_selector("#model", "s => [...s.options].map(o => o.value)") == ["shapes"]

        # choose files: one card each, the newest first, with top-5 bars (3 classes here)
        page.set_input_files("#files", [str(p) for p in images] + [str(bad)])
        page.wait_for_function("document.querySelectorAll('#results .card').length === 4 && "
                               "!document.querySelector('#results .pending')", timeout=60_000)
        assert [c["name"] for c in cards(page)] == [p.name for p in images] + ["notes.txt"]  # in file order
        got = {c["name"]: c for c in cards(page)}
        for p in local.predict([str(p) for p in images], top_k=5):
            card = got[p.uri.rsplit("/", 1)[1]]
            assert card["error"] is None and card["image"]
            assert [b[0] for b in card["bars"]] == [k for k, _ in p.top]
            assert card["bars"][0][0] == card["name"].split("_")[0]  # the right class, e.g. circles_000.png
            assert card["bars"][0][1] == pytest.approx(100 * p.score, abs=0.11)
            assert card["bars"][0][2] == f"{100 * p.score:.1f}%"
        assert "not an image" in got["notes.txt"]["error"] and got["notes.txt"]["bars"] == []
        assert "3 predicted, 1 failed" in page.inner_text("#status")

        # drop a file on the drop zone
        data = base64.b64encode(images[0].read_bytes()).decode()
        page.evaluate("""([data, name]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: 'image/png'}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt,
                bubbles: true, cancelable: true}));
        }""", [data, "dropped.png"])
        page.wait_for_function("document.querySelectorAll('#results .card').length === 5 && "
                               "!document.querySelector('#results .pending')", timeout=60_000)
        dropped = cards(page)[0]  # the newest batch comes first
        assert dropped["name"] == "dropped.png" and dropped["bars"][0][0] == images[0].parent.name
        assert page.eval_on_selector_all("#results .unknown", "els => els.length") == 0

        # a photo of none of the classes: "not one of: ..." above the nearest classes
        from petal.synthetic import foreign_photos

        page.set_input_files("#files", foreign_photos(tmp_path, ("chelsea",)))
        page.wait_for_function("document.querySelectorAll('#results .card').length === 6 && "
                               "!document.querySelector('#results .pending')", timeout=60_000)
        note = page.eval_on_selector("#results .card .unknown", "e => e.textContent")
        assert note.startswith("not one of: " + ", ".join(local.labels)) and "(nearest: " in note

        # everything came from this server (or the page's own blob: images): it works offline
        assert requested and all(u.startswith((url, "blob:")) for u in requested), requested
        assert problems == []
        page.close()


def test_page_asks_for_the_api_key(browser, model_dir):
    with running(ServeConfig({"shapes": model_dir}, api_key="s3cret")) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('invalid API key')")
        assert page.eval_on_selector("#auth", "d => d.open") is True
        page.fill("#key", "s3cret")
        page.dispatch_event("#key", "change")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.eval_on_selector("#model", "s => s.value") == "shapes"
        page.close()


def test_api_docs_render_offline(browser, model_dir):
    """/docs shows Swagger UI from the package's own assets: no CDN, so it works offline."""
    with running(ServeConfig({"shapes": model_dir})) as (url, _):
        page = browser.new_page()
        outside = []
        page.route("**/*", lambda route: (route.continue_() if route.request.url.startswith(url)
                                          else (outside.append(route.request.url), route.abort())))
        page.goto(url + "/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
        assert "/v1/models/{name}:predict" in [p.replace("\u200b", "") for p in paths]
        assert outside == []
        page.close()


def test_run_report_opens_offline_and_reveals_cell_images(browser, trained_run, tmp_path):
    """RUN/report.html from file://: figures match metrics.json, a confusion cell shows its images."""
    import json

    from petal.report import CELL_CAP, DIAGONAL_CAP

    report = trained_run.run_dir / "report.html"
    metrics = json.loads((trained_run.run_dir / "metrics.json").read_text())
    page = browser.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(report.as_uri())
    assert page.inner_text("#accuracy") == f"{metrics['accuracy']:.4f}"
    assert int(page.inner_text("#num-eval")) == metrics["num_eval"]
    cells = page.eval_on_selector_all("td[data-cell]", "tds => tds.map(t => [t.dataset.cell, +t.textContent])")
    assert sum(n for _, n in cells) == metrics["num_eval"]
    assert [[n for c, n in cells if c.startswith(f"{i},")] for i in range(3)] == metrics["confusion_matrix"]
    cell, count = max(cells, key=lambda c: c[1])
    page.click(f"td[data-cell='{cell}']")
    shown = page.eval_on_selector_all("#cell-images img", "imgs => imgs.map(i => i.naturalWidth)")
    i, j = cell.split(",")
    assert len(shown) == min(count, DIAGONAL_CAP if i == j else CELL_CAP)
    assert shown and all(w > 0 for w in shown)  # thumbnails decoded, not broken
    assert "likely label errors" in page.inner_text("#audit-line")
    assert all(u.startswith(("file:", "data:")) for u in requested), requested
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    if os.environ.get("PETAL_SCREENSHOTS"):  # keep it, e.g. for a PR description
        shutil.copy(tmp_path / "report.png", os.environ["PETAL_SCREENSHOTS"])
    page.close()
