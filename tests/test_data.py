import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin.classes import ClassMap, ClassMapError, display_name
from skin.data import (DatasetError, ScanOptions, balance, load_manifest, scan, stratified_split)
from skin.synth import make_sample

OPTS = ScanOptions(workers=1)


def test_class_map_from_numbered_folders():
    cm = ClassMap.from_folders(["3. Akne", "1. Enfeksiyonel", "10. Other", "2. Ekzama"])
    assert cm.names == ("Enfeksiyonel", "Ekzama", "Akne", "Other")
    assert display_name("6. Malign") == "Malign" and cm.index("Akne") == 2
    with pytest.raises(ClassMapError):
        ClassMap(("A", "A"))
    with pytest.raises(ClassMapError, match="differ"):
        cm.check_same(ClassMap(("Ekzama", "Enfeksiyonel", "Akne", "Other")))


def test_layout_a(scanned):
    assert ClassMap.load(scanned / "classes.json").names[0] == "Enfeksiyonel"
    for split in ("train", "val", "test"):
        df = load_manifest(scanned, split)
        assert set(df["label"]) == set(ClassMap().names)
    report = (scanned / "report.md").read_text()
    assert "Enfeksiyonel" in report


def _write_flat(root: Path, per_class=8, size=64, classes=("Akne", "Benign", "Malign")):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_sample(k, 3, i, size).image.save(root / name / f"{i}.jpg", quality=90)
    return root


