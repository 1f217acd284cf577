"""The int8 gate (petal.gate): one-sided McNemar on the discordant images, the agreement
floor and the hard cap on the accuracy drop."""

import numpy as np
import pytest

from petal.gate import int8_verdict, mcnemar_one_sided, verdict_line


def answers(n: int, *, right: int, lost: int, gained: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fp32, int8, labels) top-1 ids over n images: fp32 gets `right` right; int8 loses `lost`
    of those and gains `gained` of fp32's wrong ones."""
    labels = np.zeros(n, int)
    fp32 = np.r_[np.zeros(right, int), np.ones(n - right, int)]
    int8 = fp32.copy()
    int8[:lost] = 1
    int8[right:right + gained] = 0
    return fp32, int8, labels


def test_mcnemar_one_sided_p_values():
    assert mcnemar_one_sided(0, 0) == 1.0
    assert mcnemar_one_sided(2, 0) == pytest.approx(0.25)  # 2 flips of 381: a coin toss
    assert mcnemar_one_sided(10, 0) == pytest.approx(1 / 1024)
    assert mcnemar_one_sided(3, 3) == pytest.approx(0.65625)
    assert mcnemar_one_sided(12, 2) == pytest.approx(106 / 16384)


def test_two_images_of_381_are_chance_and_pass():
    g = int8_verdict(*answers(381, right=353, lost=2, gained=0))  # the 0.52 pt, 99.48% agreement
    assert g["passed"] and g["accuracy_drop_pt"] == pytest.approx(0.525, abs=1e-3) and g["mcnemar_p"] == 0.25
    assert "passed" in verdict_line(g) and "McNemar p = 0.25" in verdict_line(g)


def test_a_loss_beyond_chance_is_refused_though_agreement_and_drop_are_within_bounds():
    g = int8_verdict(*answers(2000, right=1800, lost=12, gained=2))
    assert g["agreement"] >= 0.99 and g["accuracy_drop_pt"] <= 1.0
    assert not g["passed"] and g["reasons"] == [f"worse beyond chance: 12 lost vs 2 gained, p = {g['mcnemar_p']:.3g} "
                                                "< 0.05"]
    assert "REFUSED: worse beyond chance" in verdict_line(g)


def test_the_agreement_floor_and_the_cap_refuse_on_their_own():
    g = int8_verdict(*answers(1000, right=900, lost=8, gained=8))  # as good, but 1.6% of answers changed
    assert not g["passed"] and g["mcnemar_p"] > 0.5 and g["reasons"][0].startswith("top-1 agreement 98.40%")
    g = int8_verdict(*answers(100, right=90, lost=2, gained=0), max_drop_pt=1.0, min_agreement=0.9)
    assert not g["passed"] and g["reasons"] == ["accuracy drop 2.00 pt > 1 pt"]  # p = 0.25: only the cap refuses
