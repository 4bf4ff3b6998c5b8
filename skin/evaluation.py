"""Bundle evaluation: score a manifest split with every member, compute the metrics of each
member and the ensemble, and write metrics.json, plots and report.md.

`BatchScorer` is the unit of work for both paths: Ray Data's `map_batches` (jobs/evaluate.py,
spread over a cluster) and a plain in-process loop (`score_locally`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from .bundle import Bundle, update_metrics
from .classes import ClassMap
from .ensemble import Predictor, combine, describe
from .gradcam import ensemble_map, method_name, normalize, upsample
from .images import DATASET_LIMITS, ImageError, load_image
from .inference import MemberRunner
from .metrics import (compute_metrics, confusion_figure, contrast_map, ece_comparison, energy_inside,
                      pointing_hit, reliability_figure)
from .presets import to_batch
from .registry import get_spec, untrained_copy


# per row; NaN without a mask. Each measurement beside what maps that know less score on the same row.
FAITH_COLUMNS = ["pointing", "energy", "pointing:centre", "energy:flat", "pointing:untrained", "pointing:contrast"]


class BatchScorer:
    """Callable on a batch {"path": [...], "label_index": [...]} (+ "mask": lesion-mask paths, "" for
    none): adds each member's temperature-scaled probabilities as "<member>" columns (skin.inference,
    the path `skin predict` runs, at the precision `amp` asks for) and an "ok" flag (False:
    unreadable, skipped). With masks, also how well the ensemble's Grad-CAM of its predicted class
    points at the lesion: "pointing" (the map's peak inside the mask) and "energy" (the map's mass
    inside it), NaN where a row has no mask; and what a map that knows nothing scores on the same
    row: "pointing:centre" (a map peaking at the image centre), "energy:flat" (a flat map's
    energy = the lesion's share of the image), "pointing:contrast" (skin.metrics.contrast_map: the
    colour that stands out from the skin, no model) and "pointing:untrained" (the same Grad-CAM, at
    the same layers and strides, of freshly initialised members: the model-randomisation check)."""

    def __init__(self, bundle_dir: str, threads: int | None = None, device: str | None = None,
                 amp: str = "off", explain: Mapping[str, Mapping[str, object]] | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.bundle = Bundle.load(bundle_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ensemble = Predictor(self.bundle, device=str(self.device), amp=amp, explain=explain)
        self.runners = self.ensemble.runners
        self._untrained: dict[str, MemberRunner] | None = None

    @property
    def untrained(self) -> dict[str, MemberRunner]:
        """Each member's architecture, explanation stride, layer, method and smoothing with fresh weights (built on
        the first batch with masks)."""
        if self._untrained is None:
            self._untrained = {n: MemberRunner(untrained_copy(r.member), 1.0, "off", r.explanation)
                               for n, r in self.runners.items()}
        return self._untrained

    def __call__(self, batch: dict) -> dict:
        paths = list(batch["path"])
        masks = [str(m) for m in batch["mask"]] if "mask" in batch else [""] * len(paths)
        images, ok = [], []
        for p in paths:
            try:
                images.append(load_image(p, DATASET_LIMITS))
                ok.append(True)
            except (ImageError, OSError):
                ok.append(False)
        out = {"path": np.array(paths, dtype=object), "label_index": np.asarray(batch["label_index"]),
               "ok": np.array(ok)}
        explain = any(m for m, good in zip(masks, ok) if good)
        c = len(self.bundle.classes)
        inputs = {}
        for name, run in self.runners.items():
            probs = np.full((len(paths), c), np.nan, dtype=np.float32)
            if images:
                inputs[name] = to_batch(images, run.member.data_config)
                probs[np.array(ok)] = run(inputs[name])[0]
            out[name] = probs
        for k in FAITH_COLUMNS + member_faith_columns(list(self.runners)):
            out[k] = np.full(len(paths), np.nan)
        if explain:
            rows = np.nonzero(ok)[0]
            # the ensemble's class (assemble's), then each image's map of that class only, from the members
            # and from their untrained copies (which see the same input tensors)
            answer = self.ensemble.combine({n: out[n][rows] for n in self.runners}).argmax(1)
            maps = {n: run.class_maps(inputs[n], answer) for n, run in self.runners.items()}
            untrained = {n: run.class_maps(inputs[n], answer) for n, run in self.untrained.items()}
            self._faithfulness(out, [m for m, good in zip(masks, ok) if good], images, maps, untrained, rows)
        return out

    def _faithfulness(self, out: dict, masks: list[str], images: list, maps: dict, untrained: dict,
                      rows: np.ndarray) -> None:
        """`maps`, `untrained`: {member: (N, h, w)}, each image's map of the ensemble's class."""
        from PIL import Image
        weights = self.ensemble.weights
        for i, (mask_path, img, row) in enumerate(zip(masks, images, rows)):
            if not mask_path:
                continue
            mask = Image.open(mask_path).convert("L")
            if mask.size != img.size:
                mask = mask.resize(img.size, Image.Resampling.NEAREST)
            mask = np.asarray(mask) > 127
            own = {n: m[i] for n, m in maps.items()}
            cam = ensemble_map(own, weights, mask.shape, self.ensemble.work)  # as assemble() builds the served map
            out["pointing"][row] = float(pointing_hit(cam, mask))
            out["energy"][row] = energy_inside(cam, mask)
            for n, m in own.items():  # each member's map of the ensemble's class
                out[f"pointing:{n}"][row] = float(pointing_hit(normalize(upsample(m[None], mask.shape)[0]).numpy(), mask))
            out["pointing:centre"][row] = float(mask[mask.shape[0] // 2, mask.shape[1] // 2])
            out["energy:flat"][row] = float(mask.mean())
            out["pointing:contrast"][row] = float(pointing_hit(contrast_map(np.asarray(img)), mask))
            fresh = {n: m[i] for n, m in untrained.items()}
            out["pointing:untrained"][row] = float(pointing_hit(ensemble_map(fresh, weights, mask.shape, self.ensemble.work), mask))
            for n, m in fresh.items():
                out[f"pointing:untrained:{n}"][row] = float(pointing_hit(
                    ensemble_map({n: m}, weights, mask.shape, self.ensemble.work), mask))


def member_faith_columns(members: list[str]) -> list[str]:
    """Per member: its own map's pointing game, and that of its untrained copy."""
    return [f"pointing:{n}" for n in members] + [f"pointing:untrained:{n}" for n in members]


