"""Stage `decompose`: POLCA and its baselines for every basis, interval by interval.

Writes, per basis ``<b>`` in ``basis/``, the arrays of the run-directory contract
(``polca/<b>/{delta,grad,first,second_exact,second_paper,integrated,fisher}``), then the LCA
baselines (``lca/top/first``, ``lca/tensors``), one block per interval (per checkpoint for
``grad``), and a diagnostics summary per basis in ``diagnostics/<b>.json``.

Resumable: a block is recomputed only when its done-marker is missing; every input a missing
block needs (checkpoint gradients, curvatures, path gradients) is recomputed deterministically
or read back from the store, so a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from polca import decompose as polca
from polca.bases import Basis
from polca.directional import directional_derivatives, mean_loss_gradient
from polca.functional import token_losses
from polca.store import ArrayStore, StoreError, atomic_write_json

# a callback after each finished interval: (array group, interval) — progress hooks and tests
IntervalHook = Callable[[str, int], None]


def run_decompose(ctx, progress: bool = True, on_interval: IntervalHook | None = None) -> dict:
    """Decompose every configured basis (default: all in ``basis/``); returns the diagnostics
    summaries by basis name."""
    opts = ctx.cfg.decompose
    names = opts.basis or sorted(p.stem for p in ctx.run.basis.glob("*.json"))
    if not names:
        raise StoreError(f"no basis in {ctx.run.basis}: run `polca basis` first")
    steps = list(ctx.checkpoints.steps)
    if len(steps) < 2:
        raise StoreError(f"decompose needs at least 2 checkpoints, {ctx.run.checkpoints} has "
                         f"{len(steps)}")
    dtype = getattr(torch, opts.dtype)
    loss = ctx.loss_in(dtype)
    thetas = _Thetas(ctx, steps, dtype)
    summaries = {}
    for name in names:
        basis = Basis.load(ctx.run.basis, name, dim=loss.space.dim)
        summaries[name] = _decompose_basis(ctx, loss, basis, thetas, progress, on_interval)
        atomic_write_json(ctx.run.root / "diagnostics" / f"{name}.json", summaries[name])
    if opts.lca:
        _lca(ctx, loss, thetas, progress, on_interval)
    return summaries


class _Thetas:
    """Checkpoint parameters in float64 (projections such as δ = ⟨b, Δθ⟩ are formed in
    float64), checked finite, the last few cached; ``dtype`` is the model's arithmetic."""

    def __init__(self, ctx, steps: list[int], dtype: torch.dtype):
        self.ctx, self.steps, self.dtype, self.cache = ctx, steps, dtype, {}

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.cache:
            theta = self.ctx.theta(self.steps[index]).to(torch.float64)
            bad = int((~torch.isfinite(theta)).sum())
            if bad:
                raise StoreError(f"checkpoint at step {self.steps[index]} has {bad} non-finite "
                                 "parameters (NaN or inf): the run diverged; drop that checkpoint "
                                 "or retrain with a lower learning rate")
            if len(self.cache) >= 3:
                self.cache.pop(min(self.cache))
            self.cache[index] = theta
        return self.cache[index]

    @property
    def intervals(self) -> int:
        return len(self.steps) - 1


