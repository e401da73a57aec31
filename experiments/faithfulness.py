"""Part (b) of the premise-first search: on a regime that passed (a), is POLCA's decomposition
faithful, and is the carry skill visible in its trajectories?

For one (regime, seed) of experiments/premise.py this script
1. picks the analysis window by the rule in docs/reproduction.md (the first-0.8 steps of the
   place that passed, widened by 500 steps each side and rounded to 100),
2. writes the run's config to experiments/configs/ (checkpoints every 20 steps from s₀ on,
   600 probe problems, ≈22 Hessian and 22 random vectors, first-order and paper-curvature
   POLCA, exact curvature with ``--exact``),
3. trains the window's checkpoints with polca's loop (the script predates the train stage's
   ``checkpoints.start`` and writes the windowed series itself, as the train stage now does;
   the CLI's train stage then finds it complete), runs the `trajectories`, `basis` and
   `decompose` stages through the CLI and times them,
4. measures faithfulness (fraction of Σ|ΔL| explained, first- vs second-order agreement) and
   the skill-signal diagnostic of carry within each place on every trajectory kind: exact
   loss L, ΔL, |ΔL|, per-vector projected loss (first order, paper, exact), per-vector
   ⟨b, ∇ℓ_x(θ_t)⟩ and all vectors' ⟨b, ∇ℓ_x⟩ together.

Clustering and the carry-cluster metric are deliberately not run here (they play no part in
the selection).

    PYTHONPATH=src python experiments/faithfulness.py REGIME [--seed 0] [--exact]

Writes experiments/results/faithfulness/<run>.json (numbers, timings) and <run>-signal.csv
(every diagnostic row); the run directory goes to /tmp/polca-faithfulness/<run>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from common import RESULTS, ROOT, merged
from premise import BASE, BY_NAME, regime_passes, verdicts

from polca.bases import Basis
from polca.checkpoints import CheckpointStore, checkpoint_schedule
from polca.config import dump_config, parse_config
from polca.directional import directional_derivatives
from polca.signal import skill_signal
from polca.stages.common import open_run
from polca.train import train

OUT = RESULTS / "faithfulness"
RUNS = Path("/tmp/polca-faithfulness")
SPACING, MARGIN, N_VECTORS = 20, 500, 22
POLCA = str(Path(sys.executable).with_name("polca"))


def window(regime: str, seed: int) -> tuple[int, int, int]:
    """``(place, s0, s1)`` by the selection rule, from the seed's own first-0.8 steps."""
    table = verdicts()
    ok, place = regime_passes(table, regime)
    if not ok:
        raise SystemExit(f"{regime} did not pass (a); nothing to analyse")
    row = table[(table.regime == regime) & (table.seed == seed) & (table.place == place)].iloc[0]
    first, last = min(row.t_c, row.t_n), max(row.t_c, row.t_n)
    steps = merged(BASE, BY_NAME[regime].overrides)["train"]["steps"]
    s0 = max(0, math.floor((first - MARGIN) / 100) * 100)
    s1 = min(steps, math.ceil((last + MARGIN) / 100) * 100)
    return place, s0, s1


def run_config(regime: str, seed: int, s0: int, s1: int, exact: bool):
    name = f"b-{regime}-s{seed}" + ("-exact" if exact else "")
    data = merged(BASE, BY_NAME[regime].overrides)
    data = merged(data, {
        "name": name, "seed": seed,
        "task": {"n_probe": 600},
        "train": {"steps": s1},
        "checkpoints": {"every": SPACING, "start": s0},
        "basis": {"kinds": ["hessian", "random"],
                  "every": max(SPACING, round((s1 - s0) / N_VECTORS / SPACING) * SPACING),
                  "sample_size": 1250, "tol": 1e-3},
        "decompose": {"curvature": ["paper", "exact"] if exact else ["paper"],
                      "integrated": False, "fisher": False, "lca": False, "dtype": "float32"},
    })
    return parse_config(data, source=name)


