"""Where and in which precision members run: one rule for training, evaluation and serving.

amp = "auto": bf16 autocast on a GPU, fp32 on a CPU; "bf16": also on a CPU that has native bf16
(AVX512-BF16 or AMX; elsewhere bf16 convolutions are several times slower than fp32, so it falls
back to fp32); "off": fp32 everywhere.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

AMP_CHOICES = ("auto", "bf16", "off")


def default_device(gpu_assigned: bool = True) -> torch.device:
    """Where a member runs unless told: the GPU when there is one (and, under Ray, one was assigned to this
    worker), else the CPU."""
    return torch.device("cuda" if gpu_assigned and torch.cuda.is_available() else "cpu")


def check_amp(amp: str) -> str:
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return amp


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: the CPUs on which bf16 convolutions beat fp32 (Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure_device(device: torch.device, amp: str = "auto") -> bool:
    """Per-device settings; returns whether bf16 autocast is used (see the module's rule)."""
    check_amp(amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return amp != "off"
    return amp == "bf16" and cpu_has_native_bf16()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled, else a null context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
