"""The review loop on tf_flowers: cleaning planted label errors, labeling new photos, the page.

    nice python benchmarks/review_loop.py [FOLDER] [--parts clean,label,page,map] [--out DIR]

- clean: 5% of the labels flipped (3 draws). A run on the flipped data; a simulated reviewer
  answers the review queue top-down truthfully (the original label), for as many cards as
  there are flips; `retrain`. Accuracy is measured against the true labels of the eval split
  (the same images for every run), for the clean run, the flipped run and the retrained one;
  flips fixed, and keypresses per fixed label (one key per card: the page moves on by itself).
- label: 20 labeled photos per class, the rest of the training split is the unlabeled pool.
  100 photos chosen by petal's queue (petal.reviewing.queue.labeling_order on a calibrated
  head and the unknown detector) vs 100 at random, 5 seeds; then how many random labels
  it takes to match petal's accuracy.
- page: decisions answered by the review server at 10,000 suspects (median, p95, max ms over
  HTTP on loopback, each saved to review.csv), and the canvas map with 50,000 points in
  Chromium (draw ms, and frame ms while dragging a lasso).
- map: the projection's class separation (5-fold accuracy of a 6-nearest-neighbour vote in
  2-D) and time, for PCA and t-SNE (and UMAP when umap-learn is importable).
Needs a warm cache for speed ($PETAL_CACHE_DIR; embeds what is missing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from petal.data import EVAL, TRAIN, load_dataset
from petal.head import HeadClassifier
from petal.reviewing.cards import DUPLICATE, run_cards
from petal.reviewing.featuremap import run_embeddings
from petal.reviewing.session import ReviewSession
from petal.run import Run
from petal.runs.head import train as train_spec
from petal.runs.retrain import retrain
from petal.spec import DataSpec, RunSpec
from petal.storage import absolute

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def train(data: str, out: Path) -> Path:
    """A head run with petal's defaults (no export: the benchmark reads the head): its folder."""
    return train_spec(RunSpec(DataSpec(str(data), eval_percent=10.0), str(out)), export=False).run_dir


def true_accuracy(run: Run, truth: dict[str, str], eval_uris: list[str]) -> float:
    """The run's head on `eval_uris` against their true labels."""
    rows, X = run_embeddings(run)
    at = {absolute(r["uri"]): i for i, r in enumerate(rows)}
    settings = run.settings()
    pred = run.head(settings).predict(X[[at[u] for u in eval_uris]])
    return float(np.mean([settings.classes[p] == truth[u] for p, u in zip(pred, eval_uris)]))


def flipped_csv(folder: str, seed: int, path: Path, percent: float = 5.0) -> set[str]:
    ds = load_dataset(folder, eval_percent=10.0)
    rng = np.random.default_rng(seed)
    flip = set(rng.choice(len(ds.examples), size=int(len(ds.examples) * percent / 100), replace=False).tolist())
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label"])
        for i, e in enumerate(ds.examples):
            w.writerow([absolute(e.uri), rng.choice([c for c in ds.classes if c != e.label]) if i in flip else e.label])
    return {absolute(ds.examples[i].uri) for i in flip}


def truthful_review(run: Run, truth: dict[str, str], budget: int) -> int:
    """Answer the first `budget` cards as a reviewer who knows the true labels; returns keypresses."""
    cards = run_cards(run)[:budget]
    s = ReviewSession(run.path, cards, run.settings().classes)
    for c in cards:
        want = [truth[u] for u in c.uris]
        if c.kind == DUPLICATE and len(set(want)) > 1:  # two different flowers: keep both, fix each elsewhere
            s.decide(c.id, "keep")
        elif c.suggested and want[0] == c.suggested:
            s.decide(c.id, "accept")
        elif all(w == lab for w, lab in zip(want, c.labels)):
            s.decide(c.id, "keep")
        else:
            s.decide(c.id, "relabel", label=want[0])
    return len(cards)


def clean_part(folder: str, out: Path, draws: int) -> dict:
    ds = load_dataset(folder, eval_percent=10.0)
    truth = {absolute(e.uri): e.label for e in ds.examples}
    clean = Run(train(folder, out / "clean"))
    eval_uris = [absolute(r["uri"]) for r in clean.split_rows() if r["split"] == EVAL]
    result = {"clean_accuracy": true_accuracy(clean, truth, eval_uris), "draws": []}
    for seed in range(draws):
        flips = flipped_csv(folder, seed, out / f"flipped-{seed}.csv")
        run = Run(train(str(out / f"flipped-{seed}.csv"), out / f"flipped-{seed}"))
        t0 = time.perf_counter()
        keys = truthful_review(run, truth, len(flips))
        review_s = time.perf_counter() - t0
        latest = ReviewSession(run.path, [], []).review.latest
        fixed = sum(absolute(u) in flips and r["action"] == "relabel" and r["label"] == truth[absolute(u)]
                    for u, r in latest.items())
        new = Run(retrain(run.path, out / f"retrained-{seed}", export=False).run_dir)
        result["draws"].append({"flips": len(flips), "fixed": fixed, "fixed_share": round(fixed / len(flips), 3),
                                "keypresses": keys, "keys_per_fix": round(keys / max(fixed, 1), 2),
                                "flipped_accuracy": true_accuracy(run, truth, eval_uris),
                                "retrained_accuracy": true_accuracy(new, truth, eval_uris),
                                "simulated_review_seconds": round(review_s, 2)})
    d = result["draws"]
    result["mean"] = {k: round(float(np.mean([x[k] for x in d])), 4) for k in
                      ("fixed_share", "keys_per_fix", "flipped_accuracy", "retrained_accuracy")}
    result["gap_pt"] = round(100 * (result["clean_accuracy"] - result["mean"]["retrained_accuracy"]), 2)
    return result


