"""Stage `basis`: build every basis in ``cfg.basis.kinds`` into ``basis/<name>.{safetensors,json}``.

Algorithm 1 is sequential, so after each basis checkpoint the vectors so far are saved to
``basis/.partial/<name>.*``; a restarted stage continues from there. A basis whose final files
exist with the same parameters is skipped; with different parameters the stage stops and says
how to rebuild it.
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from polca import bases
from polca.bases import Basis, BasisError
from polca.curvature import DTYPES, BasisCheckpoint, HessianOperator
from polca.stages.common import RunContext
from polca.store import StoreError

PARTIAL = ".partial"


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


def run_basis(ctx: RunContext, progress: bool = True) -> dict[str, Basis]:
    """Build (or resume, or skip) every configured basis; returns them by name."""
    cfg = ctx.cfg.basis
    dtype = DTYPES[cfg.dtype]
    loss = ctx.loss_in(dtype)
    steps = ctx.checkpoints.steps
    positions = basis_checkpoint_positions(steps, cfg.every)
    n_vectors = len(positions) * cfg.per_checkpoint
    if cfg.max_vectors is not None:
        n_vectors = min(n_vectors, cfg.max_vectors)
    sample = ctx.basis_sample(cfg.sample_size)
    batch_size = ctx.cfg.trajectories.batch_size
    folder = ctx.run.basis
    built: dict[str, Basis] = {}

    def theta_at(step: int):
        return lambda: ctx.theta(step).to(dtype)

    def last_hessian() -> HessianOperator:
        return HessianOperator(loss, theta_at(steps[-1])(), sample, batch_size=batch_size,
                               dtype=dtype)

    for kind in cfg.kinds:
        params = _params(cfg, kind, [steps[i] for i in positions], n_vectors, sample)
        existing = _existing(folder, kind, loss.space.dim, params)
        if existing is not None:
            built[kind] = existing
            continue
        if kind in ("hessian", "shuffled-hessian"):
            checkpoints = [BasisCheckpoint(i, steps[i], theta_at(steps[i])) for i in positions]
            basis = _algorithm_one(kind, loss, checkpoints, sample, cfg, params, n_vectors,
                                   batch_size, folder, progress)
        elif kind == "random":
            basis = bases.random_basis(loss.space.dim, n_vectors, seed=cfg.seed)
        elif kind == "trajectory-pca":
            thetas = torch.stack([theta.to(torch.float64) for _, theta in ctx.thetas()])
            basis = bases.trajectory_pca(thetas, n_vectors)
        else:
            if cfg.user_path is None:
                raise BasisError("basis kind 'user' needs basis.user_path: a safetensors file "
                                 "with 'vectors' [m, d]")
            basis = bases.user_basis(cfg.user_path, loss.space.dim)
        if kind in ("random", "trajectory-pca", "user"):
            basis = bases.with_rayleigh_eigenvalues(basis, last_hessian(), step=steps[-1])
        basis.params = {**basis.params, **params}
        basis.save(folder)
        for suffix in (".json", ".safetensors"):  # json first: a partial is judged by its json
            (folder / PARTIAL / f"{kind}{suffix}").unlink(missing_ok=True)
        if (folder / PARTIAL).is_dir() and not any((folder / PARTIAL).iterdir()):
            (folder / PARTIAL).rmdir()
        built[kind] = basis
    return built


def _params(cfg, kind: str, basis_steps: list[int], n_vectors: int, sample) -> dict:
    """What a finished basis must have been built with to be reused."""
    # the sample fixes the Hessian of every kind (Rayleigh eigenvalues included)
    common = {"sample_size": cfg.sample_size, "sample_tokens": sample.n_tokens,
              "dtype": cfg.dtype}
    if kind == "user":
        return {**common, "user_path": cfg.user_path}
    if kind == "random":
        return {**common, "seed": cfg.seed, "m": n_vectors}
    if kind == "trajectory-pca":
        return {**common, "m_requested": n_vectors}
    return {**common, "every": cfg.every, "per_checkpoint": cfg.per_checkpoint,
            "max_vectors": cfg.max_vectors, "tol": cfg.tol, "solver": cfg.solver,
            "seed": cfg.seed, "basis_steps": basis_steps}


def _existing(folder, name: str, dim: int, params: dict) -> Basis | None:
    if not (folder / f"{name}.json").is_file():
        return None
    basis = Basis.load(folder, name, dim=dim)
    stale = {k: (basis.params.get(k), v) for k, v in params.items() if basis.params.get(k) != v}
    if stale:
        raise StoreError(
            f"{folder / name}.json was built with other settings ({_describe(stale)}). Delete "
            f"{folder / name}.json and {folder / name}.safetensors to rebuild it."
        )
    return basis


def _describe(stale: dict) -> str:
    return ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in stale.items())


def _algorithm_one(kind, loss, checkpoints, sample, cfg, params, n_vectors, batch_size, folder,
                   progress) -> Basis:
    partial_folder = folder / PARTIAL
    partial = _load_partial(partial_folder, kind, loss.space.dim, params)
    order = checkpoints
    if kind == "shuffled-hessian":
        order = [checkpoints[i] for i in bases.shuffled_order(len(checkpoints), cfg.seed)]
    n_done = len({e["checkpoint"] for e in partial.provenance}) if partial else 0
    n_used = min(len(order), -(-n_vectors // cfg.per_checkpoint))
    bar = tqdm(total=n_used, initial=n_done, desc=f"basis {kind}", unit="ckpt",
               disable=not progress)

    def save(basis: Basis) -> None:
        basis.save(partial_folder)
        bar.update(1)

    try:
        return bases.hessian(
            loss, order, sample, k=cfg.per_checkpoint, tol=cfg.tol, solver=cfg.solver,
            max_vectors=n_vectors, batch_size=batch_size, dtype=DTYPES[cfg.dtype],
            seed=cfg.seed, partial=partial, on_checkpoint=save, name=kind, kind=kind,
            params=params)
    finally:
        bar.close()


def _load_partial(folder, name: str, dim: int, params: dict) -> Basis | None:
    """The partial basis of an interrupted run, or None when absent or made with other settings."""
    if not (folder / f"{name}.json").is_file():
        return None
    try:
        partial = Basis.load(folder, name, dim=dim, allow_extra_rows=True)
    except (BasisError, StoreError, ValueError) as err:
        warnings.warn(f"ignoring unreadable partial basis in {folder} ({err}); starting over",
                      stacklevel=3)
        return None
    if partial.params != params:
        warnings.warn(f"partial basis in {folder} was made with other settings; starting over",
                      stacklevel=3)
        return None
    return partial
