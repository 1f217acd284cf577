"""What the review page shows: one card per finding of a run's audit, most suspicious first.

    cards = run_cards(run)        # from RUN/suspects.csv, duplicates.csv and split.csv

A card holds one image (a label suspect with its suggested label, an outlier) or two (an
exact or near duplicate pair, shown side by side). The order, by tiers:
  0  duplicates that cross classes or splits (a conflict, or train/eval leakage): certain harm
  1  label suspects, by score (how little held-out models give the label it carries)
  2  outliers, by score (how far from every other image)
  3  duplicates within one class and split: harmless but redundant
and within a tier by score, highest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from petal.run import Run
from petal.storage import absolute, read_csv

SUSPECT, OUTLIER, DUPLICATE, NEW, UNKNOWN = "label", "outlier", "duplicate", "new", "unknown"


@dataclass
class Card:
    id: str  # stable across restarts: the kind and the image(s)
    kind: str  # SUSPECT, OUTLIER, DUPLICATE (audit); NEW, UNKNOWN (unlabeled photos)
    uris: list[str]  # one image, or two side by side
    labels: list[str]  # the label each image carries ("" for an unlabeled photo)
    suggested: str = ""  # the label the model suggests ("" when none)
    score: float = 0.0
    note: str = ""  # e.g. "exact, crosses classes, train/eval"
    top: list[tuple[str, float]] = field(default_factory=list)  # unlabeled photos: the model's best classes
    tier: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tier"}


def run_cards(run: Run) -> list[Card]:
    """Every finding of the run's audit as a card, in review order (see the module's doc)."""
    label_of = {absolute(r["uri"]): r["label"] for r in run.split_rows()}
    cards = []
    for r in read_csv(run.path / "suspects.csv") if (run.path / "suspects.csv").exists() else []:
        label = label_of.get(absolute(r["uri"]), r["label"])
        if r["reason"] == "label":
            cards.append(Card(f"label:{r['uri']}", SUSPECT, [r["uri"]], [label], r["suggested"], float(r["score"]),
                              tier=1))
        else:
            cards.append(Card(f"outlier:{r['uri']}", OUTLIER, [r["uri"]], [label], "", float(r["score"]),
                              "far from every other image", tier=2))
    for r in read_csv(run.path / "duplicates.csv") if (run.path / "duplicates.csv").exists() else []:
        a, b = r["uri_a"], r["uri_b"]
        note = r["kind"] + (f", crosses {r['crosses']}" if r["crosses"] else "")
        labels = [label_of.get(absolute(a), ""), label_of.get(absolute(b), "")]
        cards.append(Card(f"dup:{a}|{b}", DUPLICATE, [a, b], labels, "", float(r["similarity"]), note,
                          tier=0 if r["crosses"] else 3))
    return sorted(cards, key=lambda c: (c.tier, -c.score))
