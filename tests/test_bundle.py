import json
import shutil

import numpy as np
import pytest

from skin.bundle import Bundle, BundleError, derive_bundle, write_bundle
from skin.checkpoint import CheckpointError
from skin.classes import ClassMap, ClassMapError
from skin.ensemble import Predictor
from skin.registry import create_model
from skin.synth import make_sample


def test_round_trip(random_bundle):
    b = Bundle.load(random_bundle)
    assert b.untrained and b.weights == (0.30, 0.30, 0.40) and b.id.startswith("sk-")
    img = make_sample(2, 0, 0, 96).image
    p1 = Predictor(b).predict([img])[0]
    p2 = Predictor(Bundle.load(random_bundle)).predict([img])[0]
    assert p1 == p2
    assert abs(sum(p1["probabilities"].values()) - 1) < 1e-6
    assert set(p1) >= {"class", "class_index", "confidence", "probabilities", "members", "uncertain"}
    assert set(p1["members"]) == {"mobilenetv2", "efficientnet_b1", "resnet50"}
    assert p1["members"]["resnet50"]["weight"] == 0.4


def test_batch_equals_single(random_bundle):
    pr = Predictor(Bundle.load(random_bundle))
    imgs = [make_sample(k, 0, 0, 96).image for k in range(3)]
    batch = pr.predict(imgs)
    for img, r in zip(imgs, batch):
        single = pr.predict([img])[0]
        assert np.allclose(list(single["probabilities"].values()), list(r["probabilities"].values()), atol=1e-5)


