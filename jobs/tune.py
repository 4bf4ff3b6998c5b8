"""Ray Tune searches: head dropout (+ learning rate) per member, and ensemble weights.

    python jobs/tune.py weights --train-out OUT [--bundle OUT/bundle] [--out OUT/bundle-tuned]
    python jobs/tune.py dropout --data DIR --out OUT/tune [--members resnet50] [--trials 8] [--smoke]

weights: fits one temperature per member on the cached validation probabilities (NLL), then
  searches weights on the probability simplex with Ray Tune (each trial scores a batch of
  candidates: a simplex grid or Dirichlet samples), objective macro-F1 (or balanced accuracy),
  log-loss breaking ties. Writes a NEW bundle (never overwrites) with the weights, the
  temperatures and the search's provenance, plus weights_search.csv/.png; then fits the ensemble's
  own temperature on the weighted average (averaging calibrated members makes it under-confident)
  and prints NLL/ECE before/after for each member and the ensemble.
dropout: for each member, Ray Tune trials that each train the member as one worker (the Tune
  function runs skin.train's loop and reports each epoch with its checkpoint), ASHA stopping on
  val macro-F1, trials concurrent as resources allow. (A TorchTrainer nested in each trial, Ray's
  Train V2 + Tune pattern, leaks the CPUs of every ASHA-stopped trial until the driver exits:
  ray-project/ray#54305.) Writes results.csv, a plot, and
  best_config.yaml ready for `jobs/train.py --config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from skin.bundle import Bundle, derive_bundle
from skin.calibration import (apply_temperature, best_index, dirichlet_candidates, out_of_fold_gain,
                              score_candidates, simplex_grid, temperature_fit)
from skin.ensemble import combine
from skin.checkpoint import load_tensors
from skin.cluster import ClusterError, add_cluster_arguments, init_ray, start_job
from skin.progress import ProgressBoard, quiet
from skin.registry import DEFAULT_MEMBERS, get_spec, list_backbones
from skin.train import SCORE, TrainConfig


# --------------------------------------------------------------------------- weights
def weight_trial(config: dict, probs: np.ndarray, labels: np.ndarray, objective: str) -> None:
    """One Tune trial: score a batch of candidates, report the batch's best."""
    from ray import tune
    k = probs.shape[0]
    if config["kind"] == "grid":
        cands = simplex_grid(k, config["step"])
    else:
        cands = dirichlet_candidates(k, config["n"], config["seed"], config["concentration"])
    s = score_candidates(cands, probs, labels, objective)
    i = best_index(s["score"], s["log_loss"])
    tune.report({"score": float(s["score"][i]), "log_loss": float(s["log_loss"][i]),
                 "weights": cands[i].tolist(), "candidates": len(cands)})


def search_weights(probs: np.ndarray, labels: np.ndarray, objective: str = "f1_macro",
                   candidates: int = 2000, seed: int = 0, storage: str | None = None, verbose: bool = False):
    """Ray Tune over candidate batches; returns (best weights, best row, results DataFrame)."""
    from ray import tune
    k = probs.shape[0]
    batches = max(1, candidates // 250)
    space = tune.grid_search([{"kind": "grid", "step": 0.05}] +
                             [{"kind": "dirichlet", "n": 250, "seed": seed + i,
                               "concentration": (0.5, 1.0, 2.0)[i % 3]} for i in range(batches)])
    # Tune nests the grid under "search": unwrap it in the trial. Each trial scores its candidates in well under
    # a second: the trials reuse their actors (Tune's reuse_actors) instead of starting a process each, the
    # search's 15 s -> 3 s on 2 cores.
    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(_unwrap_weight_trial, probs=probs, labels=labels,
                                                                 objective=objective), {"CPU": 1}),
                       param_space={"search": space},
                       tune_config=tune.TuneConfig(metric="score", mode="max", reuse_actors=True),
                       run_config=tune.RunConfig(name="weights", storage_path=storage, verbose=0))
    with quiet(verbose):
        grid = tuner.fit()
    df = grid.get_dataframe()
    rows = [r for r in (res.metrics for res in grid) if r and "score" in r]
    best = max(rows, key=lambda r: (round(r["score"], 9), -r["log_loss"]))
    if k and len(best["weights"]) != k:
        raise RuntimeError("weight search returned a vector of the wrong length")
    return np.array(best["weights"]), best, df


