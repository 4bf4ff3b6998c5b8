"""Batch inference on unlabelled photographs: list the inputs, score them in batches, keep the
answers in a resumable table.

`BatchPredictor` is the unit of work of both paths: Ray Data's `map_batches` over an actor pool
(jobs/predict.py, spread over a cluster) and a plain in-process loop (`skin predict FOLDER`). It
answers through `skin.ensemble.Predictor`, the path `skin predict --json` and the server run, so a
row's probabilities are that answer's. A file that cannot be scored gets a row whose `error` is
the message the HTTP API gives for it; nothing aborts the run.

`PredictionStore` appends each finished batch to OUT/predictions.csv (flushed), so a killed job
loses at most the batches in flight and a re-run scores only what is missing; at the end the table
is rewritten in input order, with OUT/predictions.parquet beside it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .bundle import Bundle
from .explanation import Request
from .ensemble import UNCERTAIN_BELOW, Predictor
from .images import SERVE_SUFFIXES, ImageError, ImageLimits, load_image

MANIFEST_SUFFIXES = (".csv", ".parquet")


class InputError(ValueError):
    """The input or output of a batch run cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Inputs:
    """The files to score, in a stable order, and the root their relative names are taken from
    (for mirroring the input tree under OUT/cam)."""
    paths: list[str]
    root: str | None

    def relative(self, path: str) -> str:
        root = (self.root or "").rstrip("/")
        if root and path.startswith(root + "/"):
            return path[len(root) + 1:]
        return path.split("://", 1)[-1].lstrip("/")


def is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(uri: str):
    import pyarrow.fs as pafs
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"cannot open {uri}: {e}; give a local folder or a URI that pyarrow can open "
                         "(s3://bucket/prefix, gs://bucket/prefix, file:///path)") from None


def list_inputs(src: str) -> Inputs:
    """A folder (recursive: every entry named like an image, in sorted order; a directory named like
    one is listed too and gets an error row), a CSV/Parquet manifest with a `path` column (relative
    paths are taken from the manifest's folder; its order is kept), or a URI pyarrow resolves."""
    if is_uri(src) and not src.lower().endswith(MANIFEST_SUFFIXES):
        import pyarrow.fs as pafs
        fs, base = _filesystem(src)
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{src} does not exist")
        scheme = src.split("://", 1)[0]
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        names = sorted(e.path for e in entries if e.base_name.lower().endswith(SERVE_SUFFIXES))
        prefix = f"{scheme}://" if scheme != "file" else "file://"
        return Inputs([prefix + n for n in names], prefix + base)
    path = Path(src)
    if src.lower().endswith(MANIFEST_SUFFIXES):
        return _read_manifest(src)
    if not path.exists():
        raise InputError(f"{src} does not exist; give a folder of photographs, a CSV/Parquet manifest with a "
                         "`path` column, or a URI (s3://..., gs://...)")
    if not path.is_dir():
        raise InputError(f"{src} is a file, not a folder or a manifest; for one image use `skin predict IMAGE`, "
                         "or name a .csv/.parquet manifest with a `path` column")
    root = path.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [str(Path(dirpath, n)) for n in filenames + dirnames if n.lower().endswith(SERVE_SUFFIXES)]
    return Inputs(sorted(found), str(root))


def _read_manifest(src: str) -> Inputs:
    try:
        if src.lower().endswith(".parquet"):
            df = pd.read_parquet(src)
        else:
            df = pd.read_csv(src, keep_default_na=False, dtype=str)
    except FileNotFoundError:
        raise InputError(f"manifest {src} does not exist") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise InputError(f"cannot read manifest {src}: {e}") from None
    if "path" not in df.columns:
        raise InputError(f"manifest {src} has no `path` column (it has {list(df.columns)}); add one, one file per row")
    base = src.rsplit("/", 1)[0] if is_uri(src) else str(Path(src).resolve().parent)
    paths = []
    for p in df["path"].astype(str):
        if not p:
            continue
        if is_uri(p) or p.startswith("/"):
            paths.append(p)
        else:
            paths.append(f"{base}/{p}" if is_uri(base) else str(Path(base, p)))
    return Inputs(list(dict.fromkeys(paths)), base)  # a path listed twice is scored once