def stage(name: str, config: Path) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([POLCA, name, str(config), "--runs", str(RUNS), "--quiet"], check=True,
                   env=env)
    return time.perf_counter() - start


def trajectory_kinds(root: Path, bases: list[str]) -> dict[str, np.ndarray]:
    """Every kind as ``[token, feature]`` or ``[vector, token, feature]``."""
    arrays = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    loss = np.asarray(arrays["loss"])  # [token, checkpoint]
    kinds = {"exact loss L": loss, "ΔL": np.diff(loss, axis=1),
             "|ΔL|": np.abs(np.diff(loss, axis=1))}
    for basis in bases:
        group = arrays[f"polca/{basis}"]
        first = np.asarray(group["first"])  # [vector, interval, token]
        kinds[f"{basis}: PL first order"] = np.cumsum(first, axis=1).transpose(0, 2, 1)
        for curvature in ("paper", "exact"):
            if f"second_{curvature}" in group:
                full = first + np.asarray(group[f"second_{curvature}"])
                kinds[f"{basis}: PL {curvature} curvature"] = np.cumsum(full, 1).transpose(0, 2, 1)
        grad = np.asarray(group["grad"]).transpose(0, 2, 1)  # [vector, token, checkpoint]
        kinds[f"{basis}: ⟨b, ∇ℓ_x⟩"] = grad
        together = grad.transpose(1, 0, 2).reshape(len(loss), -1)  # [token, vector·checkpoint]
        kinds[f"{basis}: ⟨b, ∇ℓ_x⟩ all vectors"] = together
    return kinds


def agreement(root: Path, basis: str) -> dict:
    """First- vs full-order POLCA over all (vector, interval, token), per curvature estimator
    (the decompose stage reports it for exact curvature only)."""
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")[f"polca/{basis}"]
    first = np.asarray(group["first"], dtype=np.float64)
    out = {}
    for curvature in ("paper", "exact"):
        if f"second_{curvature}" in group:
            full = first + np.asarray(group[f"second_{curvature}"], dtype=np.float64)
            out[curvature] = {
                "cosine": float((first * full).sum() / np.sqrt((first**2).sum() * (full**2).sum())),
                "relative_l2": float(np.sqrt(((full - first) ** 2).sum() / (full**2).sum()))}
    return out


def exact_sample(root: Path, basis: str, n_intervals: int) -> dict:
    """First order against exact-curvature POLCA on ``n_intervals`` evenly spaced intervals,
    for runs decomposed without exact curvature: κ = bᵀ∇²ℓ_x(θ_t)b by forward-over-forward
    differentiation (float64), the rest read from the run's arrays."""
    ctx = open_run(root)
    arrays = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    group = arrays[f"polca/{basis}"]
    vectors = Basis.load(root / "basis", basis, dim=ctx.loss.space.dim).vectors.double()
    loss = np.asarray(arrays["loss"], dtype=np.float64)
    steps = ctx.checkpoints.steps
    chosen = np.unique(np.linspace(0, len(steps) - 2, n_intervals).round().astype(int))
    sums = dict.fromkeys(["dot", "first_sq", "full_sq", "abs_dl", "abs_r_first", "abs_r_full"],
                         0.0)
    for t in chosen:
        _, kappa = directional_derivatives(ctx.loss, ctx.theta(steps[t]), vectors, ctx.probe,
                                           order=2)
        delta = np.asarray(group["delta"][:, t], dtype=np.float64)
        first = np.asarray(group["first"][:, t, :], dtype=np.float64)
        full = first + 0.5 * kappa.numpy() * (delta**2)[:, None]
        delta_loss = loss[:, t + 1] - loss[:, t]
        sums["dot"] += (first * full).sum()
        sums["first_sq"] += (first**2).sum()
        sums["full_sq"] += (full**2).sum()
        sums["abs_dl"] += np.abs(delta_loss).sum()
        sums["abs_r_first"] += np.abs(delta_loss - first.sum(0)).sum()
        sums["abs_r_full"] += np.abs(delta_loss - full.sum(0)).sum()
    return {"intervals": chosen.tolist(),
            "cosine_first_vs_exact": sums["dot"] / np.sqrt(sums["first_sq"] * sums["full_sq"]),
            "explained_first_order": 1 - sums["abs_r_first"] / sums["abs_dl"],
            "explained_exact": 1 - sums["abs_r_full"] / sums["abs_dl"]}