def _unwrap_weight_trial(config: dict, probs, labels, objective) -> None:
    weight_trial(config["search"], probs, labels, objective)


def cmd_weights(a) -> int:
    train_out = Path(a.train_out)
    src = Bundle.load(a.bundle or train_out / "bundle")
    vp = load_tensors(train_out / "val_probs.safetensors")
    labels = vp["labels"].numpy().astype(int)
    names = src.member_names
    missing = [n for n in names if f"{n}.probs" not in vp]
    if missing:
        print(f"tune.py: {train_out / 'val_probs.safetensors'} lacks members {missing}", file=sys.stderr)
        return 2
    raw = {n: vp[f"{n}.probs"].numpy().astype(np.float64) for n in names}
    calib = {n: temperature_fit(raw[n], labels, not a.no_temperature)[1] for n in names}
    temps = {n: calib[n]["temperature"] for n in names}
    cal = {n: apply_temperature(raw[n], temps[n]) for n in names}
    _print_calibration(calib)

    try:
        init_ray(a.num_cpus, a.verbose)
    except ClusterError as e:
        print(f"tune.py: {e}", file=sys.stderr)
        return e.code
    stacked = np.stack([cal[n] for n in names])
    t0 = time.time()
    weights, best, df = search_weights(stacked, labels, a.objective, a.candidates, a.seed,
                                       storage=str(Path(a.storage_path or train_out / "ray_results").resolve()),
                                       verbose=a.verbose)
    weights = np.round(weights, 6)
    weights = weights / weights.sum()
    default = score_candidates(np.array([src.weights]), stacked, labels, a.objective)
    # Guard against fitting the noise of a small validation set: the same search, nested in
    # stratified folds, must beat the source weights on held-out rows, or the source weights stay.
    k = len(names)
    cands = np.concatenate([simplex_grid(k, 0.05)] + [dirichlet_candidates(k, 250, a.seed + i, (0.5, 1.0, 2.0)[i % 3])
                                                       for i in range(max(1, a.candidates // 250))])
    oof = out_of_fold_gain(cands, np.array(src.weights), stacked, labels, a.objective, a.folds, a.seed)
    searched = weights
    accepted = a.force or oof["gain"] > 0
    if not accepted:
        weights = np.array(src.weights, float)
    n_cands = int(df["candidates"].sum()) if "candidates" in df else None
    # the ensemble's own temperature, fitted on the same val rows after the weights
    t_ens, calib["ensemble"] = temperature_fit(combine(cal, dict(zip(names, weights))), labels, not a.no_temperature)
    out = Path(a.out) if a.out else train_out / f"bundle-tuned-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists():
        print(f"tune.py: {out} exists; bundles are never overwritten, choose a new --out", file=sys.stderr)
        return 2
    new = derive_bundle(src, out, weights=tuple(float(w) for w in weights), temperatures=temps, provenance={
        "weight_search": {"objective": a.objective, "candidates": n_cands, "seed": a.seed,
                          "best_score": best["score"], "best_log_loss": best["log_loss"],
                          "default_weights_score": float(default["score"][0]),
                          "searched_weights": [float(w) for w in searched], "accepted": bool(accepted),
                          "out_of_fold_gain": oof,
                          "source_bundle": src.id, "val_rows": int(len(labels)), "seconds": time.time() - t0},
        "calibration": calib}, ensemble_temperature=round(t_ens, 6))
    df.to_csv(out.parent / f"{out.name}-weights_search.csv", index=False)
    print(f"\nsearched {n_cands} candidates in {time.time() - t0:.1f}s; {a.objective}: "
          f"{best['score']:.4f} (weights {dict(zip(names, searched.round(3).tolist()))}) vs {default['score'][0]:.4f} "
          f"with {dict(zip(names, src.weights))}")
    print(f"out-of-fold check ({oof['folds']} stratified folds of the {len(labels)} validation rows): "
          f"held-out {a.objective} gain of the search {oof['gain']:+.4f} "
          f"({', '.join(f'{g:+.3f}' for g in oof['fold_gains'])}) -> "
          + ("searched weights kept" + (" (--force)" if a.force and oof["gain"] <= 0 else "") if accepted
             else f"no gain beyond the rows searched: the source weights {dict(zip(names, src.weights))} are kept "
                  "(temperatures still applied; --force keeps the searched weights)"))
    print("\nensemble temperature (after the weights, on the same val rows):")
    _print_calibration({"ensemble": calib["ensemble"]})
    best_member = min(calib[n]["ece_after"] for n in names)
    print(f"val ECE: ensemble {calib['ensemble']['ece_after']:.4f} vs best member {best_member:.4f}"
          + ("" if len(labels) >= 300 else f" ({len(labels)} val rows: ECE over 15 bins is noisy below a few hundred)"))
    print(f"new bundle {new.id}: {out} (the source bundle {src.id} is unchanged)")
    return 0


def _print_calibration(calib: dict) -> None:
    print(f"{'':<16}{'T':>7}{'NLL before':>12}{'NLL after':>11}{'ECE before':>12}{'ECE after':>11}")
    for n, c in calib.items():
        print(f"{n:<16}{c['temperature']:>7.3f}{c['nll_before']:>12.4f}{c['nll_after']:>11.4f}"
              f"{c['ece_before']:>12.4f}{c['ece_after']:>11.4f}")


# --------------------------------------------------------------------------- dropout
def dropout_trial(config: dict, say=None) -> None:
    """Tune function: this trial is the member's single training worker (skin.train.train_member
    with skin.distributed.TuneRuntime), so when ASHA stops it, its CPUs are freed with it. `say`: where its
    progress lines go (skin.progress; the driver prints them, each with the trial's id)."""
    from skin.distributed import TuneRuntime
    from skin.train import train_member
    cfg = dict(config["base"])
    cfg["dropout"] = [config[f"dropout_{i}"] for i in range(config["n_dropout"])]
    cfg["lr"] = config["lr"]
    log = print
    if say is not None:
        from ray import tune
        trial = tune.get_context().get_trial_id()
        log = lambda line: say(f"trial {trial}: {line}")  # noqa: E731
    train_member(TrainConfig.from_dict(cfg), TuneRuntime(cpus=config["cpus"]), log=log)


def asha(max_t: int, grace_period: int):
    """The dropout search's early stopping: asynchronous successive halving on epochs (rungs at
    grace_period, x2, ...); a trial continues past a rung only in the top half seen there."""
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace_period, reduction_factor=2)


def epochs_run(grid) -> dict:
    """trial id -> the epoch of its last report (how far it ran), not the epoch of its best score."""
    return {r.metrics.get("trial_id"): r.metrics.get("epoch") for r in grid if r.metrics}


def cmd_dropout(a) -> int:
    from ray import tune
    from skin.plan import Group
    out = Path(a.out).resolve()
    plan = start_job("tune.py", a, [Group("trial", a.concurrent, a.cpus_per_trial, 0.0)])  # a trial: one worker
    if isinstance(plan, int):
        return plan
    out.mkdir(parents=True, exist_ok=True)
    base = {"epochs": a.epochs, "image_size": a.image_size, "pretrained": a.pretrained, "batch_size": a.batch_size,
            "per_image_norm": a.per_image_norm, "augment": a.augment, "data_dir": str(Path(a.data).resolve())}
    if a.smoke:
        base |= {"epochs": 4, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 2, "pretrained": "none",
                 "warmup_epochs": 0.5, "num_workers": 0}
    best_configs, tables = {}, []
    for member in a.members:
        spec = get_spec(member)
        n_drop = len(spec.head.dropout)
        cfg = TrainConfig.from_dict({**base, "backbone": member})
        cfg.validate()
        space = {f"dropout_{i}": tune.uniform(0.0, 0.6) for i in range(n_drop)}
        space |= {"lr": tune.loguniform(spec.lr / 4, spec.lr * 4), "n_dropout": n_drop,
                  "base": dataclasses.asdict(cfg), "cpus": a.cpus_per_trial}
        scheduler = asha(base["epochs"], a.grace_period)
        board = None if a.verbose else ProgressBoard.start()  # a line per trial and epoch, as they come
        trial_fn = tune.with_parameters(dropout_trial, say=board.sender() if board else None)
        tuner = tune.Tuner(
            tune.with_resources(trial_fn, {"CPU": a.cpus_per_trial}),  # the trial is the training worker
            param_space=space,
            tune_config=tune.TuneConfig(metric=SCORE, mode="max", num_samples=a.trials, scheduler=scheduler,
                                        max_concurrent_trials=a.concurrent),
            run_config=tune.RunConfig(name=f"tune-dropout-{member}", storage_path=str(out / "ray_results"),
                                      verbose=1 if a.verbose else 0))
        try:
            with quiet(a.verbose):
                grid = tuner.fit()
        finally:
            if board:
                board.stop()
        best = grid.get_best_result(metric=SCORE, mode="max", scope="all")
        df = grid.get_dataframe(filter_metric=SCORE, filter_mode="max")  # each trial's best row
        df["epochs_run"] = df["trial_id"].map(epochs_run(grid))
        df["member"] = member
        tables.append(df)
        best_configs[member] = {"dropout": [round(best.config[f"dropout_{i}"], 4) for i in range(n_drop)],
                                "lr": float(best.config["lr"]), "val_f1_macro": float(df[SCORE].max())}
        print(f"{member}: best val macro-F1 {df[SCORE].max():.4f} with {best_configs[member]}")
    import pandas as pd
    table = pd.concat(tables, ignore_index=True)
    keep = [c for c in table.columns if c.startswith(("config/dropout_", "config/lr")) or c in
            ("member", "trial_id", "epoch", "epochs_run", SCORE, "val_loss", "val_accuracy")]
    table[keep].to_csv(out / "results.csv", index=False)
    _plot_dropout(table, out / "results.png")
    (out / "best_config.yaml").write_text(yaml.safe_dump(
        {"members": {m: {"dropout": c["dropout"], "lr": c["lr"]} for m, c in best_configs.items()}}, sort_keys=False))
    print(f"results: {out / 'results.csv'}, {out / 'results.png'}; best: {out / 'best_config.yaml'} "
          f"(pass it to jobs/train.py --config)")
    return 0


def _plot_dropout(table, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for member, df in table.groupby("member"):
        mean_drop = df[[c for c in df.columns if c.startswith("config/dropout_")]].mean(1)
        ax.scatter(mean_drop, df[SCORE], label=member, s=30 + 10 * df["epochs_run"])
    ax.set_xlabel("mean head dropout")
    ax.set_ylabel("best val macro-F1 (marker size: epochs reached)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("weights", help="temperatures + ensemble weights on cached validation probabilities")
    w.add_argument("--train-out", required=True, help="jobs/train.py --out folder (val_probs.safetensors, bundle/)")
    w.add_argument("--bundle", help="source bundle (default TRAIN_OUT/bundle)")
    w.add_argument("--out", help="new bundle folder (default TRAIN_OUT/bundle-tuned-<time>); never overwritten")
    w.add_argument("--objective", choices=["f1_macro", "balanced_accuracy"], default="f1_macro")
    w.add_argument("--candidates", type=int, default=2000, help="Dirichlet candidates besides the 0.05 simplex grid")
    w.add_argument("--no-temperature", action="store_true", help="keep T = 1")
    w.add_argument("--folds", type=int, default=5, help="stratified folds of the out-of-fold check (default 5)")
    w.add_argument("--force", action="store_true",
                   help="keep the searched weights even when the out-of-fold check shows no held-out gain")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--storage-path", help="Ray Tune storage (default TRAIN_OUT/ray_results)")
    w.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this job starts when RAY_ADDRESS is unset")
    w.add_argument("--verbose", action="store_true", help="Ray's own output too (worker logs, INFO messages)")
    w.set_defaults(fn=cmd_weights)
    d = sub.add_parser("dropout", help="ASHA search of head dropout and learning rate per member")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS), choices=list_backbones())
    d.add_argument("--trials", type=int, default=8)
    d.add_argument("--concurrent", type=int, default=2)
    d.add_argument("--cpus-per-trial", type=float, default=1.0)
    d.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--image-size", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--pretrained", default="imagenet")
    d.add_argument("--per-image-norm", action="store_true")
    d.add_argument("--augment", default="standard", choices=["standard", "light"])
    d.add_argument("--smoke", action="store_true", help="tiny images, 4 short epochs, random init")
    add_cluster_arguments(d, "print the resource plan of the concurrent trials and exit")
    d.set_defaults(fn=cmd_dropout)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
