"""How far one optimiser step moves a model, by width and learning rate (AdamW, polca's loop).

Under Adam every parameter moves by about the learning rate per step whatever its gradient's
scale, and the weights are initialised with std 0.02 at every width, so the *relative* weight
change per step hardly depends on width — but a wider layer sums more coherently moved weights,
so its *function* changes more per step. This script measures both, so that a learning rate for
a narrow CPU model can be matched to the paper's width 512 at 1e-5 by what POLCA decomposes:
the per-token loss change per step.

For each (width, lr): 3-layer decoder (the paper's depth), 4 heads, MLP 4×width, batch 64,
warm-up 100 steps, AdamW betas (0.9, 0.95), wd 0.1, grad clip 1.0 (polca's defaults), trained
from the same seed; over steps 100–130 (just after warm-up) the median of
  * RMS over the 5000 probe tokens of ℓ_x(θ_{t+1}) − ℓ_x(θ_t)      (``loss_change``)
  * ‖θ_{t+1} − θ_t‖ / ‖θ_t‖                                        (``relative_step``)

    PYTHONPATH=src python experiments/lr_scaling.py     # → experiments/results/lr_scaling.csv
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from common import RESULTS, config, probe_of, score

from polca.stages.common import build_model
from polca.tasks import make_task
from polca.train import batch_loss, learning_rate_factor, make_optimizer

GRID = {64: [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], 128: [3e-5, 1e-4, 3e-4, 1e-3],
        256: [1e-5, 3e-5, 1e-4, 3e-4], 512: [3e-6, 1e-5, 3e-5]}
FIRST, LAST = 100, 130


def measure(width: int, lr: float) -> dict:
    cfg = config({"task": {"kind": "addition", "n_probe": 1250}},
                 {"model": {"n_layers": 3, "d_model": width, "n_heads": 4},
                  "train": {"lr": lr, "steps": LAST}}, f"lr-scaling-{width}", seed=0)
    task = make_task(cfg)
    model = build_model(cfg, task)
    probe, _ = probe_of(task)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, cfg.train))
    loss_change, relative_step = [], []
    before = None
    start = time.perf_counter()
    for step in range(LAST):
        if step == FIRST:
            before = score(model, probe)[0]
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        loss = batch_loss(model, task.train_batch(step, cfg.train.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        if step >= FIRST:
            after = score(model, probe)[0]
            loss_change.append(np.sqrt(np.mean((after - before) ** 2)))
            new = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            relative_step.append(float((new - theta).norm() / theta.norm()))
            before = after
    return {"width": width, "lr": lr, "parameters": sum(p.numel() for p in model.parameters()),
            "loss_change": float(np.median(loss_change)),
            "relative_step": float(np.median(relative_step)),
            "seconds": round(time.perf_counter() - start, 1)}


def matched_lr(table: pd.DataFrame, width: int, target: float) -> float:
    """Learning rate at ``width`` whose loss change per step equals ``target`` (log-log
    interpolation between measured rates)."""
    rows = table[table.width == width].sort_values("lr")
    return float(np.exp(np.interp(np.log(target), np.log(rows.loss_change),
                                  np.log(rows.lr))))


def main() -> None:
    rows = []
    for width, lrs in GRID.items():
        for lr in lrs:
            rows.append(measure(width, lr))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "lr_scaling.csv", index=False)
    paper = table[(table.width == 512) & (table.lr == 1e-5)].loss_change.item()
    for width in GRID:
        print(f"width {width}: lr matching width 512 at 1e-5 in loss change per step: "
              f"{matched_lr(table, width, paper):.2g}")


if __name__ == "__main__":
    main()
