import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image

from skin.gradcam import GradCAM, ensemble_map, normalize, upsample
from skin.explanation import Explanation, ExplanationError
from skin.inference import MemberRunner
from skin.render import overlay, png_bytes
from skin.registry import DEFAULT_MEMBERS, create_model

SIZE = 96


def _member(name: str, seed: int = 0):
    """A seeded random member whose maps are well above float noise: BN scales drawn in
    [0.5, 1.5] (random init zeroes the residual ones) and the last Linear scaled so the
    largest map value is about 10."""
    torch.manual_seed(seed)
    m = create_model(name, 6, pretrained="none", input_size=SIZE).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
    x = torch.randn(2, 3, SIZE, SIZE)
    with GradCAM(m) as cam:
        _, maps = cam(x)
    with torch.no_grad():
        m.head[-1].weight.mul_(10 / maps.max().clamp_min(1e-12))
    return m, x


@pytest.fixture(scope="module", params=DEFAULT_MEMBERS)
def member_and_input(request):
    return _member(request.param)


def test_fast_path_matches_pytorch_grad_cam(member_and_input):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    member, x = member_and_input
    with GradCAM(member) as cam:
        assert cam.fast
        _, maps = cam(x)
    layer = member.get_submodule(member.spec.cam_layer)
    with ReferenceGradCAM(model=member, target_layers=[layer]) as ref:
        for k in range(6):
            expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x))
            ours = normalize(upsample(maps[:, k], (SIZE, SIZE))).numpy()
            # both are min-max normalised (peak 1, or all 0 where ReLU leaves nothing)
            rel = np.abs(ours - expected).max() / max(float(np.abs(expected).max()), 1.0)
            assert rel <= 1e-4, (member.spec.name, k, rel)


def test_fast_and_general_paths_agree(member_and_input):
    member, x = member_and_input
    with GradCAM(member, fast=True) as cam:
        logits_f, fast = cam(x)
    with GradCAM(member, fast=False) as cam:
        logits_g, general = cam(x)
    torch.testing.assert_close(logits_f, logits_g, rtol=1e-4, atol=1e-5)
    assert ((fast - general).abs().max() / general.abs().max()) < 1e-4


def test_batch_equals_one_at_a_time(member_and_input):
    member, x = member_and_input
    with GradCAM(member) as cam:
        _, batch = cam(x)
        singles = torch.cat([cam(x[i:i + 1])[1] for i in range(len(x))])
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-5)


def test_hooks_released_and_no_growth():
    member, x = _member("resnet50")
    layer = member.get_submodule(member.spec.cam_layer)
    with GradCAM(member, fast=False) as cam:
        cam(x[:1])
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0
    with pytest.raises(ZeroDivisionError):  # released even when the body raises
        with GradCAM(member, fast=False):
            1 / 0
    assert len(layer._forward_hooks) == 0
    gc.collect()
    before = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    for _ in range(100):
        with GradCAM(member) as cam:
            cam(x[:1])
    gc.collect()
    after = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    assert after - before < 10
    assert len(layer._forward_hooks) == 0


def test_train_mode_refused():
    member, x = _member("mobilenetv2")
    member.train()
    with pytest.raises(RuntimeError, match="eval"):
        with GradCAM(member) as cam:
            cam(x)


def test_general_path_on_another_layer():
    member, x = _member("resnet50")
    with GradCAM(member, layer="backbone.layer3") as cam:
        assert not cam.fast
        _, maps = cam(x)
    assert maps.shape == (2, 6, SIZE // 16, SIZE // 16)
    with pytest.raises(ValueError, match="one-pass"):
        GradCAM(member, layer="backbone.layer3", fast=True)
    with pytest.raises(AttributeError):
        GradCAM(member, layer="backbone.nope")


def test_maps_have_the_image_size_and_overlay():
    members = {n: _member(n)[0] for n in DEFAULT_MEMBERS}
    x = torch.randn(1, 3, SIZE, SIZE)
    maps = {n: MemberRunner(m)(x, cam=True)[1][0, 2] for n, m in members.items()}
    img = Image.new("RGB", (150, 100), (200, 160, 140))
    cam = ensemble_map(maps, {"mobilenetv2": 0.3, "efficientnet_b1": 0.3, "resnet50": 0.4}, (100, 150))
    assert cam.shape == (100, 150) and 0 <= cam.min() and cam.max() <= 1
    out = overlay(img, cam, alpha=0.5)
    assert out.size == img.size
    assert png_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(overlay(img, cam, alpha=0.0)), np.asarray(img))
    with pytest.raises(ValueError):
        overlay(img, cam, alpha=1.5)
    # built at the members' input size and resized once: the same picture as at the image's size
    fast = ensemble_map(maps, {"mobilenetv2": 0.3, "efficientnet_b1": 0.3, "resnet50": 0.4}, (100, 150),
                        (SIZE, SIZE))
    assert fast.shape == (100, 150) and np.abs(fast - cam).mean() < 0.05
    # the overlay's colours are Matplotlib's colormap
    import matplotlib
    want = (matplotlib.colormaps["jet"](cam)[..., :3] * 255 + 0.5).astype(np.uint8)
    got = np.asarray(overlay(img, cam, alpha=1.0)).astype(int)
    assert np.abs(got - want).max() <= 1  # float32 blending vs float64: rounding at .5 only


