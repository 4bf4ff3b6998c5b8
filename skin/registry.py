"""Backbone registry: one frozen spec per backbone, one `create_model` for every member.

The three members differ only in their spec entries. Every member exposes the same contract,
used by training, ensembling and Grad-CAM alike:

    features = member.forward_features(x)   # last conv feature map, (B, F, h, w): the CAM layer
    pooled   = member.pool(features)         # global average pool, (B, F)
    logits   = member.forward_head(pooled)   # the custom head, (B, C)
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import timm
import torch
from torch import nn


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for and cannot be had."""


@dataclass(frozen=True)
class HeadConfig:
    """Head layers: Dropout before every Linear; optional BatchNorm1d after each hidden Linear."""

    hidden: tuple[int, ...]
    dropout: tuple[float, ...]  # one rate per Linear: len(hidden) + 1
    batchnorm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "dropout", tuple(float(p) for p in self.dropout))
        if len(self.dropout) != len(self.hidden) + 1:
            raise ValueError(
                f"the head needs {len(self.hidden) + 1} dropout rates (one per Linear), "
                f"got {len(self.dropout)}: {list(self.dropout)}"
            )
        if any(not 0.0 <= p < 1.0 for p in self.dropout):
            raise ValueError(f"dropout rates must be in [0, 1), got {list(self.dropout)}")

    def with_dropout(self, dropout: float | Sequence[float] | None) -> "HeadConfig":
        """A float sets every rate; a sequence gives one rate per Linear."""
        if dropout is None:
            return self
        rates = [dropout] * len(self.dropout) if isinstance(dropout, (int, float)) else list(dropout)
        return replace(self, dropout=tuple(rates))

    def to_json(self) -> dict:
        return {"hidden": list(self.hidden), "dropout": list(self.dropout), "batchnorm": self.batchnorm}

    @classmethod
    def from_json(cls, d: dict) -> "HeadConfig":
        return cls(tuple(d["hidden"]), tuple(d["dropout"]), bool(d.get("batchnorm", False)))


@dataclass(frozen=True)
class DataConfig:
    """How a member's input is prepared; saved in every checkpoint and bundle."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # the eval preset's resize and the training cache's
    # "mean_std": the weights' own statistics. "per_image": each image standardised by its own
    # per-channel mean/std; only for random init (it helped ~0.06 macro-F1 from scratch here).
    normalize: str = "mean_std"

    def __post_init__(self) -> None:
        if self.normalize not in ("mean_std", "per_image"):
            raise ValueError(f"normalize must be 'mean_std' or 'per_image', got {self.normalize!r}")
        if self.input_size < 16:
            raise ValueError(f"input_size must be at least 16 px, got {self.input_size}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_json(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> "DataConfig":
        # fields this version no longer has (crop_pct: the eval preset resizes the whole image, it
        # never crops) are ignored, so older checkpoints and bundles load
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    weight_tag: str
    features: int
    cam_layer: str  # dotted path inside the member; its output is `forward_features`
    head: HeadConfig
    lr: float  # default peak learning rate of this member's head (backbone gets lr * backbone_lr_mult)
    cam_fast_path: bool = True  # CAM layer is followed directly by global average pool + head

    @property
    def timm_id(self) -> str:
        return f"{self.timm_name}.{self.weight_tag}"

    def data_config(self, input_size: int | None = None, normalize: str = "mean_std") -> DataConfig:
        """The weights' own preprocessing (timm's pretrained cfg, known offline); size overridable."""
        cfg = timm.models.get_pretrained_cfg(self.timm_id)
        return DataConfig(
            input_size=int(input_size or cfg.input_size[-1]),
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            interpolation=cfg.interpolation or "bicubic",
            normalize=normalize,
        )


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


register(BackboneSpec(
    "mobilenetv2", "mobilenetv2_100", "ra_in1k", 1280, "backbone.bn2",
    HeadConfig(hidden=(512, 256), dropout=(0.3, 0.3, 0.3)), lr=2e-3,
))
register(BackboneSpec(
    "efficientnet_b1", "efficientnet_b1", "ft_in1k", 1280, "backbone.bn2",
    HeadConfig(hidden=(512,), dropout=(0.3, 0.3)), lr=2e-3,
))
register(BackboneSpec(
    "resnet50", "resnet50", "a1_in1k", 2048, "backbone.layer4",
    HeadConfig(hidden=(1024, 512), dropout=(0.4, 0.4, 0.3), batchnorm=True), lr=1e-3,
))

DEFAULT_MEMBERS = ("mobilenetv2", "efficientnet_b1", "resnet50")
DEFAULT_WEIGHTS = (0.30, 0.30, 0.40)


def list_backbones() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; valid names: {', '.join(_REGISTRY)}"
        ) from None


def build_head(in_features: int, cfg: HeadConfig, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for p, hidden in zip(cfg.dropout, cfg.hidden):
        layers += [nn.Dropout(p), nn.Linear(width, hidden)]
        if cfg.batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
        width = hidden
    layers += [nn.Dropout(cfg.dropout[-1]), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class Member(nn.Module):
    """A timm backbone (num_classes=0) with the spec's custom head."""

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, head_cfg: HeadConfig,
                 num_classes: int, data_config: DataConfig, output_stride: int = 32) -> None:
        super().__init__()
        self.output_stride = output_stride
        self.spec = spec
        self.head_config = head_cfg
        self.num_classes = num_classes
        self.data_config = data_config
        self.backbone = backbone
        self.head = build_head(spec.features, head_cfg, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(features, pre_logits=True)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.pool(self.forward_features(x)))

    def metadata(self) -> dict:
        """What a checkpoint needs besides the weights to rebuild this member."""
        return {
            "backbone": self.spec.name,
            "num_classes": self.num_classes,
            "head": self.head_config.to_json(),
            "data_config": self.data_config.to_json(),
            "output_stride": self.output_stride,
        }


