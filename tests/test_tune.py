
import json

import numpy as np
import pandas as pd
import pytest

from skin.bundle import Bundle, BundleError
from skin.calibration import (apply_temperature, fit_temperature, nll, out_of_fold_gain, score_candidates,
                              simplex_grid, stratified_folds)


def _probs(y, accuracy, rng, sharpness=3.0, c=6):
    """Probabilities of a member that is right `accuracy` of the time."""
    n = len(y)
    top = np.where(rng.random(n) < accuracy, y, (y + rng.integers(1, c, n)) % c)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), top] += sharpness
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_temperature_lowers_held_out_nll_of_an_overconfident_member():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 4000)
    honest = _probs(y, 0.7, rng)
    overconfident = apply_temperature(honest, 0.25)  # logits x 4
    t = fit_temperature(overconfident[:2000], y[:2000])
    assert 2.5 < t < 6
    assert nll(apply_temperature(overconfident[2000:], t), y[2000:]) < nll(overconfident[2000:], y[2000:]) - 0.2


def test_vectorised_scores_equal_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 500)
    probs = np.stack([_probs(y, a, rng) for a in (0.9, 0.5, 0.6)])
    w = simplex_grid(3, 0.25)
    s = score_candidates(w, probs, y)
    b = score_candidates(w, probs, y, "balanced_accuracy")
    for i, wi in enumerate(w):
        pred = np.tensordot(wi, probs, 1).argmax(1)
        assert s["score"][i] == pytest.approx(f1_score(y, pred, average="macro"))
        assert b["score"][i] == pytest.approx(balanced_accuracy_score(y, pred))
    assert len(simplex_grid(3, 0.05)) == 231


def test_weight_search_favours_the_good_member(ray_local, tmp_path):
    from jobs.tune import search_weights
    rng = np.random.default_rng(2)
    y = rng.integers(0, 6, 3000)
    probs = np.stack([_probs(y, 0.97, rng), _probs(y, 0.45, rng), _probs(y, 0.45, rng)])
    weights, best, df = search_weights(probs, y, candidates=500, storage=str(tmp_path))
    assert weights[0] >= 0.7, weights
    assert best["score"] == pytest.approx(df["score"].max())


