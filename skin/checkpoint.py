"""Weights on disk: safetensors only (no pickle is ever loaded), written atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .registry import Member, member_from_metadata


class CheckpointError(ValueError):
    """A checkpoint or bundle file is missing, tampered with or inconsistent."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """temp file in the same folder + fsync + rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Atomically write a safetensors file; returns its sha256."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(clean, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} not found") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def save_member(member: Member, folder: str | Path, extra: dict | None = None) -> dict:
    """A member checkpoint: model.safetensors + member.json (what rebuilds the architecture)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_tensors(folder / "model.safetensors", member.state_dict())
    meta = member.metadata() | {"weights_file": "model.safetensors", "sha256": digest} | (extra or {})
    atomic_write_json(folder / "member.json", meta)
    return meta


def load_member_weights(member: Member, path: str | Path, expected_sha256: str | None = None) -> Member:
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path} has sha256 {actual[:12]}..., expected {expected_sha256[:12]}...: the file "
                "was modified or corrupted after it was written; restore it or rebuild the bundle")
    state = load_tensors(path)
    missing, unexpected = member.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit a {member.spec.name} member: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return member


def load_member(folder: str | Path) -> tuple[Member, dict]:
    """Rebuild a member from a checkpoint folder alone."""
    folder = Path(folder)
    meta_path = folder / "member.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} not found: not a member checkpoint")
    meta = json.loads(meta_path.read_text())
    member = member_from_metadata(meta)
    load_member_weights(member, folder / meta.get("weights_file", "model.safetensors"), meta.get("sha256"))
    return member, meta


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; an existing one is swapped out, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