def zero_init_residual_bn(backbone: nn.Module) -> int:
    """Zero the scale of the last BatchNorm in every residual block, so each block starts as an
    identity (Goyal et al. 2017, sec. 5.1). timm does this for ResNet only; from scratch,
    EfficientNet-B1 stalled at 0.49-0.74 macro-F1 here without it. Returns blocks touched."""
    touched = 0
    for module in backbone.modules():
        if getattr(module, "has_skip", False):
            norms = [m for m in module.children() if isinstance(m, nn.BatchNorm2d)]
            if norms:
                nn.init.zeros_(norms[-1].weight)
                touched += 1
        elif hasattr(module, "zero_init_last") and callable(module.zero_init_last):
            module.zero_init_last()
            touched += 1
    return touched


@contextmanager
def hub_offline(on: bool):
    """The Hugging Face hub in offline mode inside the block only, when `on` (the environment variable
    and huggingface_hub's constant, read at its import), restored after: the process is left as it was."""
    if not on:
        yield
        return
    import huggingface_hub.constants as hub
    env, const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = const
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _weights_file(spec: BackboneSpec, source: Path) -> Path:
    """A file, or a folder holding `<backbone>.safetensors`, `<timm id>.safetensors`, or a
    `<timm id>/` (hub-style) folder with model.safetensors / pytorch_model.bin."""
    if source.is_file():
        return source
    if source.is_dir():
        candidates = [
            source / f"{spec.name}.safetensors",
            source / f"{spec.timm_id}.safetensors",
            source / f"{spec.timm_name}.safetensors",
            source / spec.timm_id / "model.safetensors",
            source / spec.timm_id / "pytorch_model.bin",
        ]
        for c in candidates:
            if c.is_file():
                return c
        raise PretrainedWeightsError(
            f"no weights for {spec.name} in {source}; looked for "
            + ", ".join(str(c.relative_to(source)) for c in candidates)
        )
    raise PretrainedWeightsError(f"weights path {source} does not exist")


OUTPUT_STRIDES = (8, 16, 32)