def test_out_of_fold_check_tells_a_real_gain_from_noise():
    """A clearly better member: the nested search beats equal weights on held-out rows. Three
    equally good members on a small validation set: whatever the search finds on some rows does
    not carry over to the others."""
    rng = np.random.default_rng(3)
    cands = simplex_grid(3, 0.05)
    equal = np.full(3, 1 / 3)
    y = rng.integers(0, 6, 600)
    good = np.stack([_probs(y, 0.95, rng), _probs(y, 0.4, rng), _probs(y, 0.4, rng)])
    assert out_of_fold_gain(cands, equal, good, y)["gain"] > 0.05
    y = rng.integers(0, 6, 180)
    same = np.stack([_probs(y, 0.8, rng) for _ in range(3)])
    r = out_of_fold_gain(cands, equal, same, y)
    assert r["folds"] == 5 and r["gain"] <= 0.0, r
    folds = stratified_folds(y, 5)
    for c in range(6):  # every class spread evenly over the folds
        counts = np.bincount(folds[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_weights_job_writes_a_new_bundle_that_serves(ray_local, trained, tmp_path):
    import jobs.tune as job
    from skin.ensemble import Predictor
    from skin.synth import make_sample
    src = Bundle.load(trained / "bundle")
    out = tmp_path / "tuned"
    assert job.main(["weights", "--train-out", str(trained), "--out", str(out), "--candidates", "250"]) == 0
    new = Bundle.load(out)
    assert new.id != src.id and new.provenance["parent"] == src.id
    assert new.provenance["weight_search"]["candidates"] >= 250
    assert all(m.temperature > 0 for m in new.members)
    assert abs(sum(new.weights) - 1) < 1e-6
    check = new.provenance["weight_search"]
    assert 1 <= check["out_of_fold_gain"]["folds"] <= 5  # tiny val set: folds without rows are skipped
    assert tuple(new.weights) == pytest.approx(tuple(check["searched_weights"]) if check["accepted"] else src.weights)
    assert Bundle.load(trained / "bundle").id == src.id  # source untouched
    r = Predictor(new).predict([make_sample(1, 0, 0, 64).image])[0]
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-6
    assert job.main(["weights", "--train-out", str(trained), "--out", str(out), "--candidates", "250"]) == 2


def _planted_train_out(root, bundle, probs: dict, labels):
    """A jobs/train.py --out folder with planted validation probabilities."""
    import shutil
    import torch
    from skin.checkpoint import save_tensors
    root.mkdir(parents=True)
    shutil.copytree(bundle, root / "bundle")
    tensors = {f"{n}.probs": torch.from_numpy(p.astype(np.float32)) for n, p in probs.items()}
    save_tensors(root / "val_probs.safetensors", tensors | {"labels": torch.from_numpy(labels)})
    return root


@pytest.mark.parametrize("planted,accepted", [("one_member_far_better", True), ("three_identical", False)])
def test_weights_job_keeps_the_search_only_when_it_wins_out_of_fold(ray_local, random_bundle, tmp_path,
                                                                    planted, accepted):
    """Planted validation sets where the answer is known: one member far better than the others
    (the searched weights win on held-out rows: kept) and three members that always agree (no
    weighting can change an answer, so no held-out gain: the source weights 0.30/0.30/0.40 stay)."""
    import jobs.tune as job
    rng = np.random.default_rng(5)
    names = ["mobilenetv2", "efficientnet_b1", "resnet50"]
    if planted == "one_member_far_better":
        y = rng.integers(0, 6, 900)
        probs = dict(zip(names, [_probs(y, 0.95, rng), _probs(y, 0.35, rng), _probs(y, 0.35, rng)]))
    else:
        y = rng.integers(0, 6, 180)
        same = _probs(y, 0.8, rng)
        probs = {n: same for n in names}
    src = _planted_train_out(tmp_path / "train", random_bundle, probs, y)
    assert job.main(["weights", "--train-out", str(src), "--out", str(tmp_path / "tuned"), "--candidates", "250",
                     "--no-temperature"]) == 0
    new = Bundle.load(tmp_path / "tuned")
    check = new.provenance["weight_search"]
    assert check["accepted"] is accepted, check["out_of_fold_gain"]
    if accepted:
        assert new.weights[0] > 0.6 and tuple(new.weights) == pytest.approx(tuple(check["searched_weights"]))
    else:
        assert tuple(new.weights) == pytest.approx((0.30, 0.30, 0.40))


def _planted_trial(config):  # pickled by value (see the test): Ray's workers cannot import this module
    """Planted learning curves: score q * epoch / 4; the weaker trials report more slowly, so the
    stronger ones reach each rung first (ASHA compares a trial with those seen at its rung)."""
    import time as _time
    from ray import tune
    for epoch in range(1, 5):
        _time.sleep(0.05 if config["q"] > 0.5 else 0.6)
        tune.report({"epoch": epoch, "val_f1_macro": config["q"] * epoch / 4})


def test_asha_stops_the_weak_trials_early(ray_local, tmp_path):
    """The search's scheduler (jobs.tune.asha) on planted curves: the weak trials stop before
    max_t, the best runs to it; epochs_run reads how far each went."""
    import sys
    from ray import cloudpickle, tune
    import jobs.tune as job
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    qs = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    grid = tune.Tuner(tune.with_resources(_planted_trial, {"CPU": 0.1}),
                      param_space={"q": tune.grid_search(qs)},
                      tune_config=tune.TuneConfig(metric="val_f1_macro", mode="max", scheduler=job.asha(4, 1),
                                                  max_concurrent_trials=2),
                      run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path), verbose=0)).fit()
    ran = {r.config["q"]: r.metrics["epoch"] for r in grid}
    assert ran[0.9] == 4, ran
    assert all(ran[q] < 4 for q in (0.3, 0.2, 0.1)), ran  # stopped at a rung
    assert job.epochs_run(grid) == {r.metrics["trial_id"]: ran[r.config["q"]] for r in grid}


def _free_cpus_settle(ray, want: float | None = None, timeout: float = 30.0) -> float:
    import time
    deadline = time.time() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if want is None or free >= want - 1e-6 or time.time() > deadline:
            return free
        time.sleep(0.5)


def test_dropout_search_with_asha(ray_local, scanned, tmp_path):
    import jobs.tune as job
    before = _free_cpus_settle(ray_local)
    assert job.main(["dropout", "--data", str(scanned), "--out", str(tmp_path), "--members", "mobilenetv2",
                     "--trials", "4", "--concurrent", "2", "--cpus-per-trial", "0.5", "--smoke"]) == 0
    table = pd.read_csv(tmp_path / "results.csv")
    assert table["trial_id"].nunique() >= 4
    # epochs_run: each trial's last epoch (the "epoch" column is the epoch of its best score)
    assert table["epochs_run"].notna().all() and (table["epochs_run"] <= 4).all()
    assert (table["epochs_run"] == 4).any(), "no trial reached max_t"
    assert (table["epoch"] <= table["epochs_run"]).all()  # a trial's best epoch is one it ran
    best = __import__("yaml").safe_load((tmp_path / "best_config.yaml").read_text())["members"]["mobilenetv2"]
    top = table.loc[table["val_f1_macro"].idxmax()]
    assert best["lr"] == pytest.approx(top["config/lr"])
    assert (tmp_path / "results.png").is_file()
    # every trial's CPUs come back, ASHA-stopped ones too (a TorchTrainer nested in the trial kept them
    # until the driver exited: ray-project/ray#54305)
    assert _free_cpus_settle(ray_local, before) >= before - 1e-6, (before, ray_local.available_resources())


