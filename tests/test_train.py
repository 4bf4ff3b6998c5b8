"""Training: the loop without Ray, then through Ray Train (one shared local Ray per session)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from skin.bundle import Bundle
from skin.train import SCORE, LocalRuntime, TrainConfig, state_digest, train_member

TINY = dict(epochs=2, image_size=32, batch_size=16, max_steps_per_epoch=2, pretrained="none",
            warmup_epochs=0.5, num_workers=0, threads=1)


def test_one_member_trains_and_reports_each_epoch(scanned, tmp_path):
    rt = LocalRuntime(str(tmp_path / "run"))
    train_member(TrainConfig(backbone="mobilenetv2", data_dir=str(scanned), **TINY), rt, log=lambda s: None)
    assert [m["epoch"] for m in rt.history] == [1, 2]
    for m in rt.history:
        for k in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", SCORE):
            assert np.isfinite(m[k])
    best = max(rt.history, key=lambda m: m[SCORE])
    meta = json.loads((tmp_path / "run" / "best" / "member.json").read_text())
    assert meta["epoch"] == best["epoch"] and meta["classes"][0] == "Enfeksiyonel"
    assert (tmp_path / "run" / "latest" / "optimizer.safetensors").is_file()


def test_init_from_a_bundle_starts_from_its_members_weights(scanned, random_bundle, tmp_path, capsys):
    """--init-from: the next bundle fine-tuned from the one that answered: the run's first weights are the
    bundle member's (head included); a bundle of another class map or without the member: one line, exit 2."""
    import torch
    from skin.classes import ClassMap
    from skin.train import init_from_bundle
    from skin.registry import create_model
    src = Bundle.load(random_bundle).load_member("mobilenetv2")
    fresh = create_model("mobilenetv2", 6, pretrained="none", input_size=64)
    init_from_bundle(fresh, str(random_bundle), "mobilenetv2", ClassMap())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), src.state_dict().values()))
    rt = LocalRuntime(str(tmp_path / "run"))  # and it trains from there
    train_member(TrainConfig(backbone="mobilenetv2", data_dir=str(scanned), init_from=str(random_bundle),
                             **{**TINY, "epochs": 1}), rt, log=lambda s: None)
    assert len(rt.history) == 1
    import jobs.train as job
    from skin.bundle import write_bundle
    other = tmp_path / "other"
    write_bundle(other, ClassMap(["a", "b", "c", "d", "e", "f"]), {"mobilenetv2": fresh}, untrained=True)
    write_bundle(tmp_path / "one", ClassMap(), {"mobilenetv2": fresh}, untrained=True)
    for bundle, members, says in ((other, "mobilenetv2", "class map"),
                                  (tmp_path / "one", "mobilenetv2 resnet50", "no member(s) ['resnet50']"),
                                  (tmp_path / "nope", "mobilenetv2", "nope")):
        assert job.main(["--data", str(scanned), "--out", str(tmp_path / "o"), "--smoke", "--members", *members.split(),
                         "--init-from", str(bundle)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_class_without_training_images_is_refused_unless_fine_tuning(scanned, tmp_path, capsys):
    """A fresh run needs every class in training; a run fine-tuned from a bundle (--init-from) on reviewed
    cases may lack some, and says what that means."""
    from jobs.train import check_data
    from skin.data import DatasetError, training_split
    data = tmp_path / "data"
    shutil.copytree(scanned, data, ignore=shutil.ignore_patterns("cache"))
    split = data / f"{training_split(data)}.csv"
    df = pd.read_csv(split)
    df[df["label"] != "Akne"].to_csv(split, index=False)
    with pytest.raises(DatasetError, match=r"zero training images: \['Akne'\]"):
        check_data(str(data))
    check_data(str(data), fine_tuning=True)
    assert "keeps what the bundle knew of them" in capsys.readouterr().err


def test_output_stride_is_trained_and_saved(scanned, tmp_path):
    from skin.checkpoint import load_member
    rt = LocalRuntime(str(tmp_path / "run"))
    cfg = TrainConfig(backbone="resnet50", data_dir=str(scanned), output_stride=16, **{**TINY, "epochs": 1})
    train_member(cfg, rt, log=lambda s: None)
    member, meta = load_member(tmp_path / "run" / "best")
    assert member.output_stride == 16 and meta["output_stride"] == 16
    with pytest.raises(ValueError, match="output_stride"):
        TrainConfig(backbone="resnet50", data_dir=str(scanned), output_stride=12).validate()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_only_where_the_cpu_has_it(scanned, tmp_path, monkeypatch, native):
    import torch
    import skin.device
    import skin.train as st
    monkeypatch.setattr(skin.device, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert st.configure_device(cpu, "auto") is False and st.configure_device(cpu, "off") is False
    assert st.configure_device(cpu, "bf16") is native
    lines = []
    rt = LocalRuntime(str(tmp_path / "run"), device=cpu)
    train_member(TrainConfig(backbone="resnet50", data_dir=str(scanned), amp="bf16", **{**TINY, "epochs": 1}),
                 rt, log=lines.append)
    assert np.isfinite(rt.history[0]["train_loss"])
    # the precision the loop reports is the one it runs: "device cpu, bf16" only where the CPU has it,
    # the fp32 fallback notice only where it has not
    assert any("device cpu, bf16," in line for line in lines) is native, lines
    assert any("no native bf16" in line for line in lines) is (not native), lines
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig(backbone="resnet50", data_dir=str(scanned), amp="fp16").validate()


def test_resume_loads_the_checkpoint_weights(scanned, tmp_path):
    rt = LocalRuntime(str(tmp_path / "run"))
    cfg = TrainConfig(backbone="efficientnet_b1", data_dir=str(scanned), **(TINY | {"epochs": 1}))
    train_member(cfg, rt, log=lambda s: None)
    digest = state_digest(load_file(str(tmp_path / "run" / "latest" / "model.safetensors")))
    cfg.epochs = 2
    rt2 = LocalRuntime(str(tmp_path / "run"))
    last = train_member(cfg, rt2, log=lambda s: None)
    assert last["epoch"] == 2 and last["resumed_from_epoch"] == 1
    assert last["resumed_weights_digest"] == digest


def test_the_optimizer_is_fused_adamw_and_resumes_exactly(tmp_path):
    """The shipped optimizer is PyTorch's fused AdamW on the CPU, and its state goes through the
    checkpoint's format so that a resumed step is the uninterrupted one, bit for bit."""
    import torch
    from skin.checkpoint import load_tensors, save_tensors
    from skin.registry import create_model
    from skin.train import _load_optimizer, _optimizer_tensors, make_optimizer

    cfg = TrainConfig(backbone="mobilenetv2", data_dir="-", lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def step(member, opt):
        torch.manual_seed(1)  # the head's dropout draws the same mask for both
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(member(x), y).backward()
        opt.step()

    torch.manual_seed(0)
    a = create_model("mobilenetv2", 6, pretrained="none", input_size=32)
    opt_a = make_optimizer(a, cfg, random_init=True)
    assert all(g["fused"] for g in opt_a.param_groups)
    for _ in range(2):
        step(a, opt_a)
    save_tensors(tmp_path / "optimizer.safetensors", _optimizer_tensors(opt_a))
    b = create_model("mobilenetv2", 6, pretrained="none", input_size=32)
    b.load_state_dict(a.state_dict())
    opt_b = make_optimizer(b, cfg, random_init=True)
    _load_optimizer(opt_b, load_tensors(tmp_path / "optimizer.safetensors"))
    step(a, opt_a)
    step(b, opt_b)
    assert state_digest(b.state_dict()) == state_digest(a.state_dict())


def test_unreadable_image_is_skipped_and_counted(scanned, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(scanned, data, ignore=shutil.ignore_patterns("cache"))
    df = pd.read_csv(data / "train_balanced.csv", keep_default_na=False)
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(b"broken since the scan")
    df.loc[0, "path"] = str(gone)
    df.to_csv(data / "train_balanced.csv", index=False)
    rt = LocalRuntime(str(tmp_path / "run"))
    cfg = TrainConfig(backbone="mobilenetv2", data_dir=str(data), **(TINY | {"epochs": 1, "max_steps_per_epoch": None,
                                                                            "use_cache": False}))
    train_member(cfg, rt, log=lambda s: None)
    assert rt.history[0]["skipped_images"] == 1


def test_lr_schedule_warms_up_then_decays():
    from skin.train import lr_factor
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01


# ----------------------------------------------------------------------------- Ray Train
def test_job_outputs(trained):
    b = Bundle.load(trained / "bundle")
    assert b.member_names == ["mobilenetv2", "efficientnet_b1", "resnet50"]
    assert b.weights == (0.30, 0.30, 0.40) and not b.untrained
    assert b.provenance["dataset_manifest_sha256"]
    vp = load_file(str(trained / "val_probs.safetensors"))
    assert vp["mobilenetv2.probs"].shape[0] == vp["labels"].shape[0]
    cfg = json.loads((trained / "train_config.json").read_text())
    assert cfg["member_configs"]["resnet50"]["epochs"] == 10  # --epochs over --smoke's 2


def test_members_ran_concurrently_and_best_checkpoint_kept(trained):
    from ray.train import Result
    spans, summary = {}, json.loads((trained / "summary.json").read_text())
    for m in ("mobilenetv2", "efficientnet_b1", "resnet50"):
        result = Result.from_path(str(trained / "ray_results" / f"t-{m}"))
        hist = [metrics for _, metrics in result.best_checkpoints]
        # a member's training phase: its first epoch's start (every report carries it: Train keeps only
        # the retained checkpoints' metrics) to its last epoch's end; worker set-up excluded
        spans[m] = (min(h["train_start"] for h in hist), max(h["epoch_end"] for h in hist))
        assert all(h["train_start"] > h["run_start"] for h in hist)
        best = max(hist, key=lambda h: h[SCORE])
        assert summary[m]["best_epoch"] == best["epoch"]
        # the summary points at the stored checkpoint, not at a temporary copy of it
        run_dir = (trained / "ray_results" / f"t-{m}").resolve()
        assert Path(summary[m]["checkpoint"]).resolve().parent == run_dir
    latest_start = max(s for s, _ in spans.values())
    earliest_end = min(e for _, e in spans.values())
    assert latest_start < earliest_end, spans  # all three members were training at one moment


def test_evaluation_equals_sklearn(trained, scanned):
    from skin.evaluation import score_locally, summarize
    from skin.data import load_manifest
    b = Bundle.load(trained / "bundle")
    df = load_manifest(scanned, "test")
    scored = score_locally(str(b.root), df)
    m = summarize(scored, b)
    y = scored["label_index"].to_numpy(int)
    probs = {n: np.stack(scored[n].to_list()) for n in b.member_names}
    # the expected ensemble from bundle.json's weights by hand, not through the code under test
    w = json.loads((b.root / "bundle.json").read_text())["weights"]
    ens = sum(w[n] * probs[n] for n in b.member_names).argmax(1)
    assert m["ensemble"]["accuracy"] == pytest.approx(accuracy_score(y, ens))
    assert m["ensemble"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, ens))
    assert m["ensemble"]["f1_macro"] == pytest.approx(f1_score(y, ens, average="macro", labels=range(6), zero_division=0))
    r = probs["resnet50"].argmax(1)
    assert m["members"]["resnet50"]["f1_weighted"] == pytest.approx(f1_score(y, r, average="weighted", labels=range(6), zero_division=0))


def test_evaluate_job_with_ray_data(ray_local, trained, scanned, synth_dir, tmp_path):
    import jobs.evaluate as job
    from skin.evaluation import score_locally
    from skin.synth import make_lesion_free
    shutil.copytree(trained / "bundle", tmp_path / "bundle")
    data = tmp_path / "data"  # the test split plus lesion-free skin images
    shutil.copytree(scanned, data, ignore=shutil.ignore_patterns("cache"))
    free = pd.DataFrame({"path": [str(tmp_path / f"skin{i}.png") for i in range(5)], "label": "", "label_index": -1})
    for i, p in enumerate(free["path"]):
        make_lesion_free(3, i, 96).save(p)
    free.to_csv(data / "lesion_free_test.csv", index=False)
    test = pd.read_csv(data / "test.csv")  # two test photographs as reviewed cases (skin records export's manifest)
    pd.DataFrame({"path": test["path"][:2], "label": test["label"][:2], "answered": test["label"][:2]}).to_csv(
        tmp_path / "reviewed.csv", index=False)
    assert job.main(["--bundle", str(tmp_path / "bundle"), "--data", str(data), "--out", str(tmp_path / "eval"),
                     "--masks", str(synth_dir / "manifest.csv"), "--perturb", "3",
                     "--reviewed", str(tmp_path / "reviewed.csv")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["reviewed"]["images"] == 2 and metrics["reviewed"]["answered_accuracy"] == 1.0
    assert "On reviewed cases (2 images" in (tmp_path / "eval" / "report.md").read_text()
    pert = metrics["perturbation"]  # deletion / insertion / ROAD on 3 images, stored for /v1/info and the page
    assert pert["images"] == 3 and set(pert["members"]) == set(metrics["members"])
    assert all(0 <= pert["ensemble"][m][k] <= 1 for m in ("deletion", "insertion") for k in ("map", "random", "untrained"))
    assert Bundle.load(tmp_path / "bundle").metrics["perturbation"]["ensemble"] == pert["ensemble"]
    assert "Explanation faithfulness without masks: Grad-CAM (3 images)" in (tmp_path / "eval" / "report.md").read_text()
    # what the ensemble calls plain skin, by hand from each member's probabilities
    b = Bundle.load(tmp_path / "bundle")
    scored = score_locally(str(b.root), free)
    ens = sum(b.weight_of(n) * np.stack(scored[n].to_list()) for n in b.member_names)
    ens = ens / ens.sum(1, keepdims=True)
    if b.ensemble_temperature != 1.0:
        from skin.calibration import apply_temperature
        ens = apply_temperature(ens, b.ensemble_temperature)
    lf = metrics["lesion_free"]
    assert lf["images"] == 5 and Bundle.load(tmp_path / "bundle").metrics["lesion_free"] == lf
    assert list(lf["called"].values()) == pytest.approx(list(np.bincount(ens.argmax(1), minlength=6) / 5))
    assert lf["mean_confidence"] == pytest.approx(ens.max(1).mean(), abs=1e-5)
    tops = np.stack([np.stack(scored[n].to_list()).argmax(1) for n in b.member_names])
    flagged = (ens.max(1) < 0.5) | (tops != tops[0]).any(0)
    assert lf["uncertain"] == pytest.approx(flagged.mean())
    assert "Skin without a lesion (5 images)" in (tmp_path / "eval" / "report.md").read_text()
    f = metrics["faithfulness"]  # every test image of the synthetic set has a lesion mask
    assert f["images"] == len(pd.read_csv(scanned / "test.csv")) and 0 <= f["pointing"] <= 1
    assert set(f["members_pointing"]) == {"mobilenetv2", "efficientnet_b1", "resnet50"}
    assert Bundle.load(tmp_path / "bundle").metrics["faithfulness"]["pointing"] == f["pointing"]
    assert f["method"] == "Grad-CAM" and {e["method"] for e in f["explanations"].values()} == {"gradcam"}
    assert {e["stride"] for e in f["explanations"].values()} == {16}  # what a trained bundle serves unless told otherwise
    assert "Explanation faithfulness: Grad-CAM" in (tmp_path / "eval" / "report.md").read_text()
    assert set(metrics["members"]) == {"mobilenetv2", "efficientnet_b1", "resnet50"}
    for f in ("report.md", "confusion_counts.png", "confusion_normalized.png", "reliability.png"):
        assert (tmp_path / "eval" / f).is_file()
    assert Bundle.load(tmp_path / "bundle").metrics["ensemble"]["accuracy"] == metrics["ensemble"]["accuracy"]


def _loop_that_dies_once(config: dict) -> None:
    """Ray Train's worker function with a fault: SIGKILL this worker once, mid-way through epoch 2
    (after epoch 1's checkpoint was reported), then train as usual after Train restarts it."""
    import os
    import signal
    import time
    from skin.distributed import RayRuntime
    marker = Path(config["_kill_marker"])

    def kill(epoch: int, step: int) -> None:
        if epoch == 1 and not marker.exists():
            time.sleep(2.0)  # let the controller collect the previous report before the crash
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    train_member(TrainConfig.from_dict(config), RayRuntime(), on_step=kill)


def test_worker_killed_mid_run_resumes(ray_local, scanned, tmp_path):
    import sys
    import ray.cloudpickle
    from skin.distributed import Scaling, fit_concurrently, make_trainer
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    cfg = TrainConfig(backbone="mobilenetv2", data_dir=str(scanned), **(TINY | {"epochs": 3}))
    trainer = make_trainer(cfg, Scaling(1, 0.5), "kill", str(tmp_path / "storage"), max_failures=2, keep=None,
                           loop=_loop_that_dies_once, extra_config={"_kill_marker": str(tmp_path / "killed")})
    import tempfile
    from skin.distributed import RESUME_PREFIX
    copies = set(Path(tempfile.gettempdir()).glob(RESUME_PREFIX + "*"))
    result = fit_concurrently({"m": trainer})["m"]
    assert (tmp_path / "killed").is_file()  # the worker really was killed once
    assert set(Path(tempfile.gettempdir()).glob(RESUME_PREFIX + "*")) == copies  # the resume's copy removed
    assert result.metrics["epoch"] == 3
    by_epoch = {m["epoch"]: (c, m) for c, m in result.best_checkpoints}
    assert sorted(by_epoch) == [1, 2, 3]
    ckpt1 = Path(by_epoch[1][0].path)
    resumed = by_epoch[2][1]
    assert resumed["resumed_from_epoch"] == 1
    assert resumed["resumed_weights_digest"] == state_digest(load_file(str(ckpt1 / "model.safetensors")))


@pytest.mark.parametrize("case", ["missing", "empty", "zero_class", "backbone", "gpus"])
def test_bad_inputs_fail_before_training(ray_local, scanned, tmp_path, case, capsys):
    import jobs.train as job
    data = tmp_path / "data"
    shutil.copytree(scanned, data, ignore=shutil.ignore_patterns("cache"))
    args = ["--data", str(data), "--out", str(tmp_path / "out"), "--smoke"]
    if case == "missing":
        (data / "val.csv").unlink()
    elif case == "empty":
        (data / "train_balanced.csv").write_text("path,label,label_index,split,group,sha256,dhash,width,height\n")
    elif case == "zero_class":
        df = pd.read_csv(data / "train_balanced.csv", keep_default_na=False)
        df[df["label"] != "Akne"].to_csv(data / "train_balanced.csv", index=False)
    elif case == "backbone":
        with pytest.raises(SystemExit):
            job.main(args + ["--members", "vgg16"])
        return
    elif case == "gpus":
        args += ["--gpus-per-worker", "1"]
    assert job.main(args) == 2
    err = capsys.readouterr().err
    assert {"missing": "not found", "empty": "empty", "zero_class": "Akne",
            "gpus": "GPU"}[case] in err, err
    assert not (tmp_path / "out" / "ray_results").exists()


def test_class_map_change_refused_on_resume(trained, scanned, tmp_path, capsys):
    import jobs.train as job
    data = tmp_path / "data"
    shutil.copytree(scanned, data, ignore=shutil.ignore_patterns("cache"))
    classes = json.loads((data / "classes.json").read_text())
    classes["classes"][0], classes["classes"][1] = classes["classes"][1], classes["classes"][0]
    (data / "classes.json").write_text(json.dumps(classes))
    for split in ("train", "val", "test", "train_balanced"):
        df = pd.read_csv(data / f"{split}.csv", keep_default_na=False)
        df["label_index"] = [classes["classes"].index(l) for l in df["label"]]
        df.to_csv(data / f"{split}.csv", index=False)
    args = ["--data", str(data), "--out", str(trained), "--smoke", "--name", "t"]
    assert job.main(args) == 2
    assert "class map" in capsys.readouterr().err


@pytest.mark.parametrize("extra,says", [
    (["--config", "/nonexistent.yaml"], "No such file"),
    (["--epochs", "0"], "epochs and batch_size must be at least 1"),
    (["--weights", "1", "2"], "2 weights for 3 members"),
    (["--output-stride", "12"], "invalid choice"),
    (["--workers", "2-1"], "workers must be N >= 1 or MIN-MAX with 1 <= MIN <= MAX"),
    (["--workers", "two"], "expected N or MIN-MAX workers such as 2 or 1-2"),
])
def test_train_job_answers_bad_arguments_with_one_line(scanned, tmp_path, capsys, extra, says):
    """Before Ray starts: exit 2 and one line that says what is wrong, never a traceback."""
    import jobs.train as job
    try:
        rc = job.main(["--data", str(scanned), "--out", str(tmp_path / "o"), "--smoke", *extra])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and says in err[-1] and not any("Traceback" in line for line in err), err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_outlier_exposure_loss():
    """Lesion rows: the usual cross-entropy (the loss is nn.CrossEntropyLoss without lesion-free
    rows). Lesion-free rows (label -1): cross-entropy to the uniform distribution, smallest for
    equal logits and weighted per row."""
    import torch
    from skin.train import OutlierExposureLoss
    torch.manual_seed(0)
    logits, y = torch.randn(8, 6), torch.randint(0, 6, (8,))
    loss = OutlierExposureLoss(0.1, weight=0.5)
    assert torch.allclose(loss(logits, y), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y))
    free = torch.full((8,), -1)
    assert torch.allclose(loss(torch.zeros(8, 6), free), 0.5 * torch.log(torch.tensor(6.0)))
    assert loss(logits, free) > loss(torch.zeros(8, 6), free)
    mixed = torch.cat([y[:4], free[:4]])
    expected = (torch.nn.functional.cross_entropy(logits[:4], y[:4], label_smoothing=0.1, reduction="sum")
                - 0.5 * torch.log_softmax(logits[4:], 1).mean(1).sum()) / 8
    assert torch.allclose(loss(logits, mixed), expected)
    p = torch.zeros(8, 6, requires_grad=True)
    loss(p + torch.eye(6)[0] * 3, free).backward()  # the gradient lowers the class a lesion-free row leans to
    assert (p.grad[:, 0] > 0).all() and (p.grad[:, 1:] < 0).all()


def test_lesion_free_images_join_training(tmp_path):
    """With lesion_free_train.csv the members also see the lesion-free images (label -1, which the
    plain cross-entropy would refuse) unless lesion_free_weight is 0."""
    from skin.data import ScanOptions, scan
    from skin.synth import write_dataset
    src = write_dataset(tmp_path / "synth", per_class=8, size=48, seed=1, progress=False, lesion_free=10)
    data = tmp_path / "data"
    scan(src, data, ScanOptions(workers=1), progress=False, lesion_free=src / "lesion-free")
    for weight, says in ((1.0, "(+7 lesion-free, weight 1)"), (0.0, None)):
        lines = []
        cfg = TrainConfig(backbone="mobilenetv2", data_dir=str(data), lesion_free_weight=weight,
                          **{**TINY, "epochs": 1, "batch_size": 32, "max_steps_per_epoch": None, "use_cache": False})
        train_member(cfg, LocalRuntime(str(tmp_path / f"run{weight}")), log=lines.append)
        assert (says in lines[0]) if says else ("lesion-free" not in lines[0]), lines[0]


def test_elastic_workers_reach_ray_train_and_collectives_bind_to_the_node_address(monkeypatch, tmp_path):
    """`--workers 1-2` becomes Train's (min, max) elastic group; N stays N. Each worker points gloo and
    NCCL at the interface holding its node's Ray address before the process group forms (a host name
    resolving to 127.0.x.1 would otherwise send peers to their own loopback), and leaves a value the
    host set alone."""
    import psutil
    import ray.util
    from skin.args import worker_range
    from skin.distributed import Scaling, bind_collectives_to_node_ip, make_trainer
    assert worker_range("2") == (2, 2) and worker_range(3) == (3, 3) and worker_range("1-2") == (1, 2)
    assert worker_range([1, 2]) == (1, 2)
    cfg = TrainConfig(backbone="mobilenetv2", data_dir=str(tmp_path), **TINY)
    elastic = make_trainer(cfg, Scaling(2, 1.0, min_workers=1), "e", str(tmp_path / "s"))
    fixed = make_trainer(cfg, Scaling(2, 1.0, min_workers=2), "f", str(tmp_path / "s"))
    assert elastic.scaling_config.num_workers == (1, 2) and fixed.scaling_config.num_workers == 2
    assert elastic.backend_config.backend_cls.on_start.__qualname__.startswith("torch_config.")
    iface, ip = next((n, a.address) for n, addrs in psutil.net_if_addrs().items() for a in addrs
                     if a.family.name == "AF_INET" and not a.address.startswith("127."))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: ip)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.setenv(var, "restored-after-the-test")
        monkeypatch.delenv(var)
    bind_collectives_to_node_ip()
    assert os.environ["GLOO_SOCKET_IFNAME"] == iface and os.environ["NCCL_SOCKET_IFNAME"] == iface
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    bind_collectives_to_node_ip()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"


def test_compile_setting_reaches_the_training_model(scanned, tmp_path, monkeypatch):
    """`--compile` (TrainConfig.compile) puts the training model under torch.compile, the weights shared
    with the member that is validated and saved (inductor itself is measured on a GPU: train_gpu.py)."""
    import torch
    import jobs.train as job
    cfg = job.resolve(job.parse_args(["--data", "d", "--out", "o", "--smoke", "--compile"]))
    assert cfg["train"]["compile"] is True
    assert "compile" not in job.resolve(job.parse_args(["--data", "d", "--out", "o"]))["train"]
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(model) or model)
    rt = LocalRuntime(str(tmp_path / "run"))
    train_member(TrainConfig(backbone="mobilenetv2", data_dir=str(scanned), compile=True, **{**TINY, "epochs": 1}),
                 rt, log=lambda s: None)
    assert len(seen) == 1 and seen[0].spec.name == "mobilenetv2" and rt.history[0]["epoch"] == 1
