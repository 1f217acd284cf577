"""Everything `petal review RUN` shows, gathered once before the page opens.

    wb = open_review("runs/flowers", unlabeled="new_photos/")
    wb.session      # the cards and the decisions (petal.reviewing.session)
    wb.map          # the feature map, or None (map=False)
    wb.images       # every image the page may show, by number: /api/image/{i}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petal.errors import PetalError
from petal.progress import Reporter
from petal.report import insert_section, map_section
from petal.reviewing.cards import NEW, OUTLIER, SUSPECT, UNKNOWN, run_cards
from petal.reviewing.featuremap import FeatureMap, run_map
from petal.reviewing.queue import unlabeled_queue
from petal.reviewing.session import ReviewSession
from petal.run import HEAD, Run

PLAIN, FLAGGED, UNLABELED, REJECTED = 0, 1, 2, 3  # how a point of the map is drawn


@dataclass
class Workbench:
    run: Run
    session: ReviewSession
    map: FeatureMap | None
    images: list[str]
    index: dict[str, int]  # uri -> its number in images

    def card_list(self) -> list[dict]:
        """The cards for the page, each with its images' numbers ("img")."""
        return [{**c.to_dict(), "img": [self.index[u] for u in c.uris]} for c in self.session.cards]

    def map_points(self) -> dict:
        """The map for the page as flat arrays: x, y in [0, 1], label id (-1: unlabeled), flag, image number."""
        if self.map is None:
            return {"method": None, "x": [], "y": [], "label": [], "flag": [], "img": []}
        ids = {c: i for i, c in enumerate(self.session.classes)}
        kinds = {c.uris[0]: c.kind for c in self.session.cards if len(c.uris) == 1}
        flag = {SUSPECT: FLAGGED, OUTLIER: FLAGGED, NEW: UNLABELED, UNKNOWN: REJECTED}
        m = self.map
        return {"method": m.method, "x": np.round(m.xy[:, 0], 4).tolist(), "y": np.round(m.xy[:, 1], 4).tolist(),
                "label": [ids.get(lab, -1) for lab in m.labels],
                "flag": [flag.get(kinds.get(u, ""), PLAIN) for u in m.uris],
                "img": [self.index[u] for u in m.uris]}


def open_review(run_dir: str | Path, *, unlabeled: str | Path | None = None, cache_dir: str | Path | None = None,
                with_map: bool = True, reporter: Reporter | None = None) -> Workbench:
    """The run's audit cards (and, with `unlabeled`, its new photos queued for labeling), the
    decisions already in RUN/review.csv and RUN/labeled.csv, and the feature map."""
    reporter = reporter or Reporter()
    run = Run.open(run_dir)
    settings = run.settings()
    if settings.kind != HEAD and (unlabeled is not None or with_map):  # no head on cached features to score with
        if unlabeled is not None:
            raise PetalError(f"unlabeled: {run.path} is a {settings.kind} run; new photos are queued by the head of "
                             "a `petal train` run")
        reporter.message(f"note: {run.path} is a {settings.kind} run: no feature map (it needs cached features)")
        with_map = False
    cards = run_cards(run)
    extra = None
    if unlabeled is not None:
        q = unlabeled_queue(run, unlabeled, cache_dir, reporter)
        for uri, reason in q.failed:
            reporter.message(f"skipped {uri}: {reason}")
        cards += q.cards
        extra = (q.uris, q.X)
    fmap = None
    if with_map:
        with reporter.progress("feature map", 1) as advance:
            fmap = run_map(run, extra)
            advance(1)
    images = list(dict.fromkeys([u for c in cards for u in c.uris] + (fmap.uris if fmap else [])))
    labels = dict(zip(fmap.uris, fmap.labels)) if fmap else {}
    session = ReviewSession(run.path, cards, settings.classes, {u: lab for u, lab in labels.items() if lab})
    wb = Workbench(run, session, fmap, images, {u: i for i, u in enumerate(images)})
    if fmap is not None and run.report_path.exists():
        report_map(wb)
    return wb


def report_map(wb: Workbench) -> None:
    """The feature map, static, into RUN/report.html (replacing an earlier one)."""
    points = wb.map_points()
    classes = wb.session.classes + (["unlabeled"] if -1 in points["label"] else [])
    labels = [i if i >= 0 else len(classes) - 1 for i in points["label"]]
    flagged = [f in (FLAGGED, REJECTED) for f in points["flag"]]
    insert_section(wb.run.report_path, "map", map_section(wb.map.xy, labels, classes, flagged, wb.map.uris,
                                                          wb.map.method))
