import json

import pytest

from skin.cli import main


def test_help_and_the_data_commands_start_without_torch(tmp_path):
    """`skin --help` and `skin data synth | scan | balance` import neither torch nor timm (3-4 s of every start
    here); a user error of a module loaded on the way is still one line and exit 2; the commands that need the
    backbones still list them."""
    import subprocess
    import sys
    code = """if True:
        import sys
        from skin.cli import main
        for argv in (["--help"], ["data", "--help"], ["data", "scan", "--help"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        d = sys.argv[1]
        assert main(["data", "synth", "--out", d + "/s", "--per-class", "3", "--size", "48", "--quiet"]) == 0
        assert main(["data", "scan", d + "/s", "--out", d + "/m", "--quiet", "--workers", "1"]) == 0
        assert main(["data", "balance", d + "/m", "--per-class", "2"]) == 0
        assert main(["data", "scan", d + "/missing", "--out", d + "/x"]) == 2
        print("loaded:", sorted(m for m in ("torch", "timm", "sqlalchemy") if m in sys.modules))
    """
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: []" in r.stdout, r.stdout[-2000:]
    assert "skin: error: " in r.stderr and "missing does not exist" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "skin.cli", "data", "cache", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "{mobilenetv2,efficientnet_b1,resnet50}" in r.stdout, r.stdout + r.stderr


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
    for smooth in ("none", "flips"):  # the overlay of the image's own maps, and of the maps averaged over its flips
        assert main(["explain", str(img), "--bundle", str(random_bundle), "--cam-smooth", smooth,
                     "--out", str(tmp_path / f"{smooth}.png")]) == 0
    assert (tmp_path / "none.png").read_bytes() != (tmp_path / "flips.png").read_bytes()
    # every explanation option on the command line; a bad one: one line, exit 2, nothing written
    assert main(["explain", str(img), "--bundle", str(random_bundle), "--cam-layer", "resnet50=backbone.layer2",
                 "--cam-method", "layercam", "--cam-stride", "16", "--out", str(tmp_path / "lc.png")]) == 0
    assert (tmp_path / "lc.png").read_bytes() != (tmp_path / "none.png").read_bytes()
    capsys.readouterr()
    for layer, says in (("resnet50=backbone.nope", "has no layer 'backbone.nope'"), ("resnet50", "MEMBER=LAYER"),
                        ("vgg=backbone.layer2", "does not have")):
        assert main(["explain", str(img), "--bundle", str(random_bundle), "--cam-layer", layer,
                     "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.png").exists()
    # the costlier map on request: the ensemble's occlusion sensitivity; options that do not apply, one line
    assert main(["explain", str(img), "--bundle", str(random_bundle), "--cam-method", "occlusion",
                 "--out", str(tmp_path / "occ.png")]) == 0
    assert "occlusion sensitivity" in capsys.readouterr().out
    assert (tmp_path / "occ.png").read_bytes() != (tmp_path / "none.png").read_bytes()
    assert main(["explain", str(img), "--bundle", str(random_bundle), "--cam-method", "occlusion", "--cam-stride",
                 "8", "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "do not apply" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad.png").exists()
    # a folder, batched, into jobs/predict.py's table
    assert main(["predict", str(tmp_path / "s" / "test"), "--bundle", str(random_bundle), "--out",
                 str(tmp_path / "p.csv"), "--batch-size", "4"]) == 0
    import pandas as pd
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(table) == len(list((tmp_path / "s" / "test").rglob("*.jpg"))) and (table["error"] == "").all()
    assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "b8"), "--stride", "8"]) == 0
    assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "b9"), "--member",
                 "resnet50=12"]) == 2
    assert "STRIDE one of (8, 16, 32)" in capsys.readouterr().err
    for layer, says in (("mobilenetv2=backbone.nope", "has no layer 'backbone.nope'"), ("mobilenetv2", "NAME=LAYER")):
        assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "bl"), "--layer", layer]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "bl"), "--stride", "8",
                 "--layer", "mobilenetv2=backbone.blocks.3"]) == 0
    assert "mobilenetv2 Grad-CAM stride 8 at backbone.blocks.3" in capsys.readouterr().out
    assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "lc"), "--method", "all=layercam",
                 "--method", "resnet50=gradcam"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2 LayerCAM" in out and "efficientnet_b1 LayerCAM" in out and "resnet50 Grad-CAM" in out, out
    for method, says in (("resnet50=scorecam", "one of gradcam, layercam"), ("layercam", "NAME=METHOD")):
        assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "lm"), "--method", method]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "lm").exists()
    assert main(["bundle", "cam-stride", str(tmp_path / "lc"), "--out", str(tmp_path / "sm"), "--smooth", "all=flips",
                 "--smooth", "resnet50=none"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2 LayerCAM (flip-averaged)" in out and "resnet50 Grad-CAM stride" in out, out
    for smooth, says in (("all=rotations", "one of none, flips"), ("flips", "NAME=SMOOTH")):
        assert main(["bundle", "cam-stride", str(random_bundle), "--out", str(tmp_path / "ls"), "--smooth", smooth]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ls").exists()


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


BAD_ARGS = [
    ["data", "synth", "--out", "{t}/s", "--per-class", "1"],
    ["data", "synth", "--out", "{t}/s", "--size", "8"],
    ["data", "scan", "{t}/none", "--out", "{t}/m"],
    ["data", "scan", "{t}", "--out", "{t}/m", "--split", "70/30"],
    ["data", "scan", "{t}", "--out", "{t}/m", "--near-dup-bits", "-3"],
    ["data", "scan", "{t}", "--out", "{t}/m", "--workers", "-2"],
    ["data", "balance", "{t}", "--per-class", "0"],
    ["data", "balance", "{t}", "--per-class", "3"],
    ["data", "cache", "{t}", "--image-size", "0"],
    ["data", "cache", "{t}/none"],
    ["bundle", "random", "--out", "{t}/b", "--image-size", "3"],
    ["bundle", "random", "--out", "{t}/b", "--members", "vgg16"],
    ["bundle", "inspect", "{t}/none"],
    ["predict", "{t}/x.jpg", "--bundle", "{t}/none"],
    ["predict", "{t}/x.jpg", "--bundle", "{t}", "--uncertain-below", "7"],
    ["explain", "{t}/x.jpg", "--bundle", "{t}", "--alpha", "2"],
    ["explain", "{t}/x.jpg", "--bundle", "{t}", "--cam-stride", "12"],
    ["explain", "{t}/x.jpg", "--bundle", "{t}", "--cam-smooth", "rotations"],
    ["predict", "{t}/x.jpg", "--bundle", "{t}", "--batch-size", "0"],
    ["bundle", "cam-stride", "{t}/none", "--out", "{t}/o", "--stride", "8"],
    ["models", "--num-classes", "0"],
    ["nonsense"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=lambda a: " ".join(a[:2]) + " " + " ".join(a[-2:]))
def test_bad_arguments_answer_one_line_and_exit_2(argv, tmp_path, capsys):
    """Every subcommand answers a bad argument with exit 2 and a last line that says what is
    wrong (argparse's usage line may stand above it), never a traceback."""
    argv = [a.format(t=tmp_path) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "error" in lines[-1] and "Traceback" not in err
    assert sum("error" in line for line in lines) == 1, err  # argparse's usage lines, then one error line
