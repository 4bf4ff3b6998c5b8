"""Dataset: scan a source, validate every file, split, check leakage, balance, write manifests.

Sources: (a) root/{train,val,test}/<class>/..., (b) root/<class>/... (seeded stratified split,
group-aware with a group column), (c) a CSV manifest `path,label[,split][,group]`.
A bad file goes to rejects.csv with its reason and the scan goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .classes import DEFAULT_CLASSES, ClassMap, ClassMapError, _NUMBERED, display_name
from .images import DATASET_LIMITS, DATASET_SUFFIXES, ImageError, difference_hash, hamming, load_image
from .parallel import map_progress

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = set(DATASET_SUFFIXES)
MANIFEST_COLUMNS = ["path", "label", "label_index", "split", "group", "sha256", "dhash",
                    "width", "height"]


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message says how to fix it."""


@dataclass(frozen=True)
class ScanOptions:
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    seed: int = 0
    near_dup_bits: int = 6  # dHash Hamming distance at or below which two images are near-duplicates
    remove_leaks: bool = True
    workers: int = 0  # 0: one per core
    group_column: str = "group"
    classes: ClassMap | None = None  # the class map to keep (a bundle's, an export's); None: inferred


# --------------------------------------------------------------------------- discovery
def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def discover(source: str | Path) -> pd.DataFrame:
    """Rows of path, label (display name), split (may be empty), group (may be empty). Paths are
    absolute, so the manifests work from any working directory (Ray workers, submitted jobs)."""
    src = Path(source).resolve()
    if not src.exists():
        raise DatasetError(f"{src} does not exist; give a dataset folder or a CSV manifest")
    if src.is_file():
        return _discover_csv(src)
    split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
    rows = []
    if split_dirs:  # layout (a)
        for sd in split_dirs:
            for cls_dir in sorted(p for p in sd.iterdir() if p.is_dir()):
                rows += [{"path": str(p), "folder": cls_dir.name, "split": sd.name, "group": ""}
                         for p in _images_under(cls_dir)]
    else:  # layout (b)
        for cls_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            rows += [{"path": str(p), "folder": cls_dir.name, "split": "", "group": ""}
                     for p in _images_under(cls_dir)]
    if not rows:
        raise DatasetError(
            f"no images found under {src}. Expected {src}/<class>/*.jpg, "
            f"{src}/train/<class>/*.jpg (with val/ and test/), or a CSV manifest")
    return pd.DataFrame(rows)


def _discover_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise DatasetError(f"cannot read {path} as CSV: {e}") from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise DatasetError(f"{path} lacks column(s) {sorted(missing)}; a manifest needs "
                           "path,label and may have split,group")
    if df.empty:
        raise DatasetError(f"{path} has no rows")
    base = path.parent
    df["path"] = [str(p if Path(p).is_absolute() else base / p) for p in df["path"]]
    df["folder"] = df["label"]
    df["split"] = df["split"].str.strip().str.lower() if "split" in df else ""
    bad = sorted(set(df["split"]) - set(SPLITS) - {""})
    if bad:
        raise DatasetError(f"unknown split value(s) {bad} in {path}; use train, val or test")
    df["group"] = df["group"] if "group" in df else ""
    return df[["path", "folder", "split", "group"]]


def infer_class_map(folders: list[str]) -> ClassMap:
    """Numbered folders sort by number; the default six keep their order; others sort by name."""
    unique = sorted(set(folders))
    if all(_NUMBERED.match(f) for f in unique):
        return ClassMap.from_folders(unique)
    names = {display_name(f) for f in unique}
    if names <= set(DEFAULT_CLASSES):
        return ClassMap(tuple(n for n in DEFAULT_CLASSES if n in names))
    return ClassMap(tuple(sorted(names)))


# --------------------------------------------------------------------------- validation
def _check_one(path: str) -> dict:
    try:
        img = load_image(path, DATASET_LIMITS)
    except ImageError as e:
        return {"path": path, "error": f"{e.code}: {e}"}
    except OSError as e:
        return {"path": path, "error": f"unreadable: {e}"}
    data = Path(path).read_bytes()
    return {"path": path, "error": "", "sha256": hashlib.sha256(data).hexdigest(),
            "dhash": difference_hash(img), "width": img.size[0], "height": img.size[1]}


