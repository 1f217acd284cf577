"""report.html: what a hostile file name cannot do to the page; the test split, the unknown figures,
calibration in words and captions that say the class (issue 22 item 14)."""

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
        assert page.inner_text("#cell-images").startswith(f"{tmp_path.name}/<!--<script>a.png")  # folder/file


PER_CLASS = {"roses": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2},
             "tulips": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 1},
             "tiny": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}
METRICS = {"accuracy": 0.6667, "top5_accuracy": 1.0, "num_eval": 3, "per_class": PER_CLASS,
           "ece": 0.031, "ece_uncalibrated": 0.052, "unknown": {"kept": 0.95, "accuracy_kept": 0.7},
           "unknown_data": {"rejected_unknown": 0.9, "auroc": 0.97, "unknown_images": 10},
           "test": {"accuracy": 0.75, "top5_accuracy": 1.0, "num_eval": 8, "macro_f1": 0.7}}


def test_the_report_shows_test_unknown_and_calibration_in_words(tmp_path):
    uris = [str(tmp_path / "roses" / "1.jpg"), str(tmp_path / "roses" / "2.jpg"), str(tmp_path / "tulips" / "1.jpg")]
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0]])
    path = write_html_report(tmp_path / "report.html", "run", metrics=METRICS, classes=["roses", "tulips", "tiny"],
                             eval_set=(uris, np.array([0, 0, 1]), probs))
    text = path.read_text()
    assert "ece_uncalibrated" not in text and "calibration error (ECE) <b>0.031</b> (before calibration 0.052)" in text
    assert re.search(r'test split: accuracy <b id="test-accuracy">0.7500</b>.*8 images', text)
    assert 'kept as known <b id="kept">95.0%</b>' in text and '<b id="rejected">90.0%</b>' in text
    assert re.search(r"<td>tiny</td><td[^>]*>no eval image</td>", text)
    cells = json.loads(re.search(r'<script type="application/json" id="cells">(.*?)</script>', text).group(1))
    captions = [caption for cell in cells.values() for _, caption in cell]
    assert "roses/1.jpg (0.90)" in captions and "tulips/1.jpg (0.70)" in captions  # 1.jpg twice, told apart


def test_a_fine_tuned_runs_history_is_a_learning_curve(tmp_path):
    from petal.metrics import plot_learning_curve

    (tmp_path / "history.csv").write_text("epoch,train_loss,train_accuracy,eval_loss,eval_accuracy,seconds\n"
                                          "1,1.2,0.5,1.1,0.55,3\n2,0.8,0.7,0.9,0.65,3\n3,0.5,0.85,0.7,0.8,3\n")
    curve = plot_learning_curve(tmp_path / "history.csv", tmp_path / "learning_curve.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"
    assert plot_learning_curve(tmp_path / "none.csv", tmp_path / "x.png") is None  # a head run: no curve
    text = write_html_report(tmp_path / "r.html", "run", plots=[curve]).read_text()
    assert 'alt="learning_curve"' in text
