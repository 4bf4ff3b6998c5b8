"""`skin`: the command line of the library (no Ray needed). Run `skin --help` or `skin CMD --help`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

# The errors a user fixes (one line, exit 2), by module: each module is imported by the command that can raise
# its error, so the CLI looks them up among the modules loaded when one is raised and imports none up front
# (`skin --help` and the data commands start without torch: 0.4 s against 3-4 s here).
_USER_ERRORS = {"skin.data": ("DatasetError",), "skin.checkpoint": ("CheckpointError",),
                "skin.classes": ("ClassMapError",), "skin.images": ("ImageError",),
                "skin.registry": ("UnknownBackboneError", "PretrainedWeightsError"),
                "skin.explanation": ("ExplanationError",), "skin.records": ("RecordError",)}


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes of the skin modules loaded now, and FileNotFoundError."""
    return tuple(getattr(sys.modules[m], n) for m, names in _USER_ERRORS.items() if m in sys.modules
                 for n in names) + (FileNotFoundError,)


from .args import (add_amp_argument, add_explanation_arguments, at_least, explanation_request, fraction,
                   split_arg as _split_arg, zero_or_at_least)

_positive = at_least(1)


# --------------------------------------------------------------------------- commands
def cmd_synth(a) -> int:
    from .synth import write_dataset
    from .synth import LESION_FREE_DIR
    out = write_dataset(a.out, a.per_class, a.size, a.seed, a.workers, progress=not a.quiet, artefacts=a.artefacts,
                        lesion_free=a.lesion_free)
    print(f"wrote {a.per_class * 6} images (+ masks) in layout (a) to {out}; manifest: {out / 'manifest.csv'}")
    if a.lesion_free:
        print(f"wrote {a.lesion_free} lesion-free skin images to {out / LESION_FREE_DIR} "
              f"(scan with --lesion-free {out / LESION_FREE_DIR})")
    return 0


def cmd_scan(a) -> int:
    from .data import ScanOptions, scan
    from .classes import ClassMap
    opts = ScanOptions(split=a.split, seed=a.seed, near_dup_bits=a.near_dup_bits,
                       remove_leaks=not a.keep_leaks, workers=a.workers,
                       classes=ClassMap.load(a.classes) if a.classes else None)
    report = scan(a.source, a.out, opts, progress=not a.quiet, lesion_free=a.lesion_free)
    print((Path(a.out) / "report.md").read_text())
    print(f"manifests: {a.out}/train.csv val.csv test.csv{' lesion_free_*.csv' if a.lesion_free else ''}; "
          f"classes: {a.out}/classes.json")
    return 0 if report else 1


def cmd_balance(a) -> int:
    from .data import balance
    df = balance(a.dir, a.per_class, a.seed)
    counts = df["label"].value_counts().to_dict()
    print(f"wrote {Path(a.dir) / 'train_balanced.csv'}: {len(df)} rows, "
          f"{a.per_class} per class ({', '.join(f'{k}={v}' for k, v in counts.items())}), "
          f"{df['path'].nunique()} distinct images")
    return 0


def cmd_models(a) -> int:
    from .registry import models_table
    rows = models_table(a.num_classes)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'backbone':<16}{'timm':<26}{'F':>6}{'backbone params':>17}{'head params':>13}  {'cam layer':<17}{'head'}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backbone']:<16}{r['timm']:<26}{r['features']:>6}{r['backbone_params']:>17,}"
              f"{r['head_params']:>13,}  {r['cam_layer']:<17}{r['head']} (dropout {r['dropout']})")
    return 0


def cmd_bundle_random(a) -> int:
    import torch
    from .bundle import write_bundle
    from .classes import ClassMap
    from .registry import create_model
    classes = ClassMap.load(a.classes) if a.classes else ClassMap()
    torch.manual_seed(a.seed)
    members = {n: create_model(n, len(classes), pretrained="none", input_size=a.image_size,
                               normalize="per_image" if a.per_image_norm else None)
               for n in a.members}
    b = write_bundle(a.out, classes, members, untrained=True,
                     provenance={"note": "random weights (skin bundle random): for tests and demos only"})
    print(f"wrote untrained bundle {b.id} to {a.out} ({', '.join(a.members)}, {a.image_size or 'default'} px)")
    return 0