def test_normalisation_ignores_the_maps_scale():
    # an untrained member's maps span ~1e-8: an absolute epsilon squeezed them below 1 and so
    # weighed that member down in the ensemble map (the untrained-copy baseline read too high)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 8, 8, generator=g)
    for scale in (1e-9, 1e-3, 1e4):
        assert torch.allclose(normalize(maps * scale), normalize(maps), atol=1e-5), scale
    small = {"a": maps[0] * 3e-8, "b": maps[1]}
    same = {"a": maps[0], "b": maps[1]}
    w = {"a": 0.5, "b": 0.5}
    assert np.abs(ensemble_map(small, w, (16, 16)) - ensemble_map(same, w, (16, 16))).max() < 1e-4
    # flat maps (zero, constant, or constant up to float noise) become zeros, not noise blown up to 1
    for flat in (torch.zeros(8, 8), torch.full((8, 8), 5.0), 5.0 + 1e-7 * torch.rand(8, 8, generator=g)):
        assert normalize(flat).abs().max() == 0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_png_bytes_round_trip_exactly(mode):
    rng = np.random.default_rng(0)
    shape = (37, 53, 3) if mode == "RGB" else (37, 53)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    back = Image.open(io.BytesIO(png_bytes(img)))
    assert back.format == "PNG" and back.mode == mode and back.size == (53, 37)
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_overlay_blends_like_float_arithmetic():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB")
    cam = rng.random((40, 60)).astype(np.float32)
    import matplotlib
    heat = matplotlib.colormaps["jet"](np.minimum((cam * 256).astype(int), 255))[..., :3] * 255  # int: table index
    want = 0.6 * np.asarray(img, np.float64) + 0.4 * heat
    got = np.asarray(overlay(img, cam, alpha=0.4)).astype(float)
    assert np.abs(got - want).max() <= 1.0