def _decompose_basis(ctx, loss, basis: Basis, thetas: _Thetas, progress: bool,
                     on_interval: IntervalHook | None) -> dict:
    opts = ctx.cfg.decompose
    arrays = ctx.run.arrays()
    vectors64 = basis.vectors.to(device=ctx.device, dtype=torch.float64)
    vectors = vectors64.to(thetas.dtype)  # tangents in the model's arithmetic
    m, T, n_tokens = len(basis), thetas.intervals, ctx.probe.n_tokens
    eigenvalues = _eigenvalues(basis).to(ctx.device) if "paper" in opts.curvature else None
    group = f"polca/{basis.name}"
    # blocks computed on one basis must never be resumed with another of the same name
    fingerprint = hashlib.sha256(basis.vectors.cpu().numpy().tobytes()).hexdigest()
    attrs = {"basis": basis.name, "steps": thetas.steps, "basis_sha256": fingerprint}
    arrays.require(f"{group}/delta", (m, T), (m, 1), ("vector", "interval"), attrs=attrs)
    arrays.require(f"{group}/grad", (m, T + 1, n_tokens), (m, 1, n_tokens),
                   ("vector", "checkpoint", "token"), attrs=attrs)
    terms = ["first"] + [f"second_{c}" for c in opts.curvature]
    terms += ["integrated"] * opts.integrated + ["fisher"] * opts.fisher
    for term in terms:
        arrays.require(f"{group}/{term}", (m, T, n_tokens), (m, 1, n_tokens),
                       ("vector", "interval", "token"), attrs=attrs)
    stored = arrays.attrs(f"{group}/delta").get("basis_sha256")
    if stored != fingerprint:
        raise StoreError(
            f"the arrays under {group} were computed on another basis named {basis.name!r} "
            f"(basis/{basis.name}.safetensors changed since); delete "
            f"{ctx.run.root / 'arrays.zarr' / group} and {ctx.run.progress / group} to "
            "decompose on the new basis")
    nodes, _ = polca.simpson_nodes(opts.simpson_points)

    def derivatives(theta, order):
        return directional_derivatives(loss, theta.to(thetas.dtype), vectors, ctx.probe,
                                       order=order, engine=opts.engine,
                                       batch_size=opts.batch_size)

    checkpoint = _CheckpointDerivatives(arrays, f"{group}/grad", derivatives, thetas,
                                        needs_curvature=lambda c: "exact" in opts.curvature
                                        and c < T and not arrays.is_done(f"{group}/second_exact", c))
    todo = [t for t in range(T) if not all(
        arrays.is_done(f"{group}/{name}", t) for name in ["delta", *terms]
    ) or not arrays.is_done(f"{group}/grad", t) or not arrays.is_done(f"{group}/grad", t + 1)]
    for t in tqdm(todo, desc=f"POLCA {basis.name}", disable=not progress, unit="interval"):
        theta, theta_next = thetas[t], thetas[t + 1]
        delta = polca.interval_deltas(theta, theta_next, vectors64)
        grad, curvature = checkpoint(t)
        grad_next, _ = checkpoint(t + 1)
        blocks = {"delta": delta, "first": polca.first_order(grad, delta)}
        if "exact" in opts.curvature and curvature is not None:
            blocks["second_exact"] = polca.second_order(curvature, delta)
        if "paper" in opts.curvature:
            kappa, _ = polca.paper_curvature(grad, grad_next, eigenvalues, opts.denominator_tol)
            blocks["second_paper"] = polca.second_order(kappa, delta)
        if opts.fisher:
            blocks["fisher"] = polca.fisher(grad)
        if opts.integrated and not arrays.is_done(f"{group}/integrated", t):
            step = theta_next - theta
            inner = [derivatives(theta + float(s) * step, order=1)[0] for s in nodes[1:-1]]
            blocks["integrated"] = polca.integrated(torch.stack([grad, *inner, grad_next]), delta)
        for name, block in blocks.items():
            if arrays.is_done(f"{group}/{name}", t):
                continue
            index = (slice(None), t) if name == "delta" else (slice(None), t, slice(None))
            arrays.write_block(f"{group}/{name}", index, block.cpu().numpy(), key=t)
        if on_interval is not None:
            on_interval(group, t)
    return _diagnostics(ctx, loss, basis, arrays, group, terms, eigenvalues, thetas)


class _CheckpointDerivatives:
    """g_x(t) (and κ_x(t) when a missing second-order block needs it) per checkpoint: read from
    ``grad`` when done and no curvature is needed, else computed (one jvp-of-jvp gives both)."""

    def __init__(self, arrays: ArrayStore, name: str, derivatives, thetas: _Thetas,
                 needs_curvature: Callable[[int], bool]):
        self.arrays, self.name, self.derivatives, self.thetas = arrays, name, derivatives, thetas
        self.needs_curvature = needs_curvature
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, c: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        want_curvature = self.needs_curvature(c)
        cached = self.cache.get(c)
        if cached is not None and (cached[1] is not None or not want_curvature):
            return cached
        for old in [k for k in self.cache if k < c - 1]:
            del self.cache[old]
        if self.arrays.is_done(self.name, c) and not want_curvature:
            stored = self.arrays.group[self.name][:, c, :]
            grad = torch.as_tensor(stored).to(self.thetas[c].device)
            self.cache[c] = (grad, None)
            return self.cache[c]
        grad, curvature = self.derivatives(self.thetas[c], order=2 if want_curvature else 1)
        if not self.arrays.is_done(self.name, c):
            self.arrays.write_block(self.name, (slice(None), c, slice(None)),
                                    grad.cpu().numpy(), key=c)
        self.cache[c] = (grad, curvature)
        return self.cache[c]


def _eigenvalues(basis: Basis) -> torch.Tensor:
    values = [entry.get("eigenvalue") for entry in basis.provenance]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise StoreError(
            f"basis {basis.name!r} has no eigenvalue for vectors {missing[:5]}; the paper "
            "curvature needs one per vector. Rebuild the basis with `polca basis` (it adds "
            "Rayleigh quotients), or set decompose.curvature = ['exact']"
        )
    return torch.tensor(values, dtype=torch.float64)