def cmd_bundle_inspect(a) -> int:
    from .bundle import Bundle
    b = Bundle.load(a.dir)
    info = b.to_json()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bundle {b.id} at {b.root}  {'(UNTRAINED: random weights)' if b.untrained else ''}")
    print(f"classes: {', '.join(b.classes)}")
    for m, w in zip(b.members, b.weights):
        print(f"  {m.name:<16} weight {w:.3f}  T={m.temperature:.3f}  input {m.data_config.input_size}px "
              f"stride {m.output_stride} (maps: {m.explanation.summary(m.output_stride)})  "
              f"({m.data_config.normalize})  {m.weights_file} sha256 {m.sha256[:12]}  ok")
    ens = (b.metrics or {}).get("ensemble")
    if ens:
        print(f"test metrics (ensemble): accuracy {ens['accuracy']:.4f}, macro-F1 {ens['f1_macro']:.4f}")
    return 0


def cmd_bundle_cam_stride(a) -> int:
    from .bundle import Bundle, BundleError, derive_bundle
    from .registry import OUTPUT_STRIDES
    src = Bundle.load(a.dir)
    strides = {n: a.stride for n in src.member_names} if a.stride else {}
    for item in a.member or []:
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) not in OUTPUT_STRIDES:
            raise BundleError(f"--member takes NAME=STRIDE with STRIDE one of {OUTPUT_STRIDES}, such as resnet50=8; "
                              f"got {item!r}")
        strides[name] = int(value)
    layers = {}
    for item in a.layer or []:
        name, _, value = item.partition("=")
        if not value:
            raise BundleError(f"--layer takes NAME=LAYER, such as mobilenetv2=backbone.blocks.3; got {item!r}")
        layers[name] = value
    methods = _per_member(src, a.method, "--method", "METHOD", "resnet50=layercam or all=layercam")
    smooths = _per_member(src, a.smooth, "--smooth", "SMOOTH", "all=flips or resnet50=none")
    if not strides and not layers and not methods and not smooths:
        raise BundleError("give --stride S (every member), --member NAME=S, --layer NAME=LAYER, --method NAME=METHOD "
                          "and/or --smooth NAME=SMOOTH")
    explanations: dict[str, dict] = {}
    for key, values in (("stride", strides), ("layer", layers), ("method", methods), ("smooth", smooths)):
        for name, value in values.items():
            explanations.setdefault(name, {})[key] = value
    new = derive_bundle(src, a.out, explanations=explanations, provenance={"explanations": explanations})
    print(f"wrote bundle {new.id} to {a.out}: "
          + ", ".join(f"{e.name} {e.explanation.summary(e.output_stride)}" for e in new.members)
          + f" (answers unchanged; source {src.id} untouched)")
    return 0


def _per_member(src, items: list[str] | None, flag: str, word: str, example: str) -> dict[str, str]:
    """NAME=VALUE items (NAME may be 'all') -> {member: value}."""
    from .bundle import BundleError
    out: dict[str, str] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not value:
            raise BundleError(f"{flag} takes NAME={word}, such as {example}; got {item!r}")
        out.update(dict.fromkeys(src.member_names, value) if name == "all" else {name: value})
    return out