def attach_masks(df: pd.DataFrame, masks_csv: str | Path) -> pd.DataFrame:
    """df with a "mask" column from a CSV of path,mask (the `skin data synth` manifest; relative
    paths from the CSV's folder), matched on resolved image paths ("" where none)."""
    root = Path(masks_csv).resolve().parent
    table = pd.read_csv(masks_csv, dtype=str, keep_default_na=False)
    if not {"path", "mask"} <= set(table.columns):
        raise ValueError(f"{masks_csv} needs `path` and `mask` columns (the `skin data synth` manifest has them)")
    lookup = {str((root / p).resolve()): str((root / m).resolve()) for p, m in zip(table["path"], table["mask"]) if m}
    return df.assign(mask=[lookup.get(str(Path(p).resolve()), "") for p in df["path"]])


def score_locally(bundle_dir: str, df: pd.DataFrame, batch_size: int = 32, amp: str = "off",
                  explain: Mapping[str, Mapping[str, object]] | None = None) -> pd.DataFrame:
    scorer = BatchScorer(bundle_dir, amp=amp, explain=explain)
    cols = [c for c in ("path", "label_index", "mask") if c in df.columns]
    parts = [scorer({c: df[c].iloc[s:s + batch_size].to_numpy() for c in cols}) for s in range(0, len(df), batch_size)]
    return to_frame(parts, scorer.bundle.member_names)


