import json

from skin.cli import main


def test_cli_end_to_end(tmp_path, capsys, random_bundle):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--per-class", "6", "--size", "64", "--quiet"]) == 0
    assert main(["data", "scan", str(tmp_path / "s"), "--out", str(tmp_path / "m"), "--quiet", "--workers", "1"]) == 0
    for f in ("train.csv", "val.csv", "test.csv", "classes.json", "rejects.csv"):
        assert (tmp_path / "m" / f).is_file()
    assert main(["data", "balance", str(tmp_path / "m"), "--per-class", "5"]) == 0
    assert (tmp_path / "m" / "train_balanced.csv").is_file()
    assert main(["bundle", "inspect", str(random_bundle)]) == 0
    img = next((tmp_path / "s" / "test").rglob("*.jpg"))
    capsys.readouterr()
    assert main(["predict", str(img), "--bundle", str(random_bundle), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-6


def test_cli_errors_are_readable(tmp_path, capsys):
    assert main(["bundle", "inspect", str(tmp_path)]) == 2
    assert "bundle.json not found" in capsys.readouterr().err
    assert main(["data", "balance", str(tmp_path), "--per-class", "3"]) == 2
    assert "skin data scan" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert main(["predict", str(tmp_path / "bad.jpg"), "--bundle", str(tmp_path)]) == 2


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "788,742" in out and "658,950" in out and "2,629,126" in out
