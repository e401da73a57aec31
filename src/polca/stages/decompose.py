"""Stage `decompose`: POLCA and its baselines for every basis, interval by interval.

The stage lists the intervals whose blocks are missing, groups runs of consecutive ones into
blocks of at most ``executor.block_intervals``, computes each block with the pure kernel
(:func:`polca.decompose.block_terms`, and :func:`polca.decompose.lca_block_terms` for the LCA
baselines) through the run's executor, and writes every interval's result through the
contract as it arrives: per basis ``<b>`` the arrays ``polca/<b>/{delta, grad, first,
second_exact, second_paper, paper_small, integrated, fisher}`` one block per interval
(``grad`` per checkpoint: checkpoint c comes from interval c, the last from the last
interval's end), then ``lca/top/first`` and ``lca/tensors``, and a diagnostics summary per
basis.

A block task loads its own checkpoints one after the other (:class:`CheckpointReader`; at most
two are held) and computes the derivatives at a checkpoint shared by two of its intervals
once. Every checkpoint gets the same derivatives whichever block it falls in, so a resumed or
fanned-out run writes the same bytes as an uninterrupted one. The driver writes every result:
it holds the run's lock and the block markers, and workers never need write access to the run
directory (a block's results are a few arrays ``[vector, token]`` per interval). A basis
decomposition is recomputed when its inputs change (checkpoints, probe, basis vectors,
settings).
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
from polca.precision import arithmetic, model_dtype
from polca.stages.common import CheckpointReader
from polca.store import LCA_TENSORS, LCA_TOP, LOSS, TERM_DIMS, StoreError, term_array

# a callback after each finished interval: (array group, interval) — progress hooks and tests
IntervalHook = Callable[[str, int], None]


@dataclass(frozen=True)
class IntervalBlock:
    """Consecutive intervals ``first .. last`` (inclusive): checkpoints ``first .. last + 1``."""

    first: int
    last: int

    @property
    def intervals(self) -> range:
        return range(self.first, self.last + 1)


def interval_blocks(intervals: list[int], size: int) -> list[IntervalBlock]:
    """Runs of consecutive ``intervals`` cut into blocks of at most ``size``.

    >>> interval_blocks([0, 1, 2, 5, 6], size=2)
    [IntervalBlock(first=0, last=1), IntervalBlock(first=2, last=2), IntervalBlock(first=5, last=6)]
    """
    blocks: list[IntervalBlock] = []
    for t in intervals:
        last = blocks[-1] if blocks else None
        if last is not None and t == last.last + 1 and t - last.first < size:
            blocks[-1] = IntervalBlock(last.first, t)
        else:
            blocks.append(IntervalBlock(t, t))
    return blocks


def polca_block(reader: CheckpointReader, loss: TokenLoss, basis: Basis, probe: ProbeBatch,
                options: polca.TermOptions, block: IntervalBlock) -> list[polca.IntervalTerms]:
    """:func:`polca.decompose.block_terms` of one block, its checkpoints loaded one by one
    (picklable with :func:`partial`)."""
    return list(polca.block_terms(loss, reader.stream(block.first, block.last + 1), basis,
                                  probe, options))


def lca_block(reader: CheckpointReader, loss: TokenLoss, top: torch.Tensor, probe: ProbeBatch,
              options: polca.TermOptions, block: IntervalBlock
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`polca.decompose.lca_block_terms` of one block."""
    return list(polca.lca_block_terms(loss, reader.stream(block.first, block.last + 1), top,
                                      probe, options))


def term_options(cfg, arithmetic_name: str | None = None) -> polca.TermOptions:
    """The kernel's options from the ``decompose`` config section (the model's arithmetic
    ``arithmetic_name``, default ``decompose.dtype``)."""
    return polca.TermOptions(
        curvature=tuple(cfg.curvature), integrated=cfg.integrated,
        simpson_points=cfg.simpson_points, fisher=cfg.fisher,
        denominator_tol=cfg.denominator_tol, engine=cfg.engine, batch_size=cfg.batch_size,
        dtype=arithmetic_name or cfg.dtype)


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
    options = term_options(opts, ctx.arithmetic(opts.dtype))
    dtype = model_dtype(options.dtype)
    loss = ctx.loss_in(dtype)
    reader = ctx.reader(dtype)
    summaries = {}
    for name in names:
        basis = ctx.run.load_basis(name, dim=loss.space.dim)
        summaries[name] = _decompose_basis(ctx, loss, reader, basis, options, progress,
                                           on_interval)
        ctx.run.write_diagnostics(name, summaries[name])
    if opts.lca:
        _lca(ctx, loss, reader, options, progress, on_interval)
    return summaries


