import os
import time

import pytest
import torch
from safetensors.torch import save_file

from skin.presets import eval_preset, train_preset
from skin.registry import (DEFAULT_MEMBERS, PretrainedWeightsError, UnknownBackboneError,
                           count_parameters, create_model, get_spec)

HEAD_PARAMS = {"mobilenetv2": 788_742, "efficientnet_b1": 658_950, "resnet50": 2_629_126}


@pytest.fixture(scope="module", params=DEFAULT_MEMBERS)
def member(request):
    torch.manual_seed(0)
    return create_model(request.param, num_classes=6, pretrained="none", input_size=64)


def test_contract(member):
    x = torch.randn(2, 3, 64, 64)
    member.train()
    feats = member.forward_features(x)
    assert feats.ndim == 4 and feats.shape[1] == member.spec.features
    pooled = member.pool(feats)
    assert pooled.shape == (2, member.spec.features)
    logits = member.forward_head(pooled)
    assert logits.shape == (2, 6)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert member.head[-1].weight.grad is not None and member.head[-1].weight.grad.abs().sum() > 0
    first_conv = next(p for p in member.backbone.parameters() if p.ndim == 4)
    assert first_conv.grad is not None


def test_head_parameter_counts(member):
    assert count_parameters(member.head) == HEAD_PARAMS[member.spec.name]


def test_cam_layer_resolves_to_the_feature_map(member):
    member.eval()
    layer = member.get_submodule(member.spec.cam_layer)
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        x = torch.randn(1, 3, 64, 64)
        feats = member.forward_features(x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["out"], feats)


def test_presets_follow_the_spec(member):
    from PIL import Image
    img = Image.new("RGB", (120, 90), (200, 150, 120))
    cfg = member.data_config
    assert eval_preset(cfg)(img).shape == (3, cfg.input_size, cfg.input_size)
    assert train_preset(cfg)(img).shape == (3, cfg.input_size, cfg.input_size)
    assert cfg.mean == tuple(get_spec(member.spec.name).data_config().mean)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownBackboneError) as e:
        create_model("vgg16", pretrained="none")
    for n in DEFAULT_MEMBERS:
        assert n in str(e.value)


def test_dropout_override():
    m = create_model("mobilenetv2", pretrained="none", dropout=0.1)
    assert m.head_config.dropout == (0.1, 0.1, 0.1)
    m = create_model("efficientnet_b1", pretrained="none", dropout=[0.2, 0.5])
    assert [l.p for l in m.head if isinstance(l, torch.nn.Dropout)] == [0.2, 0.5]
    with pytest.raises(ValueError, match="dropout rates"):
        create_model("efficientnet_b1", pretrained="none", dropout=[0.2, 0.5, 0.1])


def test_imagenet_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as e:
        create_model("mobilenetv2", pretrained="imagenet")
    assert "--pretrained" in str(e.value) and "none" in str(e.value)
    assert time.perf_counter() - t0 < 30  # not the hub's minute of retries


def test_unreachable_hub_goes_offline_for_that_load_only(monkeypatch):
    """With no network the load fails fast with the fix, and the process is left as it was: no
    HF_HUB_OFFLINE set behind the caller's back (a later load, once the network is back, still tries)."""
    import huggingface_hub.constants as hub
    import skin.registry as registry
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=3.0: False)
    seen = []
    real = registry.timm.create_model
    monkeypatch.setattr(registry.timm, "create_model", lambda *a, **kw: seen.append(
        (os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE)) or real(*a, **kw))
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsError):
        create_model("mobilenetv2", pretrained="imagenet")
    assert time.perf_counter() - t0 < 30
    assert seen == [("1", True)]  # offline during the load ...
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False  # ... and only then


def test_local_weights_file_and_folder(tmp_path):
    torch.manual_seed(1)
    src = create_model("mobilenetv2", pretrained="none")
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()},
              str(tmp_path / "mobilenetv2.safetensors"))
    for source in (tmp_path / "mobilenetv2.safetensors", tmp_path):
        m = create_model("mobilenetv2", pretrained=source)
        torch.testing.assert_close(m.backbone.conv_stem.weight, src.backbone.conv_stem.weight)
    with pytest.raises(PretrainedWeightsError, match="no weights for resnet50"):
        create_model("resnet50", pretrained=tmp_path)


def test_per_image_norm_only_for_random_init(tmp_path):
    with pytest.raises(ValueError, match="random init only"):
        create_model("resnet50", pretrained=tmp_path, normalize="per_image")


def test_zero_init_last_bn_for_random_init():
    m = create_model("efficientnet_b1", pretrained="none")
    zeroed = [b for b in m.backbone.modules() if getattr(b, "has_skip", False)]
    assert zeroed and all(b.bn3.weight.abs().sum() == 0 for b in zeroed if hasattr(b, "bn3"))


@pytest.mark.parametrize("name", DEFAULT_MEMBERS)
def test_output_stride_makes_the_cam_map_finer(name):
    """Same parameters (the weights load unchanged), a 4x4 instead of 2x2 map at 64 px."""
    coarse = create_model(name, pretrained="none", input_size=64)
    fine = create_model(name, pretrained="none", input_size=64, output_stride=16)
    fine.load_state_dict(coarse.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert coarse.forward_features(x).shape[-2:] == (2, 2)
    assert fine.forward_features(x).shape[-2:] == (4, 4)
    assert fine.metadata()["output_stride"] == 16
    with pytest.raises(ValueError, match="output_stride must be one of"):
        create_model(name, pretrained="none", output_stride=4)
