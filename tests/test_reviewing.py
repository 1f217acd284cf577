"""petal.reviewing: the decision logs and what train reads of them, the labeling queue, the
review server's locks, retrain, and the page in a real Chromium (keyboard flow, reload and
server kill, the map's selection, the token)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from petal.data import load_dataset
from petal.review import apply_review
from petal.reviewing.cards import DUPLICATE, NEW, SUSPECT, Card, run_cards
from petal.reviewing.log import add_labeled, copy_labeled
from petal.reviewing.queue import margin_uncertainty, queue_order
from petal.reviewing.session import ReviewSession
from petal.run import Run
from petal.storage import absolute, read_csv


def cards_for(dataset: Path) -> tuple[list[Card], list[str]]:
    """Three one-image cards and a duplicate pair over the synthetic set's first images."""
    ds = load_dataset(dataset, eval_percent=0.0)
    ex = [e for e in ds.examples][:5]
    u = [absolute(e.uri) for e in ex]
    other = next(c for c in ds.classes if c != ex[0].label)
    cards = [Card(f"label:{u[0]}", SUSPECT, [u[0]], [ex[0].label], other, 0.9),
             Card(f"label:{u[1]}", SUSPECT, [u[1]], [ex[1].label], other, 0.8),
             Card(f"label:{u[2]}", SUSPECT, [u[2]], [ex[2].label], other, 0.7),
             Card(f"dup:{u[3]}|{u[4]}", DUPLICATE, [u[3], u[4]], [ex[3].label, ex[4].label], "", 1.0, "exact")]
    return cards, ds.classes


def test_review_csv_is_what_train_relabels_and_excludes(tmp_path, dataset):
    cards, classes = cards_for(dataset)
    s = ReviewSession(tmp_path, cards, classes, {c.uris[0]: c.labels[0] for c in cards})
    s.decide(cards[0].id, "accept")  # -> the suggested label
    s.decide(cards[1].id, "keep")
    s.decide(cards[2].id, "exclude")
    p = s.decide(cards[3].id, "exclude", which=1)  # the right image of the pair
    assert (p["reviewed"], p["left"], p["relabelled"], p["excluded"], p["changed"]) == (4, 0, 1, 2, 3)

    review = tmp_path / "review.csv"
    ds = apply_review(load_dataset(dataset, eval_percent=0.0), exclude=review, relabel=review)
    label = {absolute(e.uri): e.label for e in ds.examples}
    assert label[cards[0].uris[0]] == cards[0].suggested != cards[0].labels[0]
    assert label[cards[1].uris[0]] == cards[1].labels[0]  # kept: unchanged, and not excluded
    assert cards[2].uris[0] not in label and cards[3].uris[1] not in label  # excluded
    assert label[cards[3].uris[0]] == cards[3].labels[0]  # the pair's other image stays
    # a change of mind: the same images again, through the map; each image's last decision counts
    s.select([cards[0].uris[0]], "relabel", cards[0].labels[0])  # back to the label it had
    s.decide(cards[2].id, "keep")  # no longer excluded
    ds = apply_review(load_dataset(dataset, eval_percent=0.0), exclude=review, relabel=review)
    label = {absolute(e.uri): e.label for e in ds.examples}
    assert label[cards[0].uris[0]] == cards[0].labels[0] and label[cards[2].uris[0]] == cards[2].labels[0]
    assert s.progress()["changed"] == 1  # only the pair's right image is still out
    with pytest.raises(ValueError, match="which"):
        s.decide(cards[3].id, "exclude")
    with pytest.raises(ValueError, match="label: expected one of the classes"):
        s.decide(cards[0].id, "relabel", label="nope")


