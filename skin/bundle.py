"""The model bundle: a folder that describes itself, so serving rebuilds the ensemble from it alone.

    bundle.json           format version, id, classes, members (backbone, head, data config,
                          weights file + sha256, temperature), ensemble weights, metrics,
                          provenance, `untrained` when the weights are random
    <member>.safetensors  one per member

Loading checks the schema, every file hash, identical class maps, and weights that are
non-negative and sum to 1; anything else is refused with a message naming the problem. The id
is a hash of everything that decides an answer (class map, every member entry with its weights'
sha256, the ensemble weights) and is recomputed on load: a bundle.json edited by hand (say a
member's output_stride or temperature) is refused instead of answering under the old id.
Metrics and provenance are descriptive and not part of the id.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import __version__
from .checkpoint import (CheckpointError, atomic_write_json, load_member_weights, replace_dir,
                         save_tensors, sha256_file)
from .classes import ClassMap, ClassMapError
from .explanation import Explanation, ExplanationError, Overrides, Request
from .registry import (DEFAULT_WEIGHTS, DataConfig, HeadConfig, Member, check_output_stride, get_spec,
                       member_from_metadata)

FORMAT = "skinray-bundle"
FORMAT_VERSION = 2  # 2: the id covers every member entry and the class map (1: names, hashes, weights, T)
CAM_KEYS = ("cam_stride", "cam_layer", "cam_method", "cam_smooth")  # a member entry's Explanation in JSON


class BundleError(CheckpointError):
    """The bundle cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class MemberEntry:
    name: str
    backbone: str
    num_classes: int
    head: HeadConfig
    data_config: DataConfig
    weights_file: str
    sha256: str
    classes: tuple[str, ...]
    temperature: float = 1.0
    output_stride: int = 32
    explanation: Explanation = Explanation()  # how its maps are made (the answer never depends on it)

    def to_json(self) -> dict:
        # the explanation's options as cam_* keys, defaults left out: ids of bundles written before an
        # option existed stay valid
        return {"name": self.name, "backbone": self.backbone, "num_classes": self.num_classes,
                "head": self.head.to_json(), "data_config": self.data_config.to_json(),
                "output_stride": self.output_stride,
                "weights_file": self.weights_file, "sha256": self.sha256,
                "classes": list(self.classes), "temperature": self.temperature} | {
                    f"cam_{k}": v for k, v in self.explanation.to_json().items()}

    @classmethod
    def from_json(cls, d: dict) -> "MemberEntry":
        try:
            explanation = Explanation.from_json({k[4:]: d[k] for k in CAM_KEYS if d.get(k)})
        except (ExplanationError, TypeError, ValueError) as e:
            raise ExplanationError(f"member {d.get('name')!r}: {e}") from None
        return cls(name=str(d["name"]), backbone=str(d["backbone"]), num_classes=int(d["num_classes"]),
                   head=HeadConfig.from_json(d["head"]), data_config=DataConfig.from_json(d["data_config"]),
                   weights_file=str(d["weights_file"]), sha256=str(d["sha256"]), classes=tuple(d["classes"]),
                   temperature=float(d.get("temperature", 1.0)), output_stride=int(d.get("output_stride", 32)),
                   explanation=explanation)


