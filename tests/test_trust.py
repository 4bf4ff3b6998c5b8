"""How far to trust a map (skin.trust): paired intervals against maps that know less, and a verdict that
fails on the lie. On synthetic lesions with distractors (ink blots and gel bubbles away from the lesion,
which a colour-contrast map points at), through the same scoring evaluation runs (skin.faithfulness.score_maps
with the bundle's members), for maps put in place of the served one:

- the model's own occlusion sensitivity: shown to follow the model;
- the colour-contrast map itself: not shown (it cannot beat itself);
- the maps of untrained members served as if they were the model's: not shown.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from skin.bundle import Bundle
from skin.evaluation import BatchScorer
from skin.faithfulness import ENSEMBLE, PerturbationConfig, centre_maps, random_maps, score_maps
from skin.gradcam import ensemble_map
from skin.metrics import contrast_map
from skin.occlusion import Grid, occlusion_maps
from skin.presets import eval_geometry
from skin.registry import untrained_copy
from skin.synth import make_sample
from skin.trust import BASELINES, MASK_FREE, bundle_verdict, comparisons, paired, verdict

N = 24
GRID = Grid(patch=1 / 4, stride=1 / 8)  # 7 x 7 patches: a coarser grid than the default's 15 x 15, for speed
CFG = PerturbationConfig(steps=6)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A random-weight MobileNetV2 made decisive (temperature 0.1: a random network's answer is nearly
    uniform, so no perturbation would move it) on N synthetic lesions with distractors: its scorer, the
    images in [0, 1] at its work size, the classes it answers, its prepared inputs, and the scores of the
    maps that know less (computed once)."""
    from skin.bundle import write_bundle
    from skin.classes import ClassMap
    from skin.registry import create_model
    torch.manual_seed(0)
    b = write_bundle(tmp_path_factory.mktemp("decisive") / "b", ClassMap(),
                     {"mobilenetv2": create_model("mobilenetv2", 6, pretrained="none", input_size=64)},
                     temperatures={"mobilenetv2": 0.1}, untrained=True)
    scorer = BatchScorer(str(b.root))
    images = [make_sample(k % 6, 11, k, 64, artefacts=3).image for k in range(N)]
    from skin.presets import eval_batches
    inputs = {n: r.member.data_config for n, r in scorer.runners.items()}
    xs = eval_batches(images, inputs.values(), scorer.device)
    x = torch.stack([eval_geometry(next(iter(inputs.values())))(im) for im in images]).float() / 255
    classes = scorer.probs_of(None)(x).argmax(1)
    fresh = {n: scorer.untrained[n].class_maps(xs[cfg], classes) for n, cfg in inputs.items()}
    work = scorer.ensemble.work
    untrained = torch.stack([torch.from_numpy(ensemble_map({n: m[i] for n, m in fresh.items()},
                                                           scorer.ensemble.weights, work, work)) for i in range(N)])
    baselines = {"random": random_maps((N, 8, 8), 0), "untrained": untrained, "centre": centre_maps(N, tuple(work)),
                 "contrast": torch.stack([torch.from_numpy(contrast_map(v.permute(1, 2, 0).numpy())).float() for v in x])}
    got = _score(scorer, x, classes, baselines)
    rows = {f"{metric}:{name}": got[name][metric] for name in baselines for metric in MASK_FREE}
    return scorer, x, classes, baselines, rows, inputs, xs


def _score(scorer, x, classes, maps: dict) -> dict:
    got = score_maps({n: scorer.probs_of(n) for n in scorer.runners},
                     lambda p: torch.from_numpy(scorer.ensemble.combine({n: v.numpy() for n, v in p.items()})),
                     x, {k: (m, (ENSEMBLE,)) for k, m in maps.items()}, classes, CFG)
    return {name: {metric: v.numpy() for metric, v in got[(name, ENSEMBLE)].items()} for name in maps}