def test_tampered_weights_refused(random_bundle, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(random_bundle, root)
    f = root / "resnet50.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="resnet50.*modified"):
        Bundle.load(root)


def test_mismatched_class_maps_refused(random_bundle, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(random_bundle, root)
    meta = json.loads((root / "bundle.json").read_text())
    meta["members"][1]["classes"] = list(reversed(meta["members"][1]["classes"]))
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ClassMapError, match="efficientnet_b1"):
        Bundle.load(root)


@pytest.mark.parametrize("weights,match", [
    ({"mobilenetv2": 0.5, "efficientnet_b1": 0.5, "resnet50": 0.5}, "sum to 1"),
    ({"mobilenetv2": -0.2, "efficientnet_b1": 0.8, "resnet50": 0.4}, "non-negative"),
    ({"mobilenetv2": 0.5, "efficientnet_b1": 0.5}, "exactly the members"),
])
def test_bad_weights_refused(random_bundle, tmp_path, weights, match):
    root = tmp_path / "b"
    shutil.copytree(random_bundle, root)
    meta = json.loads((root / "bundle.json").read_text())
    meta["weights"] = weights
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=match):
        Bundle.load(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def test_write_refuses_mismatched_members(tmp_path):
    m = create_model("mobilenetv2", num_classes=4, pretrained="none", input_size=64)
    with pytest.raises(ClassMapError):
        write_bundle(tmp_path / "b", ClassMap(), {"mobilenetv2": m})


def test_derive_never_overwrites(random_bundle, tmp_path):
    src = Bundle.load(random_bundle)
    new = derive_bundle(src, tmp_path / "v2", weights=(0.2, 0.2, 0.6), temperatures={"resnet50": 1.5})
    assert Bundle.load(tmp_path / "v2").weights == (0.2, 0.2, 0.6)
    assert new.provenance["parent"] == src.id and new.id != src.id
    assert Bundle.load(random_bundle).weights == (0.30, 0.30, 0.40)
    with pytest.raises(BundleError, match="never overwritten"):
        derive_bundle(src, tmp_path / "v2", weights=(0.2, 0.2, 0.6))


def test_output_stride_travels_with_the_bundle(tmp_path):
    """A member trained at stride 16 must come back at stride 16 (same weights, finer CAM map);
    bundles written before the option load at 32; a bad value is refused at load."""
    import torch
    from skin.gradcam import GradCAM
    m = create_model("mobilenetv2", 6, pretrained="none", input_size=64, output_stride=16).eval()
    b = write_bundle(tmp_path / "b", ClassMap(), {"mobilenetv2": m})
    loaded = Bundle.load(b.root).load_member("mobilenetv2")
    assert loaded.output_stride == 16
    x = torch.randn(1, 3, 64, 64)
    with GradCAM(loaded) as cam:
        logits, maps = cam(x)
    assert maps.shape[-2:] == (4, 4)
    torch.testing.assert_close(logits, m(x))

    data = json.loads((b.root / "bundle.json").read_text())
    data["members"][0]["output_stride"] = 12
    (b.root / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="output_stride must be one of"):
        Bundle.load(b.root)
    del data["members"][0]["output_stride"]  # an older bundle
    (b.root / "bundle.json").write_text(json.dumps(data))
    assert Bundle.load(b.root, verify=False).members[0].output_stride == 32


@pytest.mark.parametrize("native", [True, False])
def test_amp_bf16_predict_and_explain_agree(random_bundle, monkeypatch, native):
    """`skin predict --amp bf16` and the server's member path (MemberRunner with cam, as `amp: bf16` runs it)
    give the same probabilities; bf16 only where the CPU has it natively, fp32 otherwise; the maps
    stay fp32."""
    import torch
    import skin.device
    from skin.inference import MemberRunner
    from skin.presets import to_batch
    monkeypatch.setattr(skin.device, "cpu_has_native_bf16", lambda: native)
    b = Bundle.load(random_bundle)
    imgs = [make_sample(k, 0, 0, 96).image for k in range(2)]
    fp32 = Predictor(b).member_probs(imgs)
    bf16 = Predictor(b, amp="bf16").member_probs(imgs)
    members = b.load_members()
    for n, m in members.items():
        probs, maps = MemberRunner(m.eval(), b.entry(n).temperature, amp="bf16")(to_batch(imgs, m.data_config), cam=True)
        assert maps.dtype == torch.float32
        assert np.allclose(probs, bf16[n], atol=1e-5)
        assert np.allclose(bf16[n], fp32[n], atol=0.05)
    # (a random EfficientNet-B1's features are ~1e-5, too small for bf16 to move its probabilities)
    assert any(not np.array_equal(bf16[n], fp32[n]) for n in members) is native


def test_uncertain_flag_names_each_reason():
    """Low confidence and member disagreement each raise the flag with their own reason; a
    confident, unanimous answer does not."""
    import numpy as np
    from skin.ensemble import combine, describe
    classes = ["a", "b", "c"]
    w = {"m1": 0.5, "m2": 0.5}

    def answer(p1, p2, below=0.5):
        mp = {"m1": np.array(p1), "m2": np.array(p2)}
        return describe(combine(mp, w), mp, w, classes, below)

    sure = answer([0.9, 0.05, 0.05], [0.8, 0.1, 0.1])
    assert not sure["uncertain"] and sure["uncertain_reasons"] == []
    low = answer([0.46, 0.3, 0.24], [0.4, 0.35, 0.25])  # agree on "a", ensemble confidence 0.43
    assert low["uncertain"] and low["uncertain_reasons"] == ["confidence 0.43 is below 0.50"]
    split = answer([0.9, 0.1, 0.0], [0.3, 0.7, 0.0])  # ensemble 0.6 for "a", members disagree
    assert split["uncertain"] and split["uncertain_reasons"] == ["members disagree on the top class: m1=a, m2=b"]
    both = answer([0.5, 0.4, 0.1], [0.2, 0.3, 0.5], below=0.4)  # "a" at 0.35 < 0.4, and a vs c
    assert len(both["uncertain_reasons"]) == 2
    assert not answer([0.46, 0.3, 0.24], [0.4, 0.35, 0.25], below=0.4)["uncertain"]  # the threshold is used


@pytest.mark.parametrize("edit", ["output_stride", "temperature", "mean", "weights", "classes"])
def test_a_hand_edited_bundle_json_is_refused(random_bundle, tmp_path, edit):
    """The id is recomputed from the content on load: an entry edited by hand (stride 32 -> 8,
    a temperature, the normalisation, the weights, the class names) no longer answers under the
    old id. Metrics (descriptive) may change without changing the id."""
    root = tmp_path / "b"
    shutil.copytree(random_bundle, root)
    original = Bundle.load(root).id
    meta = json.loads((root / "bundle.json").read_text())
    m = meta["members"][2]
    if edit == "output_stride":
        m["output_stride"] = 8
    elif edit == "temperature":
        m["temperature"] = 2.0
    elif edit == "mean":
        m["data_config"]["mean"] = [0.5, 0.5, 0.5]
    elif edit == "weights":
        meta["weights"] = {"mobilenetv2": 0.2, "efficientnet_b1": 0.2, "resnet50": 0.6}
    else:
        meta["classes"][0] = "Infection"
        for e in meta["members"]:
            e["classes"][0] = "Infection"
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=f"edited after the bundle was written: its id is '{original}'"):
        Bundle.load(root)