def check_output_stride(output_stride: int) -> int:
    """The one check of an output stride (training config, model build, bundle load)."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    return int(output_stride)


RANDOM_INIT = (False, None, "none", "random")


def is_random_init(pretrained: str | Path | bool | None) -> bool:
    """`--pretrained none` (or random/False/None): random weights, no ImageNet start."""
    return pretrained in RANDOM_INIT


def _create_backbone(spec: BackboneSpec, pretrained: str | Path | bool, output_stride: int = 32) -> nn.Module:
    kwargs = dict(num_classes=0, drop_rate=0.0)
    if check_output_stride(output_stride) != 32:
        kwargs["output_stride"] = output_stride
    if is_random_init(pretrained):
        backbone = timm.create_model(spec.timm_id, pretrained=False, **kwargs)
        zero_init_residual_bn(backbone)
        return backbone
    if pretrained in (True, "imagenet"):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        try:  # unreachable hub: offline for this load only (a cache hit still works; a miss fails in 0.2 s)
            with hub_offline(offline or not _hub_reachable()):
                return timm.create_model(spec.timm_id, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise PretrainedWeightsError(
                f"cannot load ImageNet weights for {spec.name} ({spec.timm_id}): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                "The model hub is unreachable or the weights are not cached. Either download "
                f"them where the network allows and pass --pretrained /path/to/{spec.name}.safetensors "
                "(or a folder of such files), or pass --pretrained none to start from random "
                "weights (much weaker; the bundle is then marked as trained from scratch)."
            ) from e
    path = _weights_file(spec, Path(pretrained))
    return timm.create_model(spec.timm_id, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def create_model(
    name: str,
    num_classes: int = 6,
    pretrained: str | Path | bool = "imagenet",
    dropout: float | Sequence[float] | None = None,
    input_size: int | None = None,
    normalize: str | None = None,
    head: HeadConfig | None = None,
    output_stride: int = 32,
) -> Member:
    """Build one ensemble member.

    pretrained: "imagenet" (timm's normal loading; fails fast offline with how to fix it),
    a weights file or folder (works offline), or "none" for random weights.
    output_stride: 32 (the backbones' own) or 16 / 8: the last stages keep their resolution
    with dilated convolutions (same weights, timm's `output_stride`), so the Grad-CAM feature
    map is 2x / 4x finer on each side, at 1.7-2.4x the training compute here. Worth it for
    small inputs, where stride 32 leaves a 2x2 map at 64 px.
    """
    spec = get_spec(name)
    random_init = is_random_init(pretrained)
    normalize = normalize or "mean_std"
    if normalize == "per_image" and not random_init:
        raise ValueError("per-image normalisation is for random init only: pretrained weights "
                         "keep the mean/std they were trained with")
    head_cfg = (head or spec.head).with_dropout(dropout)
    backbone = _create_backbone(spec, pretrained, output_stride)
    return Member(spec, backbone, head_cfg, num_classes, spec.data_config(input_size, normalize),
                  output_stride)


def restride(member: Member, output_stride: int) -> Member:
    """The same weights with the last stages dilated to `output_stride` (timm's `output_stride`):
    a denser feature map of the same features, for finer Grad-CAM maps. Eval mode, same device;
    the member itself is untouched (its answers stay those of its trained stride)."""
    if check_output_stride(output_stride) == member.output_stride:
        return member
    dense = member_from_metadata(member.metadata() | {"output_stride": output_stride})
    dense.load_state_dict(member.state_dict())
    return dense.to(next(member.parameters()).device).eval()


def untrained_copy(member: Member, seed: int = 0) -> Member:
    """The same architecture, stride and head freshly initialised (timm's init, seeded), eval mode,
    same device: the model-randomisation check of a saliency method (Adebayo et al. 2018). A map
    that points at the lesion as well without the trained weights does not show what they learned."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = member_from_metadata(member.metadata())
    return fresh.to(next(member.parameters()).device).eval()


def member_from_metadata(meta: dict) -> Member:
    """Rebuild a member's architecture (random weights) from checkpoint metadata."""
    spec = get_spec(meta["backbone"])
    output_stride = int(meta.get("output_stride", 32))  # bundles written before the option: 32
    backbone = _create_backbone(spec, "none", output_stride)
    return Member(spec, backbone, HeadConfig.from_json(meta["head"]), int(meta["num_classes"]),
                  DataConfig.from_json(meta["data_config"]), output_stride)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def models_table(num_classes: int = 6) -> list[dict]:
    """One row per backbone: the parameters of backbone and head (random weights, no download)."""
    rows = []
    for name in list_backbones():
        t0 = time.perf_counter()
        m = create_model(name, num_classes=num_classes, pretrained="none")
        spec = m.spec
        rows.append({
            "backbone": name, "timm": spec.timm_id, "features": spec.features,
            "backbone_params": count_parameters(m.backbone), "head_params": count_parameters(m.head),
            "cam_layer": spec.cam_layer, "input_size": m.data_config.input_size,
            "head": "->".join(str(h) for h in spec.head.hidden + (num_classes,)),
            "dropout": list(spec.head.dropout), "build_s": round(time.perf_counter() - t0, 2),
        })
    return rows


__all__ = [
    "BackboneSpec", "DataConfig", "HeadConfig", "Member", "create_model", "get_spec",
    "list_backbones", "member_from_metadata", "untrained_copy", "models_table", "DEFAULT_MEMBERS", "DEFAULT_WEIGHTS",
    "UnknownBackboneError", "PretrainedWeightsError", "OUTPUT_STRIDES", "check_output_stride", "is_random_init",
]