def _decompose_basis(ctx, loss, reader: CheckpointReader, basis: Basis,
                     options: polca.TermOptions, progress: bool,
                     on_interval: IntervalHook | None) -> dict:
    run, arrays = ctx.run, ctx.run.arrays()
    steps = list(reader.steps)
    m, T, n_tokens = len(basis), len(steps) - 1, ctx.probe.n_tokens
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
    attrs = {"basis": basis.name, "steps": steps}
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
    compute = partial(polca_block, reader, loss, basis, ctx.probe, options)
    bar = P.bar(progress, T, T - len(todo), f"POLCA {basis.name}", "interval")
    blocks = interval_blocks(todo, ctx.cfg.executor.block_intervals)
    for block, block_terms in ctx.executor.map(compute, blocks):
        for t, terms in zip(block.intervals, block_terms):
            for name, value in terms.arrays().items():
                _write(arrays, term_array(basis.name, name), t, value)
            if t == T - 1:
                _write(arrays, term_array(basis.name, "grad"), T, terms.grad_next)
            bar.update()
            if on_interval is not None:
                on_interval(group, t)
    bar.close()
    return _diagnostics(ctx, loss, reader, basis, arrays, options)


def _write(arrays, name: str, index: int, value: torch.Tensor) -> None:
    """One block of ``name`` at interval (or checkpoint) ``index``, unless already done."""
    if arrays.is_done(name, index):
        return
    at = (slice(None), index) + (slice(None),) * (len(arrays.dims(name)) - 2)
    arrays.write_block(name, at, value.cpu().numpy(), key=index)


def _probe_losses(ctx, loss, arrays, reader: CheckpointReader,
                  options: polca.TermOptions) -> np.ndarray:
    """``[token, checkpoint]`` exact losses: the trajectories stage's array, else computed."""
    n = len(reader.steps)
    if arrays.complete(LOSS, range(n)):
        return arrays.read(LOSS)
    dtype = model_dtype(options.dtype)
    with arithmetic(options.dtype):
        columns = [token_losses(loss, reader(c).to(dtype), ctx.probe, options.batch_size)
                   for c in range(n)]
    losses = torch.stack(columns, dim=1).to(torch.float64).cpu().numpy()
    if not np.isfinite(losses).all():
        raise StoreError(f"{int((~np.isfinite(losses)).sum())} non-finite token losses: a "
                         "checkpoint or probe token is broken (diverged run?)")
    return losses


def _diagnostics(ctx, loss, reader: CheckpointReader, basis: Basis, arrays,
                 options: polca.TermOptions) -> dict:
    """Diagnostics from the stored blocks (so a resumed run reports what an uninterrupted one
    would)."""
    losses = _probe_losses(ctx, loss, arrays, reader, options)
    diag = polca.DecompositionDiagnostics(len(basis))

    def block(name: str, t: int):
        array = term_array(basis.name, name)
        return torch.as_tensor(arrays.block(array, (slice(None), t))) if array in arrays \
            and name in ("delta", "paper_small", *options.terms) else None

    for t in range(len(reader.steps) - 1):
        diag.update(t, torch.as_tensor(losses[:, t + 1] - losses[:, t]), block("delta", t),
                    block("first", t), second_exact=block("second_exact", t),
                    second_paper=block("second_paper", t), integrated=block("integrated", t),
                    small_denominators=block("paper_small", t))
    return {"basis": basis.name, "kind": basis.kind, "steps": list(reader.steps),
            "denominator_tol": options.denominator_tol, **diag.summary()}


def _lca(ctx, loss, reader: CheckpointReader, options: polca.TermOptions, progress: bool,
         on_interval: IntervalHook | None) -> None:
    """Token-level top-k LCA baseline and the aggregate per-tensor LCA (Lan et al. 2020)."""
    run, arrays = ctx.run, ctx.run.arrays()
    space = loss.space
    steps = list(reader.steps)
    T, n_tokens = len(steps) - 1, ctx.probe.n_tokens
    k = min(ctx.cfg.decompose.lca_top_parameters, space.dim)
    run.refresh("decompose/lca",
                ctx.inputs("source", "checkpoints", "probe", dtype=options.dtype, top=k,
                           simpson_points=options.simpson_points),
                discard=lambda: arrays.discard("lca"), exists=bool(arrays.members("lca")))
    top = polca.top_parameters(reader(T), k)
    arrays.require(LCA_TOP, (len(top), T, n_tokens), (len(top), 1, n_tokens),
                   ("parameter", "interval", "token"),
                   attrs={"steps": steps, "parameters": top.tolist(),
                          "tensors": [space.tensor_of(i) for i in top.tolist()]})
    arrays.require(LCA_TENSORS, (len(space.names), T), (len(space.names), 1),
                   ("tensor", "interval"), attrs={"steps": steps, "tensors": space.names})
    todo = [t for t in range(T) if not (arrays.is_done(LCA_TOP, t)
                                        and arrays.is_done(LCA_TENSORS, t))]
    compute = partial(lca_block, reader, loss, top.cpu(), ctx.probe, options)
    bar = P.bar(progress, T, T - len(todo), "LCA", "interval")
    for block, results in ctx.executor.map(compute, interval_blocks(
            todo, ctx.cfg.executor.block_intervals)):
        for t, (allocation, per_tensor) in zip(block.intervals, results):
            _write(arrays, LCA_TOP, t, allocation)
            _write(arrays, LCA_TENSORS, t, per_tensor)
            bar.update()
            if on_interval is not None:
                on_interval("lca", t)
    bar.close()
