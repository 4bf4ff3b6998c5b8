"""How far to trust an explanation map: each of its faithfulness scores against maps that know less, as
paired differences with bootstrap intervals, and one verdict in plain words.

On the same images, every score of the map (deletion, insertion and ROAD without masks; the pointing game
with lesion masks) is compared with the same score of maps that know less: a random map, the same method
on untrained members (the model-randomisation check, Adebayo et al. 2018), a map peaking at the image's
centre and a colour-contrast map that knows no model (skin.metrics.contrast_map). Each comparison is the
mean over images of the paired advantage (the map's score minus the baseline's, signed so that positive
means the map did better) with a percentile bootstrap interval over resamples of the images.

The verdict (`verdict`) is about the model, so it rests on the mask-free scores, which perturb the image
three ways (greying, revealing on a blurred copy, imputing from the neighbours): the map is **shown to
follow the model** on these images only when it beats every baseline — against each, its advantage is
above zero with the whole 95% interval on at least two of deletion, insertion and ROAD, and below zero with
the whole interval on none. Otherwise it is **not shown to follow the model on these images**, and the
verdict names the baselines it did not beat: read it as a rough pointer.
The pointing game (is the map's peak on the lesion?) says whether the map is plausible to a person, not
whether it follows the model; it is reported with its intervals beside the verdict.
"""
from __future__ import annotations

import numpy as np

BASELINES = ("random", "untrained", "centre", "contrast")
BASELINE_NAMES = {"random": "a random map", "untrained": "the same maps of untrained members",
                  "centre": "a map peaking at the image centre", "contrast": "a colour-contrast map with no model"}
MASK_FREE = ("deletion", "insertion", "road")
BETTER = {"deletion": "lower", "insertion": "higher", "road": "higher", "pointing": "higher"}
LEVEL = 0.95


def paired(scores: np.ndarray, baseline: np.ndarray, better: str, resamples: int = 2000, seed: int = 0,
           level: float = LEVEL) -> dict:
    """The map's advantage over a baseline on the same images: the mean of (map - baseline) per image,
    negated where lower is better, with a percentile bootstrap interval (resampling images)."""
    d = np.asarray(scores, np.float64) - np.asarray(baseline, np.float64)
    keep = np.isfinite(d)
    d = d[keep] * (-1 if better == "lower" else 1)
    if len(d) == 0:
        return {"images": 0, "map": float("nan"), "baseline": float("nan"), "advantage": float("nan"),
                "interval": [float("nan"), float("nan")]}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"images": int(len(d)), "map": float(np.asarray(scores, np.float64)[keep].mean()),
            "baseline": float(np.asarray(baseline, np.float64)[keep].mean()), "advantage": float(d.mean()),
            "interval": [float(v) for v in np.percentile(means, q)]}


def clear(comparison: dict) -> bool:
    """The map's advantage is above zero with the whole interval."""
    return comparison["images"] > 0 and comparison["interval"][0] > 0


def worse(comparison: dict) -> bool:
    """The map's advantage is below zero with the whole interval (the baseline clearly did better)."""
    return comparison["images"] > 0 and comparison["interval"][1] < 0


def beaten(checks: dict, baseline: str) -> bool:
    """The map beat this baseline: clearly better on at least two mask-free metrics, clearly worse on none."""
    got = [checks.get(m, {}).get(baseline, {"images": 0}) for m in MASK_FREE]
    return sum(clear(c) for c in got) >= 2 and not any(worse(c) for c in got)


def verdict(checks: dict) -> dict:
    """The verdict on a map from its comparisons {metric: {baseline: paired(...)}} (the mask-free metrics
    decide; see the module's docstring): shown (bool), the baselines not beaten, the rule, and a sentence
    that claims no more than the intervals support."""
    failed = [b for b in BASELINES if not beaten(checks, b)]
    measured = [b for b in BASELINES if all(checks.get(m, {}).get(b, {}).get("images", 0) for m in MASK_FREE)]
    images = max((c["images"] for m in MASK_FREE for c in checks.get(m, {}).values()), default=0)
    shown = bool(measured) and len(measured) == len(BASELINES) and not failed
    if shown:
        sentence = (f"Shown to follow the model on {images} images: hiding, revealing or imputing what the map "
                    "marks changes the answer more than for a random map, the same maps of untrained members, a "
                    "centre map or a colour-contrast map, by margins whose 95% intervals stay above zero.")
    elif not images:
        sentence = "Not measured: how closely this map follows the model has not been tested."
    else:
        sentence = (f"Not shown to follow the model on these {images} images: it did not clearly beat "
                    + ", ".join(BASELINE_NAMES[b] for b in failed)
                    + " (deletion, insertion and ROAD with 95% intervals). Read it as a rough pointer, not as "
                    "what the answer rests on.")
    return {"shown": shown, "failed": failed, "images": images, "sentence": sentence,
            "rule": "shown only when, against each of " + ", ".join(BASELINES) + ", the map's paired advantage "
                    "has its whole 95% bootstrap interval above zero on at least two of deletion, insertion and "
                    "ROAD and below zero on none"}


def comparisons(rows, metric: str, suffix: str = "", resamples: int = 2000) -> dict:
    """{baseline: paired(...)} of one metric of one target's map against each baseline, from per-image
    columns `metric<suffix>` and `metric:<baseline><suffix>` of a table (skin.evaluation's)."""
    out = {}
    for b in BASELINES:
        col = f"{metric}:{b}{suffix}"
        if col in rows and f"{metric}{suffix}" in rows:
            out[b] = paired(rows[f"{metric}{suffix}"].to_numpy(float), rows[col].to_numpy(float), BETTER[metric],
                            resamples)
    return out


def bundle_verdict(metrics: dict | None) -> dict:
    """The verdict on a bundle's served map as its stored evaluation left it (jobs/evaluate.py writes
    metrics["perturbation"]["verdict"]), or "not measured" with the same keys when it has none."""
    p = (metrics or {}).get("perturbation") or {}
    v = p.get("verdict")
    if not v:
        v = verdict({})
    return {**v, "split": p.get("split")}
