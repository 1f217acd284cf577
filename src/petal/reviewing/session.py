"""One review: its cards, the classes, and the two decision logs; every answer saved at once.

    s = ReviewSession(run_dir, cards, classes)
    s.decide(card_id, "relabel", label="roses")   # or "accept", "keep", "exclude", "skip"
    s.select([uri, ...], "exclude")               # a map selection: one action, one undo
    s.undo()
    s.progress()                                   # {"reviewed", "left", "changed", ...}

Audit cards write RUN/review.csv, new photos RUN/labeled.csv (petal.reviewing.log). The
routes of petal.reviewing.app call these methods and nothing else; one lock keeps the
answers of two tabs in order.
"""

from __future__ import annotations

import threading
from pathlib import Path

from petal.errors import PetalError
from petal.reviewing.cards import DUPLICATE, NEW, UNKNOWN, Card
from petal.reviewing.log import (
    EXCLUDE,
    KEEP,
    LABELED_COLUMNS,
    LABELED_FILE,
    RELABEL,
    REVIEW_COLUMNS,
    REVIEW_FILE,
    SKIP,
    DecisionLog,
    check_label_name,
)

ACCEPT = "accept"  # take the suggested label
ACTIONS = (ACCEPT, KEEP, RELABEL, EXCLUDE, SKIP)
MAP_CARD = "map"  # the card column of decisions made on the feature map


class ReviewSession:
    def __init__(self, run_dir: str | Path, cards: list[Card], classes: list[str],
                 map_labels: dict[str, str] | None = None) -> None:
        """`map_labels`: uri -> label of every image on the feature map (a selection may hold any)."""
        self.cards, self.classes = cards, list(classes)
        self.map_labels = map_labels or {}
        self.by_id = {c.id: c for c in cards}
        self.single = {c.uris[0]: c.id for c in cards if len(c.uris) == 1}  # uri -> its one-image card
        self.review = DecisionLog(Path(run_dir) / REVIEW_FILE, REVIEW_COLUMNS)
        self.labeled = DecisionLog(Path(run_dir) / LABELED_FILE, LABELED_COLUMNS)
        self.lock = threading.Lock()
        self.classes += sorted({r["label"] for r in self.labeled.rows if r["label"]} - set(self.classes))

    # ------------------------------------------------------------------ actions

    def decide(self, card_id: str, action: str, label: str = "", which: int | None = None) -> dict:
        """Answer one card; returns progress(). `which`: the image of a duplicate pair to exclude."""
        card = self.by_id.get(card_id)
        if card is None:
            raise PetalError(f"card: no card {card_id!r} in this review")
        if action not in ACTIONS:
            raise PetalError(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
        with self.lock:
            if card.kind in (NEW, UNKNOWN):
                self.labeled.add([self._label_row(card, action, label)], self._next_step())
            else:
                self.review.add(self._review_rows(card, action, label, which), self._next_step())
            return self.progress()

    def select(self, uris: list[str], action: str, label: str = "") -> dict:
        """Relabel or exclude every image of a map selection, as one action."""
        if action not in (RELABEL, EXCLUDE):
            raise PetalError(f"action: a selection is relabelled or excluded, got {action!r}")
        unknown = [u for u in uris if u not in self.map_labels]
        if unknown or not uris:
            raise PetalError(f"uris: {len(unknown)} of the {len(uris)} selected images are not on the map"
                             if uris else "uris: the selection is empty")
        if action == RELABEL:
            self._check_class(label)
        with self.lock:
            self.review.add([self._row(u, self.map_labels[u], action, label if action == RELABEL else "", MAP_CARD)
                             for u in uris], self._next_step())
            return self.progress()

    def undo(self) -> dict:
        """Take back the last action (a card, or a whole map selection); returns progress() with
        the card it was ("undone": its id, or "" for a map selection or nothing)."""
        with self.lock:
            log = max((self.review, self.labeled), key=DecisionLog.last_step)
            gone = log.undo()
            return {**self.progress(), "undone": gone[0]["card"] if gone and gone[0]["card"] != MAP_CARD else ""}

    # ------------------------------------------------------------------ reading

    def decisions(self) -> dict[str, dict[str, str]]:
        """card id -> its decision {action, label, uri}: what the page shows on a card answered."""
        out = {}
        for r in self.review.rows + self.labeled.rows:
            out[r["card"]] = {"action": r.get("action") or (RELABEL if r["label"] else SKIP), "label": r["label"],
                              "uri": r["uri"]}
        return out

    def done(self) -> set[str]:
        """Cards answered: on their own, or (one image) through a map selection."""
        decided = (self.review.decided | self.labeled.decided) & self.by_id.keys()
        on_map = (self.single.get(u) for u, r in self.review.latest.items() if r["card"] == MAP_CARD)
        return decided | {c for c in on_map if c}

    def progress(self) -> dict:
        """How many cards are reviewed and left, and how many images changed (relabelled,
        excluded or newly labeled, by their latest decision)."""
        reviewed = len(self.done())
        tally = self.review.tally + self.labeled.tally
        return {"reviewed": reviewed, "left": len(self.cards) - reviewed,
                "changed": tally["relabelled"] + tally["excluded"] + tally["labeled"],
                "relabelled": tally["relabelled"], "excluded": tally["excluded"], "labeled": tally["labeled"],
                "classes": self.classes}

    # ------------------------------------------------------------------ rows

    def _next_step(self) -> int:
        return max(self.review.last_step(), self.labeled.last_step()) + 1

    def _check_class(self, label: str) -> None:
        if label not in self.classes:
            raise PetalError(f"label: expected one of the classes {self.classes}, got {label!r}")

    @staticmethod
    def _row(uri: str, was: str, action: str, label: str, card: str) -> dict[str, str]:
        return {"uri": uri, "label": label, "action": action, "was": was, "card": card}

    def _review_rows(self, card: Card, action: str, label: str, which: int | None) -> list[dict[str, str]]:
        """The review.csv rows of one answer to an audit card."""
        if action == SKIP:
            raise PetalError(f"action: {card.kind} cards are kept, relabelled or excluded, not skipped")
        if action == ACCEPT:
            if not card.suggested:
                raise PetalError(f"action: card {card.id!r} has no suggested label to accept")
            action, label = RELABEL, card.suggested
        if action == RELABEL:
            self._check_class(label)
        if card.kind == DUPLICATE and action == EXCLUDE:
            if which not in (0, 1):
                raise PetalError(f"which: a duplicate pair's image to exclude is 0 or 1, got {which!r}")
            return [self._row(card.uris[which], card.labels[which], EXCLUDE, "", card.id)]
        if card.kind == DUPLICATE and action == RELABEL:  # both images get the one label
            return [self._row(u, was, RELABEL, label, card.id) for u, was in zip(card.uris, card.labels)]
        kept = {KEEP: card.labels[0], RELABEL: label, EXCLUDE: ""}[action]
        return [self._row(u, was, action, kept if action != KEEP else was, card.id)
                for u, was in zip(card.uris, card.labels)]

    def _label_row(self, card: Card, action: str, label: str) -> dict[str, str]:
        """The labeled.csv row of an answer to a new photo: a class (given, suggested, or a new
        one's name), or skip."""
        if action == ACCEPT:
            label = card.suggested
        elif action == SKIP or action == EXCLUDE:
            label = ""
        elif action != RELABEL:
            raise PetalError(f"action: a new photo is labeled, accepted or skipped, got {action!r}")
        label = label.strip()
        if label and label not in self.classes:
            self.classes.append(check_label_name(label))
        return {"uri": card.uris[0], "label": label, "card": card.id}