def to_frame(parts: Iterable[dict], members: list[str]) -> pd.DataFrame:
    rows = ({"path": [], "label_index": [], "ok": []} | {k: [] for k in FAITH_COLUMNS} | {m: [] for m in members}
            | {k: [] for k in member_faith_columns(members)})
    for p in parts:
        for k in rows:
            rows[k].extend(list(p[k]))
    return pd.DataFrame(rows)


def readable(scored: pd.DataFrame, bundle: Bundle) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """The readable rows, their members' probabilities {member: (N, C)} and the ensemble's (N, C)."""
    good = scored[scored["ok"].astype(bool)]
    member_probs = {m: np.stack(good[m].to_list()) if len(good) else np.zeros((0, len(bundle.classes)))
                    for m in bundle.member_names}
    return good, member_probs, Predictor.remote(bundle).combine(member_probs)


def summarize(scored: pd.DataFrame, bundle: Bundle,
              explain: Mapping[str, Mapping[str, object]] | None = None) -> dict:
    """Metrics of each member and of the ensemble over the readable rows."""
    good, member_probs, ens = readable(scored, bundle)
    y = good["label_index"].to_numpy(int)
    out = {"n_skipped": int((~scored["ok"].astype(bool)).sum()), "bundle": bundle.id,
           "members": {m: compute_metrics(y, p, bundle.classes) for m, p in member_probs.items()},
           "ensemble": compute_metrics(y, ens, bundle.classes),
           "weights": bundle.weights_map, "ensemble_temperature": bundle.ensemble_temperature}
    if len(y):
        out["calibration"] = ece_comparison(y, ens, member_probs)
    faith = faithfulness(good, bundle, explain)
    if faith:
        out["faithfulness"] = faith
    if bundle.ensemble_temperature != 1.0:  # what the ensemble temperature bought, on these rows
        out["ensemble_before_temperature"] = compute_metrics(y, combine(member_probs, bundle.weights_map),
                                                             bundle.classes)
    return out


def lesion_free_summary(scored: pd.DataFrame, bundle: Bundle) -> dict | None:
    """What the ensemble answers on skin images without a lesion (`skin data scan --lesion-free`):
    the share called each class, its mean confidence, and the share the API would flag uncertain
    (the same rule: `skin.ensemble.describe`). None when no such image was readable."""
    good, member_probs, ens = readable(scored, bundle)
    if good.empty:
        return None
    answers = [describe(ens[i], {m: p[i] for m, p in member_probs.items()}, bundle.weights_map, list(bundle.classes))
               for i in range(len(ens))]
    called = np.bincount(ens.argmax(1), minlength=len(bundle.classes)) / len(ens)
    return {"images": len(ens), "called": {c: float(v) for c, v in zip(bundle.classes, called)},
            "mean_confidence": float(ens.max(1).mean()),
            "uncertain": float(np.mean([a["uncertain"] for a in answers]))}


