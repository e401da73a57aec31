"""The decompose stage in-process and on a local Ray cluster of 1 and 2 workers, and blocks of
consecutive intervals against one interval per task.

    HF_DEACTIVATE_ASYNC_LOAD=1 OMP_NUM_THREADS=1 python benchmarks/bench_executors.py

A GPT-2 series (transformers' save_pretrained; 2 layers, n_embd 64, 9 checkpoints = 8
intervals, random weight moves) is analysed with a random basis of 8 vectors on 24 probe
sequences of 16 tokens (360 scored tokens); every variant runs the whole decompose stage
(exact and paper curvature, integrated, Fisher, LCA) on a copy of the same run, one torch
thread per process (Ray sets OMP_NUM_THREADS=1 in its workers; HF_DEACTIVATE_ASYNC_LOAD=1
keeps transformers' loading on one thread). Each variant runs ``--repeats`` times, side by side
in one process, and the fastest is reported; all variants must write the same bytes.

Variants: in-process with ``executor.block_intervals`` 1 (every interval computes both of its
checkpoints) and 4 (a block shares its inner checkpoints); Ray with ``ray.init(num_cpus=1)``
and ``num_cpus=2`` (block 4: two blocks, one per worker). Prints a JSON record with the per
interval seconds the cost model (benchmarks/cost_model.py) starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

STEPS = list(range(0, 90, 10))


def make_series(folder: Path) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4))
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(folder / f"checkpoint-{step}")


def make_probe(path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(
        0, 64, (16,), generator=generator).tolist()}) + "\n" for _ in range(24)))


def config(folder: Path, probe: Path, kind: str, block: int) -> dict:
    return {"name": "bench", "source": {"kind": "hf", "path": str(folder / "checkpoint-*")},
            "task": {"kind": "probe-file", "options": {"probe": str(probe)}},
            "basis": {"kinds": ["random"], "max_vectors": 8, "every": 10},
            "decompose": {"lca_top_parameters": 20},
            "executor": {"kind": kind, "block_intervals": block}}


def arrays(root: Path) -> dict[str, bytes]:
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    return {n: np.ascontiguousarray(a[...]).tobytes() for n, a in group.members(max_depth=None)
            if isinstance(a, zarr.Array)}


def decompose_seconds(template: Path, work: Path, cfg: dict) -> tuple[float, dict]:
    from polca.config import parse_config
    from polca.stages.common import open_run
    from polca.stages.decompose import run_decompose

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    ctx = open_run(work, parse_config(cfg))
    ctx.run.say = lambda line: None
    start = time.perf_counter()
    run_decompose(ctx, progress=False)
    return time.perf_counter() - start, arrays(work)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import ray

    from polca.config import parse_config
    from polca.stages.basis import run_basis
    from polca.stages.common import open_run
    from polca.stages.trajectories import run_trajectories

    tmp = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    make_series(tmp / "gpt2")
    make_probe(tmp / "probe.jsonl")
    template = tmp / "template"
    ctx = open_run(template, parse_config(config(tmp / "gpt2", tmp / "probe.jsonl",
                                                 "in-process", 4)))
    run_trajectories(ctx, progress=False)
    run_basis(ctx, progress=False)
    shape = {"parameters": ctx.loss.space.dim, "scored_tokens": ctx.probe.n_tokens,
             "positions": int(ctx.probe.input_ids.numel()), "vectors": 8,
             "intervals": len(STEPS) - 1}

    variants = {"in-process, block 1": ("in-process", 1, None),
                "in-process, block 4": ("in-process", 4, None),
                "ray 1 worker, block 4": ("ray", 4, 1),
                "ray 2 workers, block 4": ("ray", 4, 2)}
    seconds, results = {}, {}
    for name, (kind, block, workers) in variants.items():
        if workers is not None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path),
                                               "HF_DEACTIVATE_ASYNC_LOAD": "1"}})
        cfg = config(tmp / "gpt2", tmp / "probe.jsonl", kind, block)
        times = []
        for _ in range(args.repeats):
            elapsed, results[name] = decompose_seconds(template, tmp / "work", cfg)
            times.append(elapsed)
        seconds[name] = min(times)
        if workers is not None:
            ray.shutdown()
    reference = results["in-process, block 1"]
    identical = all(r == reference for r in results.values())
    base = seconds["in-process, block 4"]
    record = {
        "shape": shape, "seconds": seconds, "identical_bytes": identical,
        "per_interval_s": {k: v / shape["intervals"] for k, v in seconds.items()},
        "ratios": {"block 4 / block 1 (in-process)": base / seconds["in-process, block 1"],
                   "ray 1 worker / in-process": seconds["ray 1 worker, block 4"] / base,
                   "ray 2 workers / ray 1 worker": seconds["ray 2 workers, block 4"]
                   / seconds["ray 1 worker, block 4"]},
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