@pytest.mark.parametrize("name", DEFAULT_MEMBERS)
def test_dense_map_matches_pytorch_grad_cam_on_the_dense_model_and_keeps_the_answer(name):
    """Maps at stride 8 come from the same weights with dilated last stages: on that dense model our
    one-pass map equals pytorch-grad-cam's; through MemberRunner(cam_stride=8) the answer is the
    trained stride's, exactly, and the maps are 4x finer on each side."""
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from skin.registry import restride
    member, x = _member(name)
    dense = restride(member, 8)
    assert dense.output_stride == 8 and member.output_stride == 32 and not dense.training
    with GradCAM(dense) as cam:
        _, maps = cam(x)
    with ReferenceGradCAM(model=dense, target_layers=[dense.get_submodule(dense.spec.cam_layer)]) as ref:
        for k in (0, 3):
            expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x))
            ours = normalize(upsample(maps[:, k], (SIZE, SIZE))).numpy()
            assert np.abs(ours - expected).max() / max(float(np.abs(expected).max()), 1.0) <= 1e-4, (name, k)
    coarse_p, coarse = MemberRunner(member)(x, cam=True)
    fine_p, fine = MemberRunner(member, explanation=Explanation(stride=8))(x, cam=True)
    np.testing.assert_array_equal(fine_p, coarse_p)  # the answer never depends on the map's stride
    assert fine.shape[-2:] == (SIZE // 8, SIZE // 8) and coarse.shape[-2:] == (SIZE // 32, SIZE // 32)
    # the dense map is weighted by the trained member's gradient (its Jacobian at the trained pooling)
    with torch.no_grad():
        z = member.pool(member.forward_features(x))
    jac = torch.autograd.functional.jacobian(lambda v: member.forward_head(v).sum(0), z)  # (C, B, K)
    feats = dense.forward_features(x).detach()
    want = torch.relu(torch.einsum("cbk,bkhw->bchw", jac, feats)) / (SIZE // 32) ** 2
    torch.testing.assert_close(fine, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_map_at_another_layer_matches_pytorch_grad_cam_on_the_dense_model_and_keeps_the_answer():
    """cam_layer: the maps by the general path at that layer of the stride-8 model (what the demo
    serves for its depthwise members); equal to pytorch-grad-cam there; the answer stays the
    trained stride's, exactly."""
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    member, x = _member("mobilenetv2")
    run = MemberRunner(member, explanation=Explanation(stride=8, layer="backbone.blocks.3"))
    probs, maps = run(x, cam=True)
    np.testing.assert_array_equal(probs, MemberRunner(member)(x)[0])
    assert maps.shape == (len(x), 6, SIZE // 8, SIZE // 8)
    dense = run.cam_member
    with ReferenceGradCAM(model=dense, target_layers=[dense.get_submodule("backbone.blocks.3")]) as ref:
        for k in (0, 3):
            expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x))
            ours = normalize(upsample(maps[:, k], (SIZE, SIZE))).numpy()
            assert np.abs(ours - expected).max() / max(float(np.abs(expected).max()), 1.0) <= 1e-4, k
    # the default layer is the one-pass path: naming it changes nothing
    assert MemberRunner(member, explanation=Explanation(layer=member.spec.cam_layer)).explanation.layer is None
    with pytest.raises(ExplanationError, match="has no layer 'backbone.blocks.99'"):
        MemberRunner(member, explanation=Explanation(layer="backbone.blocks.99"))


def test_layercam_matches_pytorch_grad_cam_at_a_shallow_layer_and_keeps_the_answer():
    """cam_method="layercam": per position, ReLU(gradient) x activation (Jiang et al. 2021), equal to
    pytorch-grad-cam's LayerCAM on the model the map is computed from; the answer stays the trained
    stride's, exactly; at a shallow layer it differs from Grad-CAM."""
    from pytorch_grad_cam import LayerCAM as ReferenceLayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    member, x = _member("resnet50")
    run = MemberRunner(member, explanation=Explanation(stride=8, layer="backbone.layer2", method="layercam"))
    probs, maps = run(x, cam=True)
    np.testing.assert_array_equal(probs, MemberRunner(member)(x)[0])
    dense = run.cam_member
    with ReferenceLayerCAM(model=dense, target_layers=[dense.get_submodule("backbone.layer2")]) as ref:
        for k in (0, 3, 5):
            expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x))
            ours = normalize(upsample(maps[:, k], (SIZE, SIZE))).numpy()
            assert np.abs(ours - expected).max() / max(float(np.abs(expected).max()), 1.0) <= 1e-4, k
    grad = MemberRunner(member, explanation=Explanation(stride=8, layer="backbone.layer2"))(x, cam=True)[1]
    assert not torch.allclose(normalize(grad), normalize(maps), atol=1e-2)
    with pytest.raises(ValueError, match="one of gradcam, layercam"):
        MemberRunner(member, explanation=Explanation(method="scorecam"))


def test_layercam_keeps_the_one_pass_path_where_the_gradient_is_constant(member_and_input):
    """At the layer feeding the pooling the gradient is the same at every position: LayerCAM is
    Grad-CAM with ReLU'd channel weights, from the one pass, equal to pytorch-grad-cam's LayerCAM."""
    from pytorch_grad_cam import LayerCAM as ReferenceLayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    member, x = member_and_input
    with GradCAM(member, method="layercam") as cam:
        assert cam.fast
        _, fast = cam(x)
    with GradCAM(member, fast=False, method="layercam") as cam:
        _, general = cam(x)
    assert ((fast - general).abs().max() / general.abs().max()) < 1e-4
    with ReferenceLayerCAM(model=member, target_layers=[member.get_submodule(member.spec.cam_layer)]) as ref:
        for k in (1, 4):
            expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x))
            ours = normalize(upsample(fast[:, k], (SIZE, SIZE))).numpy()
            assert np.abs(ours - expected).max() / max(float(np.abs(expected).max()), 1.0) <= 1e-4, k


