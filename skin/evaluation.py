"""Bundle evaluation: score a manifest split with every member, compute the metrics of each
member and the ensemble, and write metrics.json, plots and report.md.

`BatchScorer` is the unit of work for both paths: Ray Data's `map_batches` (jobs/evaluate.py,
spread over a cluster) and a plain in-process loop (`score_locally`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from .bundle import Bundle, update_metrics
from .explanation import Request
from .ensemble import Predictor, combine, describe
from .faithfulness import PerturbationConfig
from .gradcam import ensemble_map, method_name, normalize, upsample
from .images import DATASET_LIMITS, ImageError, load_image
from .inference import MemberRunner
from .metrics import compute_metrics, contrast_map, ece_comparison, energy_inside, pointing_hit
from .presets import eval_batches
from .registry import get_spec, untrained_copy


# per row; NaN without a mask. Each measurement beside what maps that know less score on the same row.
FAITH_COLUMNS = ["pointing", "energy", "pointing:centre", "energy:flat", "pointing:untrained", "pointing:contrast",
                 "pointing:random"]
# the maps that know less, beside each mask-free score (skin.trust.BASELINES)
PERTURBATION_KINDS = ("", ":random", ":untrained", ":centre", ":contrast")


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
                 amp: str = "off", explain: Request | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.bundle = Bundle.load(bundle_dir)
        from .device import default_device
        self.device = torch.device(device) if device else default_device()
        self.ensemble = Predictor(self.bundle, device=str(self.device), amp=amp, explain=explain)
        self.runners = self.ensemble.runners
        self._untrained: dict[str, MemberRunner] | None = None
        self.perturbation = PerturbationConfig()

    @property
    def untrained(self) -> dict[str, MemberRunner]:
        """Each member's architecture, explanation stride, layer, method and smoothing with fresh weights (built on
        the first batch with masks)."""
        if self._untrained is None:
            self._untrained = {n: MemberRunner(untrained_copy(r.member), 1.0, "off", r.explanation)
                               for n, r in self.runners.items()}
        return self._untrained

    @untrained.setter
    def untrained(self, runners: dict[str, MemberRunner]) -> None:
        self._untrained = dict(runners)

    def __call__(self, batch: dict) -> dict:
        paths = list(batch["path"])
        masks = [str(m) for m in batch["mask"]] if "mask" in batch else [""] * len(paths)
        perturb = [bool(v) for v in batch["perturb"]] if "perturb" in batch else [False] * len(paths)
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
        inputs = {}
        xs = eval_batches(images, (r.member.data_config for r in self.runners.values()), self.device) if images else {}
        for name, run in self.runners.items():
            probs = np.full((len(paths), c), np.nan, dtype=np.float32)
            if images:
                inputs[name] = xs[run.member.data_config]
                probs[np.array(ok)] = run(inputs[name])[0]
            out[name] = probs
        for k in FAITH_COLUMNS + member_faith_columns(list(self.runners)) + perturbation_columns(list(self.runners)):
            out[k] = np.full(len(paths), np.nan)
        rows = np.nonzero(ok)[0]  # images[i] is row rows[i]
        need = [i for i, r in enumerate(rows) if masks[r] or perturb[r]]
        if need:
            # the ensemble's class (the answer's), then each image's map of that class only, from the members
            # and from their untrained copies (which see the same input tensors)
            answer = self.ensemble.combine({n: out[n][rows[need]] for n in self.runners}).argmax(1)
            maps = {n: run.class_maps(inputs[n][need], answer) for n, run in self.runners.items()}
            # the untrained copies' maps (as costly as the maps themselves) only where a comparison needs them:
            # on the rows chosen for the mask-free scores when the table has such rows, else on every masked one;
            # NaN elsewhere (the pointing game's untrained baseline is then measured on those rows)
            fresh = [k for k, i in enumerate(need) if perturb[rows[i]]] if "perturb" in batch else list(range(len(need)))
            untrained = {}
            for n, run in self.untrained.items():
                got = run.class_maps(inputs[n][need][fresh], answer[fresh]) if fresh else maps[n][:0]
                untrained[n] = torch.full((len(need), *got.shape[1:]), float("nan"), dtype=got.dtype)
                untrained[n][fresh] = got
            sub = [images[i] for i in need]
            with_mask = [k for k, i in enumerate(need) if masks[rows[i]]]
            if with_mask:
                self._faithfulness(out, [masks[rows[need[k]]] for k in with_mask], [sub[k] for k in with_mask],
                                   _pick(maps, with_mask), _pick(untrained, with_mask), rows[need][with_mask])
            chosen = [k for k, i in enumerate(need) if perturb[rows[i]]]
            if chosen:
                self._perturbation(out, [sub[k] for k in chosen], _pick(maps, chosen), _pick(untrained, chosen),
                                   answer[chosen], rows[need][chosen], [paths[r] for r in rows[need][chosen]])
        return out

    def probs_of(self, name: str | None):
        """images (N, 3, S, S) in [0, 1] -> probabilities (N, C), as the answer computes them: one member's
        or, with None, the ensemble's (skin.ensemble.Predictor.probs_of)."""
        return self.ensemble.probs_of(name)

    def _perturbation(self, out: dict, images: list, maps: dict, untrained: dict, classes: np.ndarray,
                      rows: np.ndarray, paths: list[str]) -> None:
        """Deletion, insertion and ROAD (skin.faithfulness.score_maps, forwards shared) of the ensemble's map
        and of each member's own, each beside maps that know less on the same images: a random map, the same
        maps of untrained members, a centre map and a colour-contrast map (no model). On the images in [0, 1]
        at the ensemble's work size; the class explained is the ensemble's answer."""
        import zlib
        from .faithfulness import ENSEMBLE, centre_maps, random_maps, score_maps
        from .presets import eval_geometry
        work = self.ensemble.work
        widest = max(self.runners.values(), key=lambda r: r.member.data_config.input_size).member.data_config
        x = torch.stack([eval_geometry(widest)(im) for im in images]).float() / 255
        if tuple(x.shape[-2:]) != tuple(work):
            x = torch.nn.functional.interpolate(x, size=work, mode="bilinear", antialias=True, align_corners=False)
        weights = self.ensemble.weights
        cls = torch.as_tensor(classes).long()
        first = next(iter(maps.values()))
        members = list(self.runners)

        def ensemble_maps(member_maps: dict) -> torch.Tensor:
            return torch.stack([torch.from_numpy(ensemble_map({n: m[i] for n, m in member_maps.items()}, weights,
                                                              work, work)) for i in range(len(images))])

        def own(m: torch.Tensor) -> torch.Tensor:
            return normalize(upsample(m, work))
        everyone = (ENSEMBLE, *members)  # a map that knows no model serves every target with one set of forwards
        saliency = {"": (ensemble_maps(maps), (ENSEMBLE,)), ":untrained": (ensemble_maps(untrained), (ENSEMBLE,)),
                    ":random": (torch.stack([random_maps((1, *first.shape[-2:]), zlib.crc32(p.encode()))[0]
                                             for p in paths]), everyone),
                    ":centre": (centre_maps(len(images), tuple(work)), everyone),
                    ":contrast": (torch.stack([torch.from_numpy(contrast_map(v.permute(1, 2, 0).numpy())).float()
                                               for v in x]), everyone)}
        for n in members:
            saliency[f"@{n}"] = (own(maps[n]), (n,))
            saliency[f":untrained@{n}"] = (own(untrained[n]), (n,))
        got = score_maps({n: self.probs_of(n) for n in members},
                         lambda probs: torch.from_numpy(self.ensemble.combine({n: p.numpy() for n, p in probs.items()})),
                         x, saliency, cls, self.perturbation)
        for (name, target), values in got.items():
            kind = name.split("@")[0]
            suffix = "" if target == ENSEMBLE else f":{target}"
            for metric, v in values.items():
                out[f"{metric}{kind}{suffix}"][rows] = v.numpy()

    def _faithfulness(self, out: dict, masks: list[str], images: list, maps: dict, untrained: dict,
                      rows: np.ndarray) -> None:
        """`maps`, `untrained`: {member: (N, h, w)}, each image's map of the ensemble's class."""
        from PIL import Image
        from .faithfulness import random_maps
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
            noise = random_maps((1, *next(iter(maps.values())).shape[-2:]), int(row))[0]
            out["pointing:random"][row] = float(pointing_hit(upsample(noise[None], mask.shape)[0].numpy(), mask))
            fresh = {n: m[i] for n, m in untrained.items()}
            if any(bool(torch.isnan(m).any()) for m in fresh.values()):
                continue  # no untrained maps computed for this row
            out["pointing:untrained"][row] = float(pointing_hit(ensemble_map(fresh, weights, mask.shape, self.ensemble.work), mask))
            for n, m in fresh.items():
                out[f"pointing:untrained:{n}"][row] = float(pointing_hit(
                    ensemble_map({n: m}, weights, mask.shape, self.ensemble.work), mask))


