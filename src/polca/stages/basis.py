"""Stage `basis`: build every basis in ``cfg.basis.kinds`` into ``basis/<name>.{safetensors,json}``.

Algorithm 1 is sequential, so after each basis checkpoint the vectors so far are saved as a
partial basis; a restarted stage continues from there. A finished basis whose inputs (the
checkpoints, the basis sample, its settings) are unchanged is kept; when they changed, it is
rebuilt and the stage says so.
"""

from __future__ import annotations

import warnings

import torch

from polca import bases
from polca import progress as P
from polca.bases import Basis, BasisError
from polca.curvature import Algorithm1Options, BasisCheckpoint
from polca.parallel import ShardedHessian
from polca.precision import model_dtype
from polca.stages.common import RunContext
from polca.store import StoreError, read_vectors


def basis_checkpoint_positions(steps: list[int], every: int) -> list[int]:
    """Positions in ``steps`` of the basis checkpoints: for each multiple of ``every`` in
    ``(steps[0], steps[-1]]``, the checkpoint nearest to it (earlier on a tie), without repeats.

    The paper's schedule (a vector every 200 of 10,000 steps) gives 50 checkpoints, 200…10,000.
    A run shorter than ``every`` uses its last checkpoint.

    >>> basis_checkpoint_positions([0, 100, 200, 300, 400, 500], every=200)
    [2, 4]
    >>> basis_checkpoint_positions([0, 150, 350, 400], every=200)
    [1, 3]
    """
    first, last = steps[0], steps[-1]
    positions: list[int] = []
    for target in range(first - first % every + every, last + 1, every):
        nearest = min(range(len(steps)), key=lambda i: (abs(steps[i] - target), steps[i]))
        if nearest not in positions:
            positions.append(nearest)
    return positions or [len(steps) - 1]


def algorithm_one_options(cfg, batch_size: int, n_vectors: int,
                          arithmetic: str | None = None) -> Algorithm1Options:
    """Algorithm 1's options from the ``basis`` config section (the model's ``arithmetic``,
    default ``basis.dtype``)."""
    return Algorithm1Options(per_checkpoint=cfg.per_checkpoint, max_vectors=n_vectors,
                             tol=cfg.tol, solver=cfg.solver, batch_size=batch_size,
                             dtype=arithmetic or cfg.dtype, seed=cfg.seed)


def run_basis(ctx: RunContext, progress: bool = True) -> dict[str, Basis]:
    """Build (or resume, or keep) every configured basis; returns them by name.

    The Hessian-vector products of a basis checkpoint are the token-weighted sum over
    ``executor.hvp_shards`` shards of the basis sample, each held by the run's executor
    (:class:`polca.parallel.ShardedHessian`; one Ray actor per shard with ``--executor ray``)
    and added in shard order, so the basis is the same whichever executor holds them."""
    cfg = ctx.cfg.basis
    arithmetic = ctx.arithmetic(cfg.dtype)
    dtype = model_dtype(arithmetic)
    loss = ctx.loss_in(dtype)
    reader = ctx.reader(dtype)
    shards = ctx.cfg.executor.hvp_shards
    steps = ctx.checkpoints.steps
    positions = basis_checkpoint_positions(steps, cfg.every)
    n_vectors = len(positions) * cfg.per_checkpoint
    if cfg.max_vectors is not None:
        n_vectors = min(n_vectors, cfg.max_vectors)
    sample = ctx.basis_sample(cfg.sample_size)
    # a probe-file task without training sequences fits the basis to its probe: say so
    sample_source = getattr(getattr(ctx, "task", None), "sample_source", "training data")
    batch_size = ctx.cfg.trajectories.batch_size
    options = algorithm_one_options(cfg, batch_size, n_vectors, arithmetic)
    run = ctx.run
    built: dict[str, Basis] = {}

    def theta_at(index: int):
        return lambda: reader(index).to(dtype)

    held: list[ShardedHessian] = []

    def hessian_at(theta) -> ShardedHessian:
        # one checkpoint's shard workers at a time: Algorithm 1 is done with the last ones
        # when it asks for the next (on a Ray cluster they would otherwise keep their CPUs)
        while held:
            held.pop().close()
        held.append(ShardedHessian(ctx.executor, loss, theta, sample, shards=shards,
                                   batch_size=batch_size, arithmetic=arithmetic))
        return held[0]

    for kind in cfg.kinds:
        params = {**_params(cfg, kind, [steps[i] for i in positions], n_vectors, arithmetic),
                  "sample_source": sample_source}
        user = _user_vectors(cfg, loss.space.dim) if kind == "user" else None
        inputs = ctx.inputs(
            "source", "checkpoints", params=params, sample=ctx.sample_sha256(sample),
            user=None if user is None else run.files_sha256([cfg.user_path]),
            # shards change the summation order of the products (rounding): an input
            **({"hvp_shards": shards} if shards > 1 else {}))

        def discard(kind=kind):
            run.discard_basis(kind)
            run.discard_basis(kind, partial=True)

        run.refresh(f"basis/{kind}", inputs, discard,
                    exists=run.has_basis(kind) or run.has_basis(kind, partial=True))
        if run.has_basis(kind):
            built[kind] = run.load_basis(kind, dim=loss.space.dim)
            P.bar(progress, 1, 1, f"basis {kind}", "basis").close()
            continue
        if kind in ("hessian", "shuffled-hessian"):
            checkpoints = [BasisCheckpoint(i, steps[i], theta_at(i)) for i in positions]
            basis = _algorithm_one(run, kind, loss, checkpoints, sample, options, params,
                                   progress, hessian_at)
        elif kind == "random":
            basis = bases.random_basis(loss.space.dim, n_vectors, seed=cfg.seed)
        elif kind == "trajectory-pca":
            thetas = torch.stack([reader(i) for i in range(len(steps))])
            basis = bases.trajectory_pca(thetas, n_vectors)
        else:
            basis = bases.user_basis(user, loss.space.dim, source=cfg.user_path)
        if kind in ("random", "trajectory-pca", "user"):
            basis = bases.with_rayleigh_eigenvalues(
                basis, hessian_at(theta_at(len(steps) - 1)()), step=steps[-1])
        while held:
            held.pop().close()
        basis.params = {**basis.params, **params}
        run.save_basis(basis)
        run.discard_basis(kind, partial=True)
        built[kind] = basis
    return built