def head_accuracy(X: np.ndarray, y: np.ndarray, Xe: np.ndarray, ye: np.ndarray, seed: int) -> float:
    head = HeadClassifier(seed=seed).for_data(len(y))
    head.fit(X, y, num_classes=int(max(y.max(), ye.max())) + 1)
    return float((head.predict(Xe) == ye).mean())


def label_part(run_dir: Path, seeds: int, per_class: int = 20, budget: int = 100) -> dict:
    from petal.reviewing.queue import labeling_order, margin_uncertainty, queue_order
    from petal.unknown import KnnUnknown

    run = Run(run_dir)
    rows, X = run_embeddings(run)
    classes = run.settings().classes
    y = np.array([classes.index(r["label"]) for r in rows])
    tr, ev = (np.array([i for i, r in enumerate(rows) if r["split"] == s]) for s in (TRAIN, EVAL))
    Xe, ye = X[ev], y[ev]
    out = {"petal": [], "petal_no_unknown_group": [], "random": [], "random_more": {}}
    sizes = [budget, 2 * budget, 3 * budget, 5 * budget, 8 * budget]
    more: dict[int, list[float]] = {n: [] for n in sizes}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        start = np.concatenate([rng.choice(tr[y[tr] == c], per_class, replace=False) for c in range(len(classes))])
        pool = np.setdiff1d(tr, start)
        head = HeadClassifier(seed=seed).for_data(len(start))
        head.fit(X[start], y[start], num_classes=len(classes))
        head.calibrate(X[start], y[start])
        unknown = KnnUnknown.fit(X[start], y[start], head.oof_proba_, seed=seed)
        probs = head.predict_proba(X[pool])
        order, rejected = labeling_order(X[pool], probs, unknown)
        for arm, ranked in (("petal", np.concatenate([order, rejected])),  # as `petal review --unlabeled` queues
                            ("petal_no_unknown_group", queue_order(X[pool], margin_uncertainty(probs)))):
            picked = pool[ranked[:budget]]
            out[arm].append(head_accuracy(X[np.r_[start, picked]], y[np.r_[start, picked]], Xe, ye, seed))
        shuffled = rng.permutation(pool)
        for n in sizes:
            more[n].append(head_accuracy(X[np.r_[start, shuffled[:n]]], y[np.r_[start, shuffled[:n]]], Xe, ye, seed))
        out["random"].append(more[budget][-1])
    for k in ("petal", "petal_no_unknown_group", "random"):
        out[f"{k}_mean"], out[f"{k}_std"] = round(float(np.mean(out[k])), 4), round(float(np.std(out[k])), 4)
        diff = np.array(out[k]) - np.array(out["random"])  # paired: the same 100 starting labels
        out[f"{k}_minus_random"] = (round(float(diff.mean()), 4), round(float(diff.std()), 4))
    out["random_more"] = {n: round(float(np.mean(v)), 4) for n, v in more.items()}
    for k in ("petal", "petal_no_unknown_group"):
        matched = [n for n in sizes if out["random_more"][n] >= out[f"{k}_mean"]]
        out[f"{k}_random_labels_to_match"] = matched[0] if matched else f"> {sizes[-1]}"
    return out


def map_part(run_dir: Path) -> dict:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from petal.reviewing.featuremap import project
    from petal.unknown import normalize

    rows, X = run_embeddings(Run(run_dir))
    y = np.array([r["label"] for r in rows])

    def separation(Z: np.ndarray) -> float:
        return round(float(cross_val_score(KNeighborsClassifier(6), Z, y, cv=5).mean()), 4)

    out = {"images": len(y), "full_dim": separation(normalize(X))}
    for method in ("pca", "tsne"):
        t0 = time.perf_counter()
        xy, _ = project(X, method)
        out[method] = {"knn_accuracy": separation(xy), "seconds": round(time.perf_counter() - t0, 1)}
    try:
        import umap
        from sklearn.decomposition import PCA

        t0 = time.perf_counter()
        xy = umap.UMAP(random_state=0).fit_transform(PCA(50, random_state=0).fit_transform(normalize(X)))
        out["umap"] = {"knn_accuracy": separation(xy), "seconds": round(time.perf_counter() - t0, 1)}
    except ImportError:
        out["umap"] = "umap-learn is not installed"
    return out