def diagnostic(root: Path, kinds: dict[str, np.ndarray]) -> pd.DataFrame:
    tokens = pd.read_parquet(root / "probe" / "tokens.parquet")
    tables = []
    for kind, X in kinds.items():
        m = X.shape[0] if X.ndim == 3 else 1
        table = skill_signal(X, tokens.carry.to_numpy(), tokens.place.to_numpy(),
                             confidence=1 - 0.05 / m)
        table.insert(0, "kind", kind)
        table.insert(1, "confidence", 1 - 0.05 / m)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("regime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true", help="exact curvature as well")
    parser.add_argument("--exact-sample", type=int, default=0, metavar="N",
                        help="without --exact: exact curvature on N evenly spaced intervals")
    args = parser.parse_args()
    place, s0, s1 = window(args.regime, args.seed)
    cfg = run_config(args.regime, args.seed, s0, s1, args.exact)
    config_path = ROOT / "experiments" / "configs" / f"{cfg.name}.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(f"# experiments/faithfulness.py {args.regime} --seed {args.seed}"
                           f"{' --exact' if args.exact else ''}: window {s0}–{s1}\n"
                           + dump_config(cfg))
    root = RUNS / cfg.name
    timings = {}
    start = time.perf_counter()
    ctx = open_run(root, cfg)
    schedule = checkpoint_schedule(s1, every=SPACING, start=s0)
    train(ctx.model, ctx.task, cfg.train, schedule, CheckpointStore(ctx.run.checkpoints),
          progress=False)
    timings["train"] = time.perf_counter() - start
    for name in ("train", "trajectories", "basis", "decompose"):
        timings[name] = timings.get(name, 0.0) + stage(name, config_path)
    assert CheckpointStore(root / "checkpoints").steps == schedule
    bases = ["hessian", "random"]
    decomposition = {b: json.loads((root / "diagnostics" / f"{b}.json").read_text())
                     for b in bases}
    start = time.perf_counter()
    signal = diagnostic(root, trajectory_kinds(root, bases))
    timings["diagnostic"] = time.perf_counter() - start
    if args.exact_sample and not args.exact:
        start = time.perf_counter()
        sample = {b: exact_sample(root, b, args.exact_sample) for b in bases}
        timings["exact_sample"] = time.perf_counter() - start
    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / f"{cfg.name}.json"
    # a rerun finds the stages done: keep the first run's stage times
    earlier = {k: v for k, v in (json.loads(summary_path.read_text())["seconds"].items()
                                 if summary_path.is_file() else ())
               if k in ("train", "trajectories", "basis", "decompose")}
    signal.to_csv(OUT / f"{cfg.name}-signal.csv", index=False)
    summary = {
        "regime": args.regime, "seed": args.seed, "place": place, "window": [s0, s1],
        "intervals": len(schedule) - 1, "n_tokens": len(ctx.tokens),
        "vectors": {b: decomposition[b]["n_vectors"] for b in bases},
        "explained_fraction": {b: {k: v["explained_fraction"] for k, v in
                                   decomposition[b]["estimators"].items()} for b in bases},
        "first_vs_full": {b: agreement(root, b) for b in bases},
        "exact_curvature_sample": sample if args.exact_sample and not args.exact else None,
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, **earlier},
        "load": os.getloadavg(),
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    best = (signal[signal.group.isin([10, 100]) & (signal.status == "ok")]
            .sort_values("balanced_accuracy", ascending=False)
            .groupby(["kind", "group"], sort=False).head(1).sort_values(["group", "kind"]))
    print(best[["kind", "group", "vector", "balanced_accuracy", "ci_low", "ci_high",
                "above_chance"]].to_string(index=False))


if __name__ == "__main__":
    main()
