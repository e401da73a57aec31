"""Top-k Hessian eigenpairs: polca's solvers against PyHessian and curvlinops, side by side.

Model: the demo shape (2 layers, d_model 128, 4 heads, MLP 512, vocabulary 12, context 12,
d = 401,408) trained briefly on 3-digit addition so the Hessian has its outliers; the Hessian is
that of the mean loss of the 4 scored tokens of ``--sample`` training sequences, in float64.

Methods (each reports HVPs, seconds and the true residual max_i ‖H v_i − λ_i v_i‖ measured
with polca's operator; HVPs and seconds include that check, k products, for every method):

* ``polca-eigsh``: :func:`polca.curvature.top_eigenpairs`, SciPy ARPACK ``eigsh(which="LA")``
  (``cache_graph=False``, as these figures were first taken);
* ``polca-lanczos``: the same, torch Lanczos with full reorthogonalisation;
* ``polca-eigsh-cached``: eigsh on ``HessianOperator(cache_graph=True)``;
* ``pyhessian``: PyHessian 0.1 ``hessian.eigenvalues`` (deflated power iteration; its ``tol``
  bounds the relative change of the eigenvalue between iterations, not the residual);
* ``curvlinops``: ``curvlinops.HessianLinearOperator(...).to_scipy()`` + ``eigsh``
  (forward-over-reverse HVPs).

``--hvp`` times one Hessian-vector product (and a block of 5) by each way polca could compute
it, on configs/demo-addition.toml's model (2 layers, d_model 64, MLP 256) and basis sample
(256 sequences): double backward with the graph rebuilt for every product
(``cache_graph=False``) and kept between products (``HessianOperator``'s default keeps it
when it fits ``graph_budget``; it does here), forward-over-reverse (``jvp`` of ``grad``),
``torch.compile`` of the double backward (compile time reported apart), and for a block of
columns the per-column loop against ``is_grads_batched`` (vmap over the columns).

Run: ``.venv/bin/python benchmarks/bench_curvature.py [--sample 128] [--k 1 5] [--threads 1]``
PyHessian and curvlinops are optional (``pip install pyhessian curvlinops-for-pytorch``, each
with ``--no-deps`` so that pip keeps the installed torch); missing ones are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
import warnings
from importlib import metadata

import numpy as np
import scipy
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from polca.curvature import HessianOperator, top_eigenpairs
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig
from polca.tasks.addition import Addition


def trained_demo_model(steps: int, seed: int = 0, d_model: int = 128,
                       d_mlp: int = 512) -> tuple[Decoder, Addition]:
    torch.manual_seed(seed)
    task = Addition(digits=3, n_probe=100, seed=seed)
    model = Decoder(DecoderConfig(vocab_size=12, context_length=12, n_layers=2, d_model=d_model,
                                  n_heads=4, d_mlp=d_mlp))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    loss = ModuleTokenLoss(model)
    for step in range(steps):
        batch = task.train_batch(step, 64)
        value = loss(loss.space.flatten(dict(model.named_parameters())), batch).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    print(f"trained {steps} steps, final batch loss {value.item():.3f}")
    return model.double(), task


class ScoredLogits(nn.Module):
    """``input_ids -> [sequences * 4, vocab]`` logits at the scored positions (the same in every
    addition sequence), for the model/criterion interfaces of PyHessian and curvlinops."""

    def __init__(self, model: Decoder, sample: ProbeBatch):
        super().__init__()
        self.model = model
        self.positions = sample.scored[0].nonzero()[:, 0]
        if not bool((sample.scored == sample.scored[0]).all()):
            raise ValueError("ScoredLogits needs the same scored positions in every sequence")

    def forward(self, input_ids):
        logits = self.model(input_ids)[:, self.positions]
        return logits.reshape(-1, logits.shape[-1])


def scored_targets(sample: ProbeBatch) -> torch.Tensor:
    return sample.targets[sample.scored]  # row-major: the order of ScoredLogits' rows


def residuals(hessian: HessianOperator, values: torch.Tensor, vectors: torch.Tensor):
    products = (hessian @ vectors.T).T
    return torch.linalg.vector_norm(products - values[:, None] * vectors, dim=1)


def polca_method(solver: str, cache_graph: bool | None = False):
    def run(loss, theta, sample, k, tol):
        hessian = HessianOperator(loss, theta, sample, cache_graph=cache_graph)
        values, _, found_residuals = top_eigenpairs(hessian, k, tol=tol, solver=solver)
        return values, found_residuals, hessian.n_products
    return run


def pyhessian_method(loss, theta, sample, k, tol):
    ph = importlib.import_module("pyhessian.hessian")  # the module; the package re-exports a class

    model = loss.module
    model.load_state_dict({**loss.space.unflatten(theta)}, strict=False)
    counter = {"n": 0}
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter["n"] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    try:
        with warnings.catch_warnings():  # its loss.backward(create_graph=True) warns of a cycle
            warnings.simplefilter("ignore", UserWarning)
            computer = ph.hessian(ScoredLogits(model, sample), nn.CrossEntropyLoss(),
                                  data=(sample.input_ids, scored_targets(sample)), cuda=False)
            values, vectors = computer.eigenvalues(maxIter=100, tol=tol, top_n=k)
    finally:
        ph.hessian_vector_product = original
        torch.set_default_dtype(previous)
    vectors = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors])
    hessian = HessianOperator(loss, theta, sample)
    values = torch.tensor(values, dtype=torch.float64)
    return values, residuals(hessian, values, vectors), counter["n"] + hessian.n_products


def curvlinops_method(loss, theta, sample, k, tol):
    from curvlinops import HessianLinearOperator

    model = loss.module
    model.load_state_dict({**loss.space.unflatten(theta)}, strict=False)
    params = [p for _, p in model.named_parameters()]
    operator = HessianLinearOperator(ScoredLogits(model, sample), nn.CrossEntropyLoss(), params,
                                     [(sample.input_ids, scored_targets(sample))],
                                     check_deterministic=False)
    scipy_operator = operator.to_scipy()
    counter = {"n": 0}

    def matvec(v):
        counter["n"] += 1
        return scipy_operator @ v

    d = theta.numel()
    start = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values, vectors = eigsh(LinearOperator((d, d), matvec=matvec, dtype=np.float64), k=k,
                            which="LA", tol=tol, v0=start.numpy())
    values = torch.as_tensor(values)
    vectors = torch.as_tensor(vectors.T.copy())
    hessian = HessianOperator(loss, theta, sample)
    return values, residuals(hessian, values, vectors), counter["n"] + hessian.n_products


METHODS = {
    "polca-eigsh": polca_method("eigsh"),
    "polca-lanczos": polca_method("lanczos"),
    "polca-eigsh-cached": polca_method("eigsh", cache_graph=True),
    "pyhessian": pyhessian_method,
    "curvlinops": curvlinops_method,
}


def hvp_timings(steps: int, sample_size: int, repeats: int = 5) -> None:
    """Seconds per Hessian-vector product by each way of computing it (see the docstring)."""
    from torch.func import grad, jvp

    model, task = trained_demo_model(steps, d_model=64, d_mlp=256)
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    sample = task.basis_sample(sample_size)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(theta.numel(), generator=generator, dtype=torch.float64)
    block = torch.randn(theta.numel(), 5, generator=generator, dtype=torch.float64)
    n = sample.n_tokens

    def double_backward(vectors, batched=False):
        point = theta.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(point, sample).sum(), point, create_graph=True)
        if batched:
            return torch.autograd.grad(gradient, point, vectors.T, is_grads_batched=True)[0].T / n
        return torch.autograd.grad(gradient, point, vectors)[0] / n

    def forward_over_reverse(vector):
        return jvp(grad(lambda t: loss(t, sample).sum()), (theta,), (vector,))[1] / n

    def best(fn):
        fn()  # warm-up (and compilation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    print(f"\n### One HVP: d = {theta.numel():,}, {len(sample)} sequences ({n} tokens), "
          f"float64, best of {repeats}; load {os.getloadavg()[0]:.1f}")
    print("| product | method | seconds | ÷ first row | max rel. diff. |")
    print("|---|---|---:|---:|---:|")
    default, reference = best(
        lambda: HessianOperator(loss, theta, sample, cache_graph=False) @ v)
    kept = HessianOperator(loss, theta, sample)  # the default keeps graphs within its budget
    kept @ v
    singles = {
        "double backward, graph rebuilt per product": (default, reference),
        f"double backward, graph kept (default here: {kept.cache_graph})": best(
            lambda: kept @ v),
        "forward-over-reverse": best(lambda: forward_over_reverse(v)),
    }
    for name, fn in (("double backward", double_backward),
                     ("forward-over-reverse", forward_over_reverse)):
        start = time.perf_counter()
        try:
            compiled = torch.compile(fn)
            compiled(v)
            label = f"torch.compile({name}) ({time.perf_counter() - start:.0f} s to compile)"
            singles[label] = best(lambda compiled=compiled: compiled(v))
        except Exception as err:  # noqa: BLE001 - report whatever stops compilation
            reason = str(err).strip().splitlines()[0][:90]
            print(f"| [d] | torch.compile({name}) | failed: {type(err).__name__}: {reason} "
                  "| | |")
    for name, (seconds, out) in singles.items():
        error = float((out - reference).abs().max() / reference.abs().max())
        print(f"| [d] | {name} | {seconds:.3f} | {seconds / default:.2f} | {error:.0e} |",
              flush=True)
    loop, reference = best(
        lambda: HessianOperator(loss, theta, sample, cache_graph=False) @ block)
    batched, out = best(lambda: double_backward(block, batched=True))
    error = float((out - reference).abs().max() / reference.abs().max())
    print(f"| [d, 5] | loop over columns, graph shared | {loop:.3f} | 1.00 | 0e+00 |")
    print(f"| [d, 5] | is_grads_batched | {batched:.3f} | {batched / loop:.2f} | {error:.0e} |")


def available(name: str) -> bool:
    module = {"pyhessian": "pyhessian", "curvlinops": "curvlinops"}.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError as err:
        print(f"skipping {name}: {err}")
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=128, help="basis-sample sequences")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--hvp", action="store_true",
                        help="only the per-product timings on the demo config's model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.hvp:
        hvp_timings(args.train_steps, sample_size=256)
        return
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}",
                f"scipy {scipy.__version__}"]
    for package in ("pyhessian", "curvlinops-for-pytorch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    print(", ".join(versions), f"threads {args.threads}", platform.processor() or platform.machine())
    model, task = trained_demo_model(args.train_steps)
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    sample: ProbeBatch = task.basis_sample(args.sample)
    print(f"d = {loss.space.dim}, sample = {len(sample)} sequences, {sample.n_tokens} tokens, "
          f"tol = {args.tol}, load average before: {os.getloadavg()[0]:.1f}")
    HessianOperator(loss, theta, sample) @ theta  # warm-up: allocator and kernels, untimed
    print("| k | method | HVPs | seconds | s/HVP | top eigenvalue | max residual | max rel. residual |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for k in args.k:
        for name in args.methods:
            if not available(name):
                continue
            start = time.perf_counter()
            values, found, hvps = METHODS[name](loss, theta, sample, k, args.tol)
            seconds = time.perf_counter() - start
            relative = float((found / values.abs()).max())
            print(f"| {k} | {name} | {hvps} | {seconds:.1f} | {seconds / hvps:.2f} | "
                  f"{float(values.max()):.4g} | {float(found.max()):.2e} | {relative:.2e} |",
                  flush=True)


if __name__ == "__main__":
    main()