def cmd_predict(a) -> int:
    """Images and folders (recursive) in-process, in batches, through skin.batch.BatchPredictor (the
    unit of work of jobs/predict.py): one line per file, the API's JSON (--json) or the job's table (--out)."""
    import pandas as pd
    from .batch import BatchPredictor, answer_row, columns, error_row, list_inputs
    from .images import DATASET_FORMATS, ImageLimits
    paths: list[str] = []
    for item in a.images:
        paths += list_inputs(item).paths if Path(item).is_dir() else [item]
    scorer = BatchPredictor(a.bundle, uncertain_below=a.uncertain_below, amp=a.amp, graphs=a.graphs,
                            limits=ImageLimits(formats=DATASET_FORMATS))
    rows, answers, failures = [], [], 0
    for start in range(0, len(paths), a.batch_size):
        for path, r, err in scorer.score(paths[start:start + a.batch_size]):
            if r is None:
                failures += 1
                print(f"skin predict: {path}: {err}", file=sys.stderr)
                rows.append(error_row(path, err, scorer.classes, scorer.members))
                continue
            rows.append(answer_row(path, r))
            answers.append(r | {"file": str(path)})
            if not a.json:
                flag = "  [uncertain: " + "; ".join(r["uncertain_reasons"]) + "]" if r["uncertain"] else ""
                print(f"{path}: {r['class']} ({r['confidence']:.1%}){flag}")
    if a.out:
        df = pd.DataFrame(rows, columns=columns(scorer.classes, scorer.members))
        (df.to_parquet if a.out.endswith(".parquet") else df.to_csv)(a.out, index=False)
        print(f"skin predict: {len(df)} rows ({failures} errors) -> {a.out}", file=sys.stderr)
    if a.json:
        single = len(a.images) == 1 and not Path(a.images[0]).is_dir()
        print(json.dumps(answers if not single else (answers[0] if answers else []), indent=2))
    return 1 if failures else 0

def cmd_explain(a) -> int:
    from .bundle import Bundle
    from .ensemble import Predictor
    from .images import load_image
    from .explanation import ExplanationError
    from .occlusion import OCCLUSION
    from .render import overlay, png_bytes
    bundle = Bundle.load(a.bundle)
    if a.class_name:
        bundle.classes.index(a.class_name)  # unknown names list the valid ones
    img = load_image(a.image)
    explain = explanation_request(a, bundle.member_names)
    out = Path(a.out)
    if a.cam_method == OCCLUSION:
        if a.members:
            raise ExplanationError("--members: an occlusion map is the ensemble's; drop --members")
        t0 = time.perf_counter()
        r = Predictor(bundle, amp=a.amp, graphs=a.graphs).occlusion([img], class_name=a.class_name)[0]
        o = r["occlusion"]
        out.write_bytes(png_bytes(overlay(img, o["map"], a.alpha)))
        print(f"{a.image}: {r['class']} ({r['confidence']:.1%}); occlusion sensitivity of {o['class']} "
              f"({o['forwards']} forwards of each member, {time.perf_counter() - t0:.1f} s) -> {out}")
        return 0
    r = Predictor(bundle, amp=a.amp, graphs=a.graphs, explain=explain).answers(
        [img], cam=True, class_name=a.class_name, each_member=a.members)[0]
    g = r["gradcam"]
    out.write_bytes(png_bytes(overlay(img, g["map"], a.alpha)))
    print(f"{a.image}: {r['class']} ({r['confidence']:.1%}); Grad-CAM of {g['class']} -> {out}")
    for n, m in g.get("members", {}).items():
        p = out.with_name(f"{out.stem}-{n}{out.suffix}")
        p.write_bytes(png_bytes(overlay(img, m, a.alpha)))
        print(f"  {n}: {p}")
    return 0


