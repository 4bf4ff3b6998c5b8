"""Temperature scaling and ensemble-weight search on cached validation probabilities.

Temperature scaling (Guo et al. 2017, sec. 4.2): one scalar T per member, fitted by minimising
the validation NLL of softmax(z / T). Since log p = z - logsumexp(z), softmax(log p / T) equals
softmax(z / T): T is fitted from the cached probabilities, no model is run.

Weight search: candidate weight vectors on the probability simplex, each scored on the cached
(temperature-scaled) probabilities by macro-F1 (or balanced accuracy), ties broken by log-loss.
Scoring is vectorised over candidates: a thousand candidates on 35,000 rows take seconds.
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize_scalar

EPS = 1e-12


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / T) over the last axis (one distribution or a batch of them)."""
    logp = np.log(np.clip(probs, EPS, 1.0)) / t
    logp -= logp.max(-1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(-1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """T minimising validation NLL, searched on log T (bounded, Brent)."""
    y = np.asarray(y, int)
    res = minimize_scalar(lambda lt: nll(apply_temperature(probs, float(np.exp(lt))), y),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def temperature_fit(probs: np.ndarray, y: np.ndarray, fit: bool = True) -> tuple[float, dict]:
    """T (1.0 when not `fit`) and the validation NLL and ECE before and after it, for a member or for
    the weighted ensemble (whose own temperature corrects the under-confidence that averaging
    calibrated members brings)."""
    from .metrics import expected_calibration_error
    y = np.asarray(y, int)
    t = fit_temperature(probs, y) if fit else 1.0
    after = apply_temperature(probs, t)
    return t, {"temperature": t, "nll_before": nll(probs, y), "nll_after": nll(after, y),
               "ece_before": expected_calibration_error(y, probs), "ece_after": expected_calibration_error(y, after)}


def simplex_grid(k: int, step: float) -> np.ndarray:
    """Every weight vector with entries in multiples of `step` summing to 1."""
    n = int(round(1 / step))
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], dtype=np.float64) / n


def dirichlet_candidates(k: int, n: int, seed: int, concentration: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(k, concentration), size=n)


def score_candidates(weights: np.ndarray, member_probs: np.ndarray, y: np.ndarray,
                     objective: str = "f1_macro", chunk: int = 64) -> dict[str, np.ndarray]:
    """weights (M, K), member_probs (K, N, C), y (N,) -> {"score": (M,), "log_loss": (M,)}."""
    if objective not in ("f1_macro", "balanced_accuracy"):
        raise ValueError(f"objective must be f1_macro or balanced_accuracy, got {objective!r}")
    k, n, c = member_probs.shape
    y = np.asarray(y, int)
    flat = member_probs.reshape(k, n * c).astype(np.float32)
    scores, losses = np.empty(len(weights)), np.empty(len(weights))
    support = np.bincount(y, minlength=c)
    for s in range(0, len(weights), chunk):
        w = weights[s:s + chunk].astype(np.float32)
        ens = (w @ flat).reshape(len(w), n, c)  # (m, N, C)
        pred = ens.argmax(2)
        losses[s:s + chunk] = -np.log(np.clip(ens[:, np.arange(n), y], EPS, 1.0)).mean(1)
        for i, p in enumerate(pred):
            cm = np.bincount(y * c + p, minlength=c * c).reshape(c, c)
            tp = np.diag(cm).astype(np.float64)
            recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
            if objective == "balanced_accuracy":
                scores[s + i] = recall[support > 0].mean()
            else:
                predicted = cm.sum(0)
                precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
                denom = precision + recall
                f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
                scores[s + i] = f1.mean()
    return {"score": scores, "log_loss": losses}


def best_index(score: np.ndarray, log_loss: np.ndarray) -> int:
    """Highest score; among (numerically) equal scores, the lowest log-loss."""
    top = score.max()
    tied = np.nonzero(score >= top - 1e-9)[0]
    return int(tied[np.argmin(log_loss[tied])])


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per row, each class spread evenly over the folds."""
    y = np.asarray(y, int)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for c in np.unique(y):
        rows = rng.permutation(np.nonzero(y == c)[0])
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def out_of_fold_gain(candidates: np.ndarray, default: np.ndarray, member_probs: np.ndarray, y: np.ndarray,
                     objective: str = "f1_macro", folds: int = 5, seed: int = 0) -> dict:
    """Does searching the weights pay off beyond the rows it was searched on? For each
    stratified fold of the validation rows: pick the best candidate on the other folds, then score
    it and the default weights on the held-out fold. A search that only fits the noise of a small
    validation set (180 rows in the demo: one image is 0.006 of macro-F1) shows no out-of-fold gain.
    Returns {"gain": mean held-out score difference, "fold_gains": [...], "folds": n}."""
    y = np.asarray(y, int)
    fold = stratified_folds(y, folds, seed)
    gains = []
    for f in range(folds):
        fit, held = fold != f, fold == f
        if not held.any() or not fit.any():
            continue
        s = score_candidates(candidates, member_probs[:, fit], y[fit], objective)
        best = candidates[best_index(s["score"], s["log_loss"])]
        pair = score_candidates(np.stack([best, default]), member_probs[:, held], y[held], objective)["score"]
        gains.append(float(pair[0] - pair[1]))
    return {"gain": float(np.mean(gains)) if gains else 0.0, "fold_gains": gains, "folds": len(gains)}
