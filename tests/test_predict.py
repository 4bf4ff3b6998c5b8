"""Batch inference: jobs/predict.py over Ray Data and `skin predict` on folders (skin.batch)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skin.batch import InputError, PredictionStore, columns, list_inputs
from skin.bundle import Bundle
from skin.images import ImageError, load_image
from skin.synth import make_sample


def _photos(root: Path) -> dict[str, str]:
    """A nested folder of good photographs and bad files; {relative path: expected error ('' = scored)}."""
    (root / "clinic" / "day2").mkdir(parents=True)
    want = {}
    for i, rel in enumerate(["a.jpg", "clinic/b.png", "clinic/day2/c.jpg", "clinic/day2/d.webp"]):
        make_sample(i % 6, 7, i, 72).image.save(root / rel)
        want[rel] = ""
    good = (root / "a.jpg").read_bytes()
    bad = {"empty.jpg": b"", "clinic/notes.jpg": b"these are notes, not a photograph\n",
           "clinic/day2/cut.jpg": good[: len(good) // 3]}
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "clinic" / "folder.png").mkdir()  # a directory named like an image
    (root / "readme.txt").write_text("not listed: not an image type")
    for rel, data in bad.items():  # the message the HTTP API gives for the same bytes
        with pytest.raises(ImageError) as e:
            load_image(data)
        want[rel] = str(e.value)
    want["clinic/folder.png"] = "is a directory, not an image file"
    return want


def _cli_probabilities(bundle: Path, files: list[Path], capsys) -> dict[str, dict]:
    from skin.cli import main
    capsys.readouterr()
    assert main(["predict", *map(str, files), "--bundle", str(bundle), "--json"]) == 0
    return {Path(r["file"]).resolve().as_posix(): r["probabilities"] for r in json.loads(capsys.readouterr().out)}


def test_listing_and_manifests(tmp_path):
    want = _photos(tmp_path / "in")
    inputs = list_inputs(str(tmp_path / "in"))
    assert [inputs.relative(p) for p in inputs.paths] == sorted(want)  # stable order, .txt skipped
    uri = list_inputs((tmp_path / "in").as_uri())  # the pyarrow file-system path (s3://, gs:// alike)
    assert [uri.relative(p) for p in uri.paths] == sorted(want)
    pd.DataFrame({"path": ["clinic/b.png", str(tmp_path / "in" / "a.jpg"), "clinic/b.png"]}).to_csv(
        tmp_path / "in" / "list.csv", index=False)
    m = list_inputs(str(tmp_path / "in" / "list.csv"))
    assert m.paths == [str(tmp_path / "in" / "clinic" / "b.png"), str(tmp_path / "in" / "a.jpg")]
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "bad.csv", index=False)
    for src, msg in [(tmp_path / "bad.csv", "no `path` column"), (tmp_path / "nope", "does not exist"),
                     (tmp_path / "in" / "a.jpg", "is a file")]:
        with pytest.raises(InputError, match=msg):
            list_inputs(str(src))


def test_store_resumes_after_a_partial_write_and_refuses_another_bundle(random_bundle, tmp_path):
    b = Bundle.load(random_bundle)
    store = PredictionStore(tmp_path / "out", b)
    assert store.open() == set()
    cols = columns(b.classes.names, b.member_names)
    row = {c: "" for c in cols} | {"path": "/x/1.jpg", "uncertain": False, "error": "file not found"}
    store.append(pd.DataFrame([row, row | {"path": "/x/2.jpg"}]))
    with open(store.csv, "a") as f:
        f.write("/x/3.jpg,Akne,0.9")  # a job killed in the middle of a write
    assert PredictionStore(tmp_path / "out", b).open() == {"/x/1.jpg", "/x/2.jpg"}
    other = tmp_path / "other"
    shutil.copytree(random_bundle, other)
    from skin.bundle import derive_bundle
    with pytest.raises(InputError, match="holds predictions of bundle"):
        PredictionStore(tmp_path / "out", derive_bundle(Bundle.load(other), tmp_path / "b2", weights=[.5, .25, .25])).open()


def test_predict_job_folder_cam_resume_and_manifest(ray_local, random_bundle, tmp_path, capsys):
    import jobs.predict as job
    photos, out = tmp_path / "photos", tmp_path / "out"
    want = _photos(photos)
    args = ["--bundle", str(random_bundle), "--out", str(out), "--cpus-per-worker", "1", "--batch-size", "3"]
    assert job.main(args + ["--input", str(photos), "--dry-run"]) == 0
    assert not out.exists()  # a dry run plans and writes nothing
    assert job.main(args + ["--input", str(photos), "--cam"]) == 0
    df = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert df.columns.tolist() == columns(Bundle.load(random_bundle).classes.names, Bundle.load(random_bundle).member_names)
    assert [Path(p).relative_to(photos).as_posix() for p in df["path"]] == sorted(want)  # one row per file, in order
    assert dict(zip((Path(p).relative_to(photos).as_posix() for p in df["path"]), df["error"])) == want
    assert pd.read_parquet(out / "predictions.parquet")["path"].tolist() == df["path"].tolist()
    # the probabilities are those of `skin predict --json` for the same files
    good = df[df["error"] == ""]
    ref = _cli_probabilities(random_bundle, [Path(p) for p in good["path"]], capsys)
    for _, r in good.iterrows():
        exp = ref[Path(r["path"]).resolve().as_posix()]
        assert max(abs(float(r[f"p_{c}"]) - v) for c, v in exp.items()) <= 1e-5
        assert r["class"] == max(exp, key=exp.get)
    cams = sorted(p.relative_to(out / "cam").as_posix() for p in (out / "cam").rglob("*.png"))
    assert cams == sorted(str(Path(k).with_suffix(".png")) for k, e in want.items() if not e)

    # resume: only the new files are scored, the old rows stay as they were
    make_sample(3, 9, 0, 72).image.save(photos / "clinic" / "new.jpg")
    capsys.readouterr()
    assert job.main(args + ["--input", str(photos)]) == 0
    assert "1 to score" in capsys.readouterr().out
    again = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(again) == len(df) + 1 and again["path"].is_unique
    pd.testing.assert_frame_equal(again[again["path"].isin(df["path"])].reset_index(drop=True), df)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored_this_run"] == 1 and summary["errors"] == 4 and summary["scored"] == 5

    # a manifest naming some of the files and one that is missing
    pd.DataFrame({"path": ["clinic/b.png", "gone.jpg"]}).to_csv(photos / "list.csv", index=False)
    assert job.main(args[:2] + ["--out", str(tmp_path / "m"), "--cpus-per-worker", "1",
                                "--input", str(photos / "list.csv")]) == 0
    m = pd.read_csv(tmp_path / "m" / "predictions.csv", keep_default_na=False)
    assert m["error"].tolist() == ["", "file not found"]
    b_row = df[df["path"] == str(photos / "clinic" / "b.png")].iloc[0]
    assert abs(float(m.iloc[0]["p_Akne"]) - float(b_row["p_Akne"])) <= 1e-6


def test_predict_job_refuses_bad_arguments_with_one_line(random_bundle, tmp_path, capsys):
    import jobs.predict as job
    (tmp_path / "empty").mkdir()
    cases = [(["--input", str(tmp_path / "nope")], "does not exist"),
             (["--input", str(tmp_path / "empty")], "no images in"),
             (["--input", str(tmp_path), "--bundle", str(tmp_path)], "bundle")]
    for extra, msg in cases:
        argv = ["--bundle", str(random_bundle), "--out", str(tmp_path / "o")] + extra
        assert job.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