def _params(cfg, kind: str, basis_steps: list[int], n_vectors: int, arithmetic: str) -> dict:
    """The settings a basis of ``kind`` depends on (recorded in its json)."""
    common = {"sample_size": cfg.sample_size, "dtype": arithmetic}
    if kind == "user":
        return {**common, "user_path": cfg.user_path}
    if kind == "random":
        return {**common, "seed": cfg.seed, "m": n_vectors}
    if kind == "trajectory-pca":
        return {**common, "m_requested": n_vectors}
    return {**common, "every": cfg.every, "per_checkpoint": cfg.per_checkpoint,
            "max_vectors": cfg.max_vectors, "tol": cfg.tol, "solver": cfg.solver,
            "seed": cfg.seed, "basis_steps": basis_steps}


def _user_vectors(cfg, dim: int) -> torch.Tensor:
    if cfg.user_path is None:
        raise BasisError("basis kind 'user' needs basis.user_path: a safetensors file "
                         "with 'vectors' [m, d]")
    return read_vectors(cfg.user_path)


def _algorithm_one(run, kind, loss, checkpoints, sample, options, params, progress,
                   make_operator) -> Basis:
    partial = _load_partial(run, kind, loss.space.dim, params)
    n_done = len({e["checkpoint"] for e in partial.provenance}) if partial else 0
    n_used = min(len(checkpoints), -(-options.max_vectors // options.per_checkpoint))
    bar = P.bar(progress, n_used, n_done, f"basis {kind}", "basis checkpoint")

    def save(basis: Basis) -> None:
        run.save_basis(basis, partial=True)
        bar.update(1)

    try:
        return bases.hessian(loss, checkpoints, sample, options,
                             shuffled=kind == "shuffled-hessian", partial=partial,
                             on_checkpoint=save, params=params, make_operator=make_operator)
    finally:
        bar.close()


def _load_partial(run, name: str, dim: int, params: dict) -> Basis | None:
    """The partial basis of an interrupted run, or None when absent or made with other settings."""
    if not run.has_basis(name, partial=True):
        return None
    try:
        partial = run.load_basis(name, dim=dim, partial=True)
    except (BasisError, StoreError, ValueError) as err:
        warnings.warn(f"ignoring unreadable partial basis {name!r} of {run.root} ({err}); "
                      "starting over", stacklevel=3)
        return None
    if partial.params != params:
        warnings.warn(f"partial basis {name!r} of {run.root} was made with other settings; "
                      "starting over", stacklevel=3)
        return None
    return partial