def test_metrics_do_not_change_the_id_and_version_1_bundles_still_load(random_bundle, tmp_path):
    from skin.bundle import bundle_id, update_metrics
    root = tmp_path / "b"
    shutil.copytree(random_bundle, root)
    before = Bundle.load(root)
    assert update_metrics(root, {"test": {"accuracy": 0.5}}).id == before.id == Bundle.load(root).id
    meta = json.loads((root / "bundle.json").read_text())
    meta["format_version"] = 1  # an older bundle: its narrower id (names, hashes, weights, temperatures)
    meta["id"] = bundle_id(before.classes, before.members, before.weights, version=1)
    (root / "bundle.json").write_text(json.dumps(meta))
    assert Bundle.load(root).id == meta["id"]


def test_cam_stride_travels_with_the_bundle_and_never_changes_the_answer(random_bundle, tmp_path):
    from skin.bundle import derive_bundle
    b = Bundle.load(random_bundle)
    fine = derive_bundle(b, tmp_path / "fine", explanations={"resnet50": {"stride": 8}, "mobilenetv2": {"stride": 16}})
    loaded = Bundle.load(fine.root)
    assert {e.name: e.explanation.stride for e in loaded.members} == {"mobilenetv2": 16, "efficientnet_b1": None,
                                                                "resnet50": 8}
    assert loaded.id != b.id and all(e.output_stride == 32 for e in loaded.members)
    imgs = [make_sample(k, 0, 0, 96).image for k in range(2)]
    coarse = Predictor(b).member_outputs(imgs, cam=True)
    dense = Predictor(loaded).member_outputs(imgs, cam=True)
    for n in b.member_names:
        np.testing.assert_array_equal(dense[n][0], coarse[n][0])
    assert dense["resnet50"][1].shape[-2:] == (8, 8) and coarse["resnet50"][1].shape[-2:] == (2, 2)
    assert dense["mobilenetv2"][1].shape[-2:] == (4, 4) and dense["efficientnet_b1"][1].shape[-2:] == (2, 2)
    from skin.explanation import Overrides
    assert Predictor(b, explain=dict.fromkeys(b.member_names, Overrides(stride=8))).member_outputs(imgs, cam=True)["efficientnet_b1"][1].shape[-2:] == (8, 8)
    with pytest.raises(BundleError, match=r"resnet50: explanation stride \(cam_stride\) must be one of 8, 16, 32"):
        derive_bundle(b, tmp_path / "bad", explanations={"resnet50": {"stride": 12}})
    with pytest.raises(BundleError, match="not in the bundle"):
        derive_bundle(b, tmp_path / "bad2", explanations={"vgg": {"stride": 8}})


def test_cam_layer_travels_with_the_bundle_and_never_changes_the_answer(random_bundle, tmp_path):
    from skin.bundle import derive_bundle
    b = Bundle.load(random_bundle)
    other = derive_bundle(b, tmp_path / "layer", explanations={"mobilenetv2": {"stride": 8, "layer": "backbone.blocks.3"}})
    loaded = Bundle.load(other.root)
    assert {e.name: e.explanation.layer for e in loaded.members} == {"mobilenetv2": "backbone.blocks.3",
                                                               "efficientnet_b1": None, "resnet50": None}
    stride_only = derive_bundle(b, tmp_path / "stride", explanations={"mobilenetv2": {"stride": 8}})
    assert loaded.id != stride_only.id  # the id covers the layer
    imgs = [make_sample(k, 0, 0, 96).image for k in range(2)]
    before, after = Predictor(b).member_outputs(imgs, cam=True), Predictor(loaded).member_outputs(imgs, cam=True)
    for n in b.member_names:
        np.testing.assert_array_equal(after[n][0], before[n][0])
    assert after["mobilenetv2"][1].shape[-2:] == (8, 8)
    pooled = Predictor(stride_only).member_outputs(imgs, cam=True)["mobilenetv2"][1]  # the default layer, same stride
    assert not np.allclose(after["mobilenetv2"][1].numpy(), pooled.numpy())
    with pytest.raises(BundleError, match="has no layer 'backbone.nope'"):
        derive_bundle(b, tmp_path / "bad", explanations={"mobilenetv2": {"layer": "backbone.nope"}})
    with pytest.raises(BundleError, match="not in the bundle"):
        derive_bundle(b, tmp_path / "bad2", explanations={"vgg": {"layer": "backbone.blocks.3"}})