def _pick(maps: dict, idx: list[int]) -> dict:
    return {n: m[idx] for n, m in maps.items()}


def perturbation_columns(members: list[str]) -> list[str]:
    """deletion / insertion / road of the ensemble's map ("deletion"), beside maps that know less
    ("deletion:random", ":untrained", ":centre", ":contrast"), and the same of each member's own map
    ("deletion:<member>", "deletion:random:<member>", ...)."""
    from .faithfulness import METRICS
    return [f"{m}{kind}{suffix}" for suffix in [""] + [f":{n}" for n in members]
            for kind in PERTURBATION_KINDS for m in METRICS]


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
                  explain: Request | None = None, perturb: int = 0) -> pd.DataFrame:
    """BatchScorer over `df` in this process; `perturb`: how many rows get the perturbation metrics."""
    scorer = BatchScorer(bundle_dir, amp=amp, explain=explain)
    if perturb:
        df = df.assign(perturb=perturb_rows(df, perturb))
    cols = [c for c in ("path", "label_index", "mask", "perturb") if c in df.columns]
    parts = [scorer({c: df[c].iloc[s:s + batch_size].to_numpy() for c in cols}) for s in range(0, len(df), batch_size)]
    return to_frame(parts, scorer.bundle.member_names)


def perturb_rows(df: pd.DataFrame, n: int, seed: int = 0) -> np.ndarray:
    """A flag per row: `n` rows spread evenly over the classes (seeded), to score with the perturbation
    metrics (each image costs some hundred forward passes)."""
    flags = np.zeros(len(df), dtype=bool)
    if n <= 0 or df.empty:
        return flags
    order = np.random.default_rng(seed).permutation(len(df))
    labels = df["label_index"].to_numpy()[order]
    # round-robin over the classes in the shuffled order: class by class, one row each, until n
    queues = [list(order[labels == k]) for k in sorted(set(labels))]
    taken = 0
    while taken < min(n, len(df)):
        for q in queues:
            if q and taken < n:
                flags[q.pop(0)] = True
                taken += 1
    return flags