@dataclass(frozen=True)
class Bundle:
    root: Path
    id: str
    classes: ClassMap
    members: tuple[MemberEntry, ...]
    weights: tuple[float, ...]
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    untrained: bool = False
    version: int = FORMAT_VERSION
    # the member entries exactly as bundle.json stores them: the id is checked against these, so a
    # field this version no longer reads (e.g. crop_pct) keeps an older bundle's id valid
    stored_members: tuple[dict, ...] | None = field(default=None, repr=False, compare=False)
    # temperature of the combined probabilities (fitted on val after the weights: averaging calibrated
    # members makes an under-confident ensemble); 1.0 = none, and then absent from bundle.json and the id
    ensemble_temperature: float = 1.0

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def weights_map(self) -> dict[str, float]:
        return dict(zip(self.member_names, self.weights))

    def weight_of(self, name: str) -> float:
        return self.weights[self.member_names.index(name)]

    def entry(self, name: str) -> MemberEntry:
        for m in self.members:
            if m.name == name:
                return m
        raise BundleError(f"bundle {self.root} has no member {name!r}; it has {self.member_names}")

    def architecture(self, name: str) -> Member:
        """One member's architecture with random weights (no file read)."""
        e = self.entry(name)
        return member_from_metadata({"backbone": e.backbone, "num_classes": e.num_classes,
                                     "head": e.head.to_json(), "data_config": e.data_config.to_json(),
                                     "output_stride": e.output_stride})

    def explanations(self, request: Request | None = None) -> dict[str, Explanation]:
        """Each member's Explanation as a request makes it: the stored one with its Overrides applied."""
        return {e.name: e.explanation.override((request or {}).get(e.name)) for e in self.members}

    def check_explain(self, explain: Request) -> None:
        """Every layer named in `explain` ({member: Overrides}) exists in its member, else ExplanationError
        (checked on architectures built on the meta device: no weights, no memory)."""
        import torch
        for name, options in explain.items():
            layer = options.layer
            if layer:
                with torch.device("meta"):
                    member = self.architecture(name)
                try:
                    member.get_submodule(layer)
                except AttributeError:
                    raise ExplanationError(f"{member.spec.name} has no layer {layer!r}; give a dotted path such as "
                                           f"{member.spec.cam_layer}") from None

    def load_member(self, name: str) -> Member:
        """Rebuild one member (eval mode) and load its weights, checking the file hash."""
        e = self.entry(name)
        member = self.architecture(name)
        load_member_weights(member, self.root / e.weights_file, e.sha256)
        return member.eval()

    def load_members(self) -> dict[str, Member]:
        return {name: self.load_member(name) for name in self.member_names}

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": self.version, "id": self.id,
                "classes": list(self.classes), "members": [m.to_json() for m in self.members],
                "weights": {m.name: w for m, w in zip(self.members, self.weights)},
                "metrics": self.metrics, "provenance": self.provenance, "untrained": self.untrained} | (
                    {"ensemble_temperature": self.ensemble_temperature} if self.ensemble_temperature != 1.0 else {})

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        path = root / "bundle.json"
        if not path.is_file():
            raise BundleError(f"{path} not found; build a bundle with `python jobs/train.py` or "
                              "`skin bundle random --out DIR`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{path} is not valid JSON: {e}") from None
        bundle = _from_json(root, data)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        expected = bundle_id(self.classes, self.stored_members or self.members, self.weights, self.version,
                              self.ensemble_temperature)
        if self.id != expected:
            raise BundleError(f"{self.root}/bundle.json was edited after the bundle was written: its id is "
                              f"{self.id!r} but its classes, members and weights hash to {expected!r}; restore it, "
                              "or write a new bundle (jobs/tune.py weights, skin.bundle.derive_bundle)")
        for m in self.members:
            f = self.root / m.weights_file
            if not f.is_file():
                raise BundleError(f"member {m.name}: weights file {f} is missing")
            actual = sha256_file(f)
            if actual != m.sha256:
                raise BundleError(
                    f"member {m.name}: {f.name} has sha256 {actual[:12]}..., bundle.json says "
                    f"{m.sha256[:12]}...: the file was modified after the bundle was written")