def _probe_losses(ctx, loss, arrays: ArrayStore, thetas: _Thetas) -> np.ndarray:
    """``[token, checkpoint]`` exact losses: the trajectories stage's array, else computed."""
    if "loss" in arrays and len(arrays.done("loss")) == len(thetas.steps):
        return arrays.read("loss")
    columns = [token_losses(loss, thetas[c].to(thetas.dtype), ctx.probe,
                            ctx.cfg.decompose.batch_size)
               for c in range(len(thetas.steps))]
    losses = torch.stack(columns, dim=1).to(torch.float64).cpu().numpy()
    if not np.isfinite(losses).all():
        raise StoreError(f"{int((~np.isfinite(losses)).sum())} non-finite token losses: a "
                         "checkpoint or probe token is broken (diverged run?)")
    return losses


def _diagnostics(ctx, loss, basis: Basis, arrays: ArrayStore, group: str, terms: list[str],
                 eigenvalues: torch.Tensor | None, thetas: _Thetas) -> dict:
    """Diagnostics from the stored blocks (so a resumed run reports what an uninterrupted one
    would)."""
    losses = _probe_losses(ctx, loss, arrays, thetas)
    diag = polca.DecompositionDiagnostics(len(basis))
    tol = ctx.cfg.decompose.denominator_tol
    T = losses.shape[1] - 1
    for t in range(T):
        block = {name: torch.as_tensor(arrays.group[f"{group}/{name}"][:, t, :])
                 for name in terms}
        grads = arrays.group[f"{group}/grad"][:, t : t + 2, :]
        small = None
        if eigenvalues is not None:
            _, small = polca.paper_curvature(torch.as_tensor(grads[:, 0]),
                                             torch.as_tensor(grads[:, 1]), eigenvalues, tol)
        diag.update(t, torch.as_tensor(losses[:, t + 1] - losses[:, t]),
                    torch.as_tensor(arrays.group[f"{group}/delta"][:, t]), block["first"],
                    second_exact=block.get("second_exact"), second_paper=block.get("second_paper"),
                    integrated=block.get("integrated"), small_denominators=small)
    return {"basis": basis.name, "kind": basis.kind, "steps": list(ctx.checkpoints.steps),
            "denominator_tol": tol, **diag.summary()}


def _lca(ctx, loss, thetas: _Thetas, progress: bool, on_interval: IntervalHook | None) -> None:
    """Token-level top-k LCA baseline and the aggregate per-tensor LCA (Lan et al. 2020)."""
    opts = ctx.cfg.decompose
    arrays = ctx.run.arrays()
    space = loss.space
    T, n_tokens = thetas.intervals, ctx.probe.n_tokens
    top = polca.top_parameters(thetas[T], min(opts.lca_top_parameters, space.dim))
    attrs = {"steps": thetas.steps, "parameters": top.tolist(),
             "tensors": [space.tensor_of(i) for i in top.tolist()]}
    arrays.require("lca/top/first", (len(top), T, n_tokens), (len(top), 1, n_tokens),
                   ("parameter", "interval", "token"), attrs=attrs)
    arrays.require("lca/tensors", (len(space.names), T), (len(space.names), 1),
                   ("tensor", "interval"), attrs={"steps": thetas.steps, "tensors": space.names})
    nodes, _ = polca.simpson_nodes(opts.simpson_points)
    endpoint_gradients: dict[int, torch.Tensor] = {}

    def aggregate_gradient(theta):
        return mean_loss_gradient(loss, theta.to(thetas.dtype), ctx.probe,
                                  opts.batch_size).to(torch.float64)

    todo = [t for t in range(T) if not (arrays.is_done("lca/top/first", t)
                                        and arrays.is_done("lca/tensors", t))]
    for t in tqdm(todo, desc="LCA", disable=not progress, unit="interval"):
        theta, theta_next = thetas[t], thetas[t + 1]
        step = theta_next - theta
        if not arrays.is_done("lca/top/first", t):
            grad, _ = directional_derivatives(loss, theta.to(thetas.dtype), top.to(theta.device),
                                              ctx.probe,
                                              order=1, engine=opts.engine,
                                              batch_size=opts.batch_size)
            allocation = polca.first_order(grad, step[top.to(step.device)])
            arrays.write_block("lca/top/first", (slice(None), t, slice(None)),
                               allocation.cpu().numpy(), key=t)
        if not arrays.is_done("lca/tensors", t):
            for c in (t, t + 1):
                if c not in endpoint_gradients:
                    endpoint_gradients[c] = aggregate_gradient(thetas[c])
            inner = [aggregate_gradient(theta + float(s) * step) for s in nodes[1:-1]]
            path = torch.stack([endpoint_gradients[t], *inner, endpoint_gradients[t + 1]])
            per_tensor = polca.lca_per_tensor(path, step, space.slices)
            arrays.write_block("lca/tensors", (slice(None), t), per_tensor.cpu().numpy(), key=t)
            endpoint_gradients.pop(t - 1, None)
        if on_interval is not None:
            on_interval("lca", t)