def to_frame(parts: Iterable[dict], members: list[str]) -> pd.DataFrame:
    rows = ({"path": [], "label_index": [], "ok": []} | {k: [] for k in FAITH_COLUMNS} | {m: [] for m in members}
            | {k: [] for k in member_faith_columns(members) + perturbation_columns(members)})
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
              explain: Request | None = None) -> dict:
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
    perturbed = perturbation_summary(good, bundle, explain)
    if perturbed:
        out["perturbation"] = perturbed
    if bundle.ensemble_temperature != 1.0:  # what the ensemble temperature bought, on these rows
        out["ensemble_before_temperature"] = compute_metrics(y, combine(member_probs, bundle.weights_map),
                                                             bundle.classes)
    return out


def reviewed_summary(scored: pd.DataFrame, bundle: Bundle, manifest: str | Path) -> dict | None:
    """How this bundle does on the cases reviewers confirmed or corrected (`skin records export`'s manifest:
    path, label = the review's class, answered = what the bundle that answered said) among the rows scored,
    against the answering bundle: both accuracies against the reviewers' classes, the paired difference
    with its 95% bootstrap interval, the answers it fixed and the ones it broke (None: no scored row was
    reviewed)."""
    from .records import RecordError
    from .trust import paired
    try:
        m = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise RecordError(f"--reviewed {manifest}: cannot read it as the export's manifest.csv ({e})") from None
    if not {"path", "label", "answered"} <= set(m.columns):
        raise RecordError(f"--reviewed {manifest}: not a `skin records export` manifest (needs path, label, answered)")
    good, _, ens = readable(scored, bundle)
    where = {str(Path(p).resolve()): i for i, p in enumerate(good["path"])}
    m = m[[str(Path(p).resolve()) in where for p in m["path"]]]
    if m.empty:
        return None
    rows = [where[str(Path(p).resolve())] for p in m["path"]]
    names = bundle.classes.names
    now = np.array([names[k] for k in ens[rows].argmax(1)])
    right_now = (now == m["label"].to_numpy()).astype(float)
    right_then = (m["answered"].to_numpy() == m["label"].to_numpy()).astype(float)
    diff = paired(right_now, right_then, "higher")
    return {"images": int(len(m)), "accuracy": float(right_now.mean()), "answered_accuracy": float(right_then.mean()),
            "difference": diff["advantage"], "interval": diff["interval"],
            "fixed": int(((right_now == 1) & (right_then == 0)).sum()),
            "broken": int(((right_now == 0) & (right_then == 1)).sum()), "manifest": str(manifest)}


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