def test_ensemble_temperature_sharpens_a_planted_under_confident_ensemble(random_bundle, tmp_path):
    """Three calibrated members that err on different rows average into an under-confident
    ensemble; its own temperature (T < 1) lowers val NLL and ECE, travels in the bundle (and its
    id), and is applied wherever the ensemble answers."""
    from skin.bundle import derive_bundle
    from skin.calibration import apply_temperature, temperature_fit
    from skin.ensemble import Predictor, combine
    from skin.synth import make_sample
    rng = np.random.default_rng(5)
    y = rng.integers(0, 6, 900)
    members = {}
    for k in range(3):
        raw = _probs(y, 0.75, rng)
        members[f"m{k}"] = apply_temperature(raw, temperature_fit(raw, y)[0])  # each member calibrated
    ens = combine(members, {n: 1 / 3 for n in members})
    t, stats = temperature_fit(ens, y)
    assert t < 0.9, t  # the average is under-confident: the ensemble temperature sharpens it
    assert stats["nll_after"] < stats["nll_before"] and stats["ece_after"] < stats["ece_before"], stats
    assert temperature_fit(ens, y, fit=False)[0] == 1.0

    b = Bundle.load(random_bundle)
    sharp = derive_bundle(b, tmp_path / "sharp", ensemble_temperature=0.5)
    assert Bundle.load(sharp.root).ensemble_temperature == 0.5 and sharp.id != b.id
    img = [make_sample(2, 0, 0, 64).image]
    plain, sharpened = Predictor(b).predict(img)[0], Predictor(Bundle.load(sharp.root)).predict(img)[0]
    expected = apply_temperature(np.array(list(plain["probabilities"].values())), 0.5)
    np.testing.assert_allclose(list(sharpened["probabilities"].values()), expected, atol=1e-9)
    data = json.loads((sharp.root / "bundle.json").read_text())
    data["ensemble_temperature"] = 2.0  # hand-edited: refused, the id covers it
    (sharp.root / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="edited"):
        Bundle.load(sharp.root)


def test_a_stopped_dropout_trial_gives_its_cpus_back(ray_local, scanned, tmp_path):
    """Tune stops a trial (here by a stop criterion, as ASHA does at a rung) while it trains: the
    trial's CPUs come back at once. With a TorchTrainer nested in the trial its placement group
    stayed until the driver exited (ray-project/ray#54305)."""
    import dataclasses
    from ray import tune
    import jobs.tune as job
    from skin.train import TrainConfig
    before = _free_cpus_settle(ray_local)
    base = TrainConfig(backbone="mobilenetv2", data_dir=str(scanned), epochs=4, image_size=32, batch_size=16,
                       max_steps_per_epoch=2, pretrained="none", warmup_epochs=0.5, num_workers=0)
    grid = tune.Tuner(tune.with_resources(job.dropout_trial, {"CPU": 0.5}),
                      param_space={"dropout_0": 0.1, "dropout_1": 0.1, "dropout_2": 0.1, "lr": 1e-3, "n_dropout": 3,
                                   "base": dataclasses.asdict(base), "cpus": 0.5,
                                   "name": "stopped", "storage": str(tmp_path)},
                      run_config=tune.RunConfig(name="stopped", storage_path=str(tmp_path), stop={"epoch": 1},
                                                verbose=0)).fit()
    assert [r.metrics["epoch"] for r in grid] == [1]  # stopped after its first epoch, of 4
    assert _free_cpus_settle(ray_local, before) >= before - 1e-6, (before, ray_local.available_resources())


def test_ece_comparison_tells_a_worse_calibrated_ensemble_from_sampling_noise():
    """The report's calibration line: ECE of the ensemble and of each member with bootstrap
    intervals, and the paired difference to the best member. An ensemble equal to its best member
    differs by exactly 0; a planted over-confident one is worse with an interval above 0."""
    from skin.metrics import ece_comparison, expected_calibration_error
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 400)
    logits = rng.normal(0, 1, (400, 6))
    logits[np.arange(400), y] += 1.5
    good = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sharp = np.exp(4 * logits) / np.exp(4 * logits).sum(1, keepdims=True)
    same = ece_comparison(y, good, {"a": good, "b": sharp}, resamples=200)
    assert same["best_member"] == "a" and same["difference"] == 0 and same["difference_interval"] == [0, 0]
    assert same["ece"]["b"] == pytest.approx(expected_calibration_error(y, sharp))
    for m, (lo, hi) in same["interval"].items():
        assert lo <= same["ece"][m] <= hi, m
    worse = ece_comparison(y, sharp, {"a": good, "b": sharp}, resamples=200)
    assert worse["difference"] > 0 and worse["difference_interval"][0] > 0