def faithfulness(scored: pd.DataFrame, bundle: Bundle,
                 explain: Mapping[str, Mapping[str, object]] | None = None) -> dict | None:
    """Pointing game and energy in the mask of the ensemble's Grad-CAM, overall and per class, over
    the rows that have a lesion mask (None when none has)."""
    if "pointing" not in scored:
        return None
    rows = scored[scored["pointing"].notna()]
    if rows.empty:
        return None

    def baseline(g: pd.DataFrame) -> dict:
        return {"centre_pointing": float(g["pointing:centre"].mean()), "flat_energy": float(g["energy:flat"].mean()),
                "contrast_pointing": float(g["pointing:contrast"].mean()),
                "untrained_pointing": float(g["pointing:untrained"].mean())}

    per_class = {bundle.classes.name(int(k)): {"pointing": float(g["pointing"].mean()), "energy": float(g["energy"].mean()),
                                               "images": int(len(g))} | baseline(g)
                 for k, g in rows.groupby("label_index")}
    members = {m: float(rows[f"pointing:{m}"].mean()) for m in bundle.member_names if f"pointing:{m}" in rows}
    untrained = {m: float(rows[f"pointing:untrained:{m}"].mean()) for m in bundle.member_names
                 if f"pointing:untrained:{m}" in rows}
    used = {e.name: e.explanation.override(**(explain or {}).get(e.name, {})).describe(
        e.output_stride, get_spec(e.backbone).cam_layer) for e in bundle.members}
    strides, layers = ({n: d[k] for n, d in used.items()} for k in ("stride", "layer"))
    methods, smooths = ({n: d[k] for n, d in used.items()} for k in ("method", "smooth"))
    return {"pointing": float(rows["pointing"].mean()), "energy": float(rows["energy"].mean()), "images": int(len(rows)),
            "per_class": per_class, "members_pointing": members, "members_untrained_pointing": untrained,
            "baseline": baseline(rows) | {
                "what": "maps that know less, on the same images: one always peaking at the image centre; a flat "
                        "one (its energy = the lesion's share of the image); the colour that stands out from the "
                        "skin, no model (contrast); the same maps of freshly initialised members (untrained)"},
            "method": method_name(methods.values(), smooths.values()), "cam_methods": methods, "cam_smooths": smooths,
            "cam_layers": layers, "cam_strides": strides, "masks": "synthetic lesions (skin data synth)",
            "note": "measured on synthetic lesions with known masks; not measured on real photographs"}


def _where(f: dict, member: str) -> str:
    """A member's explanation as stored with the faithfulness (older metrics: the stride only)."""
    where = f"stride {f['cam_strides'][member]}"
    if "cam_layers" in f:
        where = (f"{method_name(f['cam_methods'][member], f.get('cam_smooths', {}).get(member))} "
                 f"at {f['cam_layers'][member]}, " + where)
    return where