def _used(bundle: Bundle, explain) -> dict[str, dict]:
    """Each member's explanation as evaluated (the bundle's, overridden by `explain`), resolved."""
    return {e.name: x.describe(e.output_stride, get_spec(e.backbone).cam_layer)
            for e, x in zip(bundle.members, bundle.explanations(explain).values())}


def faithfulness(scored: pd.DataFrame, bundle: Bundle,
                 explain: Request | None = None) -> dict | None:
    """Pointing game and energy in the mask of the ensemble's Grad-CAM, overall and per class, over
    the rows that have a lesion mask (None when none has), beside maps that know less, with the paired
    advantage over each and its bootstrap interval (skin.trust)."""
    from .trust import comparisons
    if "pointing" not in scored:
        return None
    rows = scored[scored["pointing"].notna()]
    if rows.empty:
        return None

    def baseline(g: pd.DataFrame) -> dict:
        return {"centre_pointing": float(g["pointing:centre"].mean()), "flat_energy": float(g["energy:flat"].mean()),
                "contrast_pointing": float(g["pointing:contrast"].mean()),
                "untrained_pointing": float(g["pointing:untrained"].mean()),
                "untrained_images": int(g["pointing:untrained"].notna().sum()),
                "random_pointing": float(g["pointing:random"].mean())}

    per_class = {bundle.classes.name(int(k)): {"pointing": float(g["pointing"].mean()), "energy": float(g["energy"].mean()),
                                               "images": int(len(g))} | baseline(g)
                 for k, g in rows.groupby("label_index")}
    members = {m: float(rows[f"pointing:{m}"].mean()) for m in bundle.member_names if f"pointing:{m}" in rows}
    untrained = {m: float(rows[f"pointing:untrained:{m}"].mean()) for m in bundle.member_names
                 if f"pointing:untrained:{m}" in rows}
    used = _used(bundle, explain)
    return {"pointing": float(rows["pointing"].mean()), "energy": float(rows["energy"].mean()), "images": int(len(rows)),
            "per_class": per_class, "members_pointing": members, "members_untrained_pointing": untrained,
            "checks": {"pointing": comparisons(rows, "pointing")},
            "baseline": baseline(rows) | {
                "what": "maps that know less, on the same images: one always peaking at the image centre; a flat "
                        "one (its energy = the lesion's share of the image); the colour that stands out from the "
                        "skin, no model (contrast); the same maps of freshly initialised members (untrained; on the rows of the "
                        "mask-free scores when --perturb chose some, as costly as the maps themselves); "
                        "uniform noise (random)"},
            "method": method_name([d["method"] for d in used.values()], [d["smooth"] for d in used.values()]),
            "explanations": used, "masks": "synthetic lesions (skin data synth)",
            "note": "measured on synthetic lesions with known masks; not measured on real photographs"}