def validate_files(paths: list[str], workers: int = 0, progress: bool = True) -> pd.DataFrame:
    """Decode and hash every file in parallel; one row per path, `error` empty when valid."""
    workers = workers or (os.cpu_count() or 1)
    parallel = workers if workers > 1 and len(paths) > 64 else 1
    return pd.DataFrame(map_progress(_check_one, paths, parallel, "scan", "files validated", 500, progress,
                                     chunksize=32))


# --------------------------------------------------------------------------- split
def stratified_split(labels: np.ndarray, groups: np.ndarray | None, fractions, seed: int) -> np.ndarray:
    """Assign each row to train/val/test per class; with groups, whole groups move together
    (a group's class is its most frequent label) so no lesion or patient straddles splits."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    if groups is None or all(g == "" for g in groups):
        units = np.arange(len(labels)).astype(str)
    else:
        units = np.where(groups == "", [f"__row{i}" for i in range(len(labels))], groups)
    unit_df = pd.DataFrame({"unit": units, "label": labels})
    unit_label = unit_df.groupby("unit")["label"].agg(lambda s: s.value_counts().index[0])
    assignment = {}
    for label in sorted(unit_label.unique()):
        members = np.array(sorted(unit_label.index[unit_label == label]))
        rng.shuffle(members)
        n = len(members)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:  # every split sees every class when there are at least 3 units
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        for i, m in enumerate(members):
            assignment[m] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    for i, u in enumerate(units):
        out[i] = assignment[u]
    return out


# --------------------------------------------------------------------------- leakage
def find_leaks(df: pd.DataFrame, near_dup_bits: int) -> pd.DataFrame:
    """Rows of val/test that duplicate (exactly, or within near_dup_bits of dHash) an image in
    an earlier split (train before val before test)."""
    leaks = []
    order = {s: i for i, s in enumerate(SPLITS)}
    seen_sha: dict[str, tuple[str, str]] = {}
    for row in df.sort_values("split", key=lambda s: s.map(order)).itertuples():
        prev = seen_sha.get(row.sha256)
        if prev and prev[1] != row.split:
            leaks.append({"path": row.path, "split": row.split, "kind": "exact",
                          "duplicate_of": prev[0], "distance": 0})
        seen_sha.setdefault(row.sha256, (row.path, row.split))
    exact = {l["path"] for l in leaks}
    for later in ("val", "test"):
        earlier = df[df["split"].map(order) < order[later]]
        cur = df[(df["split"] == later) & ~df["path"].isin(exact)]
        if earlier.empty or cur.empty:
            continue
        a = cur["dhash"].to_numpy(np.uint64)
        b = earlier["dhash"].to_numpy(np.uint64)
        for start in range(0, len(a), 1024):  # bounded memory: 1024 x N distances at a time
            d = hamming(a[start:start + 1024], b)
            j = d.argmin(axis=1)
            best = d[np.arange(len(j)), j]
            for k in np.nonzero(best <= near_dup_bits)[0]:
                leaks.append({"path": cur["path"].iloc[start + k], "split": later, "kind": "near",
                              "duplicate_of": earlier["path"].iloc[j[k]], "distance": int(best[k])})
    return pd.DataFrame(leaks, columns=["path", "split", "kind", "duplicate_of", "distance"])


# --------------------------------------------------------------------------- scan
def manifest_hash(df: pd.DataFrame) -> str:
    """Content identity of a manifest: what each row is and which class it belongs to."""
    h = hashlib.sha256()
    for row in df.sort_values("path").itertuples():
        h.update(f"{row.sha256}\t{row.label}\t{row.split}\n".encode())
    return h.hexdigest()


# Lesion-free skin images (outlier exposure): manifests lesion_free_<split>.csv, label "" and index -1.
LESION_FREE = "lesion_free"
NO_CLASS = -1


def _scan_lesion_free(folder: str | Path, options: ScanOptions, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(valid rows with their split, rejects) of a folder of lesion-free skin images: its
    train/val/test subfolders when it has them, else a seeded split by the scan's fractions."""
    src = Path(folder).resolve()
    if not src.is_dir():
        raise DatasetError(f"--lesion-free {src} is not a folder; give a folder of skin images without a lesion")
    split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
    rows = ([{"path": str(p), "split": sd.name} for sd in split_dirs for p in _images_under(sd)] if split_dirs
            else [{"path": str(p), "split": ""} for p in _images_under(src)])
    if not rows:
        raise DatasetError(f"no images found under --lesion-free {src}")
    df = pd.DataFrame(rows).merge(validate_files([r["path"] for r in rows], options.workers, progress),
                                  on="path", how="left")
    rejects = df[df["error"] != ""][["path", "error"]].rename(columns={"error": "reason"})
    df = df[df["error"] == ""].copy()
    todo = df["split"] == ""
    if todo.any():
        df.loc[todo, "split"] = stratified_split(np.full(int(todo.sum()), LESION_FREE), None, options.split,
                                                 options.seed)
    df["label"], df["label_index"], df["group"] = "", NO_CLASS, ""
    return df, rejects


