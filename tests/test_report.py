"""report.html: what a hostile file name cannot do to the page."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from petal.report import script_json, write_html_report


def test_script_json_reads_back_and_holds_no_markup():
    value = {"a": ["<!--<script>x.jpg", "</script><b>&amp;", "\u2028"]}
    text = script_json(value)
    assert not set("<>&") & set(text)
    assert json.loads(text) == value


def hostile_report(tmp_path):
    """A report whose confusion cell and top losses show an image named `<!--<script>a.png`."""
    names = ["<!--<script>a.png", "b.png", "c.png", "d.png"]
    uris = []
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (60 * i, 100, 100)).save(tmp_path / name, "PNG")
        uris.append(str(tmp_path / name))
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    metrics = {"accuracy": 0.5, "top5_accuracy": 1.0, "num_eval": 4, "macro_f1": 0.5, "per_class": {}}
    plot = tmp_path / "plot.png"
    Image.new("RGB", (8, 8)).save(plot)
    return write_html_report(tmp_path / "report.html", "t", metrics=metrics, classes=["x", "y"],
                             eval_set=(uris, y, probs), plots=[plot])


def test_a_hostile_file_name_does_not_truncate_the_report(tmp_path):
    doc = hostile_report(tmp_path).read_text()
    data = re.search(r'<script type="application/json" id="cells">(.*?)</script>', doc, re.S).group(1)
    assert "<" not in data  # no "<!--" nor "<script" for the parser to act on
    assert "<!--<script>a.png" in json.dumps(json.loads(data), ensure_ascii=False)


def test_the_report_keeps_every_section_in_a_browser(tmp_path):
    """The parser's view (Chromium): after the confusion matrix come the top losses and the plots."""
    pytest.importorskip("playwright.sync_api")
    from petal.webpage.browser import chromium, chromium_path

    if not chromium_path():
        pytest.skip("no Chromium browser found")
    report = hostile_report(tmp_path)
    with chromium() as browser:
        page = browser.new_page()
        page.goto(report.as_uri())
        heads = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        assert [h for h in heads if h in ("Top losses", "Plots")] == ["Top losses", "Plots"], heads
        page.click("td[data-cell='0,1']")
        assert page.inner_text("#cell-images").startswith("<!--<script>a.png")
