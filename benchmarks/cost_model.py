"""A per-interval cost model: wall time of a run from seconds measured on this machine.

    OMP_NUM_THREADS=1 python benchmarks/cost_model.py [--gpu benchmarks/results/gpu/gpu_time_float64.json]

Measured (here, one torch thread, float64): with ``benchmarks/gpu_check.py``'s ``timed`` at two
shapes of the built-in decoder on addition (``demo``: d = 102,400, 768 positions, m = 8;
``wide``: d = 401,408, 1,536 positions, m = 16) the seconds of one POLCA interval (exact and
paper curvature, 3-point Simpson integral, Fisher), of one interval of the LCA baselines, of
the token losses at one checkpoint and of one Hessian-vector product on the probe as the
sample; and the Hessian-vector products Algorithm 1 spends at one checkpoint (k = 1,
tol 1e-3, Lanczos) at the ``wide`` shape.

Model (an assumption, checked between the two measured shapes): every forward-mode pass costs
in proportion to the parameters d times the positions it runs over, so

    POLCA interval = a_polca · m · d · positions        LCA interval = a_lca · d · positions
    losses at a checkpoint = a_loss · d · positions     HVP = a_hvp · d · sample positions

with each constant fitted at the ``wide`` shape; the printed check says how far the same law
is from the ``demo`` measurement. A run's time is then

    intervals · (bases · POLCA(m) + LCA) + checkpoints · losses
    + Hessian checkpoints · HVPs per checkpoint · HVP   (hessian and shuffled-hessian)

divided by the workers (blocks of 8 intervals spread evenly: ideal scaling, no contention;
what 2 workers gave on this 2-core machine is in docs/benchmarks.md). Everything at paper and
Pythia scale is extrapolated, not measured; with ``--gpu`` the POLCA constant is refitted from
gpu_check.sh's paper-shape measurement (a GPU column, the other terms scaled by the same
factor: an assumption).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check

# Targets (the sizes are the models'; the probe and basis settings are stated choices)
TARGETS = {
    # configs/paper-addition.toml: 500 intervals, 4 bases of m = 50 (hessian, random,
    # shuffled-hessian, trajectory-pca), LCA; probe 1250 problems x 12 positions; basis sample
    # 1250 problems; Hessian vectors at 50 checkpoints
    "paper addition (9.5M, 500 intervals)": {
        "d": 9_476_608, "positions": 1250 * 12, "m": 50, "intervals": 500, "bases": 4,
        "hessian_checkpoints": 2 * 50, "sample_positions": 1250 * 12},
    # Pythia-70m (d without the input embedding, which is a lookup): 154 published
    # checkpoints; 5000 probe tokens as 40 sequences of 128; hessian + random, m = 50; basis
    # sample 64 sequences of 128 tokens; Hessian vectors at 50 checkpoints
    "Pythia-70m (154 checkpoints)": {
        "d": 70_426_624 - 50_304 * 512, "positions": 40 * 128, "m": 50, "intervals": 153,
        "bases": 2, "hessian_checkpoints": 50, "sample_positions": 64 * 128},
    "Pythia-1b (154 checkpoints)": {
        "d": 1_011_781_632 - 50_304 * 2048, "positions": 40 * 128, "m": 50, "intervals": 153,
        "bases": 2, "hessian_checkpoints": 50, "sample_positions": 64 * 128},
}


def hvps_per_checkpoint(shape: str = "wide") -> int:
    """Hessian-vector products Algorithm 1 spends at one checkpoint (k = 1, tol 1e-3)."""
    from polca.curvature import Algorithm1Options, hessian_basis

    loss, thetas, _, probe = gpu_check.setup(shape)
    _, provenance = hessian_basis(loss, [(0, 0, thetas[0])], probe,
                                  Algorithm1Options(tol=1e-3, solver="lanczos",
                                                    batch_size=len(probe)))
    return int(provenance[0]["hvps"])


def measure() -> dict:
    shapes = {name: gpu_check.timed("cpu", "float64", shape=name) for name in ("demo", "wide")}
    for entry in shapes.values():
        entry["positions"] = entry["tokens"] * 3  # addition: 12 positions per 4 scored tokens
    return {"shapes": shapes, "hvps_per_checkpoint": hvps_per_checkpoint(),
            "load_average": os.getloadavg()}


def constants(entry: dict) -> dict:
    work = entry["parameters"] * entry["positions"]
    return {"polca": entry["polca_interval_s"] / (entry["vectors"] * work),
            "lca": entry["lca_interval_s"] / work, "loss": entry["losses_checkpoint_s"] / work,
            "hvp": entry["hvp_s"] / work}


def predict(c: dict, t: dict, hvps: int) -> dict:
    """Seconds of each part of a run of target ``t`` with constants ``c``, one worker."""
    work = t["d"] * t["positions"]
    parts = {
        "polca": t["intervals"] * t["bases"] * c["polca"] * t["m"] * work,
        "lca": t["intervals"] * c["lca"] * work,
        "losses": (t["intervals"] + 1) * c["loss"] * work,
        "basis": t["hessian_checkpoints"] * hvps * c["hvp"] * t["d"] * t["sample_positions"],
    }
    parts["total"] = sum(parts.values())
    return parts


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def report(measured: dict, gpu: dict | None = None, workers=(1, 2, 16, 64)) -> str:
    wide, demo = measured["shapes"]["wide"], measured["shapes"]["demo"]
    c = constants(wide)
    check = {k: v / constants(demo)[k] for k, v in c.items()}  # law's demo prediction/measured
    load = ", ".join(f"{x:.1f}" for x in measured["load_average"])
    lines = [f"Measured on this machine (one thread, float64; load average {load}):", "",
             "| shape | d | positions | m | POLCA interval | LCA interval | losses/ckpt | HVP |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in measured["shapes"].items():
        lines.append(f"| {name} | {e['parameters']:,} | {e['positions']:,} | {e['vectors']} | "
                     f"{e['polca_interval_s']:.3f} s | {e['lca_interval_s']:.3f} s | "
                     f"{e['losses_checkpoint_s']:.4f} s | {e['hvp_s']:.4f} s |")
    hvps = (f"Algorithm 1 spent {measured['hvps_per_checkpoint']} Hessian-vector products at "
            "one checkpoint of the wide shape (k = 1, tol 1e-3).")
    law = ("Law fitted at the wide shape, checked at the demo shape (predicted / measured): "
           + ", ".join(f"{k} {v:.2f}" for k, v in check.items())
           + " (below 1: the small shape has fixed overheads the law leaves out).")
    lines += ["", hvps, "", law, ""]
    gpu_factor = None
    if gpu is not None and "polca_interval_s" in gpu:
        paper = TARGETS["paper addition (9.5M, 500 intervals)"]
        cpu_paper = c["polca"] * paper["m"] * paper["d"] * paper["positions"]
        gpu_factor = gpu["polca_interval_s"] / cpu_paper
        lines.append(f"GPU ({gpu.get('gpu', '?')}, {gpu['arithmetic']}): paper-shape POLCA "
                     f"interval measured {gpu['polca_interval_s']:.2f} s; CPU law "
                     f"{cpu_paper:.0f} s; every term scaled by {gpu_factor:.3g}.")
        lines.append("")
    head = ["target", "POLCA interval (1 basis)", *(f"{w} CPU worker{'s' * (w > 1)}"
                                                      for w in workers)]
    if gpu_factor is not None:
        head.append("1 GPU")
    lines += ["Extrapolated (one thread per worker, ideal scaling over workers):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in TARGETS.items():
        parts = predict(c, t, measured["hvps_per_checkpoint"])
        interval = c["polca"] * t["m"] * t["d"] * t["positions"]
        row = [name, duration(interval)] + [duration(parts["total"] / w) for w in workers]
        if gpu_factor is not None:
            row.append(duration(parts["total"] * gpu_factor))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", type=Path, help="a JSON written by --save (skip measuring)")
    parser.add_argument("--save", type=Path, help="write the measurements to this JSON")
    parser.add_argument("--gpu", type=Path, help="gpu_check.sh's gpu_time_<dtype>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    measured = json.loads(args.measured.read_text()) if args.measured else measure()
    if args.save:
        args.save.write_text(json.dumps(measured, indent=2) + "\n")
    gpu = json.loads(args.gpu.read_text()) if args.gpu else None
    print(report(measured, gpu), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