def judge(setting, candidate: torch.Tensor) -> dict:
    """The verdict on `candidate` served as the ensemble's map, scored as evaluation scores it."""
    scorer, x, classes, _, baseline_rows, *_ = setting
    own = _score(scorer, x, classes, {"map": candidate})["map"]
    rows = pd.DataFrame(baseline_rows | {m: own[m] for m in MASK_FREE})
    return verdict({m: comparisons(rows, m) for m in MASK_FREE})


def test_the_models_own_occlusion_sensitivity_is_shown_to_follow_it(setting):
    scorer, x, classes, *_ = setting
    v = judge(setting, occlusion_maps(scorer.probs_of(None), x, classes, GRID))
    assert v["shown"], v
    assert v["sentence"].startswith("Shown to follow the model")


def test_the_colour_contrast_map_served_as_the_explanation_is_not_shown(setting):
    v = judge(setting, setting[3]["contrast"])
    assert not v["shown"] and "contrast" in v["failed"]
    assert "rough pointer" in v["sentence"] and "a colour-contrast map with no model" in v["sentence"]


def test_untrained_members_maps_served_as_if_trained_are_not_shown(setting):
    """Maps of other freshly initialised members (not the baseline's own copies) know nothing of the model."""
    scorer, x, classes, _, _, inputs, xs = setting
    torch.manual_seed(123)
    other = {n: untrained_copy(scorer.runners[n].member) for n in scorer.runners}
    from skin.inference import MemberRunner
    fresh = {n: MemberRunner(m, 1.0, "off", scorer.runners[n].explanation).class_maps(xs[inputs[n]], classes)
             for n, m in other.items()}
    work = scorer.ensemble.work
    served = torch.stack([torch.from_numpy(ensemble_map({n: m[i] for n, m in fresh.items()},
                                                        scorer.ensemble.weights, work, work)) for i in range(N)])
    v = judge(setting, served)
    assert not v["shown"] and v["failed"], v


def test_paired_intervals_are_signed_so_positive_means_the_map_did_better():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    better_low = paired(base - 0.1, base, "lower")  # deletion: lower is better
    assert better_low["advantage"] == pytest.approx(0.1) and better_low["interval"][0] > 0
    worse_high = paired(base - 0.1, base, "higher")
    assert worse_high["advantage"] == pytest.approx(-0.1) and worse_high["interval"][1] < 0
    same = paired(base + rng.normal(0, 0.05, 200), base, "higher")
    assert same["interval"][0] < 0 < same["interval"][1]


def test_the_verdict_names_what_was_not_beaten_and_needs_every_baseline():
    clear = {"images": 30, "advantage": 0.1, "interval": [0.05, 0.15], "map": 0.5, "baseline": 0.4}
    vague = clear | {"advantage": 0.02, "interval": [-0.01, 0.05]}
    against = clear | {"advantage": -0.05, "interval": [-0.08, -0.02]}
    checks = {m: {b: clear for b in BASELINES} for m in MASK_FREE}
    assert verdict(checks)["shown"]
    checks["road"]["untrained"] = vague  # two of three clear, none against: still beaten
    assert verdict(checks)["shown"]
    checks["insertion"]["untrained"] = vague  # one of three: not beaten
    v = verdict(checks)
    assert not v["shown"] and v["failed"] == ["untrained"] and "untrained members" in v["sentence"]
    checks["road"]["centre"] = against  # clearly worse on one: not beaten, whatever the others say
    assert verdict(checks)["failed"] == ["untrained", "centre"]
    del checks["insertion"]["random"], checks["deletion"]["random"]  # not measured: not beaten
    assert verdict(checks)["failed"] == ["random", "untrained", "centre"]
    assert verdict({})["sentence"].startswith("Not measured")
    # what /v1/info and the OIP metadata say: the stored verdict, or "not measured" without one
    stored = verdict(checks)
    assert bundle_verdict({"perturbation": {"split": "test", "verdict": stored}}) == stored | {"split": "test"}
    assert not bundle_verdict(None)["shown"] and bundle_verdict({})["sentence"].startswith("Not measured")