def cmd_records(a) -> int:
    import datetime as dt
    from .records import PhotoStore, RecordError, Records, parse_since
    store = Records.open(a.db)
    photos = PhotoStore(Path(a.photos)) if getattr(a, "photos", None) else None
    if a.records_cmd == "export":
        if photos is None:
            raise RecordError("--photos: the folder the service keeps consented photographs in (its photos_dir)")
        s = store.export(a.out, photos, parse_since(a.since))
        print(f"exported {s['exported']} reviewed photograph(s) ({s['corrected']} corrected, "
              f"{s['exported'] - s['corrected']} confirmed; {s['without_photo']} reviewed without a kept photograph "
              f"left out) -> {s['manifest']}\nnext: skin data scan {s['manifest']} --classes "
              f"{Path(s['manifest']).with_name('classes.json')} --out DATA")
    elif a.records_cmd == "delete":
        for rid in a.request_id:
            if not store.delete(rid, photos):
                raise RecordError(f"no answer with request id {rid!r} on record")
            print(f"deleted {rid} (its reviews{' and photograph' if photos else ''} too)")
    elif a.records_cmd == "purge":
        n = store.purge(dt.timedelta(days=a.older_than_days), photos)
        print(f"deleted {n} answer(s) older than {a.older_than_days:g} days")
    else:  # queue
        for q in store.queue(a.limit):
            said = ", ".join(f"{r['reviewer']}: {r['right_class']}" for r in q["reviews"]) or "not reviewed"
            print(f"{q['at']}  {q['request_id']:<20} {q['why']:<9} answered {q['answer_class']:<14} {said}")
        for cls, d in store.agreement().items():
            print(f"agreement {cls:<14} {d['agreed']}/{d['reviewed']} = {d['agreement']:.2f}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given the command line (`argv`), only the command it names gets its
    arguments (and imports what they list: backbones, explanation options); the others stay one-line
    entries of `skin --help`. Without it, every command's."""
    p = argparse.ArgumentParser(prog="skin", description="skinray's library tools: datasets, models, "
                                "bundles, prediction and Grad-CAM, in-process (no Ray needed).")
    sub = p.add_subparsers(dest="cmd", required=True)

    want = _wanted(argv, COMMANDS)
    for name, (help_, build) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_)
        if want in (None, name):
            build(cmd, list(argv[argv.index(name) + 1:]) if want == name else None)  # the group's own words
    return p


def _wanted(argv: Sequence[str] | None, names) -> str | None:
    """The command `argv` names among `names` (its first word); "" when it names none (`--help` alone);
    None when every command should be built: no `argv`, or a first word that is no command (argparse then
    lists the choices)."""
    if argv is None:
        return None
    words = [w for w in argv if not w.startswith("-")]
    if not words:
        return ""
    return words[0] if words[0] in names else None


CACHE_HELP = "write the resized-image cache training reads (once per manifest)"


