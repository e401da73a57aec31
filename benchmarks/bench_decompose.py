"""Benchmark: per-interval cost of POLCA's directional derivatives, every engine side by side.

For every probe token and m basis vectors at one checkpoint it computes ⟨b, ∇ℓ_x⟩ (first
order) and bᵀ∇²ℓ_x b (exact second order) in these ways, in one process, on the same inputs:

  naive    a Python loop over tokens: one forward per sequence, ``torch.autograd.grad`` per
           token (first order) and a double-backward Hessian-vector product per token and
           vector (second order);
  loop     one ``jvp`` (first order) or jvp-of-jvp (both orders) per vector in a Python loop:
           the engine before the jet (``engine="forward"`` up to polca 2e6cd48), with the
           decompose stage's 512-sequence chunks and with 64-sequence chunks;
  vmap     ``engine="forward"`` now: ``torch.func.vmap`` over the vectors of the same
           jvp / jvp-of-jvp, in chunks of about FORWARD_CHUNK_POSITIONS positions × vectors;
  reverse  ``engine="reverse"``: per-sample gradients projected (forward-over-reverse for
           second order);
  jet      ``engine="jet"``: Taylor-mode propagation of all vectors at once (``polca.models.jet``).

Beside the seconds: FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products only, as that counter does; on a subset of sequences, scaled per token) in units of
one forward pass of the model over the same tokens, and the peak resident memory a method
adds (measured in a forked child: its peak RSS minus the parent's RSS at the fork). Slow
methods run on a subset of tokens and are extrapolated linearly per token ("extrap.").
Every method's numbers are compared with the jet's on the tokens both computed.

``--sweep`` times the jet against its chunk size (what :data:`polca.directional.JET_CHUNK_BYTES`
and ``JET_MIN_ROWS`` are set from); ``--hf`` adds the generic engines on a Hugging Face GPT-2
of the demo shape (vmap against the loop, for the generic fallback) and a sweep of the vmapped
forward engine's chunk (what ``FORWARD_CHUNK_POSITIONS`` is set from).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decompose.py   (about 15 min, 1 thread)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
import time

import torch
from torch.func import jvp
from torch.utils.flop_counter import FlopCounterMode, bmm_flop

import polca.directional
from polca.directional import (
    JET_CHUNK_BYTES,
    JET_MIN_ROWS,
    choose_engine,
    directional_derivatives,
    jet_chunks,
)
from polca.functional import ModuleTokenLoss, ProbeBatch, token_losses
from polca.models.decoder import Decoder, DecoderConfig
from polca.models.jet import token_loss_jet

SHAPES = {  # configs/demo-addition.toml's model, and the paper's (3 layers, width 512)
    "demo": {"n_layers": 2, "d_model": 64, "d_mlp": 256, "sequences": 1250,
             "dtype": torch.float64},
    "paper": {"n_layers": 3, "d_model": 512, "d_mlp": 2048, "sequences": 16,
              "dtype": torch.float32},
}
STAGE_BATCH = 512  # sequences per chunk the decompose stage passes (DecomposeConfig.batch_size)


def make_problem(n_layers, d_model, d_mlp, sequences, dtype, seed=0):
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(vocab_size=12, context_length=12, n_layers=n_layers,
                                  d_model=d_model, n_heads=4, d_mlp=d_mlp)).to(dtype)
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach().clone()
    ids = torch.randint(0, 12, (sequences, 12))
    scored = torch.zeros(sequences, 12, dtype=torch.bool)
    scored[:, -5:-1] = True  # 4 scored tokens before the last position, as in addition
    return loss, theta, ProbeBatch(ids, torch.roll(ids, -1, 1), scored)


# the methods ------------------------------------------------------------------------------------
def naive(loss, theta, batch, vectors, order):
    """Per-token autograd loop; second order by double backward per token and vector."""
    firsts, seconds = [], []
    for row in range(len(batch)):
        point = theta.clone().requires_grad_(True)
        losses = loss(point, batch[row: row + 1])
        for j in range(len(losses)):
            (grad,) = torch.autograd.grad(losses[j], point, retain_graph=True,
                                          create_graph=order == 2)
            firsts.append(vectors @ grad.detach())
            if order == 2:
                seconds.append(torch.stack([
                    torch.autograd.grad(grad @ v, point, retain_graph=True)[0] @ v
                    for v in vectors]))
    return torch.stack(firsts, 1), (torch.stack(seconds, 1) if order == 2 else None)


def loop(batch_size):
    """The forward engine before the jet (polca 2e6cd48): per chunk of ``batch_size``
    sequences, a Python loop over the vectors of jvp (first order) or jvp-of-jvp (both)."""
    def run(loss, theta, batch, vectors, order):
        firsts, seconds = [], []
        for chunk in batch.split(batch_size):
            def losses(point, chunk=chunk):
                return loss(point, chunk)

            for v in vectors:
                if order == 1:
                    firsts.append(jvp(losses, (theta,), (v,))[1])
                    continue
                first, second = jvp(lambda p, v=v: jvp(losses, (p,), (v,)), (theta,), (v,))[1]
                firsts.append(first)
                seconds.append(second)
        m = len(vectors)
        return _by_chunk(firsts, m), (_by_chunk(seconds, m) if order == 2 else None)
    return run


def _by_chunk(rows, m):
    """Per-chunk lists of m ``[tokens]`` rows -> ``[m, tokens]``."""
    chunks = [torch.stack(rows[i: i + m]) for i in range(0, len(rows), m)]
    return torch.cat(chunks, 1)


def engine(name, batch_size=STAGE_BATCH):
    def run(loss, theta, batch, vectors, order):
        return directional_derivatives(loss, theta, vectors, batch, order=order, engine=name,
                                       batch_size=batch_size)
    return run


METHODS = {
    "naive": naive,
    "loop (512-seq. chunks)": loop(STAGE_BATCH),
    "loop (64-seq. chunks)": loop(64),
    "vmap (engine='forward')": engine("forward"),
    "reverse": engine("reverse"),
    "jet": engine("jet"),
}


# measurements -----------------------------------------------------------------------------------
def timed(fn, repeat_below=20.0):
    """Best of two runs when one takes under ``repeat_below`` seconds (shared machine)."""
    start = time.perf_counter()
    out = fn()
    best = time.perf_counter() - start
    if best < repeat_below:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def flops(fn) -> int:
    # polca.models.jet accumulates with in-place baddbmm_, which the counter's table lacks
    def baddbmm_flop(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
        return bmm_flop(a_shape, b_shape)

    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.baddbmm_: baddbmm_flop}) as counter:
        fn()
    return counter.get_total_flops()


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split(f"{field}:")[1].split()[0])


def peak_memory(shape: str, m: int, method: str, order: int, tokens: int | None) -> int:
    """Bytes of resident memory ``method`` adds at its peak, measured in a fresh process (so
    no freed heap of earlier methods hides its allocations) on the first ``tokens`` scored
    tokens (None: the first STAGE_BATCH sequences)."""
    command = [sys.executable, __file__, "--memory-child", shape, str(m), method, str(order),
               str(tokens or 0), "--demo-sequences", str(SHAPES["demo"]["sequences"])]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


def memory_child(shape: str, m: int, method: str, order: int, tokens: int) -> None:
    """The child of :func:`peak_memory`: prints the bytes the method added to the peak RSS."""
    torch.set_num_threads(1)
    loss, theta, batch, vectors = problem_and_vectors(SHAPES[shape], m)
    sub = first_tokens(batch, tokens) if tokens else batch[:STAGE_BATCH]
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    METHODS[method](loss, theta, sub, vectors, order)
    print((status_kib("VmHWM") - before) * 1024)


def relative_difference(out, reference, order):
    n = out[0].shape[1]
    return max(float((out[k].double() - reference[k][:, :n].double()).abs().max()
                     / reference[k][:, :n].double().abs().max()) for k in range(order))


def first_tokens(batch: ProbeBatch, n: int) -> ProbeBatch:
    """The first ``n`` scored tokens of ``batch`` (row-major), for the slow methods."""
    rank = batch.scored.reshape(-1).cumsum(0).reshape(batch.scored.shape)  # 1-based if scored
    scored = batch.scored & (rank <= n)
    rows = int(scored.any(1).nonzero().max()) + 1
    return ProbeBatch(batch.input_ids[:rows], batch.targets[:rows], scored[:rows])


def problem_and_vectors(shape, m):
    """The benchmark problem of a shape and m unit vectors (seeded: a memory child rebuilds it)."""
    loss, theta, batch = make_problem(shape["n_layers"], shape["d_model"], shape["d_mlp"],
                                      shape["sequences"], shape["dtype"])
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(m, theta.numel(), generator=generator, dtype=shape["dtype"])
    vectors /= torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    return loss, theta, batch, vectors


def bench(shape_name, m, slow_tokens, skip=()):
    shape = SHAPES[shape_name]
    label = f"{shape_name} shape"
    loss, theta, batch, vectors = problem_and_vectors(shape, m)
    tokens, k = batch.n_tokens, batch.n_tokens / len(batch)
    token_losses(loss, theta, batch[:8])  # warm-up

    def forward_pass():  # the unit, timed next to each method (the machine's load drifts)
        return min(timed(lambda: token_losses(loss, theta, batch, 256))[0] for _ in range(2))

    forward_seconds = forward_pass()
    flop_rows = 8 if shape["sequences"] > 8 else 2
    forward_flops = flops(lambda: loss(theta, batch[:flop_rows])) / (flop_rows * k)
    print(f"\n## {label}: d = {theta.numel():,}, {tokens} tokens, m = {m}, {shape['dtype']}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"one forward pass over the probe set (256-sequence chunks): {forward_seconds:.3f} s "
          "(re-timed before each method: the unit of 'forward passes (time)')")
    print("| order | method | seconds | ÷ jet | naive ÷ | forward passes (time) | "
          "forward passes (FLOPs) | peak memory | rel. diff. vs jet |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for order in (2, 1):
        results, seconds, units, counted, memory, extrapolated = {}, {}, {}, {}, {}, set()
        for name, method in METHODS.items():
            if (name, order) in skip or name in skip:
                continue
            slow = (name, order) in slow_tokens
            sub = first_tokens(batch, slow_tokens[(name, order)]) if slow else batch
            unit = forward_pass()
            elapsed, out = timed(lambda sub=sub, method=method, order=order:
                                 method(loss, theta, sub, vectors, order))
            seconds[name] = elapsed * tokens / sub.n_tokens
            units[name] = seconds[name] / unit
            results[name] = out
            if slow:
                extrapolated.add(name)
            flop_sub = sub if slow else batch[:flop_rows]
            counted[name] = flops(lambda method=method, flop_sub=flop_sub, order=order:
                                  method(loss, theta, flop_sub, vectors, order)) / (
                flop_sub.n_tokens * forward_flops)
            memory[name] = peak_memory(shape_name, m, name, order,
                                       slow_tokens[(name, order)] if slow else None)
        for name, elapsed in seconds.items():
            tag = " (extrap.)" if name in extrapolated else ""
            print(f"| {order} | {name} | {elapsed:.2f}{tag} | "
                  f"{elapsed / seconds['jet']:.1f}× | "
                  f"{seconds.get('naive', float('nan')) / elapsed:.0f}× | "
                  f"{units[name]:.0f} | {counted[name]:.1f} | "
                  f"{memory[name] / 2**20:.0f} MiB | "
                  f"{relative_difference(results[name], results['jet'], order):.0e} |",
                  flush=True)
        rows[order] = {"units": units, "flops": counted}
    print(f"(1 + 4m) = {1 + 4 * m} and (1 + 2m) = {1 + 2 * m} forward passes; auto picks "
          f"{choose_engine(m, k, 2, jet=True)} (both orders), "
          f"{choose_engine(m, k, 1, jet=True)} (first order); load {os.getloadavg()[0]:.1f}")
    return {"k": k, "m": m, **rows}


def cost_constants(runs):
    """The cost model of polca.directional, in forward passes per sequence.

    ``runs[shape]`` holds that shape's runs at two values of m. The jet and forward mode cost
    about the same per forward pass at every shape: their constants come from the demo shape.
    Reverse mode does not: its per-sample gradients ``[tokens, d]`` and their projections are
    memory-bound, so per forward pass they cost more as d grows (about 3.5x at the paper
    shape's 9.5M parameters than at the demo's 0.1M); its constants are the largest over the
    shapes measured, so that auto never picks it where it was measured to lose.
    """
    (a, b) = runs["demo"]
    out = {}
    for order in (1, 2):
        ja, jb = a[order]["units"]["jet"], b[order]["units"]["jet"]
        per_direction = (jb - ja) / (b["m"] - a["m"])
        out[f"JET_COST[{order}]"] = (ja - per_direction * a["m"], per_direction)
        out[f"FORWARD_COST[{order}]"] = a[order]["units"]["vmap (engine='forward')"] / a["m"]
    gradient, hvp = [], []
    for shape_runs in runs.values():
        first = shape_runs[0]  # the smaller m
        reverse1 = first[1]["units"]["reverse"] / first["k"]
        gradient.append(reverse1)
        hvp.append((first[2]["units"]["reverse"] / first["k"] - reverse1) / first["m"])
    out["REVERSE_GRADIENT_COST"], out["REVERSE_HVP_COST"] = max(gradient), max(hvp)
    print("\nmeasured cost-model constants (forward passes per sequence):")
    for name, value in out.items():
        text = f"({value[0]:.2f}, {value[1]:.2f})" if isinstance(value, tuple) else f"{value:.2f}"
        print(f"  {name} = {text}")


def sweep(shape, m):
    """Jet seconds against sequences per chunk (one chunk of directions)."""
    loss, theta, batch = make_problem(shape["n_layers"], shape["d_model"], shape["d_mlp"],
                                      shape["sequences"], shape["dtype"])
    vectors = torch.randn(m, theta.numel(), dtype=shape["dtype"])
    chosen, _ = jet_chunks(loss.module.cfg, batch, m, 2, theta, STAGE_BATCH)
    print(f"\njet chunk sweep, m = {m}, {shape['d_model']} wide, {shape['dtype']} "
          f"(JET_CHUNK_BYTES = {JET_CHUNK_BYTES}, JET_MIN_ROWS = {JET_MIN_ROWS} choose "
          f"{chosen}); load {os.getloadavg()[0]:.1f}")
    for order in (2, 1):
        line = []
        for sequences in (2, 4, 8, 12, 16, 32, 128):
            if sequences > len(batch):
                break

            def run(sequences=sequences, order=order):
                for chunk in batch.split(sequences):
                    token_loss_jet(loss, theta, vectors, chunk, order)

            line.append(f"{sequences}: {timed(run, repeat_below=60)[0]:.2f} s")
        print(f"  order {order}: " + ", ".join(line), flush=True)


def hf_generic(m, repeats=3):
    """The generic engines, the per-direction loop (before) against vmap over directions
    (``engine="forward"``), on a Hugging Face GPT-2 of the demo shape; interleaved runs, best
    of ``repeats``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from polca.models.hf import HFTokenLoss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=12, n_embd=64, n_layer=2,
                                       n_head=4, n_inner=256, tie_word_embeddings=False,
                                       bos_token_id=0, eos_token_id=0,
                                       activation_function="gelu")).double()
    loss = HFTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    _, _, batch = make_problem(1, 8, 8, 512, torch.float64)
    vectors = torch.randn(m, theta.numel(), dtype=torch.float64)
    runs = {"loop, 64-seq. chunks": loop(64), "loop, 512-seq. chunks": loop(STAGE_BATCH),
            "engine='forward' (vmap)": engine("forward")}
    print(f"\nHugging Face GPT-2 (demo shape, float64, {batch.n_tokens} tokens, m = {m}), "
          f"interleaved, best of {repeats}; load {os.getloadavg()[0]:.1f}")
    for order in (2, 1):
        best = dict.fromkeys(runs, float("inf"))
        outputs = {}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                outputs[name] = run(loss, theta, batch, vectors, order)[order - 1]
                best[name] = min(best[name], time.perf_counter() - start)
        reference = outputs["loop, 64-seq. chunks"]
        line = ", ".join(
            f"{name} {seconds:.2f} s (rel. diff. "
            f"{float((outputs[name] - reference).abs().max() / reference.abs().max()):.0e})"
            for name, seconds in best.items())
        print(f"  order {order}: {line}", flush=True)
    # the vmapped engine's chunk: directions per call and positions × directions per call
    vectors = torch.randn(2 * m, theta.numel(), dtype=torch.float64)
    defaults = (polca.directional.FORWARD_CHUNK_DIRECTIONS,
                polca.directional.FORWARD_CHUNK_POSITIONS)
    line = []
    for directions in (m, 2 * m):
        for positions in (768, 3072, 12288):
            polca.directional.FORWARD_CHUNK_DIRECTIONS = directions
            polca.directional.FORWARD_CHUNK_POSITIONS = positions
            seconds, _ = timed(lambda: engine("forward")(loss, theta, batch, vectors, 2))
            line.append(f"{directions} × {positions}: {seconds:.2f} s")
    (polca.directional.FORWARD_CHUNK_DIRECTIONS,
     polca.directional.FORWARD_CHUNK_POSITIONS) = defaults
    print(f"  engine='forward', order 2, m = {2 * m}, by FORWARD_CHUNK_DIRECTIONS × "
          "FORWARD_CHUNK_POSITIONS: " + ", ".join(line), flush=True)


