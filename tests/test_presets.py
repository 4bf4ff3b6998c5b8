"""The train preset's two halves: geometry per image in the loader, per-pixel work batched on the
training device. The batched half must do what torchvision's per-image transforms do."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from skin.data import load_classes
from skin.presets import BatchAugment, color_jitter, rotate, shift_hue, train_preset
from skin.registry import DataConfig, create_model
from skin.train import LocalRuntime, TrainConfig, loaders


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 24, 30, generator=g) * 0.9 + 0.05


def test_colour_jitter_matches_torchvision_per_image(images):
    b = torch.tensor([0.8, 1.0, 1.15, 1.2])
    c = torch.tensor([1.2, 0.85, 1.0, 0.8])
    s = torch.tensor([0.9, 1.1, 1.15, 0.85])
    h = torch.tensor([0.02, -0.02, 0.0, 0.013])
    got = color_jitter(images.clone(), b, c, s, h)
    for i in range(len(images)):
        want = F.adjust_brightness(images[i], float(b[i]))
        want = F.adjust_contrast(want, float(c[i]))
        want = F.adjust_saturation(want, float(s[i]))
        want = F.adjust_hue(want, float(h[i]))
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_hue_shift_matches_torchvision_and_leaves_grey_alone(images):
    for hue in (0.3, -0.45, 0.5):
        got = shift_hue(images, torch.full((4,), hue))
        for i in range(4):
            torch.testing.assert_close(got[i], F.adjust_hue(images[i], hue), atol=1e-5, rtol=0)
    grey = images.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    torch.testing.assert_close(shift_hue(grey, torch.full((4,), 0.25)), grey, atol=1e-6, rtol=0)


def test_rotation_matches_torchvision():
    x = torch.rand(3, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    angles = torch.tensor([17.0, -33.0, 90.0])
    got = rotate(x, angles)
    for i, a in enumerate(angles.tolist()):
        want = F.rotate(x[i], a, interpolation=F.InterpolationMode.BILINEAR)
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=0)


def test_neutral_factors_are_the_identity(images):
    one = torch.ones(4)
    torch.testing.assert_close(color_jitter(images.clone(), one, one, one, one * 0), images, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(images, one * 0), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strength", ["standard", "light"])
def test_split_preset_gives_normalised_float_batches(strength):
    torch.manual_seed(0)  # the preset draws from torch's RNG (crop, flips, per-image factors)
    cfg = DataConfig(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    preset = train_preset(cfg, strength)
    img = Image.fromarray((np.random.default_rng(0).random((60, 70, 3)) * 255).astype(np.uint8))
    u8 = torch.stack([preset.sample(img) for _ in range(5)])
    assert u8.dtype == torch.uint8 and u8.shape == (5, 3, 48, 48)  # the loader ships uint8
    out = preset.batch(u8)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 48, 48)
    if strength == "light":  # no per-pixel randomness: exactly scale + normalise
        torch.testing.assert_close(out, (u8.float() / 255 - 0.5) / 0.25)
    else:  # per-image random factors: no two of the five copies are equal
        assert all(not torch.allclose(out[i], out[j]) for i in range(5) for j in range(i + 1, 5))
    assert preset(img).shape == (3, 48, 48)


def test_per_image_normalisation_in_the_batch_half():
    cfg = DataConfig(32, (0.5,) * 3, (0.25,) * 3, normalize="per_image")
    out = BatchAugment(cfg, "light")(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(3, 3), atol=1e-5, rtol=0)


def test_loader_ships_uint8_to_a_gpu_and_floats_on_a_cpu(scanned, tmp_path):
    """Placement: the GPU path gets uint8 batches plus the batch half to run on the device; the
    CPU path keeps the whole preset in the loader."""
    classes = load_classes(scanned)
    member = create_model("mobilenetv2", len(classes), pretrained="none", input_size=32)
    cfg = TrainConfig(backbone="mobilenetv2", data_dir=str(scanned), image_size=32, pretrained="none",
                      batch_size=4, num_workers=0, use_cache=False)
    for device, dtype in (("cuda", torch.uint8), ("cpu", torch.float32)):
        rt = LocalRuntime(str(tmp_path / device), device=torch.device(device), cpus=1.0)
        with warnings.catch_warnings():  # pin_memory without an accelerator warns
            warnings.simplefilter("ignore")
            train, _, _, augment, _ = loaders(cfg, member, classes, rt)
            x, y, _ = next(iter(train))
        assert x.dtype == dtype
        assert (augment is not None) == (device == "cuda")



def test_the_served_tensor_equals_the_eval_preset(random_bundle):
    """The Serve path splits the eval preset: the ingress resizes (service.dataplane.prepare_inputs, uint8)
    and the member normalises (eval_pixels, as MemberModel runs it on a batch). Together they
    give the eval preset's tensor for every member."""
    import torch
    from PIL import Image
    from service.dataplane import prepare_inputs
    from skin.bundle import Bundle
    from skin.presets import eval_pixels, eval_preset
    b = Bundle.load(random_bundle)
    cfgs = {e.name: e.data_config for e in b.members}
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8))
    sent = prepare_inputs(cfgs, img)
    for name, cfg in cfgs.items():
        assert sent[name].dtype == np.uint8
        served = eval_pixels(cfg)(torch.from_numpy(np.stack([sent[name]])))
        torch.testing.assert_close(served, eval_preset(cfg)(img)[None], atol=1e-6, rtol=0)


def test_device_batches_equal_the_eval_preset():
    """skin.presets.eval_batches (what Predictor runs: each upload sent to the device once as uint8,
    resized and normalised there) gives the eval preset's tensors, one batch per distinct config,
    for images of different sizes (on a CPU to float rounding: per-image
    standardisation reduces a batch at once)."""
    from skin.presets import eval_batches, to_batch
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((97, 131), (240, 180))]
    cfgs = [DataConfig(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
            DataConfig(48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interpolation="bilinear"),
            DataConfig(64, (0, 0, 0), (1, 1, 1), normalize="per_image")]
    got = eval_batches(imgs, cfgs + [DataConfig(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))], "cpu")
    assert len(got) == 3
    for cfg in cfgs:
        assert got[cfg].shape == (2, 3, cfg.input_size, cfg.input_size)
        torch.testing.assert_close(got[cfg], to_batch(imgs, cfg), atol=1e-6, rtol=0)
