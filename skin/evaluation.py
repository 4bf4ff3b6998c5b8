"""Bundle evaluation: score a manifest split with every member, compute the metrics of each
member and the ensemble, and write metrics.json, plots and report.md.

`BatchScorer` is the unit of work for both paths: Ray Data's `map_batches` (jobs/evaluate.py,
spread over a cluster) and a plain in-process loop (`score_locally`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from .bundle import Bundle, update_metrics
from .classes import ClassMap
from .ensemble import combine
from .images import DATASET_LIMITS, ImageError, load_image
from .inference import MemberRunner
from .metrics import compute_metrics, confusion_figure, reliability_figure
from .presets import to_batch


class BatchScorer:
    """Callable on a batch {"path": [...], "label_index": [...]}: adds each member's temperature-
    scaled probabilities as "<member>" columns (skin.inference, the path `skin predict` runs, at
    the precision `amp` asks for) and an "ok" flag (False: unreadable, skipped)."""

    def __init__(self, bundle_dir: str, threads: int | None = None, device: str | None = None,
                 amp: str = "off") -> None:
        if threads:
            torch.set_num_threads(threads)
        self.bundle = Bundle.load(bundle_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.runners = {n: MemberRunner(m.to(self.device).eval(), self.bundle.entry(n).temperature, amp)
                        for n, m in self.bundle.load_members().items()}

    def __call__(self, batch: dict) -> dict:
        paths = list(batch["path"])
        images, ok = [], []
        for p in paths:
            try:
                images.append(load_image(p, DATASET_LIMITS))
                ok.append(True)
            except (ImageError, OSError):
                ok.append(False)
        out = {"path": np.array(paths, dtype=object), "label_index": np.asarray(batch["label_index"]),
               "ok": np.array(ok)}
        c = len(self.bundle.classes)
        for name, run in self.runners.items():
            probs = np.full((len(paths), c), np.nan, dtype=np.float32)
            if images:
                probs[np.array(ok)] = run(to_batch(images, run.member.data_config))[0]
            out[name] = probs
        return out


def score_locally(bundle_dir: str, df: pd.DataFrame, batch_size: int = 32, amp: str = "off") -> pd.DataFrame:
    scorer = BatchScorer(bundle_dir, amp=amp)
    parts = []
    for start in range(0, len(df), batch_size):
        chunk = df.iloc[start:start + batch_size]
        parts.append(scorer({"path": chunk["path"].tolist(), "label_index": chunk["label_index"].to_numpy()}))
    return _to_frame(parts, scorer.bundle.member_names)


def _to_frame(parts: Iterable[dict], members: list[str]) -> pd.DataFrame:
    rows = {"path": [], "label_index": [], "ok": []} | {m: [] for m in members}
    for p in parts:
        for k in rows:
            rows[k].extend(list(p[k]))
    return pd.DataFrame(rows)


def summarize(scored: pd.DataFrame, bundle: Bundle) -> dict:
    """Metrics of each member and of the ensemble over the readable rows."""
    good = scored[scored["ok"].astype(bool)]
    y = good["label_index"].to_numpy(int)
    member_probs = {m: np.stack(good[m].to_list()) for m in bundle.member_names}
    weights = {m: bundle.weight_of(m) for m in bundle.member_names}
    out = {"n_skipped": int((~scored["ok"].astype(bool)).sum()), "bundle": bundle.id,
           "members": {m: compute_metrics(y, p, bundle.classes) for m, p in member_probs.items()},
           "ensemble": compute_metrics(y, combine(member_probs, weights), bundle.classes),
           "weights": weights}
    return out


def write_report(metrics: dict, bundle: Bundle, scored: pd.DataFrame, out: str | Path, split: str) -> Path:
    """metrics.json, confusion matrices (counts and row-normalised), reliability diagram, report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    classes: ClassMap = bundle.classes
    good = scored[scored["ok"].astype(bool)]
    y = good["label_index"].to_numpy(int)
    weights = {m: bundle.weight_of(m) for m in bundle.member_names}
    ens = combine({m: np.stack(good[m].to_list()) for m in bundle.member_names}, weights)
    import matplotlib.pyplot as plt
    for normalize, suffix in ((False, "counts"), (True, "normalized")):
        fig = confusion_figure(np.array(metrics["ensemble"]["confusion_matrix"]), classes,
                               f"ensemble, {split} ({suffix})", normalize)
        fig.savefig(out / f"confusion_{suffix}.png")
        plt.close(fig)
    fig = reliability_figure(y, ens, f"ensemble reliability, {split}")
    fig.savefig(out / "reliability.png")
    plt.close(fig)
    rows = [("ensemble", metrics["ensemble"])] + list(metrics["members"].items())
    lines = [f"# Evaluation of bundle `{bundle.id}` on `{split}`", "",
             f"{len(y)} images scored, {metrics['n_skipped']} unreadable skipped. "
             f"Weights: {', '.join(f'{k} {v:.2f}' for k, v in weights.items())}."
             + (" **Untrained bundle (random weights).**" if bundle.untrained else ""), "",
             "| model | accuracy | balanced acc | macro-F1 | weighted-F1 | macro-P | macro-R | ROC AUC (ovr) | ECE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows:
        auc = f"{m['roc_auc_ovr']:.4f}" if m.get("roc_auc_ovr") is not None else "n/a"
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | {m['f1_macro']:.4f} | "
                     f"{m['f1_weighted']:.4f} | {m['precision_macro']:.4f} | {m['recall_macro']:.4f} | {auc} | {m['ece']:.4f} |")
    lines += ["", "## Per class (ensemble)", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for c, r in metrics["ensemble"]["per_class"].items():
        lines.append(f"| {c} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |")
    lines += ["", "![confusion](confusion_counts.png) ![normalized](confusion_normalized.png) "
              "![reliability](reliability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def store_in_bundle(bundle: Bundle, metrics: dict, split: str) -> None:
    slim = {"split": split, "ensemble": _slim(metrics["ensemble"]),
            "members": {m: _slim(v) for m, v in metrics["members"].items()}}
    update_metrics(bundle.root, slim)


def _slim(m: dict) -> dict:
    keys = ("n", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "precision_macro",
            "recall_macro", "roc_auc_ovr", "ece", "nll")
    return {k: m[k] for k in keys if k in m}