def synthetic_workbench(folder: Path, suspects: int, points: int, classes: int = 5):
    """A review of `suspects` label-suspect cards (each a hard link to one small JPEG) and a map
    of `points` points (the map-only ones without files)."""
    from PIL import Image

    from petal.reviewing.cards import SUSPECT, Card
    from petal.reviewing.featuremap import FeatureMap
    from petal.reviewing.workbench import Workbench

    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(classes)]
    uris = [str(folder / f"img{i:06d}.jpg") for i in range(points)]
    Image.new("RGB", (320, 240), (200, 80, 120)).save(folder / "one.jpg")
    for u in uris[:suspects]:
        Path(u).unlink(missing_ok=True)
        Path(u).hardlink_to(folder / "one.jpg")
    labels = [names[i % classes] for i in range(points)]
    cards = [Card(f"label:{u}", SUSPECT, [u], [lab], names[(i + 1) % classes], 1 - i / suspects)
             for i, (u, lab) in enumerate(zip(uris[:suspects], labels))]
    centers = rng.uniform(0, 1, (classes, 2))
    xy = np.clip(centers[np.arange(points) % classes] + rng.normal(0, 0.08, (points, 2)), 0, 1).astype(np.float32)
    fmap = FeatureMap(uris, labels, xy, "synthetic")
    session = ReviewSession(folder, cards, names, dict(zip(uris, labels)))
    return Workbench(Run(folder), session, fmap, uris, {u: i for i, u in enumerate(uris)})


def page_part(out: Path, suspects: int = 10_000, points: int = 50_000, decisions: int = 300) -> dict:
    import httpx

    from petal.reviewing.server import review_server
    from petal.webpage.browser import chromium_path

    out.mkdir(parents=True, exist_ok=True)
    wb = synthetic_workbench(out, suspects, points)
    result: dict = {"suspects": suspects, "points": points}
    with review_server(wb) as url:
        token = url.split("token=")[1]
        base = url.split("?")[0]
        with httpx.Client(headers={"X-Petal-Token": token}) as client:
            times = []
            for c in wb.session.cards[:decisions]:
                t0 = time.perf_counter()
                r = client.post(base + "api/decide", json={"card": c.id, "action": "accept"})
                times.append(1000 * (time.perf_counter() - t0))
                r.raise_for_status()
        result["decide_ms_httpx"] = summary(times)
        result["decide_ms_in_process"] = summary(in_process(wb, decisions))
        if chromium_path():
            result.update(in_browser(url, decisions))
    return result


def in_process(wb, decisions: int) -> list[float]:  # noqa: ANN001 - a Workbench
    """The library call alone (decide, save with fsync, progress) on the next cards."""
    times = []
    for c in wb.session.cards[2 * decisions:3 * decisions]:
        t0 = time.perf_counter()
        wb.session.decide(c.id, "accept")
        times.append(1000 * (time.perf_counter() - t0))
    return times


def summary(times: list[float]) -> dict:
    return {"median": round(float(np.median(times)), 1), "p95": round(float(np.percentile(times, 95)), 1),
            "max": round(max(times), 1), "n": len(times)}


def in_browser(url: str, decisions: int) -> dict:
    """In Chromium: `decisions` keypresses (Enter: accept), each timed from the page's POST to its
    answer; then the map: the draw time of all its points, and frame times while lassoing."""
    from petal.webpage.browser import chromium

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        for k in range(decisions):
            page.keyboard.press("Enter")
            page.wait_for_function(f"Number(document.body.dataset.saved) >= {k + 1}")
        out = {"decide_ms_browser": summary(page.evaluate("window.petalTimings"))}
        out["map"] = lasso(page)
        return out


def lasso(page) -> dict:  # noqa: ANN001 - a Playwright Page
    page.keyboard.press("m")
    page.wait_for_function("window.petalMapStats", timeout=60_000)
    draw = page.evaluate("window.petalMapStats")
    box = page.locator("#map").bounding_box()
    page.keyboard.down("Shift")
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    t0, frames = time.perf_counter(), 60
    for k in range(frames):
        page.mouse.move(box["x"] + 100 + 5 * k, box["y"] + 100 + 3 * (k % 20))
    frame_ms = 1000 * (time.perf_counter() - t0) / frames
    page.mouse.up()
    page.keyboard.up("Shift")
    return {"draw_ms": round(draw["drawMs"], 1), "lasso_move_ms": round(frame_ms, 1),
            "selected": page.evaluate("PetalMap.selected().size")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(DEFAULT))
    ap.add_argument("--parts", default="page,map,label,clean")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="Keep the runs here (default: a temp folder).")
    args = ap.parse_args()
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        report: dict = {}
        if "page" in parts:
            report["page"] = page_part(out / "page")
            print(json.dumps({"page": report["page"]}), flush=True)
        base = out / "base"
        if {"map", "label"} & set(parts) and not Run(base).finished:
            train(args.folder, base)
        if "map" in parts:
            report["map"] = map_part(base)
            print(json.dumps({"map": report["map"]}), flush=True)
        if "label" in parts:
            report["label"] = label_part(base, args.seeds)
            print(json.dumps({"label": report["label"]}), flush=True)
        if "clean" in parts:
            report["clean"] = clean_part(args.folder, out / "clean", args.draws)
            print(json.dumps({"clean": report["clean"]}), flush=True)
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
