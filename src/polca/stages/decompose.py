"""Stage `decompose`: POLCA and its baselines for every basis, interval by interval.

The stage lists the intervals whose blocks are missing, computes each with the pure kernel
(:func:`polca.decompose.interval_terms`, and :func:`polca.decompose.lca_interval_terms` for
the LCA baselines) through the run's executor, and writes every result through the contract
as it arrives: per basis ``<b>`` the arrays ``polca/<b>/{delta, grad, first, second_exact,
second_paper, paper_small, integrated, fisher}`` one block per interval (``grad`` per
checkpoint: checkpoint c comes from interval c, the last from the last interval's end), then
``lca/top/first`` and ``lca/tensors``, and a diagnostics summary per basis.

Intervals are independent, so a resumed or fanned-out run writes the same bytes as an
uninterrupted one. A basis decomposition is recomputed when its inputs change (checkpoints,
probe, basis vectors, settings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from polca import decompose as polca
from polca import progress as P
from polca.bases import Basis
from polca.functional import ProbeBatch, TokenLoss, token_losses
from polca.store import LCA_TENSORS, LCA_TOP, LOSS, TERM_DIMS, StoreError, term_array

# a callback after each finished interval: (array group, interval) — progress hooks and tests
IntervalHook = Callable[[str, int], None]


@dataclass(frozen=True)
class IntervalBlock:
    """One interval's work: its index and the checkpoints at both ends (float64 ``[d]``)."""

    index: int
    theta_start: torch.Tensor
    theta_end: torch.Tensor


def polca_block(loss: TokenLoss, basis: Basis, probe: ProbeBatch, options: polca.TermOptions,
                block: IntervalBlock) -> polca.IntervalTerms:
    """:func:`polca.decompose.interval_terms` of one block (picklable with :func:`partial`)."""
    return polca.interval_terms(loss, block.theta_start, block.theta_end, basis, probe, options)


