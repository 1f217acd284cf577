"""The int8 gate: is the int8 model worse than fp32, beyond what chance explains?

An accuracy drop counted in images is a coin toss on a few hundred eval images: 2 images
of 381 are 0.52 points, and the same export can lose them on one CPU and not on another.
What decides is the images the two models answer differently (the discordant pairs):

    lost   = images fp32 gets right and int8 gets wrong
    gained = images int8 gets right and fp32 gets wrong

Were int8 no worse, each discordant image would be a loss or a gain with even odds;
McNemar's exact test, one-sided, asks how likely `lost` or more losses out of
`lost + gained` are under those odds. The gate refuses when

- that p-value is below ALPHA (int8 is worse, beyond chance), or
- top-1 agreement with fp32 is below MIN_AGREEMENT (the model has changed, whichever way), or
- the accuracy drop is above MAX_DROP_PT points (a hard cap, whatever the test says).

    figures = int8_verdict(fp32_top1, int8_top1, labels)   # (N,) class ids each
    figures["passed"], verdict_line(figures)
"""

from __future__ import annotations

import numpy as np

MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 on the eval split an int8 export must reach
MAX_DROP_PT = 1.0  # the most eval accuracy (percentage points) it may lose, whatever the test says
ALPHA = 0.05  # one-sided significance level of McNemar's test


def mcnemar_one_sided(lost: int, gained: int) -> float:
    """P(X >= lost) for X ~ Binomial(lost + gained, 1/2): the chance of losing at least this
    many of the discordant images were int8 as good as fp32. 1.0 with none discordant."""
    from scipy.stats import binom

    n = lost + gained
    return 1.0 if n == 0 else float(binom.sf(lost - 1, n, 0.5))


def int8_verdict(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, *,
                 min_agreement: float = MIN_AGREEMENT, max_drop_pt: float = MAX_DROP_PT,
                 alpha: float = ALPHA) -> dict:
    """The gate's figures and verdict for (N,) top-1 ids of fp32 (`reference`) and int8
    (`candidate`) against the (N,) true ids `labels`; "passed" and, when not, "reasons"."""
    ref_right, cand_right = reference == labels, candidate == labels
    lost, gained = int((ref_right & ~cand_right).sum()), int((~ref_right & cand_right).sum())
    agreement = float((reference == candidate).mean()) if len(labels) else 1.0
    acc_fp32, acc = float(ref_right.mean()) if len(labels) else 0.0, float(cand_right.mean()) if len(labels) else 0.0
    drop = round(100 * (acc_fp32 - acc), 4)
    p = mcnemar_one_sided(lost, gained)
    reasons = ([f"top-1 agreement {agreement:.2%} < {min_agreement:.0%}"] if agreement < min_agreement else []) + \
        ([f"accuracy drop {drop:.2f} pt > {max_drop_pt:g} pt"] if drop > max_drop_pt else []) + \
        ([f"worse beyond chance: {lost} lost vs {gained} gained, p = {p:.3g} < {alpha:g}"] if p < alpha else [])
    return {"images": len(labels), "agreement": agreement, "accuracy": acc, "accuracy_fp32": acc_fp32,
            "accuracy_drop_pt": drop, "lost": lost, "gained": gained, "mcnemar_p": p, "alpha": alpha,
            "min_agreement": min_agreement, "max_accuracy_drop_pt": max_drop_pt, "passed": not reasons,
            "reasons": reasons}


def verdict_line(g: dict) -> str:
    """The gate in one line: the figures, the test and the verdict."""
    verdict = "passed" if g["passed"] else "REFUSED: " + "; ".join(g["reasons"])
    return (f"int8 gate on {g['images']} eval images: top-1 agreement {g['agreement']:.2%} (>= "
            f"{g['min_agreement']:.0%}), accuracy {g['accuracy']:.2%} vs fp32 {g['accuracy_fp32']:.2%} (drop "
            f"{g['accuracy_drop_pt']:.2f} pt, at most {g['max_accuracy_drop_pt']:g}); discordant images: "
            f"{g['lost']} lost, {g['gained']} gained, one-sided McNemar p = {g['mcnemar_p']:.3g} (refuse below "
            f"{g['alpha']:g}): {verdict}")
