"""One member-inference path (skin.inference): prediction, explanation, evaluation, batch
inference and training's validation give the same probabilities for the same images, and
`assemble` builds the same answer for the CLI, the batch job and the server."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from skin.bundle import Bundle, derive_bundle
from skin.ensemble import Predictor, assemble
from skin.explanation import Explanation
from skin.inference import MemberRunner, calibrated
from skin.synth import make_sample


@pytest.fixture(scope="module")
def warm_bundle(random_bundle, tmp_path_factory):
    """The random bundle with temperatures that are not 1, so a path that forgets them shows."""
    b = Bundle.load(random_bundle)
    return derive_bundle(b, tmp_path_factory.mktemp("t") / "b",
                         temperatures={n: t for n, t in zip(b.member_names, (0.5, 2.0, 0.25))})


def test_every_consumer_gives_the_member_path_probabilities(warm_bundle, tmp_path):
    from skin.batch import BatchPredictor
    from skin.cache import ManifestDataset, skip_none_collate
    from skin.evaluation import BatchScorer
    from skin.presets import eval_preset, to_batch
    from skin.train import score_loader
    b = Bundle.load(warm_bundle.root)
    images = [make_sample(k, 3, k, 80).image for k in range(4)]
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    members = b.load_members()
    want = {n: calibrated(m.eval()(to_batch(images, m.data_config)), b.entry(n).temperature).detach().numpy()
            for n, m in members.items()}  # the definition: softmax(member(x) / T)

    pred = Predictor(b).member_outputs(images, cam=True)
    scored = BatchScorer(str(b.root))({"path": np.array(paths), "label_index": np.zeros(4, int)})
    rows = pd.DataFrame(BatchPredictor(str(b.root)).rows(paths))
    ens = sum(b.weight_of(n) * want[n] for n in members) / sum(b.weights)
    for n, m in members.items():
        np.testing.assert_allclose(pred[n][0], want[n], atol=1e-5, err_msg=f"Predictor/explain {n}")
        np.testing.assert_allclose(scored[n], want[n], atol=1e-5, err_msg=f"evaluation {n}")
        ds = ManifestDataset(pd.DataFrame({"path": paths, "label_index": [0] * 4}), eval_preset(m.data_config))
        p, _, _ = score_loader(m, DataLoader(ds, 2, collate_fn=skip_none_collate), torch.device("cpu"), False)
        t = b.entry(n).temperature  # validation scores at T = 1: undo the temperature to compare
        np.testing.assert_allclose(p, calibrated(torch.log(torch.from_numpy(want[n])) * t).numpy(), atol=1e-5,
                                   err_msg=f"training validation {n}")
    np.testing.assert_allclose(rows[[f"p_{c}" for c in b.classes.names]].to_numpy(float), ens, atol=1e-5)


def test_member_runner_refuses_training_mode(random_bundle):
    m = Bundle.load(random_bundle).load_member("resnet50").train()
    with pytest.raises(RuntimeError, match="eval"):
        MemberRunner(m)


def test_assemble_marks_degraded_answers_and_explains_the_asked_class():
    classes = ["a", "b", "c"]
    probs = {"m1": np.array([0.7, 0.2, 0.1]), "m2": np.array([0.6, 0.3, 0.1])}
    maps = {"m1": torch.rand(3, 2, 2), "m2": torch.rand(3, 2, 2)}
    w = {"m1": 0.5, "m2": 0.5, "m3": 1.0}
    r = assemble(probs, w, classes, member_maps=maps, size=(8, 6), work=(4, 4), class_name="c", all_classes=True,
                 each_member=True, missing=["m3"])
    assert r["class"] == "a" and r["degraded"] and r["missing_members"] == ["m3"]
    assert r["uncertain"] and any("m3" in x for x in r["uncertain_reasons"])
    g = r["gradcam"]
    assert g["class"] == "c" and g["map"].shape == (8, 6) and set(g["maps"]) == set(classes)
    np.testing.assert_array_equal(g["maps"]["c"], g["map"])
    assert not np.allclose(g["maps"]["a"], g["map"])
    assert set(g["members"]) == {"m1", "m2"} and g["members"]["m1"].shape == (8, 6)
    assert np.isclose(r["confidence"], 0.65)  # weights renormalised over the members that answered
    with pytest.raises(ValueError, match="size"):
        assemble(probs, w, classes, member_maps=maps)


def test_scorer_measures_where_the_map_points(random_bundle, tmp_path):
    """Pointing game and energy against planted masks: a mask over the whole image holds every
    peak and all the energy; an empty one none; rows without a mask stay unmeasured."""
    from PIL import Image
    from skin.evaluation import BatchScorer, faithfulness, to_frame
    paths, masks = [], []
    for i, fill in enumerate((255, 0, None)):
        paths.append(str(tmp_path / f"{i}.png"))
        make_sample(i, 1, i, 80).image.save(paths[-1])
        if fill is None:
            masks.append("")
        else:
            masks.append(str(tmp_path / f"{i}-mask.png"))
            Image.new("L", (40, 40), fill).save(masks[-1])  # another size than the image: resized
    scorer = BatchScorer(str(random_bundle))
    out = scorer({"path": np.array(paths), "label_index": np.zeros(3, int), "mask": np.array(masks)})
    assert out["pointing"][0] == 1.0 and out["energy"][0] == pytest.approx(1.0)
    assert out["pointing"][1] == 0.0 and out["energy"][1] == 0.0
    assert np.isnan(out["pointing"][2]) and np.isnan(out["energy"][2])
    assert out["pointing:resnet50"][0] == 1.0 and out["pointing:resnet50"][1] == 0.0
    # the baselines that know nothing of the image: a centre-peaked map and a flat map
    assert out["pointing:centre"][:2].tolist() == [1.0, 0.0] and out["energy:flat"][:2].tolist() == [1.0, 0.0]
    assert np.isnan(out["pointing:centre"][2])
    # ... a colour-contrast map with no model, and the same maps from untrained members
    for k in ("pointing:contrast", "pointing:untrained", "pointing:untrained:resnet50"):
        assert out[k][:2].tolist() == [1.0, 0.0] and np.isnan(out[k][2]), k
    # a dark patch off-centre on plain skin, masked: the contrast map finds it, the centre map does not
    skin = np.full((80, 80, 3), (210, 170, 150), np.uint8)
    skin[50:66, 8:24] = (90, 60, 50)
    patch = np.zeros((80, 80), np.uint8)
    patch[50:66, 8:24] = 255
    Image.fromarray(skin).save(tmp_path / "patch.png")
    Image.fromarray(patch).save(tmp_path / "patch-mask.png")
    one = scorer({"path": np.array([str(tmp_path / "patch.png")]), "label_index": np.zeros(1, int),
                  "mask": np.array([str(tmp_path / "patch-mask.png")])})
    assert one["pointing:contrast"][0] == 1.0 and one["pointing:centre"][0] == 0.0
    # the untrained column reads the untrained copies' maps: copies whose maps peak on the patch hit,
    # copies whose maps peak in the far corner miss, whatever the bundle's own maps do
    class fake:  # an untrained copy whose every map peaks at `cell`
        def __init__(self, cell):
            self.cell = cell

        def class_maps(self, x, classes):
            maps = torch.zeros(len(x), 8, 8)
            maps[:, self.cell[0], self.cell[1]] = 1.0
            return maps
    real_untrained = scorer.untrained
    for cell, hit in (((6, 1), 1.0), ((0, 7), 0.0)):
        scorer.untrained = {n: fake(cell) for n in scorer.runners}
        got = scorer({"path": np.array([str(tmp_path / "patch.png")]), "label_index": np.zeros(1, int),
                      "mask": np.array([str(tmp_path / "patch-mask.png")])})
        assert got["pointing:untrained"][0] == hit and got["pointing:untrained:resnet50"][0] == hit, cell
    scorer.untrained = real_untrained
    f = faithfulness(to_frame([out], scorer.bundle.member_names), scorer.bundle)
    assert f["images"] == 2 and f["pointing"] == 0.5
    assert f["baseline"]["centre_pointing"] == 0.5 and f["baseline"]["flat_energy"] == 0.5
    assert f["baseline"]["contrast_pointing"] == 0.5 and f["baseline"]["untrained_pointing"] == 0.5
    assert f["members_untrained_pointing"]["resnet50"] == 0.5
    # the untrained copies: each member's architecture, explanation stride and layer, other weights
    for n, run in scorer.runners.items():
        fresh = scorer.untrained[n]
        assert (fresh.cam_stride, fresh.explanation, fresh.member.spec.name) == (run.cam_stride, run.explanation, n)
        a, b = run.member.state_dict(), fresh.member.state_dict()
        assert a.keys() == b.keys()
        assert not any(torch.equal(a[k], b[k]) for k in a if k.endswith("conv1.weight") or k.endswith("0.weight"))
    # ... and its explanation method and smoothing: a flip-averaged LayerCAM bundle's untrained copies are
    # explained by flip-averaged LayerCAM
    from skin.bundle import Bundle, derive_bundle
    lc = derive_bundle(Bundle.load(random_bundle), tmp_path / "lc", explanations={"resnet50": {
        "layer": "backbone.layer2", "method": "layercam", "smooth": "flips"}})
    scorer = BatchScorer(str(lc.root))
    want = Explanation(layer="backbone.layer2", method="layercam", smooth="flips")
    assert scorer.runners["resnet50"].explanation == scorer.untrained["resnet50"].explanation == want
    assert scorer.untrained["mobilenetv2"].explanation == Explanation()
    f = faithfulness(to_frame([scorer({"path": np.array(paths[:2]), "label_index": np.zeros(2, int),
                                        "mask": np.array(masks[:2])})], lc.member_names), lc)
    used = f["explanations"]  # one shape: each member's Explanation resolved (Explanation.describe)
    assert f["method"] == "Grad-CAM / LayerCAM (partly flip-averaged)" and used["resnet50"]["method"] == "layercam"
    assert {n: e["smooth"] for n, e in used.items()} == {"mobilenetv2": "none", "efficientnet_b1": "none",
                                                          "resnet50": "flips"}
    from skin.registry import get_spec
    assert {n: e["layer"] for n, e in used.items()} == {"mobilenetv2": get_spec("mobilenetv2").cam_layer,
                                                         "efficientnet_b1": get_spec("efficientnet_b1").cam_layer,
                                                         "resnet50": "backbone.layer2"}


def test_scorer_scores_the_maps_the_service_draws(random_bundle, tmp_path):
    """The evaluation's pointing game and energy are those of the map `skin explain` and the API
    return (assemble's ensemble map of the predicted class), and each member's too: with maps at a
    shallow layer and flip-averaged, where the scorer computes only the answered class's map."""
    from skin.bundle import Bundle, derive_bundle
    from skin.evaluation import BatchScorer
    from skin.metrics import energy_inside, pointing_hit
    b = derive_bundle(Bundle.load(random_bundle), tmp_path / "b", explanations={
        "mobilenetv2": {"stride": 8, "layer": "backbone.blocks.3", "method": "layercam", "smooth": "flips"},
        "resnet50": {"smooth": "flips"}})
    samples = [make_sample(k, 2, k, 96) for k in range(4)]
    paths, masks = [], []
    for k, s in enumerate(samples):
        paths.append(str(tmp_path / f"{k}.png"))
        masks.append(str(tmp_path / f"{k}-mask.png"))
        s.image.save(paths[-1])
        s.mask.save(masks[-1])
    out = BatchScorer(str(b.root))({"path": np.array(paths), "label_index": np.arange(4), "mask": np.array(masks)})
    answers = Predictor(b).answers([s.image for s in samples], cam=True, each_member=True)
    for k, (a, s) in enumerate(zip(answers, samples)):
        mask = np.asarray(s.mask) > 127
        assert out["pointing"][k] == pointing_hit(a["gradcam"]["map"], mask), k
        assert out["energy"][k] == pytest.approx(energy_inside(a["gradcam"]["map"], mask), abs=1e-5), k
        for n, m in a["gradcam"]["members"].items():
            assert out[f"pointing:{n}"][k] == pointing_hit(m, mask), (k, n)


def test_contrast_map_finds_what_stands_out_from_the_skin():
    """The no-model baseline: on a synthetic lesion its peak lies in the mask; on plain skin with one
    dark spot it peaks on the spot."""
    from skin.metrics import contrast_map, pointing_hit
    hits = [pointing_hit(contrast_map(np.asarray(s.image)), np.asarray(s.mask) > 0)
            for s in (make_sample(4, 2, i, 96) for i in range(6))]
    assert np.mean(hits) >= 0.8, hits
    img = np.full((64, 64, 3), 200, np.uint8)
    img[40:44, 10:14] = 60
    i, j = np.unravel_index(contrast_map(img).argmax(), (64, 64))
    assert 38 <= i <= 45 and 8 <= j <= 15, (i, j)


@pytest.mark.parametrize("explanation", [Explanation(), Explanation(layer="backbone.blocks.3", smooth="flips")])
def test_maps_are_computed_in_chunks_whatever_the_batch(explanation, monkeypatch):
    """A batch larger than the member's map chunk is explained a chunk at a time (memory bounded at any
    batch size): no pass of the maps sees more images than the chunk (times the flipped views), the
    answer is the whole batch's exactly as without maps, and the maps are those of each chunk."""
    import skin.inference as inference
    from skin.registry import create_model
    monkeypatch.setitem(inference.MAP_CHUNKS, "one_pass", 4)
    monkeypatch.setitem(inference.MAP_CHUNKS, "general", 8)  # 2 with flips
    monkeypatch.setattr(inference, "MAP_CHUNK_SIDE", 64)  # the chunks as measured at this input size
    torch.manual_seed(0)
    run = MemberRunner(create_model("mobilenetv2", 6, pretrained="none", input_size=64).eval(), explanation=explanation)
    chunk = run.map_chunk
    assert chunk == (4 if not explanation.layer else 2)
    monkeypatch.setattr(inference, "MAP_CHUNK_SIDE", 128)  # at half the side of where it was measured: 4x as many
    assert run.map_chunk == 4 * chunk
    monkeypatch.setattr(inference, "MAP_CHUNK_SIDE", 64)
    from skin.gradcam import GradCAM
    seen = []
    real = GradCAM.__call__
    monkeypatch.setattr(GradCAM, "__call__", lambda self, x, *args: seen.append(len(x)) or real(self, x, *args))
    x = torch.randn(7, 3, 64, 64)
    probs, maps = run(x, cam=True)
    assert max(seen) <= chunk * (3 if explanation.smooth == "flips" else 1), seen
    np.testing.assert_array_equal(probs, run(x)[0])
    parts = torch.cat([run(x[s:s + chunk], cam=True)[1] for s in range(0, 7, chunk)])
    torch.testing.assert_close(maps, parts)
    classes = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    seen.clear()
    got = run.class_maps(x, classes)
    assert max(seen) <= chunk * (3 if explanation.smooth == "flips" else 1), seen
    torch.testing.assert_close(got, maps[torch.arange(7), classes], rtol=1e-4, atol=1e-6)


def test_scorer_measures_faithfulness_without_masks_on_the_served_map(random_bundle, tmp_path):
    """The perturbation metrics (deletion, insertion, ROAD) are those of the map the API draws (the
    ensemble's map of its answer), with the answer's probabilities: recomputed here from `Predictor`
    and skin.faithfulness on the same images; only the rows asked for are scored, and each member's
    own and the maps that know less (random, untrained members, centre, colour contrast) get theirs,
    with paired intervals and a verdict in the summary."""
    from skin.evaluation import BatchScorer, perturbation_columns, perturbation_summary, to_frame
    from skin.faithfulness import scores
    from skin.presets import eval_geometry
    b = Bundle.load(random_bundle)
    samples = [make_sample(k, 3, k, 64) for k in range(3)]  # 64 px: the members' input size, so no resize
    paths = []
    for k, s in enumerate(samples):
        paths.append(str(tmp_path / f"{k}.png"))
        s.image.save(paths[-1])
    scorer = BatchScorer(str(b.root))
    out = scorer({"path": np.array(paths), "label_index": np.arange(3), "perturb": np.array([True, False, True])})
    cols = perturbation_columns(b.member_names)
    assert len(cols) == 3 * 5 * 4 and all(np.isnan(out[c][1]) for c in cols)
    assert all(not np.isnan(out[c][0]) and not np.isnan(out[c][2]) for c in cols)
    answers = Predictor(b).answers([samples[k].image for k in (0, 2)], cam=True)
    x = torch.stack([eval_geometry(b.entry("resnet50").data_config)(samples[k].image) for k in (0, 2)]).float() / 255
    probs_of = scorer.probs_of(None)
    np.testing.assert_allclose(probs_of(x).numpy(), [[a["probabilities"][c] for c in b.classes] for a in answers],
                               atol=1e-5)
    served = torch.stack([torch.from_numpy(a["gradcam"]["map"]) for a in answers])
    classes = torch.tensor([a["class_index"] for a in answers])
    want = scores(probs_of, x, served, classes, scorer.perturbation)
    for metric in ("deletion", "insertion", "road"):
        np.testing.assert_allclose(out[metric][[0, 2]], want[metric].numpy(), atol=1e-7, rtol=0, err_msg=metric)
    from skin.faithfulness import centre_maps
    centre = scores(probs_of, x, centre_maps(2, tuple(x.shape[-2:])), classes, scorer.perturbation)
    np.testing.assert_allclose(out["insertion:centre"][[0, 2]], centre["insertion"].numpy(), atol=1e-7, rtol=0)
    summary = perturbation_summary(to_frame([out], b.member_names), b)
    assert summary["images"] == 2 and set(summary["members"]) == set(b.member_names)
    assert summary["ensemble"]["deletion"]["map"] == pytest.approx(float(np.mean(out["deletion"][[0, 2]])))
    assert summary["better"] == {"deletion": "lower", "insertion": "higher", "road": "higher"}
    c = summary["checks"]["ensemble"]["deletion"]["centre"]  # lower is better: the advantage is baseline - map
    assert c["images"] == 2 and c["advantage"] == pytest.approx(float(np.mean(out["deletion:centre"][[0, 2]]
                                                                              - out["deletion"][[0, 2]])))
    assert summary["verdict"]["shown"] is False  # an untrained bundle on two images shows nothing
