"""Benchmark: per-interval cost of POLCA on the demo and the paper's model shapes.

Compares, side by side as ratios, three ways to get ⟨b, ∇ℓ_x⟩ (first order) and bᵀ∇²ℓ_x b
(exact second order) for every probe token and m basis vectors at one checkpoint:

  (a) naive: a Python loop over tokens of ``torch.autograd.grad`` (first order) and, per token
      and vector, a double-backward Hessian-vector product (second order);
  (b) reverse: per-sample gradients projected (``engine="reverse"``, forward-over-reverse for
      second order);
  (c) forward: ``torch.func.jvp`` per vector (``engine="forward"``, jvp-of-jvp for second order).

Slow paths run on a subset of tokens and are extrapolated linearly per token (marked "extrap.").
Per interval, the estimators cost: first order = one first-order pass per checkpoint (shared
by neighbouring intervals); exact = one second-order pass instead (it returns both orders);
paper = first-order passes only (its ratio of gradient differences is free); integrated with
3 Simpson points = one more first-order pass at the interval midpoint.

Run:  .venv/bin/python benchmarks/bench_decompose.py            (about 3–5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from polca.directional import choose_engine, directional_derivatives
from polca.functional import ModuleTokenLoss, ProbeBatch, token_losses
from polca.models.decoder import Decoder, DecoderConfig


def make_problem(n_layers, d_model, d_mlp, n_sequences, dtype, seed=0):
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(vocab_size=12, context_length=12, n_layers=n_layers,
                                  d_model=d_model, n_heads=4, d_mlp=d_mlp)).to(dtype)
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach().clone()
    ids = torch.randint(0, 12, (n_sequences, 12))
    scored = torch.zeros(n_sequences, 12, dtype=torch.bool)
    scored[:, -5:-1] = True                                  # 4 scored tokens, as in addition
    batch = ProbeBatch(ids, torch.roll(ids, -1, 1), scored)
    return loss, theta, batch


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def naive(loss, theta, batch, vectors, order):
    """Per-token autograd loop; second order by double backward per token and vector."""
    firsts, seconds = [], []
    for row in range(len(batch)):
        sequence = batch[row : row + 1]
        point = theta.clone().requires_grad_(True)
        losses = loss(point, sequence)
        for j in range(len(losses)):
            (grad,) = torch.autograd.grad(losses[j], point, retain_graph=True,
                                          create_graph=order == 2)
            firsts.append(vectors @ grad.detach())
            if order == 2:
                seconds.append(torch.stack([
                    torch.autograd.grad(grad @ v, point, retain_graph=True)[0] @ v
                    for v in vectors]))
    first = torch.stack(firsts, 1)
    return first, (torch.stack(seconds, 1) if order == 2 else None)


def bench_shape(label, n_layers, d_model, d_mlp, n_sequences, subsets, m, dtype):
    loss, theta, batch = make_problem(n_layers, d_model, d_mlp, n_sequences, dtype)
    vectors = torch.linalg.qr(torch.randn(theta.numel(), m, dtype=torch.float64))[0].T
    vectors = vectors.to(dtype).contiguous()
    tokens = batch.n_tokens
    token_losses(loss, theta, batch[:8])                                # warm-up
    forward_pass, _ = timed(lambda: token_losses(loss, theta, batch, 256))
    print(f"\n## {label}: d = {theta.numel():,} parameters, {tokens} tokens, m = {m}, {dtype}")
    print(f"one forward pass over the probe set (256 sequences a chunk): {forward_pass:.3f} s")
    results, seconds = {}, {}
    for method, order in [("naive", 1), ("naive", 2), ("reverse", 1), ("reverse", 2),
                          ("forward", 1), ("forward", 2)]:
        rows = subsets.get((method, order), n_sequences)
        sub = batch[:rows]
        if method == "naive":
            elapsed, out = timed(lambda sub=sub, order=order: naive(loss, theta, sub, vectors, order))
        else:
            directional_derivatives(loss, theta, vectors, batch[:2], order=order, engine=method)
            elapsed, out = timed(lambda sub=sub, order=order, method=method:
                                 directional_derivatives(loss, theta, vectors, sub, order=order,
                                                         engine=method, batch_size=256))
        seconds[(method, order)] = elapsed * tokens / sub.n_tokens
        results[(method, order)] = out
        tag = "" if rows == n_sequences else f" (extrap. from {sub.n_tokens} tokens)"
        print(f"  {method:8s} order {order}: {seconds[(method, order)]:9.2f} s{tag}")
    # equal results: every method against forward mode on the tokens both computed
    for (method, order), out in results.items():
        n = out[0].shape[1]
        reference = results[("forward", 2)]
        error = max(float((out[k].double() - reference[k][:, :n].double()).abs().max() /
                          reference[k][:, :n].double().abs().max())
                    for k in range(order))
        print(f"  max relative difference {method} order {order} vs forward: {error:.1e}")
    first = {k: seconds[(k, 1)] for k in ("naive", "reverse", "forward")}
    second = {k: seconds[(k, 2)] for k in ("naive", "reverse", "forward")}
    estimators = {
        "first order": first,
        "exact (1st+2nd)": second,
        "paper (1st + ratio)": first,
        "integrated (3-pt)": {k: 2 * v for k, v in first.items()},
    }
    print(f"\n| {label} | naive loop (a) | per-sample grads (b) | forward (c) | (a)/(c) | "
          "(a)/best |")
    print("|---|---|---|---|---|---|")
    for name, cost in estimators.items():
        best = min(cost["reverse"], cost["forward"])
        print(f"| {name} | {cost['naive']:.1f} s | {cost['reverse']:.1f} s | "
              f"{cost['forward']:.1f} s | {cost['naive'] / cost['forward']:.0f}× | "
              f"{cost['naive'] / best:.0f}× |")
    per_sequence = batch.n_tokens / len(batch)
    print(f"auto picks: first order → {choose_engine(m, per_sequence, 1)}, "
          f"second order → {choose_engine(m, per_sequence, 2)}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-sequences", type=int, default=1250)
    parser.add_argument("--paper-sequences", type=int, default=16)
    parser.add_argument("--vectors", type=int, default=8)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    bench_shape("demo (2 layers, d 128, MLP 512)", 2, 128, 512, args.demo_sequences,
                {("naive", 1): 4, ("naive", 2): 1, ("reverse", 2): 2},
                args.vectors, torch.float64)
    bench_shape("paper (3 layers, d 512, MLP 2048)", 3, 512, 2048, args.paper_sequences,
                {("naive", 1): 2, ("naive", 2): 1, ("reverse", 1): 4, ("reverse", 2): 1},
                args.vectors, torch.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of the benchmark process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
