"""report.html (issue 22 item 14): the test split, the unknown figures, names in words, captions
that say the class."""

from __future__ import annotations

import json
import re

import numpy as np

from petal.report import write_html_report

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