def lca_block(loss: TokenLoss, top: torch.Tensor, probe: ProbeBatch, options: polca.TermOptions,
              block: IntervalBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`polca.decompose.lca_interval_terms` of one block."""
    return polca.lca_interval_terms(loss, block.theta_start, block.theta_end, top, probe,
                                    options)


def term_options(cfg) -> polca.TermOptions:
    """The kernel's options from the ``decompose`` config section."""
    return polca.TermOptions(
        curvature=tuple(cfg.curvature), integrated=cfg.integrated,
        simpson_points=cfg.simpson_points, fisher=cfg.fisher,
        denominator_tol=cfg.denominator_tol, engine=cfg.engine, batch_size=cfg.batch_size,
        dtype=cfg.dtype)


def run_decompose(ctx, progress: bool = True, on_interval: IntervalHook | None = None) -> dict:
    """Decompose every configured basis (default: all in ``basis/``); returns the diagnostics
    summaries by basis name."""
    opts = ctx.cfg.decompose
    names = opts.basis or ctx.run.basis_names()
    if not names:
        raise StoreError(f"no basis in {ctx.run.basis}: run `polca basis` first")
    steps = list(ctx.checkpoints.steps)
    if len(steps) < 2:
        raise StoreError(f"decompose needs at least 2 checkpoints, the run has {len(steps)}")
    options = term_options(opts)
    loss = ctx.loss_in(getattr(torch, opts.dtype))
    thetas = _Thetas(ctx, steps)
    summaries = {}
    for name in names:
        basis = ctx.run.load_basis(name, dim=loss.space.dim)
        summaries[name] = _decompose_basis(ctx, loss, basis, thetas, options, progress,
                                           on_interval)
        ctx.run.write_diagnostics(name, summaries[name])
    if opts.lca:
        _lca(ctx, loss, thetas, options, progress, on_interval)
    return summaries


class _Thetas:
    """Checkpoint parameters in float64 (projections such as δ = ⟨b, Δθ⟩ are formed in
    float64), checked finite, the last few cached."""

    def __init__(self, ctx, steps: list[int]):
        self.ctx, self.steps, self.cache = ctx, steps, {}

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

    def blocks(self, intervals):
        """:class:`IntervalBlock` of each interval, made as they are asked for."""
        for t in intervals:
            yield IntervalBlock(t, self[t], self[t + 1])

    @property
    def intervals(self) -> int:
        return len(self.steps) - 1


def _decompose_basis(ctx, loss, basis: Basis, thetas: _Thetas, options: polca.TermOptions,
                     progress: bool, on_interval: IntervalHook | None) -> dict:
    run, arrays = ctx.run, ctx.run.arrays()
    m, T, n_tokens = len(basis), thetas.intervals, ctx.probe.n_tokens
    group = f"polca/{basis.name}"
    if "paper" in options.curvature:
        try:
            polca.eigenvalues(basis)
        except ValueError as err:
            raise StoreError(str(err)) from None
    run.refresh(f"decompose/{basis.name}",
                ctx.inputs("source", "checkpoints", "probe", basis=run.basis_sha256(basis.name),
                           dtype=options.dtype, simpson_points=options.simpson_points,
                           denominator_tol=options.denominator_tol),
                discard=lambda: arrays.discard(group), exists=bool(arrays.members(group)))
    names = ["delta", "grad", *options.terms] + ["paper_small"] * ("paper" in options.curvature)
    attrs = {"basis": basis.name, "steps": thetas.steps}
    for name in names:
        dims = TERM_DIMS[name]
        shape = {"vector": m, "interval": T, "checkpoint": T + 1, "token": n_tokens}
        arrays.require(term_array(basis.name, name), [shape[d] for d in dims],
                       [m if d == "vector" else 1 if d in ("interval", "checkpoint") else
                        n_tokens for d in dims], dims,
                       dtype="bool" if name == "paper_small" else "float64", attrs=attrs)

    def missing(t: int) -> bool:
        ends = [t] + [T] * (t == T - 1)
        return not (all(arrays.is_done(term_array(basis.name, n), t) for n in names
                        if n != "grad")
                    and all(arrays.is_done(term_array(basis.name, "grad"), c) for c in ends))

    todo = [t for t in range(T) if missing(t)]
    compute = partial(polca_block, loss, basis, ctx.probe, options)
    bar = P.bar(progress, T, T - len(todo), f"POLCA {basis.name}", "interval")
    for block, terms in ctx.executor.map(compute, thetas.blocks(todo)):
        t = block.index
        blocks = terms.arrays()
        for name, value in blocks.items():
            _write(arrays, term_array(basis.name, name), t, value)
        if t == T - 1:
            _write(arrays, term_array(basis.name, "grad"), T, terms.grad_next)
        bar.update()
        if on_interval is not None:
            on_interval(group, t)
    bar.close()
    return _diagnostics(ctx, loss, basis, arrays, options, thetas)


def _write(arrays, name: str, index: int, value: torch.Tensor) -> None:
    """One block of ``name`` at interval (or checkpoint) ``index``, unless already done."""
    if arrays.is_done(name, index):
        return
    at = (slice(None), index) + (slice(None),) * (len(arrays.dims(name)) - 2)
    arrays.write_block(name, at, value.cpu().numpy(), key=index)


def _probe_losses(ctx, loss, arrays, thetas: _Thetas, options: polca.TermOptions) -> np.ndarray:
    """``[token, checkpoint]`` exact losses: the trajectories stage's array, else computed."""
    if arrays.complete(LOSS, range(len(thetas.steps))):
        return arrays.read(LOSS)
    dtype = getattr(torch, options.dtype)
    columns = [token_losses(loss, thetas[c].to(dtype), ctx.probe, options.batch_size)
               for c in range(len(thetas.steps))]
    losses = torch.stack(columns, dim=1).to(torch.float64).cpu().numpy()
    if not np.isfinite(losses).all():
        raise StoreError(f"{int((~np.isfinite(losses)).sum())} non-finite token losses: a "
                         "checkpoint or probe token is broken (diverged run?)")
    return losses


def _diagnostics(ctx, loss, basis: Basis, arrays, options: polca.TermOptions,
                 thetas: _Thetas) -> dict:
    """Diagnostics from the stored blocks (so a resumed run reports what an uninterrupted one
    would)."""
    losses = _probe_losses(ctx, loss, arrays, thetas, options)
    diag = polca.DecompositionDiagnostics(len(basis))

    def block(name: str, t: int):
        array = term_array(basis.name, name)
        return torch.as_tensor(arrays.block(array, (slice(None), t))) if array in arrays \
            and name in ("delta", "paper_small", *options.terms) else None

    for t in range(thetas.intervals):
        diag.update(t, torch.as_tensor(losses[:, t + 1] - losses[:, t]), block("delta", t),
                    block("first", t), second_exact=block("second_exact", t),
                    second_paper=block("second_paper", t), integrated=block("integrated", t),
                    small_denominators=block("paper_small", t))
    return {"basis": basis.name, "kind": basis.kind, "steps": list(thetas.steps),
            "denominator_tol": options.denominator_tol, **diag.summary()}


def _lca(ctx, loss, thetas: _Thetas, options: polca.TermOptions, progress: bool,
         on_interval: IntervalHook | None) -> None:
    """Token-level top-k LCA baseline and the aggregate per-tensor LCA (Lan et al. 2020)."""
    run, arrays = ctx.run, ctx.run.arrays()
    space = loss.space
    T, n_tokens = thetas.intervals, ctx.probe.n_tokens
    k = min(ctx.cfg.decompose.lca_top_parameters, space.dim)
    run.refresh("decompose/lca",
                ctx.inputs("source", "checkpoints", "probe", dtype=options.dtype, top=k,
                           simpson_points=options.simpson_points),
                discard=lambda: arrays.discard("lca"), exists=bool(arrays.members("lca")))
    top = polca.top_parameters(thetas[T], k)
    arrays.require(LCA_TOP, (len(top), T, n_tokens), (len(top), 1, n_tokens),
                   ("parameter", "interval", "token"),
                   attrs={"steps": thetas.steps, "parameters": top.tolist(),
                          "tensors": [space.tensor_of(i) for i in top.tolist()]})
    arrays.require(LCA_TENSORS, (len(space.names), T), (len(space.names), 1),
                   ("tensor", "interval"), attrs={"steps": thetas.steps, "tensors": space.names})
    todo = [t for t in range(T) if not (arrays.is_done(LCA_TOP, t)
                                        and arrays.is_done(LCA_TENSORS, t))]
    compute = partial(lca_block, loss, top, ctx.probe, options)
    bar = P.bar(progress, T, T - len(todo), "LCA", "interval")
    for block, (allocation, per_tensor) in ctx.executor.map(compute, thetas.blocks(todo)):
        _write(arrays, LCA_TOP, block.index, allocation)
        _write(arrays, LCA_TENSORS, block.index, per_tensor)
        bar.update()
        if on_interval is not None:
            on_interval("lca", block.index)
    bar.close()