def test_undo_takes_back_one_action_and_a_new_session_resumes(tmp_path, dataset):
    cards, classes = cards_for(dataset)
    on_map = {c.uris[0]: c.labels[0] for c in cards}
    s = ReviewSession(tmp_path, cards, classes, on_map)
    s.decide(cards[0].id, "keep")
    p = s.select([cards[1].uris[0], cards[2].uris[0]], "relabel", classes[0])  # one action, two images
    assert p["reviewed"] == 3  # one-image cards answered through the map count as reviewed
    assert s.undo()["undone"] == ""  # the whole selection went
    assert [r["card"] for r in read_csv(tmp_path / "review.csv")] == [cards[0].id]
    s.decide(cards[2].id, "exclude")

    again = ReviewSession(tmp_path, cards, classes, on_map)  # a restarted server
    assert again.progress()["reviewed"] == 2 and again.done() == {cards[0].id, cards[2].id}
    assert again.undo()["undone"] == cards[2].id
    assert ReviewSession(tmp_path, cards, classes).done() == {cards[0].id}


def test_labeled_photos_join_training_as_a_new_class_and_are_copied_only_when_asked(tmp_path, dataset):
    new = sorted(dataset.glob("*/*"))[:3]
    cards = [Card(f"new:{p}", NEW, [str(p)], [""], "circles") for p in new]
    s = ReviewSession(tmp_path, cards, ["circles", "squares"])
    s.decide(cards[0].id, "accept")
    s.decide(cards[1].id, "relabel", label="hexagons")  # "none of these": a new class
    for bad in ("..", "a/b"):  # a class becomes a folder with --copy-to: never outside DATA
        with pytest.raises(ValueError, match="class name"):
            s.decide(cards[2].id, "relabel", label=bad)
    s.decide(cards[2].id, "skip")
    assert s.progress()["classes"][-1] == "hexagons"
    ds = load_dataset(dataset, eval_percent=0.0)
    first = ds.examples[0]
    labeled = tmp_path / "labeled.csv"
    more = add_labeled(ds, labeled)
    assert len(more.examples) == len(ds.examples)  # the photos are in the data already: not twice
    copies = copy_labeled(labeled, tmp_path / "data")
    assert sorted(p.parent.name for p in copies) == ["circles", "hexagons"]
    assert all(p.exists() for p in new)  # copied, never moved
    with open(tmp_path / "extra.csv", "w", newline="") as f:
        csv.writer(f).writerows([["uri", "label"], [str(tmp_path / "data" / "hexagons" / new[1].name), "hexagons"]])
    grown = add_labeled(ds, tmp_path / "extra.csv")
    assert grown.classes == ds.classes + ["hexagons"] and grown.examples[0] == first
    assert grown.examples[-1].split == "train" and grown.examples[-1].label == "hexagons"


def test_queue_puts_uncertain_photos_first_and_near_copies_of_queued_ones_later():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.55, 0.45], [0.52, 0.48]])
    np.testing.assert_allclose(margin_uncertainty(probs), [1.0, 0.2, 0.9, 0.96], atol=1e-6)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 64))
    X = np.stack([base[0], base[0] + 1e-3, base[1], base[2]])  # photos 0 and 1: the same
    u = np.array([1.0, 0.99, 0.6, 0.5], np.float32)
    assert queue_order(X, u).tolist() == [0, 2, 3, 1]  # the twin of the first waits
    assert queue_order(X, u, near=1e-9).tolist() == [0, 1, 2, 3]  # no penalty: by uncertainty alone


# --------------------------------------------------------------------------- a run with planted errors