def perturbation_summary(scored: pd.DataFrame, bundle: Bundle,
                         explain: Request | None = None) -> dict | None:
    """Mean deletion, insertion and ROAD over the rows that have them, for the ensemble's map and each
    member's own, each beside maps that know less (random, untrained members, centre, colour contrast),
    the paired advantage over each with its bootstrap interval, and the verdict (skin.trust) on the
    ensemble's map (the one served) and on each member's (None when no row has them)."""
    from .faithfulness import BETTER, METRICS, PerturbationConfig
    from .trust import BASELINES, comparisons, verdict
    if "deletion" not in scored:
        return None
    rows = scored[scored["deletion"].notna()]
    if rows.empty:
        return None

    def target(suffix: str) -> dict:
        return {m: {"map": float(rows[f"{m}{suffix}"].mean())}
                | {b: float(rows[f"{m}:{b}{suffix}"].mean()) for b in BASELINES if f"{m}:{b}{suffix}" in rows}
                for m in METRICS}

    def checks(suffix: str) -> dict:
        return {m: comparisons(rows, m, suffix) for m in METRICS}
    used = list(bundle.explanations(explain).values())
    cfg = PerturbationConfig()
    ensemble_checks = checks("")
    member_checks = {n: checks(f":{n}") for n in bundle.member_names}
    return {"images": int(len(rows)), "ensemble": target(""),
            "members": {n: target(f":{n}") for n in bundle.member_names}, "better": dict(BETTER),
            "checks": {"ensemble": ensemble_checks, "members": member_checks},
            "verdict": verdict(ensemble_checks),
            "member_verdicts": {n: verdict(c) for n, c in member_checks.items()},
            "method": method_name([u.method for u in used], [u.smooth for u in used]),
            "steps": cfg.steps, "road_shares": list(cfg.road_shares),
            "what": "the explained class's probability as the map's most salient pixels are removed (deletion: "
                    "area under the curve, lower is better) or revealed on a blurred copy (insertion: higher is "
                    "better), and ROAD (removal by imputation from the neighbours, most minus least salient "
                    "first: higher is better); beside a random map, the same maps of untrained members, a map "
                    "peaking at the centre and a colour-contrast map with no model, each as a paired advantage "
                    "with a 95% bootstrap interval over the images",
            "class": "the ensemble's answer"}


def store_in_bundle(bundle: Bundle, metrics: dict, split: str) -> None:
    slim = {"split": split, "ensemble": _slim(metrics["ensemble"]),
            **({"calibration": metrics["calibration"]} if "calibration" in metrics else {}),
            "members": {m: _slim(v) for m, v in metrics["members"].items()}}
    if metrics.get("lesion_free"):
        slim["lesion_free"] = metrics["lesion_free"]
    if metrics.get("faithfulness"):
        slim["faithfulness"] = {k: v for k, v in metrics["faithfulness"].items()} | {"split": split}
    if metrics.get("perturbation"):
        slim["perturbation"] = metrics["perturbation"] | {"split": split}
    update_metrics(bundle.root, slim)


def _slim(m: dict) -> dict:
    keys = ("n", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "precision_macro",
            "recall_macro", "roc_auc_ovr", "ece", "nll")
    return {k: m[k] for k in keys if k in m}