def test_layout_b_split_and_rejects(tmp_path):
    src = _write_flat(tmp_path / "flat")
    (src / "Akne" / "broken.jpg").write_bytes(b"not really a jpeg")
    data = (src / "Akne" / "0.jpg").read_bytes()
    (src / "Akne" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    report = scan(src, tmp_path / "out", OPTS, progress=False)
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert sorted(Path(p).name for p in rejects["path"]) == ["broken.jpg", "truncated.jpg"]
    assert all(rejects["reason"].str.len() > 10)
    assert report["classes"] == ["Akne", "Benign", "Malign"]  # default order kept
    counts = report["counts"]
    for c in report["classes"]:
        assert counts["train"][c] >= 4 and counts["val"][c] >= 1 and counts["test"][c] >= 1


def test_layout_c_csv_with_groups(tmp_path):
    src = _write_flat(tmp_path / "flat", per_class=12)
    rows = []
    for p in sorted(src.rglob("*.jpg")):
        rows.append({"path": str(p.relative_to(src)), "label": p.parent.name,
                     "group": f"{p.parent.name}-patient{int(p.stem) // 3}"})
    pd.DataFrame(rows).to_csv(src / "manifest.csv", index=False)
    scan(src / "manifest.csv", tmp_path / "out", OPTS, progress=False)
    seen = {}
    for split in ("train", "val", "test"):
        for g in load_manifest(tmp_path / "out", split)["group"]:
            assert seen.setdefault(g, split) == split, f"group {g} straddles splits"


def test_csv_errors(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\nx.jpg,A\n")
    with pytest.raises(DatasetError, match="lacks column"):
        scan(tmp_path / "m.csv", tmp_path / "out", OPTS, progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nope", tmp_path / "out", OPTS, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        scan(tmp_path / "empty", tmp_path / "out", OPTS, progress=False)


def test_planted_duplicates_are_found_and_removed(tmp_path, synth_dir):
    src = tmp_path / "ds"
    shutil.copytree(synth_dir, src, ignore=shutil.ignore_patterns("masks", "manifest.csv"))
    train_img = sorted((src / "train" / "3. Akne").glob("*.jpg"))[0]
    shutil.copy(train_img, src / "test" / "3. Akne" / "exact_copy.jpg")
    img = Image.open(train_img).convert("RGB")
    near = img.resize((int(img.width * 0.8), int(img.height * 0.8)))
    near.save(src / "val" / "3. Akne" / "near_copy.jpg", quality=80)
    scan(src, tmp_path / "out", OPTS, progress=False)
    leaks = pd.read_csv(tmp_path / "out" / "leaks.csv")
    by_name = {Path(p).name: k for p, k in zip(leaks["path"], leaks["kind"])}
    assert by_name.get("exact_copy.jpg") == "exact"
    assert by_name.get("near_copy.jpg") == "near"
    assert len(leaks) == 2, leaks  # and no false alarms among the distinct synthetic images
    kept = pd.concat([load_manifest(tmp_path / "out", s) for s in ("val", "test")])
    assert not kept["path"].str.contains("_copy").any()


def test_balance(scanned):
    a = balance(scanned, per_class=10, seed=3)
    b = balance(scanned, per_class=10, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a["label"].value_counts().tolist() == [10] * 6
    train = set(load_manifest(scanned, "train")["path"])
    assert set(a["path"]) <= train
    for split in ("val", "test"):
        assert not set(a["path"]) & set(load_manifest(scanned, split)["path"])
    big = balance(scanned, per_class=20, seed=3)  # short classes: every image once, then repeats
    for _, rows in big.groupby("label"):
        assert len(rows) == 20 and rows["path"].nunique() == len(train & set(rows["path"]))
    balance(scanned, per_class=10, seed=0)  # restore what other tests expect


def test_balance_refuses_an_empty_class(tmp_path, scanned):
    shutil.copytree(scanned, tmp_path / "s")
    df = pd.read_csv(tmp_path / "s" / "train.csv", keep_default_na=False)
    df[df["label"] != "Akne"].to_csv(tmp_path / "s" / "train.csv", index=False)
    with pytest.raises(DatasetError, match="'Akne' has no training images"):
        balance(tmp_path / "s", per_class=5)


def test_stratified_split_is_seeded():
    labels = np.array(["a"] * 20 + ["b"] * 20)
    s1 = stratified_split(labels, None, (0.7, 0.15, 0.15), 1)
    s2 = stratified_split(labels, None, (0.7, 0.15, 0.15), 1)
    assert (s1 == s2).all() and (s1 == "train").sum() == 28


def test_manifest_paths_work_from_any_directory(tmp_path, synth_dir, monkeypatch):
    """A scan given a relative path stores absolute paths: Ray workers and submitted jobs read the
    manifest from another working directory."""
    import shutil
    shutil.copytree(synth_dir, tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    scan("s", "d", ScanOptions(workers=1), progress=False)
    df = pd.read_csv(tmp_path / "d" / "val.csv")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])


def test_training_says_so_when_no_validation_image_can_be_read(scanned, tmp_path):
    from skin.train import LocalRuntime, TrainConfig, train_member
    data = tmp_path / "data"
    shutil.copytree(scanned, data, ignore=shutil.ignore_patterns("cache"))
    val = pd.read_csv(data / "val.csv")
    val["path"] = [str(tmp_path / "gone" / Path(p).name) for p in val["path"]]  # moved since the scan
    val.to_csv(data / "val.csv", index=False)
    cfg = TrainConfig(backbone="mobilenetv2", data_dir=str(data), epochs=1, image_size=32, batch_size=16,
                      max_steps_per_epoch=1, pretrained="none", num_workers=0, threads=1, use_cache=False)
    with pytest.raises(DatasetError, match="none of the validation images could be read"):
        train_member(cfg, LocalRuntime(str(tmp_path / "run")), log=lambda s: None)


def test_scan_takes_lesion_free_images_apart_from_the_classes(tmp_path):
    """`skin data scan --lesion-free FOLDER`: lesion_free_<split>.csv with label index -1 (the
    folder's own splits kept), bad files in rejects.csv, the class manifests untouched; a later
    scan without the option leaves none of them behind; a missing folder is one clear error."""
    from skin.data import load_lesion_free
    from skin.synth import write_dataset
    src = write_dataset(tmp_path / "synth", per_class=4, size=48, seed=1, progress=False, lesion_free=10)
    (src / "lesion-free" / "train" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    report = scan(src, out, OPTS, progress=False, lesion_free=src / "lesion-free")
    assert report["lesion_free"] == {"train": 7, "val": 1, "test": 2}
    free = load_lesion_free(out, "train")
    assert len(free) == 7 and set(free["label_index"]) == {-1} and all("/lesion-free/train/" in p for p in free["path"])
    assert "broken.jpg" in pd.read_csv(out / "rejects.csv")["path"].str.cat()
    assert not pd.read_csv(out / "train.csv")["path"].str.contains("lesion-free").any()
    scan(src, out, OPTS, progress=False)
    assert load_lesion_free(out, "train") is None and not list(out.glob("lesion_free_*.csv"))
    with pytest.raises(DatasetError, match="not a folder"):
        scan(src, out, OPTS, progress=False, lesion_free=tmp_path / "nowhere")