@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory, dataset, cache_dir) -> tuple[Path, dict[str, str]]:
    """A head run on the synthetic set with 5 labels flipped (export skipped): (run folder,
    {flipped uri: its true label})."""
    from petal.head import HeadClassifier
    from petal.runs.head import train
    from petal.spec import DataSpec, RunSpec

    tmp = tmp_path_factory.mktemp("flipped")
    ds = load_dataset(dataset, eval_percent=25.0)
    rows = [[absolute(e.uri), e.label] for e in ds.examples]
    truth = {}
    for i in (0, 9, 17, 26, 34):
        truth[rows[i][0]] = rows[i][1]
        rows[i][1] = next(c for c in ds.classes if c != rows[i][1])
    with open(tmp / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([["uri", "label"], *rows])
    run = train(RunSpec(DataSpec(str(tmp / "data.csv"), eval_percent=25.0), str(tmp / "run"), cache_dir=cache_dir,
                        trainer=HeadClassifier(epochs=20, seed=0)), export=False).run_dir
    return run, truth


@pytest.fixture()
def review_dir(flipped_run, tmp_path) -> Path:
    """A fresh copy of the run, so that each test's decisions start from none."""
    return Path(shutil.copytree(flipped_run[0], tmp_path / "run"))


def test_cards_put_the_planted_errors_first_with_their_true_label_suggested(review_dir, flipped_run):
    truth = flipped_run[1]
    cards = run_cards(Run.open(review_dir))
    top = [c for c in cards if c.kind == SUSPECT][:len(truth)]
    assert {c.uris[0]: c.suggested for c in top} == truth
    assert [c.tier for c in cards] == sorted(c.tier for c in cards)  # conflicts, suspects, outliers, pairs


def test_server_refuses_without_the_token_and_cross_site_posts(review_dir):
    import httpx

    from petal.reviewing.server import review_server
    from petal.reviewing.workbench import open_review

    wb = open_review(review_dir, with_map=False)
    card = wb.session.cards[0].id
    with review_server(wb) as url:
        base, token = url.split("?")[0], url.split("token=")[1]
        with httpx.Client() as anon:
            assert anon.get(base).status_code == 403  # the page itself, without ?token=
            assert anon.get(base + "?token=wrong").status_code == 403
            for path in ("api/cards", "api/map", "api/image/0"):
                assert anon.get(base + path).status_code == 403, path
            assert anon.post(base + "api/decide", json={"card": card, "action": "keep"}).status_code == 403
            assert anon.get(base + "api/cards", headers={"Host": f"evil.example:{base.split(':')[2]}"}
                            ).status_code == 403  # DNS rebinding: another name for this address
        with httpx.Client() as browser:
            page = browser.get(url)
            assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
            assert "samesite=strict" in page.headers["set-cookie"].lower()
            assert browser.get(base + "api/cards").status_code == 200  # the cookie reads
            # a form or fetch from another site carries the cookie, but no token header: refused
            assert browser.post(base + "api/decide", json={"card": card, "action": "keep"}).status_code == 403
            ok = {"X-Petal-Token": token}
            assert browser.post(base + "api/decide", json={"card": card, "action": "keep"},
                                headers={**ok, "Origin": "http://evil.example"}).status_code == 403
            assert not (review_dir / "review.csv").exists()
            r = browser.post(base + "api/decide", json={"card": card, "action": "keep"}, headers=ok)
            assert r.status_code == 200 and r.json()["reviewed"] == 1
            bad = browser.post(base + "api/decide", json={"card": card, "action": "burn"}, headers=ok)
            assert bad.status_code == 400 and "action: expected one of" in bad.json()["error"]
            assert browser.get(base + f"api/image/{len(wb.images)}").status_code == 404
            img = browser.get(base + "api/image/0")
            assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"  # a JPEG
    assert [r["card"] for r in read_csv(review_dir / "review.csv")] == [card]


def test_retrain_applies_the_review_and_compares(review_dir, flipped_run, dataset):
    truth = flipped_run[1]
    cards = [c for c in run_cards(Run.open(review_dir)) if c.kind == SUSPECT]
    s = ReviewSession(review_dir, cards, Run.open(review_dir).settings().classes)
    for c in cards:
        s.decide(c.id, "relabel", label=truth[c.uris[0]]) if c.uris[0] in truth else s.decide(c.id, "keep")
    photo = review_dir.parent / "new" / "photo.png"  # a new photo, outside the data
    photo.parent.mkdir()
    shutil.copyfile(next(iter(sorted(dataset.glob("circles/*.png")))), photo)
    with open(review_dir / "labeled.csv", "w", newline="") as f:  # as petal review writes it
        csv.writer(f).writerows([["uri", "label", "card", "step"], [str(photo), "ovals", f"new:{photo}", "99"]])
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    new = review_dir.parent / "run-2"
    done = subprocess.run([sys.executable, "-m", "petal.cli", "retrain", str(review_dir), "--out", str(new),
                           "--no-export"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    label = {absolute(x["uri"]): x["label"] for x in read_csv(new / "split.csv")}
    assert all(label[u] == t for u, t in truth.items())  # every planted error fixed in the new run
    assert json.loads((new / "settings.json").read_text())["classes"][-1] == "ovals"
    assert label[absolute(photo)] == "ovals"
    old, now = (json.loads((d / "metrics.json").read_text()) for d in (review_dir, new))
    rows = {w: (a, b) for w, a, b in json.loads((new / "retrain.json").read_text())["rows"]}
    assert rows["accuracy"] == (old["accuracy"], now["accuracy"])
    assert "ECE" in rows and "kept share" in rows and "ovals f1" in rows
    assert re.search(r"│ accuracy +│ +[0-9.]+ │ +[0-9.]+ │ +[+-][0-9.]+ │", done.stdout)  # old, new, change
    assert 'id="retrain"' in (new / "report.html").read_text()
    assert (new / "review.csv").read_bytes() == (review_dir / "review.csv").read_bytes()  # goes on from there


# --------------------------------------------------------------------------- the page in Chromium

def needs_browser() -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from petal.webpage.browser import chromium_path

    if not chromium_path():
        pytest.skip("no Chromium browser found (apt-get install chromium, or set PETAL_CHROMIUM)")


@pytest.fixture(scope="module")
def browser():
    needs_browser()
    from petal.webpage.browser import chromium

    with chromium() as b:
        yield b


def start_review(run: Path) -> tuple[subprocess.Popen, str]:
    """`petal review RUN` in its own process on a free port; (process, the printed URL)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "petal.cli", "review", str(run), "--port", "0", "--no-map"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if m := re.search(r"open (http://\S+)", line):
            return proc, m.group(1)
    raise AssertionError(f"petal review did not print its URL (exit {proc.wait()})")


def saved(page, n: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.saved || 0) >= {n}", timeout=30_000)


def test_keyboard_flow_survives_a_reload_and_a_killed_server(browser, review_dir):
    proc, url = start_review(review_dir)
    try:
        page = browser.new_context().new_page()
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        cards = page.evaluate("state.cards")
        classes = page.evaluate("state.classes")
        assert [c["kind"] for c in cards[:3]] == ["label"] * 3
        at = lambda: page.get_attribute("#card", "data-id")  # noqa: E731 - the card shown
        assert at() == cards[0]["id"]
        page.keyboard.press("Enter")  # accept the suggestion
        saved(page, 1)
        assert at() == cards[1]["id"]  # moved on by itself
        page.keyboard.press("k")  # keep
        saved(page, 2)
        page.keyboard.press("2")  # relabel to the second class...
        saved(page, 3)
        page.keyboard.press("u")  # ...no: undo, the same card comes back
        saved(page, 4)
        assert at() == cards[2]["id"]
        page.click("text=exclude it")  # the mouse works too
        saved(page, 5)
        want = [(cards[0]["id"], "relabel", cards[0]["suggested"]), (cards[1]["id"], "keep", cards[1]["labels"][0]),
                (cards[2]["id"], "exclude", "")]
        got = lambda: [(r["card"], r["action"], r["label"]) for r in read_csv(review_dir / "review.csv")]  # noqa: E731
        assert got() == want and classes[1] not in [r[2] for r in got()[2:]]
        assert page.inner_text("#progress").startswith(f"reviewed 3 · left {len(cards) - 3} · changed 2")

        page.reload()  # a closed tab loses nothing
        page.wait_for_selector("body[data-ready='1']")
        assert at() == cards[3]["id"] and page.inner_text("#progress").startswith("reviewed 3")

        proc.send_signal(signal.SIGKILL)  # a killed server neither
        proc.wait()
        proc, url = start_review(review_dir)
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        assert at() == cards[3]["id"] and page.inner_text("#progress").startswith("reviewed 3")
        assert got() == want and not problems
    finally:
        proc.kill()
        proc.wait()


def test_map_selection_relabels_in_one_action_and_undo_takes_it_back(browser, review_dir):
    from petal.reviewing.server import review_server
    from petal.reviewing.workbench import open_review

    wb = open_review(review_dir)
    report = (review_dir / "report.html").read_text()
    assert report.count('id="feature-map"') == 1 and len(wb.map.uris) == len(read_csv(review_dir / "split.csv"))
    with review_server(wb) as url:
        page = browser.new_context().new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.keyboard.press("m")
        page.wait_for_function("window.petalMapStats")
        assert page.evaluate("window.petalMapStats.points") == len(wb.map.uris)
        box = page.locator("#map").bounding_box()
        page.mouse.move(box["x"] + 5, box["y"] + 5)  # a box over the left half of the map
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] - 5, steps=8)
        page.mouse.up()
        chosen = page.evaluate("[...PetalMap.selected()].map(i => state.cards && i)")
        xy = wb.map.xy
        inside = {u for u, (x, _) in zip(wb.map.uris, xy) if 12 + x * (900 - 24) <= 900 / 2}
        assert 0 < len(chosen) and {wb.map.uris[i] for i in chosen} == inside  # what the box covers, no more
        classes = wb.session.classes
        page.keyboard.press("1")  # all of them -> the first class, in one action
        saved(page, 1)
        rows = read_csv(review_dir / "review.csv")
        assert {r["uri"] for r in rows} == inside and {(r["card"], r["label"], r["step"]) for r in rows} == {
            ("map", classes[0], "1")}
        page.keyboard.press("u")
        saved(page, 2)
        assert read_csv(review_dir / "review.csv") == []


def test_page_refuses_a_browser_without_the_token(browser, review_dir):
    from petal.reviewing.server import review_server
    from petal.reviewing.workbench import open_review

    with review_server(open_review(review_dir, with_map=False)) as url:
        page = browser.new_context().new_page()
        answer = page.goto(url.split("?")[0])
        assert answer.status == 403 and "token" in page.inner_text("body")
        assert page.evaluate("fetch('api/cards').then(r => r.status)") == 403


def test_unlabeled_photos_are_queued_scored_and_labeled_into_labeled_csv(review_dir, tmp_path, cache_dir):
    from petal.reviewing.workbench import open_review
    from petal.synthetic import make_dataset

    new = make_dataset(tmp_path / "new", per_class=3, seed=7)  # photos the run has never seen
    (new / "notes.txt").write_text("not an image")
    wb = open_review(review_dir, unlabeled=new, cache_dir=cache_dir)
    fresh = [c for c in wb.session.cards if c.kind in (NEW, "unknown")]
    photos = sorted(str(p) for p in new.glob("*/*.*"))
    assert sorted(c.uris[0] for c in fresh) == photos  # each photo once; the text file is not one
    assert all(len(c.top) == 3 and abs(sum(p for _, p in c.top) - 1) < 0.05 for c in fresh if c.kind == NEW)
    assert wb.map is not None and set(photos) <= set(wb.map.uris)
    card = next(c for c in fresh if c.kind == NEW)
    wb.session.decide(card.id, "accept")
    row = read_csv(review_dir / "labeled.csv")[0]
    assert (row["uri"], row["label"], row["card"]) == (card.uris[0], card.suggested, card.id)
    assert not (review_dir / "review.csv").exists()  # audit decisions and new labels stay apart