def load_lesion_free(data_dir: str | Path, split: str) -> pd.DataFrame | None:
    """The lesion-free manifest of a split (`skin data scan --lesion-free`), or None without one."""
    path = Path(data_dir) / f"{LESION_FREE}_{split}.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"group": str, "label": str}, keep_default_na=False)
    return df if len(df) else None


def scan(source: str | Path, out: str | Path, options: ScanOptions = ScanOptions(),
         progress: bool = True, lesion_free: str | Path | None = None) -> dict:
    """Scan, validate, split, remove leaks; write manifests, classes.json, rejects.csv, report;
    with `lesion_free`, also lesion_free_<split>.csv from that folder of skin images."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = discover(source)
    classes = options.classes or infer_class_map(found["folder"].tolist())
    found["label"] = [display_name(f) for f in found["folder"]]
    unknown = sorted(set(found["label"]) - set(classes.names))
    if unknown:
        raise DatasetError(f"labels {unknown} are not in the class map given ({list(classes.names)}); fix the "
                           "labels or give the class map that has them")
    checked = validate_files(found["path"].tolist(), options.workers, progress)
    df = found.merge(checked, on="path", how="left")
    rejects = df[df["error"] != ""][["path", "error"]].rename(columns={"error": "reason"})
    df = df[df["error"] == ""].copy()
    if df.empty:
        raise DatasetError(f"every file under {source} was rejected; see {out / 'rejects.csv'}")
    if (df["split"] == "").any():
        todo = df["split"] == ""
        groups = df.loc[todo, "group"].to_numpy(str) if options.group_column else None
        df.loc[todo, "split"] = stratified_split(df.loc[todo, "label"].to_numpy(str), groups,
                                                 options.split, options.seed)
    df["label_index"] = [classes.index(n) for n in df["label"]]
    df["dhash"] = df["dhash"].astype(np.uint64)
    leaks = find_leaks(df, options.near_dup_bits)
    if options.remove_leaks and not leaks.empty:
        df = df[~df["path"].isin(set(leaks["path"]))]
    for split in SPLITS:
        part = df[df["split"] == split][MANIFEST_COLUMNS].sort_values(["label_index", "path"])
        part.to_csv(out / f"{split}.csv", index=False)
    free_counts = None
    for split in SPLITS:  # a scan without --lesion-free leaves none from an earlier scan behind
        (out / f"{LESION_FREE}_{split}.csv").unlink(missing_ok=True)
    if lesion_free is not None:
        free, free_rejects = _scan_lesion_free(lesion_free, options, progress)
        rejects = pd.concat([rejects, free_rejects], ignore_index=True)
        free["dhash"] = free["dhash"].astype(np.uint64)
        free_counts = {}
        for split in SPLITS:
            part = free[free["split"] == split][MANIFEST_COLUMNS].sort_values("path")
            part.to_csv(out / f"{LESION_FREE}_{split}.csv", index=False)
            free_counts[split] = len(part)
    classes.save(out / "classes.json")
    rejects.to_csv(out / "rejects.csv", index=False)
    leaks.to_csv(out / "leaks.csv", index=False)
    counts = {s: {c: int(((df["split"] == s) & (df["label"] == c)).sum()) for c in classes}
              for s in SPLITS}
    report = {"source": str(source), "classes": list(classes), "counts": counts,
              "rejected": len(rejects), "leaks": {k: int((leaks["kind"] == k).sum())
                                                  for k in ("exact", "near")},
              "leaks_removed": bool(options.remove_leaks), "near_dup_bits": options.near_dup_bits,
              "manifest_sha256": manifest_hash(df), "seed": options.seed, "lesion_free": free_counts}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_report_md(report))
    return report


def _report_md(r: dict) -> str:
    lines = [f"# Dataset scan of `{r['source']}`", "", "| class | train | val | test |",
             "|---|---:|---:|---:|"]
    for c in r["classes"]:
        lines.append(f"| {c} | " + " | ".join(str(r["counts"][s][c]) for s in SPLITS) + " |")
    lines += ["", f"Rejected files: {r['rejected']} (see rejects.csv).",
              f"Cross-split duplicates: {r['leaks']['exact']} exact, {r['leaks']['near']} near "
              f"(dHash <= {r['near_dup_bits']} bits); "
              + ("removed from val/test." if r["leaks_removed"] else "kept (--keep-leaks).")]
    if r.get("lesion_free"):
        lines.append("Lesion-free skin images (outlier exposure): "
                     + ", ".join(f"{s} {n}" for s, n in r["lesion_free"].items()) + ".")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- manifests
def load_classes(data_dir: str | Path) -> ClassMap:
    path = Path(data_dir) / "classes.json"
    if not path.is_file():
        raise DatasetError(f"{path} not found; run `skin data scan SOURCE --out {data_dir}` first")
    return ClassMap.load(path)


def load_manifest(data_dir: str | Path, split: str, classes: ClassMap | None = None) -> pd.DataFrame:
    """Read DIR/<split>.csv (train may be train_balanced) and check it against the class map."""
    path = Path(data_dir) / f"{split}.csv"
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found; run `skin data scan` (and `skin data "
                           "balance` for train_balanced) first")
    df = pd.read_csv(path, dtype={"group": str}, keep_default_na=False)
    if df.empty:
        raise DatasetError(f"manifest {path} is empty; the split has no images")
    classes = classes or load_classes(data_dir)
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise ClassMapError(f"{path} has labels {unknown} not in classes.json {list(classes)}")
    expected = [classes.index(n) for n in df["label"]]
    if list(df["label_index"]) != expected:
        raise ClassMapError(f"{path} was indexed with a different class map than classes.json; "
                            "re-run `skin data scan`")
    return df


def balance(data_dir: str | Path, per_class: int, seed: int = 0) -> pd.DataFrame:
    """A fixed number per class from the training split only: every image once, then the
    shortfall sampled with replacement; a class that already has enough is sampled without."""
    if per_class < 1:
        raise DatasetError("--per-class must be at least 1")
    classes = load_classes(data_dir)
    train = load_manifest(data_dir, "train", classes)
    rng = np.random.default_rng(seed)
    parts = []
    for k, name in enumerate(classes):
        rows = train[train["label_index"] == k]
        if rows.empty:
            raise DatasetError(f"class {name!r} has no training images; add some or drop the class")
        if len(rows) >= per_class:
            idx = rng.choice(len(rows), per_class, replace=False)
        else:
            idx = np.concatenate([np.arange(len(rows)),
                                  rng.choice(len(rows), per_class - len(rows), replace=True)])
        parts.append(rows.iloc[np.sort(idx)])
    out = pd.concat(parts, ignore_index=True)
    out.to_csv(Path(data_dir) / "train_balanced.csv", index=False)
    return out


def training_split(data_dir: str | Path) -> str:
    """The balanced training manifest when present, else the plain training split."""
    return "train_balanced" if (Path(data_dir) / "train_balanced.csv").is_file() else "train"
