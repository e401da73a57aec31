"""Premise sweep (issue 11, part a): is a carry skill learned at a different time from the same
place's tokens without a carry?

For every regime (a config override of the base below) and seed: train with polca's own loop
(single thread), score the 1250 probe problems (5000 tokens) every ``every`` steps, and keep per
checkpoint and per (place, carry) group the accuracy (greedy prediction = target) and the mean
token loss. Then apply the selection rule of docs/reproduction.md ("Selection rule"): t_c, t_n =
first step a place's carry / no-carry tokens reach accuracy 0.80; a seed passes at a place when
both are reached, both groups end ≥ 0.90, and |t_c − t_n| ≥ 300 steps; a regime passes when one
place passes on ≥ 2 seeds with the same sign. Seeds 1 and 2 run only where seed 0 passes.

One command regenerates everything (runs already done are read back, not retrained):

    PYTHONPATH=src python experiments/premise.py            # sweep + table + figure
    PYTHONPATH=src python experiments/premise.py report     # table + figure from the results

Writes ``experiments/results/premise/<regime>-s<seed>.csv`` (group curves) and ``.json`` (wall
time), per-token arrays in ``experiments/results/premise/tokens/`` (not in git), the table
``docs/premise-table.md`` and the figure ``docs/premise-curves.png``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from common import DOCS, RESULTS, config, probe_of, score

from polca.checkpoints import CheckpointStore, checkpoint_schedule
from polca.signal import skill_signal
from polca.stages.common import build_model
from polca.tasks import make_task
from polca.train import train

OUT = RESULTS / "premise"
LEVEL, FINAL_LEVEL, MIN_GAP = 0.80, 0.90, 300  # the selection rule's numbers
PLACES = (10, 100)

BASE = {
    "task": {"kind": "addition", "digits": 3, "n_probe": 1250},
    "model": {"n_layers": 2, "d_model": 64, "n_heads": 4},
    "train": {"steps": 4000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100},
}


@dataclass
class Regime:
    name: str
    what: str
    overrides: dict = field(default_factory=dict)
    every: int = 50
    planted: bool = False
    added_later: bool = False  # not in the list fixed before the sweep (see its description)


def _r(name, what, every=50, planted=False, added_later=False, **sections):
    return Regime(name, what, sections, every, planted, added_later)


# Per-step loss change after warm-up (experiments/lr_scaling.py, results/lr_scaling.csv): the
# paper's width 512 at 1e-5 is matched by width 64 at ≈2.4e-4, 128 at ≈7.8e-5, 256 at ≈2.5e-5;
# width 256 at ≈2.3e-4 matches width 64 at 1e-3.
REGIMES = [
    _r("d64-lr1e-3", "2L d64, lr 1e-3 (the demo's model and rate)"),
    _r("d64-lr3e-3", "2L d64, lr 3e-3", train={"lr": 3e-3, "steps": 3000}),
    _r("d64-lr3e-4", "2L d64, lr 3e-4, 8000 steps (≈ the paper's per-step change)",
       every=100, train={"lr": 3e-4, "steps": 8000}),
    _r("d64-lr1e-4", "2L d64, lr 1e-4, 20000 steps", every=100,
       train={"lr": 1e-4, "steps": 20000}),
    _r("d128-lr1e-3", "2L d128, lr 1e-3", model={"d_model": 128}, train={"steps": 3000}),
    _r("d128-lr3e-4", "2L d128, lr 3e-4, 6000 steps", every=100, model={"d_model": 128},
       train={"lr": 3e-4, "steps": 6000}),
    _r("d128-lr1e-4", "2L d128, lr 1e-4, 12000 steps (≈ the paper's per-step change)",
       every=100, model={"d_model": 128}, train={"lr": 1e-4, "steps": 12000}),
    _r("d64-3L-lr1e-3", "3L d64, lr 1e-3", model={"n_layers": 3}),
    _r("d256-lr2.5e-4", "2L d256, lr 2.5e-4, 3000 steps (≈ d64 at 1e-3 per step)",
       model={"d_model": 256}, train={"lr": 2.5e-4, "steps": 3000}),
    _r("d64-warmup1000", "2L d64, lr 1e-3, warm-up 1000 steps", train={"warmup_steps": 1000}),
    _r("d64-batch256", "2L d64, lr 1e-3, batch 256", train={"batch_size": 256}),
    _r("d64-batch16", "2L d64, lr 1e-3, batch 16", train={"batch_size": 16}),
    _r("d64-fixed2k", "2L d64, lr 1e-3, fixed training set of 2000 problems, 6000 steps",
       task={"options": {"train_size": 2000}}, train={"steps": 6000}),
    _r("d64-fixed20k", "2L d64, lr 1e-3, fixed training set of 20000 problems, 6000 steps",
       task={"options": {"train_size": 20000}}, train={"steps": 6000}),
    _r("d64-reversed", "2L d64, lr 1e-3, sum written units first (task reversed_addition)",
       task={"kind": "reversed_addition"}),
    _r("planted-onset2000", "2L d64, lr 1e-3, no carry into 10s/100s before step 2000",
       planted=True, task={"options": {"carry_onset": 2000}}, train={"steps": 5000}),
    _r("planted-onset2000-5pct", "as planted-onset2000 with 5% carry problems before 2000",
       planted=True, task={"options": {"carry_onset": 2000, "early_carry_fraction": 0.05}},
       train={"steps": 5000}),
    _r("planted-100s-onset2000", "2L d64, lr 1e-3, no carry into the 100s before step 2000",
       planted=True, task={"options": {"carry_onset": 2000, "carry_places": [100]}},
       train={"steps": 5000}),
    _r("planted-d128-lr3e-4", "2L d128, lr 3e-4, no carry into 10s/100s before step 3000",
       every=100, planted=True, model={"d_model": 128},
       task={"options": {"carry_onset": 3000}}, train={"lr": 3e-4, "steps": 6000}),
    # added after (b) failed on planted-onset2000-5pct: is (b) a matter of the learning rate?
    _r("planted-100s-lr3e-4", "2L d64, lr 3e-4 (≈ the paper's per-step change), no carry into "
       "the 100s before step 1500, 3000 steps; added after the first sweep", planted=True,
       added_later=True, task={"options": {"carry_onset": 1500, "carry_places": [100]}},
       train={"lr": 3e-4, "steps": 3000}),
]
BY_NAME = {r.name: r for r in REGIMES}


# -- running --------------------------------------------------------------------------------
def run(regime: Regime, seed: int) -> None:
    """Train one (regime, seed) and write its group curves; skipped when they exist."""
    stem = f"{regime.name}-s{seed}"  # names hold dots ("lr2.5e-4"): no Path.with_suffix
    if (OUT / f"{stem}.csv").is_file():
        return
    cfg = config(BASE, regime.overrides, regime.name, seed)
    task = make_task(cfg)
    model = build_model(cfg, task)
    probe, tokens = probe_of(task)
    schedule = checkpoint_schedule(cfg.train.steps, every=regime.every)
    print(f"{regime.name} seed {seed}: {cfg.train.steps} steps", flush=True)
    folder = Path(tempfile.mkdtemp(prefix=f"premise-{regime.name}-"))
    try:
        start = time.perf_counter()
        store = CheckpointStore(folder)
        train(model, task, cfg.train, schedule, store, progress=False)
        seconds = time.perf_counter() - start
        losses, correct = [], []
        for step in schedule:
            model.load_state_dict(store.load(step))
            loss, right = score(model, probe)
            losses.append(loss)
            correct.append(right)
        train_loss = [e["train_loss"] for e in store.entries]
    finally:
        shutil.rmtree(folder)
    losses, correct = np.array(losses, np.float32), np.array(correct)
    (OUT / "tokens").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "tokens" / f"{stem}.npz", steps=schedule,
                        loss=losses, correct=correct, place=tokens.place.to_numpy(),
                        carry=tokens.carry.to_numpy())
    curves = group_curves(schedule, losses, correct, tokens)
    curves.to_csv(OUT / f"{stem}.csv", index=False)
    (OUT / f"{stem}.json").write_text(json.dumps({
        "train_seconds": round(seconds, 1), "steps": cfg.train.steps,
        "train_loss": train_loss}))


def group_curves(steps, losses, correct, tokens) -> pd.DataFrame:
    """Per checkpoint and (place, carry) group: tokens, accuracy and mean loss."""
    rows = []
    for (place, carry), members in tokens.groupby(["place", "carry"]).groups.items():
        index = np.asarray(members)
        for i, step in enumerate(steps):
            rows.append({"step": step, "place": place, "carry": bool(carry),
                         "n": len(index), "accuracy": correct[i, index].mean(),
                         "loss": losses[i, index].mean()})
    return pd.DataFrame(rows)


# -- the selection rule -----------------------------------------------------------------------
def first_reach(curve: pd.DataFrame, level: float = LEVEL) -> float:
    hit = curve[curve.accuracy >= level]
    return float(hit.step.iloc[0]) if len(hit) else np.nan


def place_verdict(curves: pd.DataFrame, place: int) -> dict:
    """t_c, t_n, final accuracies, dip and pass/fail of one seed at one place."""
    out = {}
    for carry, key in ((True, "c"), (False, "n")):
        curve = curves[(curves.place == place) & (curves.carry == carry)].sort_values("step")
        out[f"t_{key}"] = first_reach(curve)
        out[f"final_{key}"] = curve.accuracy.iloc[-1]
        after = curve[curve.step >= out[f"t_{key}"]] if np.isfinite(out[f"t_{key}"]) else curve
        out[f"dip_{key}"] = after.accuracy.min()  # lowest accuracy after first reaching 0.8
    out["gap"] = out["t_c"] - out["t_n"]
    out["passes"] = bool(np.isfinite(out["gap"]) and abs(out["gap"]) >= MIN_GAP
                         and min(out["final_c"], out["final_n"]) >= FINAL_LEVEL)
    return out


def verdicts() -> pd.DataFrame:
    rows = []
    for path in sorted(OUT.glob("*-s*.csv")):
        name, seed = path.stem.rsplit("-s", 1)
        if name not in BY_NAME:
            continue
        curves = pd.read_csv(path)
        meta = json.loads((OUT / f"{path.stem}.json").read_text())
        for place in PLACES:
            rows.append({"regime": name, "seed": int(seed), "place": place,
                         "train_seconds": meta["train_seconds"], **place_verdict(curves, place)})
    return pd.DataFrame(rows)


def regime_passes(table: pd.DataFrame, name: str) -> tuple[bool, int | None]:
    """(passes, place): one place passes on ≥ 2 seeds with the same sign of t_c − t_n."""
    for place in PLACES:
        ok = table[(table.regime == name) & (table.place == place) & table.passes]
        for sign in (1, -1):
            if (np.sign(ok.gap) == sign).sum() >= 2:
                return True, place
    return False, None


# -- report -----------------------------------------------------------------------------------
def _t(value) -> str:
    return "never" if not np.isfinite(value) else f"{int(value)}"


def seed_table(table: pd.DataFrame) -> str:
    """Per regime, seed and place: the rule's times and verdict."""
    header = ("| regime | seed | place | t_c (carry) | t_n (no carry) | t_c − t_n "
              "| final acc. c / n | lowest acc. after 0.8, c / n | seed passes | train time |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        planted = " (planted)" if BY_NAME[r.regime].planted else ""
        gap = "–" if not np.isfinite(r.gap) else f"{int(r.gap):+d}"
        lines.append(
            f"| {r.regime}{planted} | {r.seed} | {r.place} | {_t(r.t_c)} | {_t(r.t_n)} | {gap} | "
            f"{r.final_c:.3f} / {r.final_n:.3f} | {r.dip_c:.2f} / {r.dip_n:.2f} | "
            f"{'yes' if r.passes else 'no'} | {r.train_seconds:.0f} s |")
    return "\n".join(lines) + "\n"


def regime_table(table: pd.DataFrame) -> str:
    """Per regime: the verdict of (a), the seed-0 times and the exact-loss carry signal."""
    header = ("| regime | what | verdict (a) | t_c − t_n, 10s / 100s (seed 0) "
              "| carry in exact loss, 10s / 100s (seed 0) |")
    lines = [header, "|---|---|---|---|---|"]
    for regime in REGIMES:
        rows = table[table.regime == regime.name]
        if not len(rows):
            continue
        ok, place = regime_passes(table, regime.name)
        verdict = f"**passes** at the {place}s place" if ok else "fails"
        verdict += f" (seeds {', '.join(map(str, sorted(rows.seed.unique())))})"
        gaps = " / ".join(
            "–" if not np.isfinite(g) else f"{int(g):+d}"
            for g in rows[rows.seed == 0].set_index("place").loc[list(PLACES), "gap"])
        lines.append(f"| {regime.name}{' (planted)' * regime.planted} | {regime.what} | "
                     f"{verdict} | {gaps} | {exact_loss_signal(regime.name)} |")
    return "\n".join(lines) + "\n"


def lr_table() -> str:
    """experiments/lr_scaling.py's measurements, one row per width."""
    path = RESULTS / "lr_scaling.csv"
    if not path.is_file():
        return ""
    scaling = pd.read_csv(path)
    header = "| width (3 layers) | parameters | lr: per-step RMS loss change (relative step) |"
    lines = [header, "|---|---|---|"]
    for width, rows in scaling.groupby("width"):
        cells = ", ".join(f"{r.lr:.0e}: {r.loss_change:.3f} ({r.relative_step:.1e})"
                          for r in rows.itertuples())
        lines.append(f"| {width} | {rows.parameters.iloc[0]:,} | {cells} |")
    return "\n".join(lines) + "\n"


def exact_loss_signal(name: str, seed: int = 0) -> str:
    """Skill-signal diagnostic of carry within the tens and the hundreds place on the exact
    per-token loss trajectories of the whole run (10-NN, 5 folds): balanced accuracy [95%].
    Computed once from the per-token arrays and kept in the run's .json (which is in git)."""
    meta_path = OUT / f"{name}-s{seed}.json"
    meta = json.loads(meta_path.read_text())
    if "exact_loss_carry_signal" not in meta:
        data = np.load(OUT / "tokens" / f"{name}-s{seed}.npz")
        table = skill_signal(data["loss"].T, data["carry"], data["place"]).set_index("group")
        meta["exact_loss_carry_signal"] = {
            str(p): [round(float(table.loc[p, c]), 3)
                     for c in ("balanced_accuracy", "ci_low", "ci_high")] for p in PLACES}
        meta_path.write_text(json.dumps(meta))
    return " / ".join("{:.2f} [{:.2f}, {:.2f}]".format(*meta["exact_loss_carry_signal"][str(p)])
                      for p in PLACES)


def figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in REGIMES if (table.regime == r.name).any()]
    fig, axes = plt.subplots(len(names), 4, figsize=(14, 1.9 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for path_csv in sorted(OUT.glob(f"{name}-s*.csv")):
            seed = int(path_csv.stem.rsplit("-s", 1)[1])
            curves = pd.read_csv(path_csv)
            style = "-" if seed == 0 else ":"
            for col, (place, what) in enumerate([(10, "accuracy"), (10, "loss"),
                                                 (100, "accuracy"), (100, "loss")]):
                ax = row[col]
                for carry, colour in ((True, "tab:red"), (False, "tab:blue")):
                    c = curves[(curves.place == place) & (curves.carry == carry)]
                    ax.plot(c.step, c[what], style, color=colour, lw=1,
                            label=("carry" if carry else "no carry") if seed == 0 else None)
                if what == "accuracy":
                    ax.axhline(LEVEL, color="grey", lw=0.5)
                    ax.set_ylim(-0.02, 1.02)
                else:
                    ax.set_yscale("log")
                ax.set_title(f"{name}: {place}s {what}", fontsize=7)
                ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Carry (red) vs no-carry (blue) tokens per place; seed 0 solid, others dotted",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=80)


def report() -> pd.DataFrame:
    table = verdicts()
    note = "<!-- generated by `PYTHONPATH=src python experiments/premise.py report` -->\n"
    (DOCS / "premise-table.md").write_text(note + "# Premise sweep: every seed\n\n"
                                           + seed_table(table))
    figure(table, DOCS / "premise-curves.png")
    text = regime_table(table) + "\n" + lr_table()
    page = DOCS / "reproduction.md"
    begin, end = "<!-- premise table: begin -->\n", "<!-- premise table: end -->"
    old = page.read_text()
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        page.write_text(head + begin + text + rest[rest.index(end):])
    print(text)
    return table


def main(argv: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if argv[:1] != ["report"]:
        names = argv or [r.name for r in REGIMES]
        for name in names:
            run(BY_NAME[name], 0)
            first = verdicts()
            if first[(first.regime == name) & (first.seed == 0)].passes.any():
                for seed in (1, 2):
                    run(BY_NAME[name], seed)
    report()


if __name__ == "__main__":
    main(sys.argv[1:])
