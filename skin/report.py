"""The evaluation report: metrics.json, confusion matrices, the reliability diagram and report.md.

report.md opens with how far to trust the explanation (skin.trust's verdict, in plain words, with its
rule), then the classification metrics, calibration, per-class results, and the explanation's scores
beside maps that know less, each with its paired advantage and 95% interval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .bundle import Bundle
from .classes import ClassMap
from .gradcam import method_name
from .metrics import confusion_figure, reliability_figure
from .trust import BASELINE_NAMES, BASELINES, MASK_FREE


def _where(f: dict, member: str) -> str:
    """A member's explanation as stored with the faithfulness: {member: Explanation.describe()} (metrics
    stored before: four parallel cam_* dicts)."""
    if "explanations" in f:
        e = f["explanations"][member]
        return f"{e['name']} at {e['layer']}, stride {e['stride']}"
    where = f"stride {f['cam_strides'][member]}"
    if "cam_layers" in f:
        where = (f"{method_name(f['cam_methods'][member], f.get('cam_smooths', {}).get(member))} "
                 f"at {f['cam_layers'][member]}, " + where)
    return where


def _cmp(c: dict | None) -> str:
    """'+0.041 (+0.012 to +0.070)' for a paired comparison; '–' when absent."""
    if not c or not c.get("images"):
        return "–"
    lo, hi = c["interval"]
    return f"{c['advantage']:+.3f} ({lo:+.3f} to {hi:+.3f})"


def verdict_lines(metrics: dict) -> list[str]:
    """The report's first section: the verdict on the served map and on each member's, and the rule."""
    pert = metrics.get("perturbation")
    if not pert or "verdict" not in pert:
        return ["## How far to trust the explanation", "",
                "Not measured: run `jobs/evaluate.py` with `--perturb N` (N > 0) to test whether the map follows "
                "the model.", ""]
    v = pert["verdict"]
    lines = ["## How far to trust the explanation", "",
             f"**{pert['method']} of the ensemble (what the service draws): "
             + ("shown to follow the model" if v["shown"] else "not shown to follow the model on these images")
             + f".** {v['sentence']}", "",
             f"Rule: {v['rule']}.", ""]
    members = pert.get("member_verdicts") or {}
    if members:
        lines += ["Each member's own map: " + "; ".join(
            f"{n} {'shown' if mv['shown'] else 'not shown (did not clearly beat ' + ', '.join(mv['failed']) + ')'}"
            for n, mv in members.items()) + ".", ""]
    return lines


def perturbation_lines(pert: dict) -> list[str]:
    lines = ["", f"## Explanation faithfulness without masks: {pert['method']} ({pert['images']} images)", "",
             f"Deletion and insertion (RISE, {pert['steps']} steps) and ROAD (shares {pert['road_shares']} %) of "
             "the answered class; lower deletion, higher insertion and ROAD are better. Each map's mean beside the "
             "same score of maps that know less: " + "; ".join(f"{b}: {BASELINE_NAMES[b]}" for b in BASELINES) + ".",
             "", "| map of | metric | map | " + " | ".join(BASELINES) + " |", "|---|---|---:|" + "---:|" * len(BASELINES)]
    for name, t in [("ensemble", pert["ensemble"])] + list(pert["members"].items()):
        for m in MASK_FREE:
            lines.append(f"| {name} | {m} | {t[m]['map']:.3f} | "
                         + " | ".join(f"{t[m][b]:.3f}" if b in t[m] else "–" for b in BASELINES) + " |")
    checks = pert.get("checks")
    if checks:
        lines += ["", "The map's paired advantage over each (positive: the map did better; 95% bootstrap interval "
                  "over the images):", "", "| map of | metric | " + " | ".join(BASELINES) + " |",
                  "|---|---|" + "---|" * len(BASELINES)]
        for name, c in [("ensemble", checks["ensemble"])] + list(checks["members"].items()):
            for m in MASK_FREE:
                lines.append(f"| {name} | {m} | " + " | ".join(_cmp(c.get(m, {}).get(b)) for b in BASELINES) + " |")
    return lines


def pointing_lines(f: dict) -> list[str]:
    b = f["baseline"]
    method = f.get("method", "Grad-CAM")
    lines = ["", f"## Explanation faithfulness: {method} ({f['images']} images with lesion masks: {f['masks']})", "",
             f"Pointing game {f['pointing']:.3f} (share of maps whose peak lies in the lesion), energy in the "
             f"mask {f['energy']:.3f}. {f['note'].capitalize()}. The pointing game says whether the map is "
             "plausible to a person (on the lesion), not whether it follows the model (the verdict above).", "",
             "What maps that know less score on the same images: a map peaking at the centre points at "
             f"{b['centre_pointing']:.3f} of lesions; a flat map's energy in the mask is {b['flat_energy']:.3f}; "
             f"a colour-contrast map with no model (skin.metrics.contrast_map) points at {b['contrast_pointing']:.3f}; "
             f"the same {method} of freshly initialised members at {b['untrained_pointing']:.3f}"
             + (f" ({b['untrained_images']} of the images)" if b.get("untrained_images", f["images"]) < f["images"]
                else "")
             + (f"; a random map at {b['random_pointing']:.3f}" if "random_pointing" in b else "") + "."]
    checks = (f.get("checks") or {}).get("pointing")
    if checks:
        lines += ["", "Pointing game, the map's paired advantage (95% bootstrap interval): "
                  + "; ".join(f"over {k} {_cmp(c)}" for k, c in checks.items()) + "."]
    lines += ["", "| class | pointing game | energy in mask | images | centre map | flat map: energy | contrast map "
              "| untrained members |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c} | {v['pointing']:.3f} | {v['energy']:.3f} | {v['images']} | {v['centre_pointing']:.3f} | "
              f"{v['flat_energy']:.3f} | {v['contrast_pointing']:.3f} | {v['untrained_pointing']:.3f} |"
              for c, v in f["per_class"].items()]
    lines += ["", "Each member's own map (of the ensemble's class), trained / untrained: " + ", ".join(
        f"{m} {p:.3f} / {f['members_untrained_pointing'].get(m, float('nan')):.3f} ({_where(f, m)})"
        for m, p in f["members_pointing"].items()) + "."]
    return lines


def write_report(metrics: dict, bundle: Bundle, scored: pd.DataFrame, out: str | Path, split: str) -> Path:
    """metrics.json, confusion matrices (counts and row-normalised), reliability diagram, report.md."""
    from .evaluation import readable
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
    lines = [f"# Evaluation of bundle `{bundle.id}` on `{split}`", ""] + verdict_lines(metrics) + [
             "## Classification", "",
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
    if metrics.get("perturbation"):
        lines += perturbation_lines(metrics["perturbation"])
    if metrics.get("faithfulness"):
        lines += pointing_lines(metrics["faithfulness"])
    free = metrics.get("lesion_free")
    if free:
        lines += ["", f"## Skin without a lesion ({free['images']} images)", "",
                  f"Flagged uncertain by the API's rule: {free['uncertain']:.3f}; mean confidence "
                  f"{free['mean_confidence']:.3f} (a uniform answer is {1 / len(classes):.3f}). Called: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in free["called"].items() if v) + "."]
    reviewed = metrics.get("reviewed")
    if reviewed:
        lines += reviewed_lines(reviewed)
    lines += ["", "![confusion](confusion_counts.png) ![normalized](confusion_normalized.png) "
              "![reliability](reliability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def reviewed_lines(r: dict) -> list[str]:
    """How the bundle does on cases a reviewer corrected or confirmed, against the bundle that answered them."""
    lines = ["", f"## On reviewed cases ({r['images']} images a reviewer confirmed or corrected)", "",
             f"Accuracy of this bundle {r['accuracy']:.3f} against the answering bundle(s)' "
             f"{r['answered_accuracy']:.3f} on the same images (paired difference {r['difference']:+.3f}, 95% "
             f"bootstrap interval {r['interval'][0]:+.3f} to {r['interval'][1]:+.3f})"
             + (f": it fixed {r['fixed']} answer(s) and broke {r['broken']}." if "fixed" in r else ".")]
    return lines