def _aug_smooth_reference(cls, model, layer: str, x: torch.Tensor, k: int, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's aug_smooth over ttach's four flips, its maps kept at the feature size `size`
    (its per-view min-max normalisation then happens where ours does; no resize)."""
    import ttach as tta
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with cls(model=model, target_layers=[model.get_submodule(layer)]) as ref:
        ref.tta_transforms = tta.Compose([tta.HorizontalFlip(), tta.VerticalFlip()])  # its subclasses take no argument for it
        ref.get_target_width_height = lambda t: (size[1], size[0])
        return ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x), aug_smooth=True)


@pytest.mark.parametrize("name, layer, method", [("mobilenetv2", "backbone.blocks.3", "layercam"),
                                                  ("resnet50", None, "gradcam")])
def test_flip_smoothed_maps_match_pytorch_grad_cam_aug_smooth_and_keep_the_answer(name, layer, method):
    """cam_smooth="flips": each map the mean of the four flips' maps, each normalised and flipped back:
    pytorch-grad-cam's aug_smooth with ttach's flips, on the model the map comes from (the general
    path at a shallow layer of the stride-8 copy; the one-pass path at the pooled layer). The answer
    is the unflipped image's, exactly."""
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM, LayerCAM as ReferenceLayerCAM
    member, x = _member(name)
    x = x[:, :, :, : SIZE - 32]  # not square: a flip that swapped the axes would show
    # a shallow layer: the general path on the stride-8 copy; the pooled layer: the one pass on the trained model
    run = MemberRunner(member, explanation=Explanation(stride=8 if layer else None, layer=layer, method=method, smooth="flips"))
    probs, maps = run(x, cam=True)
    np.testing.assert_array_equal(probs, MemberRunner(member)(x)[0])
    model = run.cam_member if layer else member
    cls = ReferenceLayerCAM if method == "layercam" else ReferenceGradCAM
    for k in (0, 3):
        expected = _aug_smooth_reference(cls, model, layer or member.spec.cam_layer, x, k, tuple(maps.shape[-2:]))
        assert np.abs(maps[:, k].numpy() - expected).max() <= 1e-4, (name, k)


def test_flip_smoothed_maps_follow_a_flip_of_the_image():
    """The smoothed map of a flipped image is the flipped map of the image (the four views are a
    group); the unsmoothed maps of the stride-8 copy are not (strided convolutions are not
    flip-symmetric), so the property is the smoothing's."""
    member, x = _member("mobilenetv2")
    smooth = MemberRunner(member, explanation=Explanation(stride=8, layer="backbone.blocks.3", method="layercam", smooth="flips"))
    plain = MemberRunner(member, explanation=Explanation(stride=8, layer="backbone.blocks.3", method="layercam"))
    for dims in ((-1,), (-2,)):
        torch.testing.assert_close(smooth(x.flip(dims), cam=True)[1], smooth(x, cam=True)[1].flip(dims),
                                   rtol=1e-4, atol=1e-5)
        a, b = normalize(plain(x.flip(dims), cam=True)[1]), normalize(plain(x, cam=True)[1]).flip(dims)
        assert (a - b).abs().max() > 1e-2
    with pytest.raises(ValueError, match="one of none, flips"):
        MemberRunner(member, explanation=Explanation(smooth="rotations"))


@pytest.mark.parametrize("layer, smooth", [(None, "none"), ("backbone.blocks.3", "none"), ("backbone.blocks.3", "flips")])
def test_class_maps_are_the_all_class_maps_at_each_images_class(layer, smooth):
    """MemberRunner.class_maps (one backward on the general path, for scoring) gives each image the
    map the all-class path gives it for that class: one-pass, general, flip-averaged."""
    member, x = _member("mobilenetv2")
    run = MemberRunner(member, explanation=Explanation(stride=8, layer=layer, method="layercam", smooth=smooth))
    classes = torch.tensor([4, 1])
    want = run(x, cam=True)[1][torch.arange(len(x)), classes]
    got = run.class_maps(x, classes)
    assert got.shape == want.shape == (len(x), SIZE // 8, SIZE // 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