def _data_arguments(cmd: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """skin data synth | scan | balance | cache (torch only for cache)."""
    data = cmd.add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="write the built-in synthetic lesion dataset (layout a + masks)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--per-class", type=at_least(3), default=200, help="images per class, all splits (default 200; "
                   "at least 3: one image per split)")
    s.add_argument("--size", type=at_least(32), default=256, help="image side in pixels (default 256; at least 32)")
    s.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same pixels")
    s.add_argument("--workers", type=_positive, default=1, help="processes (default 1)")
    s.add_argument("--artefacts", type=at_least(0), default=0, metavar="N",
                   help="add 1..N ink blots / gel bubbles per image away from the lesion (not in its mask; "
                        "same lesions and masks as without): a test of whether Grad-CAM follows the model "
                        "or merely what stands out from the skin (default 0)")
    s.add_argument("--lesion-free", type=zero_or_at_least(3), default=0, metavar="N",
                   help="also write N lesion-free skin images (same nuisances, no lesion) under OUT/lesion-free/"
                        "{train,val,test}, for outlier exposure in training (default 0; 0 or at least 3)")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.set_defaults(fn=cmd_synth)

    s = data.add_parser("scan", help="validate, split and de-duplicate a dataset into manifests")
    s.add_argument("source", help="folder (root/{train,val,test}/<class>/ or root/<class>/) or CSV manifest path,label[,split][,group]")
    s.add_argument("--out", required=True, help="writes train.csv val.csv test.csv classes.json rejects.csv leaks.csv report.md")
    s.add_argument("--split", type=_split_arg, default=(0.70, 0.15, 0.15), help="TRAIN/VAL/TEST fractions when the source has no split (default 70/15/15)")
    s.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    s.add_argument("--near-dup-bits", type=at_least(0), default=6, help="dHash Hamming distance counted as a near-duplicate (default 6; 0 = exact only)")
    s.add_argument("--keep-leaks", action="store_true", help="report cross-split duplicates but keep them in val/test")
    s.add_argument("--lesion-free", metavar="FOLDER", default=None,
                   help="a folder of skin images without a lesion (with train/val/test subfolders, or split like the "
                        "dataset): written as lesion_free_<split>.csv; training then teaches the members that plain "
                        "skin is evidence of no class (outlier exposure, TrainConfig.lesion_free_weight)")
    s.add_argument("--workers", type=at_least(0), default=0, help="validation processes (default: one per core)")
    s.add_argument("--classes", metavar="CLASSES_JSON", help="keep this class map (a bundle's or an export's "
                   "classes.json; e.g. `skin records export`'s, so that the next bundle can start from the one that "
                   "answered even when some classes were never reviewed); default: inferred from the labels")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.set_defaults(fn=cmd_scan)

    s = data.add_parser("balance", help="a fixed number per class from the training split only")
    s.add_argument("dir", help="a `skin data scan` output folder")
    s.add_argument("--per-class", type=_positive, required=True, help="images per class (with replacement only where a class is short)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_balance)

    s = data.add_parser("cache", help=CACHE_HELP)
    if _wanted(argv, ("synth", "scan", "balance", "cache")) in (None, "cache"):
        from .cache import add_cache_arguments  # torch: only for `skin data cache`
        add_cache_arguments(s)


def _models_arguments(s: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """skin models."""
    s.add_argument("--num-classes", type=_positive, default=6)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)


def _bundle_arguments(cmd: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """skin bundle random | cam-stride | inspect."""
    bundle = cmd.add_subparsers(dest="bundle_cmd", required=True)
    from .registry import DEFAULT_MEMBERS, list_backbones
    s = bundle.add_parser("random", help="a bundle of random weights, marked untrained (tests, demos)")
    s.add_argument("--out", required=True)
    s.add_argument("--image-size", type=at_least(16), default=None, help="input size of every member (default: the weights' own, 224)")
    s.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS), choices=list_backbones())
    s.add_argument("--classes", help="classes.json to use (default: the six default classes)")
    s.add_argument("--per-image-norm", action="store_true", help="standardise each image by its own statistics")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_bundle_random)
    s = bundle.add_parser("cam-stride", help="a new bundle whose Grad-CAM maps use a finer stride, another layer, "
                          "LayerCAM and/or flip-averaging (answers unchanged)")
    s.add_argument("dir", help="source bundle (left untouched)")
    s.add_argument("--out", required=True, help="the new bundle's folder (never overwritten)")
    s.add_argument("--stride", type=int, choices=(8, 16, 32), help="for every member")
    s.add_argument("--member", action="append", metavar="NAME=STRIDE", help="for one member (repeatable)")
    s.add_argument("--layer", action="append", metavar="NAME=LAYER",
                   help="Grad-CAM at this layer of one member, by the general path (one backward per class), "
                        "e.g. mobilenetv2=backbone.blocks.3; default: the layer feeding the pooling (repeatable)")
    s.add_argument("--method", action="append", metavar="NAME=METHOD",
                   help="how one member's gradient weighs its feature map: gradcam (one weight per channel, the "
                        "default) or layercam (per position, Jiang et al. 2021; built for layers before the last), "
                        "e.g. resnet50=layercam (repeatable; NAME may be 'all')")
    s.add_argument("--smooth", action="append", metavar="NAME=SMOOTH",
                   help="flips: one member's maps averaged over the image's four flips, each normalised and "
                        "flipped back (test-time augmentation of the map, pytorch-grad-cam's aug_smooth; 4x the "
                        "map's cost, the answer unchanged); none: the image's own maps (the default), "
                        "e.g. all=flips (repeatable; NAME may be 'all')")
    s.set_defaults(fn=cmd_bundle_cam_stride)
    s = bundle.add_parser("inspect", help="validate a bundle (schema, hashes, class maps, weights); non-zero exit when invalid")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bundle_inspect)


