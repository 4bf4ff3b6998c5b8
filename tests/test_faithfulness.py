"""Faithfulness without masks (skin.faithfulness): deletion / insertion (RISE) and ROAD."""
import numpy as np
import pytest
import torch

from skin.faithfulness import PerturbationConfig, auc, deletion_insertion, impute, random_maps, road

SIZE = 32


def _patch_model(patch=(slice(4, 12), slice(18, 28))):
    """A toy 2-class model that only looks at one patch: p(class 0) = sigmoid(8 (mean red in the patch - 0.5))."""
    def probs_of(x):
        p0 = torch.sigmoid(8 * (x[:, 0, patch[0], patch[1]].mean((1, 2)) - 0.5))
        return torch.stack([p0, 1 - p0], 1)
    oracle = torch.zeros(SIZE, SIZE)
    oracle[patch] = 1.0
    return probs_of, oracle


def test_auc_is_the_trapezoid_over_even_fractions():
    curve = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(auc(curve), torch.tensor([0.5, 0.25]))


def test_deletion_and_insertion_rank_a_map_that_knows_above_one_that_does_not():
    """The map of the pixels the model reads: deletion falls fastest (lowest AUC), insertion rises
    fastest (highest); its reverse is worst; a random map lies between. The curves start and end
    where they must (the image itself, all grey, all blurred)."""
    probs_of, oracle = _patch_model()
    torch.manual_seed(0)
    x = torch.rand(2, 3, SIZE, SIZE) * 0.2
    x[:, 0, 4:12, 18:28] = 1.0  # class 0, from the patch only
    cls = torch.zeros(2, dtype=torch.long)
    cfg = PerturbationConfig(steps=8, blur_sigma=0.1)
    good = deletion_insertion(probs_of, x, oracle.expand(2, -1, -1), cls, cfg)
    bad = deletion_insertion(probs_of, x, (1 - oracle).expand(2, -1, -1), cls, cfg)
    rnd = deletion_insertion(probs_of, x, random_maps((2, 8, 8), 0), cls, cfg)
    assert (good["deletion"] < rnd["deletion"]).all() and (rnd["deletion"] < bad["deletion"]).all()
    assert (good["insertion"] > rnd["insertion"]).all() and (rnd["insertion"] > bad["insertion"]).all()
    full = probs_of(x)[:, 0]
    torch.testing.assert_close(good["deletion_curve"][:, 0], full)
    torch.testing.assert_close(good["insertion_curve"][:, -1], full)
    assert good["deletion_curve"].shape == (2, 9)
    # the patch is 80 of 1024 pixels: after the first step (1/8 of the pixels) the oracle has removed all of
    # it (the all-grey answer), the reverse map none of it (the image's answer)
    torch.testing.assert_close(good["deletion_curve"][:, 1], good["deletion_curve"][:, -1])
    torch.testing.assert_close(bad["deletion_curve"][:, 1], full)


def test_imputation_fills_from_the_neighbours():
    """A linear ramp is harmonic for ROAD's weights: the removed pixels come back exactly (noise off);
    kept pixels never change."""
    h = w = 16
    ramp = torch.linspace(0, 1, w).expand(h, w)
    x = torch.stack([ramp, ramp.T, 0.5 * torch.ones(h, w)])
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[5:11, 3:9] = False
    y = impute(x, keep, noise=0.0)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    y = impute(torch.rand(3, h, w), keep, noise=0.0)
    assert y.shape == (3, h, w)


def test_road_matches_pytorch_grad_cam_with_the_noise_off():
    """Our ROAD = pytorch-grad-cam's ROADCombined (MoRF and LeRF averaged over the same shares, the
    softmax of the explained class) with the imputation's noise off, on a small CNN."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(128, 5)).eval()
    x = torch.rand(2, 3, 24, 24)
    maps = torch.rand(2, 24, 24)
    classes = torch.tensor([1, 3])
    shares = (10, 30, 60)
    ours = road(lambda t: torch.softmax(model(t), 1), x, maps, classes,
                PerturbationConfig(road_shares=shares, road_noise=0.0))
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    imputer = NoisyLinearImputer(noise=0.0)
    # share s removed = pytorch-grad-cam's percentile 100 - s; compared share by share
    morf = np.stack([PerturbationConfidenceMetric(RemoveMostRelevantFirst(100 - s, imputer))(
        x, maps.numpy(), targets, model) for s in shares], axis=1)
    lerf = np.stack([PerturbationConfidenceMetric(RemoveLeastRelevantFirst(100 - s, imputer))(
        x, maps.numpy(), targets, model) for s in shares], axis=1)
    np.testing.assert_allclose(ours["morf"].numpy(), morf, atol=1e-5)
    np.testing.assert_allclose(ours["lerf"].numpy(), lerf, atol=1e-5)
    np.testing.assert_allclose(ours["road"].numpy(), ((lerf - morf) / 2).mean(1), atol=1e-5)


def test_road_ranks_a_map_that_knows_above_its_reverse():
    probs_of, oracle = _patch_model()
    x = torch.rand(1, 3, SIZE, SIZE) * 0.2
    x[:, 0, 4:12, 18:28] = 1.0
    cls = torch.zeros(1, dtype=torch.long)
    good = road(probs_of, x, oracle[None] + 0.01 * torch.rand(1, SIZE, SIZE), cls)["road"]
    bad = road(probs_of, x, 1 - oracle[None] + 0.01 * torch.rand(1, SIZE, SIZE), cls)["road"]
    assert good.item() > 0.2 and good.item() > bad.item()


def test_many_maps_with_shared_forwards_score_as_each_alone():
    """skin.faithfulness.score_maps (what evaluation runs: every map's views computed once and run through
    only the members its targets need) gives, for every (map, target), what `scores` gives for that map with
    that target's probabilities: members that look at different patches, an ensemble of their weighted mean."""
    from skin.faithfulness import ENSEMBLE, centre_maps, score_maps, scores
    torch.manual_seed(1)
    a, _ = _patch_model((slice(4, 12), slice(18, 28)))
    b, _ = _patch_model((slice(16, 30), slice(2, 14)))
    members = {"a": a, "b": b}
    weights = {"a": 0.3, "b": 0.7}

    def combine(probs: dict) -> torch.Tensor:
        return sum(weights[m] * p for m, p in probs.items())
    x = torch.rand(3, 3, SIZE, SIZE)
    cls = torch.tensor([0, 1, 0])
    cfg = PerturbationConfig(steps=4, road_shares=(20, 60), blur_sigma=0.1, batch=5)
    maps = {"own-a": (torch.rand(3, 8, 8), ("a",)), "ens": (torch.rand(3, 8, 8), (ENSEMBLE,)),
            "centre": (centre_maps(3, (SIZE, SIZE)), (ENSEMBLE, "a", "b"))}
    got = score_maps(members, combine, x, maps, cls, cfg, seed=3)
    assert set(got) == {("own-a", "a"), ("ens", ENSEMBLE), ("centre", ENSEMBLE), ("centre", "a"), ("centre", "b")}
    for (name, target), values in got.items():
        probs_of = (lambda v: combine({m: f(v) for m, f in members.items()})) if target == ENSEMBLE else members[target]
        want = scores(probs_of, x, maps[name][0], cls, cfg, seed=3)
        for metric in ("deletion", "insertion", "road"):
            torch.testing.assert_close(values[metric], want[metric], atol=1e-6, rtol=0)