def read_bytes(path: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a file (enough to tell that it is too large, as the API does),
    from a local path or a URI. Raises ImageError with a message that says what is wrong."""
    try:
        if is_uri(path):
            fs, p = _filesystem(path)
            import pyarrow.fs as pafs
            kind = fs.get_file_info(p).type
            if kind == pafs.FileType.Directory:
                raise ImageError("is a directory, not an image file")
            if kind == pafs.FileType.NotFound:
                raise ImageError("file not found")
            with fs.open_input_stream(p) as f:
                return f.read(limit + 1)
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("cannot read the file: permission denied") from None
    except InputError as e:
        raise ImageError(str(e)) from None
    except OSError as e:
        raise ImageError(f"cannot read the file: {e.strerror or e}") from None


def columns(classes: Sequence[str], members: Sequence[str]) -> list[str]:
    """The output table's columns, in order."""
    return (["path", "class", "confidence"] + [f"p_{c}" for c in classes] + [f"top_{m}" for m in members]
            + ["uncertain", "uncertain_reasons", "error"])


def answer_row(path: str, answer: dict) -> dict:
    """One table row of an answer of skin.ensemble (the API's JSON shape)."""
    return ({"path": path, "class": answer["class"], "confidence": answer["confidence"]}
            | {f"p_{c}": p for c, p in answer["probabilities"].items()}
            | {f"top_{m}": v["top_class"] for m, v in answer["members"].items()}
            | {"uncertain": bool(answer["uncertain"]), "uncertain_reasons": "; ".join(answer["uncertain_reasons"]),
               "error": ""})


def error_row(path: str, message: str, classes: Sequence[str], members: Sequence[str]) -> dict:
    return ({"path": path, "class": "", "confidence": np.nan} | {f"p_{c}": np.nan for c in classes}
            | {f"top_{m}": "" for m in members} | {"uncertain": False, "uncertain_reasons": "", "error": message})


class BatchPredictor:
    """Callable on a batch {"path": [...]}: one row per path (columns()), scored through
    skin.ensemble.Predictor; with `cam_dir`, each overlay PNG written under it at the path's
    place relative to `cam_root`, its maps made as `explain` asks (skin.explanation.requested).
    `max_batch`: with compiled members, batch sizes up to it are compiled at construction, not in
    the middle of the job (a no-op for eager members)."""

    def __init__(self, bundle_dir: str, threads: int | None = None, device: str | None = None, amp: str = "off",
                 uncertain_below: float = UNCERTAIN_BELOW, cam_dir: str | None = None, cam_root: str | None = None,
                 alpha: float = 0.4, limits: ImageLimits = ImageLimits(),
                 explain: Request | None = None, graphs: str = "auto",
                 max_batch: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.bundle = Bundle.load(bundle_dir)
        from .device import default_device
        device = device or str(default_device())
        self.predictor = Predictor(self.bundle, device=device, uncertain_below=uncertain_below, amp=amp,
                                   explain=explain, graphs=graphs)
        if max_batch:  # compiled members (skin.graphs): every batch size the job can hand over, captured now
            for run in self.predictor.runners.values():
                run.warm_up(max_batch, cam=cam_dir is not None)
        self.classes, self.members = self.bundle.classes.names, self.bundle.member_names
        self.cam_dir, self.inputs, self.alpha, self.limits = cam_dir, Inputs([], cam_root), alpha, limits

    def load(self, path: str):
        return load_image(read_bytes(path, self.limits.max_bytes), self.limits)

    def cam_path(self, path: str) -> Path:
        return Path(self.cam_dir, self.inputs.relative(path)).with_suffix(".png")

    def score(self, paths: Sequence[str]) -> list[tuple[str, dict | None, str]]:
        """(path, answer or None, error message or "") per path, in order; one batched forward pass."""
        images, good, errors = [], [], {}
        for p in paths:
            try:
                images.append(self.load(p))
                good.append(p)
            except ImageError as e:
                errors[p] = str(e)
        answers = dict(zip(good, self.predictor.answers(images, cam=self.cam_dir is not None))) if images else {}
        if self.cam_dir is not None:
            from .render import overlay, png_bytes
            for p, img in zip(good, images):
                out = self.cam_path(p)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(png_bytes(overlay(img, answers[p]["gradcam"]["map"], self.alpha)))
        return [(p, answers.get(p), errors.get(p, "")) for p in paths]

    def rows(self, paths: Sequence[str]) -> list[dict]:
        return [answer_row(p, a) if a is not None else error_row(p, e, self.classes, self.members)
                for p, a, e in self.score(paths)]

    def __call__(self, batch: dict) -> pd.DataFrame:
        return pd.DataFrame(self.rows([str(p) for p in batch["path"]]),
                            columns=columns(self.classes, self.members))


class PredictionStore:
    """OUT/predictions.csv as an append-only log during a run (one flushed write per batch), bound
    to one bundle by OUT/run.json; `finish` rewrites it in input order and writes the Parquet twin."""

    def __init__(self, out: str | Path, bundle: Bundle) -> None:
        self.out = Path(out)
        self.bundle = bundle
        self.cols = columns(bundle.classes.names, bundle.member_names)
        self.csv, self.meta = self.out / "predictions.csv", self.out / "run.json"

    def open(self, write: bool = True) -> set[str]:
        """Check OUT belongs to this bundle (or is new) and return the paths already scored; with
        `write`, claim OUT for the bundle (run.json) and start the table (a dry run writes nothing)."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file; give a folder")
        if self.meta.is_file():
            was = json.loads(self.meta.read_text()).get("bundle")
            if was != self.bundle.id:
                raise InputError(f"{self.out} holds predictions of bundle {was}; this is bundle {self.bundle.id}. "
                                 "Use another --out (answers of two bundles never share a table)")
        elif self.csv.is_file():
            raise InputError(f"{self.csv} exists without run.json: not a skinray output; use another --out")
        if not write:
            return set(pd.read_csv(self.csv, usecols=["path"], dtype=str)["path"]) if self.csv.is_file() else set()
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta.write_text(json.dumps({"bundle": self.bundle.id, "classes": self.bundle.classes.names,
                                         "members": self.bundle.member_names}, indent=2) + "\n")
        if not self.csv.is_file():
            self.csv.write_text(",".join(self.cols) + "\n")
            return set()
        self._drop_partial_line()
        done = pd.read_csv(self.csv, usecols=["path"], dtype=str, keep_default_na=False)["path"]
        return set(done)

    def _drop_partial_line(self) -> None:
        """A run killed during a write can leave half a line at the end: cut it off."""
        data = self.csv.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.csv, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: pd.DataFrame) -> None:
        text = rows[self.cols].to_csv(index=False, header=False)
        with open(self.csv, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> pd.DataFrame:
        df = pd.read_csv(self.csv, dtype={"path": str, "class": str, "uncertain_reasons": str, "error": str}
                         | {c: str for c in self.cols if c.startswith("top_")}, keep_default_na=False,
                         na_values={c: [""] for c in self.cols if c == "confidence" or c.startswith("p_")})
        df["uncertain"] = df["uncertain"].astype(str).str.lower() == "true"
        return df

    def finish(self, order: Sequence[str]) -> pd.DataFrame:
        """Rewrite the table in input order (one row per path; the last answer wins) with the Parquet twin."""
        df = self.read().drop_duplicates("path", keep="last")
        rank = {p: i for i, p in enumerate(order)}
        df = df.assign(_o=df["path"].map(lambda p: rank.get(p, len(rank)))).sort_values(["_o", "path"], kind="stable")
        df = df.drop(columns="_o").reset_index(drop=True)
        tmp = self.csv.with_suffix(".csv.tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(self.csv)
        df.to_parquet(self.out / "predictions.parquet", index=False)
        return df


def summary(df: pd.DataFrame, seconds: float, scored_now: int) -> dict:
    ok = df[df["error"] == ""]
    return {"rows": len(df), "scored": len(ok), "errors": int((df["error"] != "").sum()),
            "scored_this_run": scored_now, "seconds": round(seconds, 1),
            "images_per_s": round(scored_now / seconds, 2) if seconds > 0 else None,
            "classes": {str(k): int(v) for k, v in ok["class"].value_counts().items()},
            "uncertain_share": float(ok["uncertain"].mean()) if len(ok) else 0.0}


def format_summary(s: dict) -> str:
    classes = ", ".join(f"{k} {v}" for k, v in s["classes"].items()) or "none"
    return (f"{s['rows']} files: {s['scored']} scored, {s['errors']} errors; "
            f"{s['scored_this_run']} this run in {s['seconds']:.0f}s"
            + (f" ({s['images_per_s']:.1f} images/s)" if s["images_per_s"] else "")
            + f"; classes: {classes}; uncertain {s['uncertain_share']:.1%}")