def write_report(metrics: dict, bundle: Bundle, scored: pd.DataFrame, out: str | Path, split: str) -> Path:
    """metrics.json, confusion matrices (counts and row-normalised), reliability diagram, report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    classes: ClassMap = bundle.classes
    good, _, ens = readable(scored, bundle)
    y = good["label_index"].to_numpy(int)
    import matplotlib.pyplot as plt
    for normalize, suffix in ((False, "counts"), (True, "normalized")):
        fig = confusion_figure(np.array(metrics["ensemble"]["confusion_matrix"]), classes,
                               f"ensemble, {split} ({suffix})", normalize)
        fig.savefig(out / f"confusion_{suffix}.png")
        plt.close(fig)
    fig = reliability_figure(y, ens, f"ensemble reliability, {split}")
    fig.savefig(out / "reliability.png")
    plt.close(fig)
    rows = [("ensemble", metrics["ensemble"])] + ([(f"ensemble before T={bundle.ensemble_temperature:.3f}",
                                                     metrics["ensemble_before_temperature"])]
                                                   if "ensemble_before_temperature" in metrics else [])
    rows += list(metrics["members"].items())
    lines = [f"# Evaluation of bundle `{bundle.id}` on `{split}`", "",
             f"{len(y)} images scored, {metrics['n_skipped']} unreadable skipped. "
             f"Weights: {', '.join(f'{k} {v:.2f}' for k, v in bundle.weights_map.items())}."
             + (" **Untrained bundle (random weights).**" if bundle.untrained else ""), "",
             "| model | accuracy | balanced acc | macro-F1 | weighted-F1 | macro-P | macro-R | ROC AUC (ovr) | ECE | NLL |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows:
        auc = f"{m['roc_auc_ovr']:.4f}" if m.get("roc_auc_ovr") is not None else "n/a"
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | {m['f1_macro']:.4f} | "
                     f"{m['f1_weighted']:.4f} | {m['precision_macro']:.4f} | {m['recall_macro']:.4f} | {auc} | {m['ece']:.4f} | "
                     f"{m.get('nll', float('nan')):.4f} |")
    cal = metrics.get("calibration")
    if cal:
        ci = cal["interval"]
        lines += ["", f"Calibration: ECE with {cal['level']:.0%} bootstrap intervals ({cal['resamples']} resamples of "
                  "these images): " + ", ".join(f"{m} {e:.3f} ({ci[m][0]:.3f}-{ci[m][1]:.3f})" for m, e in cal["ece"].items())
                  + f". Ensemble minus its best-calibrated member ({cal['best_member']}): {cal['difference']:+.3f} "
                  f"({cal['difference_interval'][0]:+.3f} to {cal['difference_interval'][1]:+.3f})."]
    lines += ["", "## Per class (ensemble)", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for c, r in metrics["ensemble"]["per_class"].items():
        lines.append(f"| {c} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |")
    f = metrics.get("faithfulness")
    if f:
        b = f["baseline"]
        method = f.get("method", "Grad-CAM")
        lines += ["", f"## Explanation faithfulness: {method} ({f['images']} images with lesion masks: {f['masks']})", "",
                  f"Pointing game {f['pointing']:.3f} (share of maps whose peak lies in the lesion), energy in the "
                  f"mask {f['energy']:.3f}. {f['note'].capitalize()}.", "",
                  "What maps that know less score on the same images: a map peaking at the centre points at "
                  f"{b['centre_pointing']:.3f} of lesions; a flat map's energy in the mask is {b['flat_energy']:.3f}; "
                  f"a colour-contrast map with no model (skin.metrics.contrast_map) points at {b['contrast_pointing']:.3f}; "
                  f"the same {method} of freshly initialised members at {b['untrained_pointing']:.3f}. A pointing game "
                  "no higher than the contrast map's does not show that the map follows the model; the gap to the "
                  "untrained members is what the training put into it (Adebayo et al. 2018, model randomisation).", "",
                  "| class | pointing game | energy in mask | images | centre map | flat map: energy | contrast map "
                  "| untrained members |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {c} | {v['pointing']:.3f} | {v['energy']:.3f} | {v['images']} | {v['centre_pointing']:.3f} | "
                  f"{v['flat_energy']:.3f} | {v['contrast_pointing']:.3f} | {v['untrained_pointing']:.3f} |"
                  for c, v in f["per_class"].items()]
        lines += ["", "Each member's own map (of the ensemble's class), trained / untrained: " + ", ".join(
            f"{m} {p:.3f} / {f['members_untrained_pointing'].get(m, float('nan')):.3f} ({_where(f, m)})"
            for m, p in f["members_pointing"].items()) + "."]
    free = metrics.get("lesion_free")
    if free:
        lines += ["", f"## Skin without a lesion ({free['images']} images)", "",
                  f"Flagged uncertain by the API's rule: {free['uncertain']:.3f}; mean confidence "
                  f"{free['mean_confidence']:.3f} (a uniform answer is {1 / len(classes):.3f}). Called: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in free["called"].items() if v) + "."]
    lines += ["", "![confusion](confusion_counts.png) ![normalized](confusion_normalized.png) "
              "![reliability](reliability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def store_in_bundle(bundle: Bundle, metrics: dict, split: str) -> None:
    slim = {"split": split, "ensemble": _slim(metrics["ensemble"]),
            **({"calibration": metrics["calibration"]} if "calibration" in metrics else {}),
            "members": {m: _slim(v) for m, v in metrics["members"].items()}}
    if metrics.get("lesion_free"):
        slim["lesion_free"] = metrics["lesion_free"]
    if metrics.get("faithfulness"):
        slim["faithfulness"] = {k: v for k, v in metrics["faithfulness"].items()} | {"split": split}
    update_metrics(bundle.root, slim)


def _slim(m: dict) -> dict:
    keys = ("n", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "precision_macro",
            "recall_macro", "roc_auc_ovr", "ece", "nll")
    return {k: m[k] for k in keys if k in m}