def shipped_configs(root="configs"):
    """``(name, DecoderConfig, probe batch)`` for every shipped config: addition and the
    moving-window sum from their tasks' basis samples; text with random tokens of the
    config's vocabulary and context, every position scored (as the text probe is)."""
    from pathlib import Path

    from polca.config import load_config
    from polca.sources import open_source

    for path in sorted(Path(root).glob("*.toml")):
        cfg = load_config(path)
        if cfg.task.kind == "text":
            options = cfg.task.options
            vocab, length = options["vocab_size"], options["context_length"]
            decoder = DecoderConfig(vocab, length, cfg.model.n_layers, cfg.model.d_model,
                                    cfg.model.n_heads, cfg.model.d_mlp, cfg.model.tied_head,
                                    cfg.model.attention)
            ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
            batch = ProbeBatch(ids, torch.roll(ids, -1, 1), torch.ones_like(ids, dtype=torch.bool))
        else:
            source, task = open_source(cfg)
            decoder = source.build_model().cfg
            batch = task.basis_sample(16)
        yield path.stem, decoder, batch


def configs_agreement(m=3):
    """The jet against the loop of jvp-of-jvp (the engine before it), float64, on every
    shipped config's model (weights perturbed off the initialisation so curvature is not
    tiny): the largest relative difference of each order."""
    print(f"\njet against the jvp-of-jvp loop, float64, m = {m}, every shipped config")
    print("| config | d | tokens | first order | second order |")
    print("|---|---:|---:|---:|---:|")
    for name, decoder, batch in shipped_configs():
        torch.manual_seed(0)
        model = Decoder(decoder).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        loss = ModuleTokenLoss(model)
        theta = loss.space.flatten(dict(model.named_parameters())).detach()
        vectors = torch.randn(m, theta.numel(), dtype=torch.float64)
        vectors /= torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
        reference = loop(STAGE_BATCH)(loss, theta, batch, vectors, 2)
        got = engine("jet")(loss, theta, batch, vectors, 2)
        errors = [float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, reference)]
        print(f"| {name} | {theta.numel():,} | {batch.n_tokens} | {errors[0]:.0e} | "
              f"{errors[1]:.0e} |", flush=True)
        del model, loss, theta, vectors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--vectors", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--sweep", action="store_true", help="jet chunk-size sweep")
    parser.add_argument("--hf", action="store_true", help="generic engines on HF GPT-2")
    parser.add_argument("--configs", action="store_true",
                        help="jet against jvp-of-jvp on every shipped config's model")
    parser.add_argument("--demo-sequences", type=int, default=1250, help="5000 tokens")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        shape, m, method, order, tokens = args.memory_child
        SHAPES["demo"]["sequences"] = args.demo_sequences
        memory_child(shape, int(m), method, int(order), int(tokens))
        return
    SHAPES["demo"]["sequences"] = args.demo_sequences
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"load {os.getloadavg()}")
    runs = {}
    for name in args.shapes:
        shape = SHAPES[name]
        for m in args.vectors:
            # the naive loop and reverse second order are slow: a few tokens, extrapolated
            few = max(1, 80 // m) if name == "demo" else 1  # tokens, as the vectors grow
            slow = {("naive", 1): 4 * few, ("naive", 2): few, ("reverse", 2): 4 * few}
            if name == "paper":
                slow[("reverse", 1)] = 8
            runs.setdefault(name, []).append(bench(name, m, slow))
        if args.sweep:
            for m in args.vectors:
                sweep(shape, m)
    if len(runs.get("demo", ())) == 2:
        cost_constants(runs)
    if args.hf:
        hf_generic(10)
    if args.configs:
        configs_agreement()
    with open("/proc/self/status") as status:
        peak = int(status.read().split("VmHWM:")[1].split()[0]) / 1024
    print(f"\npeak resident memory of the benchmark process: {peak:.0f} MiB; "
          f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