def _from_json(root: Path, d: dict) -> Bundle:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise BundleError(f"{root}/bundle.json is not a skinray bundle (format != {FORMAT!r})")
    if d.get("format_version") not in (1, FORMAT_VERSION):
        raise BundleError(f"bundle format version {d.get('format_version')!r} is not supported "
                          f"(this skinray reads versions 1 and {FORMAT_VERSION})")
    try:
        classes = ClassMap(tuple(d["classes"]))
        members = tuple(MemberEntry.from_json(m) for m in d["members"])
        weights_map = d["weights"]
    except ExplanationError as e:
        raise BundleError(f"{root}/bundle.json: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root}/bundle.json is malformed: {type(e).__name__}: {e}") from None
    if not members:
        raise BundleError("the bundle has no members")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise BundleError(f"member names repeat: {names}")
    for m in members:
        get_spec(m.backbone)  # unknown backbone names list the valid ones
        classes.check_same(ClassMap(m.classes), f"class maps of the bundle and member {m.name}")
        if m.num_classes != len(classes):
            raise ClassMapError(f"member {m.name} has {m.num_classes} outputs, bundle has "
                                f"{len(classes)} classes")
        try:
            check_output_stride(m.output_stride)
        except ValueError as e:
            raise BundleError(f"member {m.name}: {e}") from None
        if not (m.temperature > 0 and math.isfinite(m.temperature)):
            raise BundleError(f"member {m.name}: temperature must be a positive number, got {m.temperature}")
    if not isinstance(weights_map, dict) or set(weights_map) != set(names):
        raise BundleError(f"ensemble weights must name exactly the members {names}, got {weights_map!r}")
    weights = tuple(float(weights_map[n]) for n in names)
    check_weights(weights)
    t_ens = d.get("ensemble_temperature", 1.0)
    if not (isinstance(t_ens, (int, float)) and t_ens > 0 and math.isfinite(t_ens)):
        raise BundleError(f"ensemble_temperature must be a positive number, got {t_ens!r}")
    return Bundle(root, str(d.get("id", "")), classes, members, weights, d.get("metrics", {}) or {},
                  d.get("provenance", {}) or {}, bool(d.get("untrained", False)), int(d["format_version"]),
                  tuple(d["members"]), float(t_ens))


