"""Metrics for members and the ensemble, all via scikit-learn, in the class map's order."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             log_loss, precision_recall_fscore_support, precision_score,
                             recall_score, roc_auc_score)

from .classes import ClassMap


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017, eq. 3): |accuracy - confidence| averaged over equal-width bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def ece_comparison(y: np.ndarray, ensemble: np.ndarray, members: dict[str, np.ndarray], resamples: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict:
    """Is the ensemble calibrated at least as well as its best member on these images? The ECE of
    each, the best member's, and the paired difference (ensemble - best member) with percentile
    bootstrap intervals over resamples of the images (the same resample for every model): on a
    few hundred images an ECE moves by a few hundredths from the sample alone."""
    y = np.asarray(y, int)
    models = {"ensemble": np.asarray(ensemble, np.float64)} | {m: np.asarray(p, np.float64) for m, p in members.items()}
    point = {m: expected_calibration_error(y, p) for m, p in models.items()}
    best = min(members, key=point.get)
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in models}
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        for m, p in models.items():
            draws[m].append(expected_calibration_error(y[idx], p[idx]))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    diff = np.array(draws["ensemble"]) - np.array(draws[best])
    return {"ece": point, "interval": {m: np.percentile(d, q).tolist() for m, d in draws.items()},
            "best_member": best, "difference": point["ensemble"] - point[best],
            "difference_interval": np.percentile(diff, q).tolist(), "level": level, "resamples": resamples}


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: ClassMap) -> dict:
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax sums to 1 only within ~1e-7
    pred = probs.argmax(1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    row = cm.sum(1, keepdims=True)
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "precision_macro": float(precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall_macro": float(recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "f1_macro": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "precision_weighted": float(precision_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "recall_weighted": float(recall_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "f1_weighted": float(f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.divide(cm, np.maximum(row, 1)).round(4).tolist(),
        "ece": expected_calibration_error(y, probs),
        "nll": float(log_loss(y, np.clip(probs, 1e-12, 1), labels=labels)),
    }
    try:
        out["roc_auc_ovr"] = float(roc_auc_score(y, probs, multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from y: AUC undefined
        out["roc_auc_ovr"] = None
    return out


def confusion_figure(cm: np.ndarray, classes: ClassMap, title: str = "", normalize: bool = False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            txt = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if shown[i, j] > shown.max() / 2 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def reliability_figure(y: np.ndarray, probs: np.ndarray, title: str = "", bins: int = 15):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    mids, accs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            mids.append(conf[sel].mean())
            accs.append(correct[sel].mean())
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(mids, accs, "o-", label=f"model (ECE {expected_calibration_error(y, probs):.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- faithfulness of maps
def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game (Zhang et al. 2016): is the map's peak inside the lesion mask?"""
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(mask[i, j])


def contrast_map(image: np.ndarray, sigma: float = 0.04) -> np.ndarray:
    """A saliency map that knows no model: each pixel's RGB distance from the image's median
    colour (the skin), Gaussian-smoothed (`sigma` a share of the side). On images where the lesion
    is the only thing that stands out from the skin it points at the lesion; an explanation that
    scores no better than it on the pointing game has not shown that it follows the model."""
    from scipy.ndimage import gaussian_filter
    a = np.asarray(image, np.float32)[..., :3]
    d = np.linalg.norm(a - np.median(a.reshape(-1, 3), 0), axis=-1)
    return gaussian_filter(d, sigma * max(d.shape))


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total mass that lies inside the mask (energy-based pointing game)."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else 0.0