def _predict_arguments(s: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """skin predict."""
    s.description = ("Classify images in-process, in batches. A folder is read recursively "
                     "(.jpg .jpeg .png .webp .heic .heif). For a cluster, a manifest or a URI: jobs/predict.py.")
    s.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    s.add_argument("--bundle", required=True)
    s.add_argument("--json", action="store_true", help="print the HTTP API's JSON shape")
    s.add_argument("--out", help="also write jobs/predict.py's table (a row per file, errors included) to this "
                   ".csv or .parquet file")
    s.add_argument("--batch-size", type=_positive, default=16, help="images per forward pass (default 16)")
    s.add_argument("--uncertain-below", type=fraction, default=0.5, help="flag answers whose confidence is below this (default 0.5)")
    add_amp_argument(s)
    s.set_defaults(fn=cmd_predict)


def _records_arguments(cmd: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """skin records queue | export | delete | purge."""
    rec = cmd.add_subparsers(dest="records_cmd", required=True)
    from .records import default_url
    db = {"help": f"the records' SQLAlchemy URL (the service's records_url; default {default_url()})"}
    s = rec.add_parser("queue", help="uncertain and disputed answers, oldest first; agreement per class")
    s.add_argument("--db", **db)
    s.add_argument("--limit", type=_positive, default=50)
    s.set_defaults(fn=cmd_records)
    s = rec.add_parser("export", help="reviewed photographs (kept with consent) as a manifest `skin data scan` takes")
    s.add_argument("--db", **db)
    s.add_argument("--photos", help="the service's photos_dir")
    s.add_argument("--since", help="reviews from this date (YYYY-MM-DD) on")
    s.add_argument("--out", required=True, help="a new folder: OUT/manifest.csv and OUT/photos/")
    s.set_defaults(fn=cmd_records)
    s = rec.add_parser("delete", help="forget answers by request id: the row, its reviews, its photograph")
    s.add_argument("request_id", nargs="+")
    s.add_argument("--db", **db)
    s.add_argument("--photos", help="the service's photos_dir (to remove kept photographs too)")
    s.set_defaults(fn=cmd_records)
    s = rec.add_parser("purge", help="the retention period: forget every answer older than N days")
    s.add_argument("--older-than-days", type=float, required=True)
    s.add_argument("--db", **db)
    s.add_argument("--photos", help="the service's photos_dir (to remove kept photographs too)")
    s.set_defaults(fn=cmd_records)


def _explain_arguments(s: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """skin explain."""
    s.add_argument("image")
    s.add_argument("--bundle", required=True)
    s.add_argument("--class", dest="class_name", help="explain this class instead of the predicted one")
    s.add_argument("--out", default="overlay.png", help="output PNG (default overlay.png)")
    s.add_argument("--members", action="store_true", help="also write OUT-<member>.png for each member")
    s.add_argument("--alpha", type=fraction, default=0.4, help="overlay opacity in [0, 1] (default 0.4)")
    add_explanation_arguments(s, occlusion=True)
    add_amp_argument(s)
    s.set_defaults(fn=cmd_explain)


COMMANDS = {
    "data": ("synthesise, scan, balance datasets", _data_arguments),
    "models": ("registry table: parameters of each backbone and head", _models_arguments),
    "bundle": ("create or check model bundles", _bundle_arguments),
    "predict": ("classify images (files or folders) in-process with a bundle", _predict_arguments),
    "records": ("the service's answer records: review queue, export for training, deletion, retention",
                _records_arguments),
    "explain": ("Grad-CAM overlay of the ensemble (and, with --members, each member)", _explain_arguments),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except user_errors() as e:
        print(f"skin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("skin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