def check_weights(weights: Sequence[float]) -> None:
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise BundleError(f"ensemble weights must be non-negative, got {list(weights)}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise BundleError(f"ensemble weights must sum to 1, got {list(weights)} (sum {sum(weights):.6f})")


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


def bundle_id(classes: ClassMap, members: Sequence[MemberEntry | dict], weights: Sequence[float],
               version: int = FORMAT_VERSION, ensemble_temperature: float = 1.0) -> str:
    """The content hash that names a bundle (version 1 bundles keep their narrower id). `members`:
    entries, or their JSON as stored."""
    h = hashlib.sha256()
    if version == 1:
        for m, w in zip(members, weights):
            m = m if isinstance(m, MemberEntry) else MemberEntry.from_json(m)
            h.update(f"{m.name}:{m.sha256}:{w:.6f}:{m.temperature:.6f};".encode())
    else:
        h.update(json.dumps({"classes": list(classes),
                             "members": [m.to_json() if isinstance(m, MemberEntry) else m for m in members],
                             "weights": [f"{w:.6f}" for w in weights]}
                            | ({"ensemble_temperature": f"{ensemble_temperature:.6f}"} if ensemble_temperature != 1.0 else {}),
                            sort_keys=True).encode())
    return "sk-" + h.hexdigest()[:12]


def _write(root: Path, classes: ClassMap, entries: list[MemberEntry], weights: Sequence[float],
           files: Mapping[str, callable], metrics: dict, provenance: dict, untrained: bool,
           overwrite: bool, ensemble_temperature: float = 1.0) -> Bundle:
    """Write into a hidden sibling folder, then rename it into place (all or nothing)."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(entries):
        raise BundleError(f"{len(weights)} weights for {len(entries)} members")
    check_weights(weights)
    if root.exists() and not overwrite:
        raise BundleError(f"{root} already exists; bundles are never overwritten, choose a new path")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        final = []
        for e in entries:
            digest = files[e.name](tmp / e.weights_file)
            final.append(replace(e, sha256=digest))
        bundle = Bundle(root, bundle_id(classes, final, weights, FORMAT_VERSION, ensemble_temperature), classes,
                        tuple(final), weights, metrics, provenance, untrained,
                        ensemble_temperature=float(ensemble_temperature))
        atomic_write_json(tmp / "bundle.json", bundle.to_json())
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return bundle


def write_bundle(root: str | Path, classes: ClassMap, members: Mapping[str, Member],
                 weights: Sequence[float] | None = None, temperatures: Mapping[str, float] | None = None,
                 metrics: dict | None = None, provenance: dict | None = None,
                 untrained: bool = False, overwrite: bool = True,
                 explanations: Mapping[str, Explanation] | None = None) -> Bundle:
    """Save members (name -> Member) as a new bundle at root, each explained as `explanations` says
    (default: Explanation(), the pooled layer at the trained stride)."""
    names = list(members)
    weights = weights if weights is not None else _default_weights(names)
    entries, files = [], {}
    for name, m in members.items():
        if m.num_classes != len(classes):
            raise ClassMapError(f"member {name} has {m.num_classes} outputs, class map has {len(classes)}")
        entries.append(MemberEntry(name, m.spec.name, m.num_classes, m.head_config, m.data_config,
                                   f"{name}.safetensors", "", tuple(classes),
                                   float((temperatures or {}).get(name, 1.0)), m.output_stride,
                                   (explanations or {}).get(name, Explanation())))
        files[name] = (lambda path, m=m: save_tensors(path, m.state_dict()))
    prov = {"code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return _write(Path(root), classes, entries, weights, files, metrics or {},
                  prov | (provenance or {}), untrained, overwrite)


def derive_bundle(src: Bundle, root: str | Path, weights: Sequence[float] | None = None,
                  temperatures: Mapping[str, float] | None = None, metrics: dict | None = None,
                  provenance: dict | None = None, ensemble_temperature: float | None = None,
                  explanations: Mapping[str, Overrides | Mapping[str, Any]] | None = None) -> Bundle:
    """A new bundle version from an existing one (new weights / temperatures / ensemble temperature /
    metrics / explanations); the member files are copied and re-hashed, the source bundle is left
    untouched. `explanations`: {member: Overrides} of its stored Explanation, e.g.
    {"resnet50": Overrides(stride=8, layer="backbone.layer1", method="layercam", smooth="flips")}, or the same
    as {option: value} dicts (a config file's, the command line's)."""
    explanations = dict(explanations or {})
    unknown = set(explanations) - set(src.member_names)
    if unknown:
        raise BundleError(f"members {sorted(unknown)} are not in the bundle; it has {src.member_names}")
    new_expl = {}
    for e in src.members:
        try:
            o = explanations.get(e.name)
            x = e.explanation.override(o if o is None or isinstance(o, Overrides) else Overrides.of(o))
        except ExplanationError as err:
            raise BundleError(f"member {e.name}: {err}") from None
        if x.layer and x.layer != e.explanation.layer:
            check_cam_layer(src.load_member(e.name), x.layer)
        new_expl[e.name] = x
    entries = [replace(e, temperature=float((temperatures or {}).get(e.name, e.temperature)),
                       explanation=new_expl[e.name]) for e in src.members]
    files = {e.name: (lambda path, e=e: _copy(src.root / e.weights_file, path)) for e in entries}
    prov = dict(src.provenance) | {"parent": src.id, "created": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | (provenance or {})
    return _write(Path(root), src.classes, entries, weights if weights is not None else src.weights,
                  files, metrics if metrics is not None else dict(src.metrics), prov, src.untrained,
                  overwrite=False, ensemble_temperature=src.ensemble_temperature if ensemble_temperature is None
                  else ensemble_temperature)


def check_cam_layer(member, layer: str) -> str:
    """`layer` names a module of the member (a dotted path, e.g. backbone.blocks.3), else BundleError."""
    try:
        member.get_submodule(layer)
    except AttributeError:
        top = ", ".join(n for n, _ in member.backbone.named_children())
        raise BundleError(f"{member.spec.name} has no layer {layer!r}; give a dotted path such as "
                          f"backbone.<child> (its children: {top}) or {member.spec.cam_layer}") from None
    return layer


def _copy(a: Path, b: Path) -> str:
    shutil.copyfile(a, b)
    return sha256_file(b)


def _default_weights(names: Sequence[str]) -> tuple[float, ...]:
    """0.30/0.30/0.40 for the three default members; equal weights for any other set."""
    from .registry import DEFAULT_MEMBERS
    if tuple(names) == DEFAULT_MEMBERS:
        return DEFAULT_WEIGHTS
    return tuple(1.0 / len(names) for _ in names)


def update_metrics(root: str | Path, metrics: dict) -> Bundle:
    """Store evaluation metrics in bundle.json (weights and hashes unchanged, id unchanged)."""
    b = Bundle.load(root)
    data = json.loads((Path(root) / "bundle.json").read_text())
    data["metrics"] = metrics
    atomic_write_json(Path(root) / "bundle.json", data)
    return replace(b, metrics=metrics)