def _only_maps_change(before: Bundle, after: Bundle, changed: str, unchanged: str) -> None:
    """Every member answers the same in both bundles; `changed`'s maps differ, `unchanged`'s do not."""
    imgs = [make_sample(k, 0, 0, 96).image for k in range(2)]
    a, b = Predictor(before).member_outputs(imgs, cam=True), Predictor(after).member_outputs(imgs, cam=True)
    for n in before.member_names:
        np.testing.assert_array_equal(b[n][0], a[n][0])
    assert not np.allclose(b[changed][1].numpy(), a[changed][1].numpy())
    np.testing.assert_array_equal(b[unchanged][1].numpy(), a[unchanged][1].numpy())


def test_cam_method_travels_with_the_bundle_and_never_changes_the_answer(random_bundle, tmp_path):
    from skin.bundle import derive_bundle
    b = Bundle.load(random_bundle)
    layer = {"layer": "backbone.layer2"}
    grad = derive_bundle(b, tmp_path / "grad", explanations={"resnet50": layer})
    assert derive_bundle(b, tmp_path / "grad2", explanations={"resnet50": layer | {"method": "gradcam"}}).id == grad.id
    assert "cam_method" not in (grad.root / "bundle.json").read_text()  # the default is stored as no key
    lc = Bundle.load(derive_bundle(b, tmp_path / "lc", explanations={"resnet50": layer | {"method": "layercam"}}).root)
    assert {e.name: e.explanation.method for e in lc.members} == {"mobilenetv2": "gradcam", "efficientnet_b1": "gradcam",
                                                                    "resnet50": "layercam"}
    assert lc.id != grad.id  # the id covers the method
    _only_maps_change(grad, lc, changed="resnet50", unchanged="mobilenetv2")
    with pytest.raises(BundleError, match="one of gradcam, layercam"):
        derive_bundle(b, tmp_path / "bad", explanations={"resnet50": {"method": "scorecam"}})
    with pytest.raises(BundleError, match="not in the bundle"):
        derive_bundle(b, tmp_path / "bad2", explanations={"vgg": {"method": "layercam"}})
    # a hand-edited method is refused on load
    import json
    d = json.loads((lc.root / "bundle.json").read_text())
    d["members"][2]["cam_method"] = "scorecam"
    (lc.root / "bundle.json").write_text(json.dumps(d))
    with pytest.raises(BundleError):
        Bundle.load(lc.root)


def test_cam_smooth_travels_with_the_bundle_and_never_changes_the_answer(random_bundle, tmp_path):
    """Flip-averaged maps (cam_smooth="flips") are stored per member, covered by the id, used by every
    path that loads the bundle, and leave every member's probabilities as they were."""
    import json
    from skin.bundle import derive_bundle
    b = Bundle.load(random_bundle)
    assert derive_bundle(b, tmp_path / "same", explanations=dict.fromkeys(b.member_names, {"smooth": "none"})).id == b.id
    assert "cam_smooth" not in (tmp_path / "same" / "bundle.json").read_text()  # the default is stored as no key
    sm = Bundle.load(derive_bundle(b, tmp_path / "sm", explanations={"mobilenetv2": {"smooth": "flips"}}).root)
    assert {e.name: e.explanation.smooth for e in sm.members} == {"mobilenetv2": "flips", "efficientnet_b1": "none",
                                                                    "resnet50": "none"}
    assert sm.id != b.id
    _only_maps_change(b, sm, changed="mobilenetv2", unchanged="resnet50")
    with pytest.raises(BundleError, match="one of none, flips"):
        derive_bundle(b, tmp_path / "bad", explanations={"resnet50": {"smooth": "rotations"}})
    d = json.loads((sm.root / "bundle.json").read_text())
    d["members"][0]["cam_smooth"] = "rotations"  # a hand-edited value is refused on load
    (sm.root / "bundle.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="mobilenetv2"):
        Bundle.load(sm.root)
