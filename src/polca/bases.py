"""Orthonormal bases of weight-space directions, with provenance (METHOD §3).

Every constructor returns a :class:`Basis`: ``vectors [m, d]`` (float64, orthonormal rows) and
one provenance dict per vector (``index``, ``kind``, ``checkpoint``, ``step``, ``eigenvalue``,
``eigenvalue_source``, ``residual``). Kinds:

* ``hessian`` — Algorithm 1 over the basis checkpoints in training order;
* ``shuffled-hessian`` — Algorithm 1 over a seeded permutation of the same checkpoints;
* ``random`` — QR of a seeded Gaussian matrix;
* ``trajectory-pca`` — top right singular vectors of the parameter updates;
* ``user`` — a matrix from a safetensors file, validated orthonormal.

Bases without eigenvalues get Rayleigh quotients (:func:`with_rayleigh_eigenvalues`).

Example:
    >>> basis = random_basis(dim=1000, m=4, seed=0)
    >>> basis.vectors.shape, basis.kind
    (torch.Size([4, 1000]), 'random')
    >>> bool(torch.allclose(basis.vectors @ basis.vectors.T, torch.eye(4, dtype=torch.float64)))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from polca.curvature import Algorithm1Options, BasisCheckpoint, hessian_basis, rayleigh_quotients
from polca.functional import ProbeBatch, TokenLoss

KINDS = ("hessian", "random", "shuffled-hessian", "trajectory-pca", "user")
PROVENANCE_KEYS = ("index", "kind", "checkpoint", "step", "eigenvalue", "eigenvalue_source",
                   "residual")
RAYLEIGH = "rayleigh-last-checkpoint"


class BasisError(ValueError):
    """A basis file is malformed, not orthonormal, or made for another parameter space."""


@dataclass
class Basis:
    """``vectors [m, d]`` (float64, orthonormal rows) with per-vector provenance.

    ``provenance[i]`` describes ``vectors[i]``; ``params`` records how the basis was made.
    """

    name: str
    kind: str
    vectors: torch.Tensor
    provenance: list[dict]
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise BasisError(f"basis {self.name!r}: vectors must be [m, d]; got shape "
                             f"{tuple(self.vectors.shape)}")
        if len(self.provenance) != len(self.vectors):
            raise BasisError(f"basis {self.name!r}: {len(self.vectors)} vectors but "
                             f"{len(self.provenance)} provenance entries")
        self.vectors = self.vectors.detach().to("cpu", torch.float64)
        self.provenance = [{"index": i, "kind": self.kind, **{k: None for k in PROVENANCE_KEYS[2:]},
                            **entry} for i, entry in enumerate(self.provenance)]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.vectors)

    def metadata(self) -> dict:
        """The ``basis/<name>.json`` document."""
        return {"name": self.name, "kind": self.kind, "dim": self.dim,
                "vectors": self.provenance, "params": self.params}


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip rows so that each one's entry of largest magnitude is positive (a canonical sign)."""
    rows = torch.arange(len(vectors))
    return vectors * torch.sign(vectors[rows, vectors.abs().argmax(dim=1)])[:, None]


def hessian(
    loss: TokenLoss,
    checkpoints: Sequence[BasisCheckpoint],
    sample: ProbeBatch,
    options: Algorithm1Options | None = None,
    *,
    shuffled: bool = False,
    name: str | None = None,
    partial: Basis | None = None,
    on_checkpoint: Callable[[Basis], None] | None = None,
    params: dict | None = None,
    make_operator: Callable[[torch.Tensor], object] | None = None,
) -> Basis:
    """Algorithm 1 over ``checkpoints`` (see :func:`polca.curvature.hessian_basis`): in training
    order (kind ``hessian``) or, with ``shuffled``, in the seeded permutation
    :func:`shuffled_order` of them (kind ``shuffled-hessian``, the paper's Appendix E).

    ``partial`` (a basis saved by ``on_checkpoint``) resumes: its checkpoints must be the first
    ones of the order; the rest are processed. ``on_checkpoint(basis)`` gets the basis so far
    after every checkpoint. ``make_operator``: see :func:`polca.curvature.hessian_basis`.
    """
    options = options or Algorithm1Options()
    kind = "shuffled-hessian" if shuffled else "hessian"
    name = name or kind
    if shuffled:
        checkpoints = [checkpoints[i] for i in shuffled_order(len(checkpoints), options.seed)]
    done: list[int] = []
    if partial is not None:
        for entry in partial.provenance:
            if not done or done[-1] != entry["checkpoint"]:
                done.append(entry["checkpoint"])
        order = [c.index for c in checkpoints]
        if order[: len(done)] != done:
            raise BasisError(f"partial basis {partial.name!r} was made at checkpoints {done}, "
                             f"which do not start the order {order}; delete it to start over")
    params = dict(params or {})

    def as_basis(vectors, provenance) -> Basis:
        return Basis(name, kind, vectors, provenance, params)

    vectors, provenance = hessian_basis(
        loss, checkpoints[len(done):], sample, options,
        vectors=None if partial is None else partial.vectors,
        provenance=None if partial is None else partial.provenance,
        on_checkpoint=None if on_checkpoint is None else (
            lambda v, p: on_checkpoint(as_basis(v, p))),
        make_operator=make_operator,
    )
    return as_basis(vectors, provenance)


def shuffled_order(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)``: the checkpoint order of ``shuffled-hessian``.

    >>> sorted(shuffled_order(5, seed=0)) == list(range(5))
    True
    """
    return np.random.default_rng([seed, 1]).permutation(n).tolist()


def random_basis(dim: int, m: int, seed: int = 0, name: str = "random") -> Basis:
    """``m`` orthonormal vectors: QR of a seeded ``[d, m]`` standard Gaussian matrix."""
    if not 1 <= m <= dim:
        raise BasisError(f"a random basis needs 1 <= m <= d; got m={m}, d={dim}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, m, generator=generator, dtype=torch.float64)
    vectors = _fix_signs(torch.linalg.qr(gaussian).Q.T)
    return Basis(name, "random", vectors, [{} for _ in range(m)], {"seed": seed, "m": m})


def trajectory_pca(thetas: Sequence[torch.Tensor] | torch.Tensor, m: int,
                   name: str = "trajectory-pca") -> Basis:
    """Top-``m`` principal directions of the updates ``θ_{t+1} − θ_t`` of ``thetas [T+1, d]``.

    The updates are NOT centred: POLCA projects the updates themselves (δ_{t,b} = ⟨b, Δθ_t⟩),
    and the leading uncentred direction is the mean drift of training, which centring would
    remove. The top-m right singular vectors of the ``[T, d]`` update matrix maximise
    Σ_t ‖P_B Δθ_t‖², the share of the trajectory the basis captures. ``m`` is capped at T.
    Provenance records each direction's singular value and explained fraction.
    """
    thetas = torch.stack(list(thetas)) if not isinstance(thetas, torch.Tensor) else thetas
    updates = torch.diff(thetas.to(torch.float64), dim=0)
    if len(updates) == 0:
        raise BasisError("trajectory-pca needs at least two checkpoints")
    _, singular_values, right = torch.linalg.svd(updates, full_matrices=False)
    kept = min(m, int((singular_values > singular_values[0] * 1e-12).sum()))
    energy = (singular_values**2).sum()
    provenance = [{"singular_value": float(s), "explained": float(s**2 / energy)}
                  for s in singular_values[:kept]]
    return Basis(name, "trajectory-pca", _fix_signs(right[:kept]), provenance,
                 {"m": kept, "m_requested": m, "centred": False, "intervals": len(updates)})


def user_basis(vectors: torch.Tensor, dim: int, tol: float = 1e-5, name: str = "user",
               source: str = "user") -> Basis:
    """A basis the user supplies: ``vectors [m, d]`` checked orthonormal within ``tol``
    (``max |V Vᵀ − I| ≤ tol``) and of the model's dimension ``dim``; ``source`` names where
    they came from (a file) in messages and provenance.

    >>> user_basis(torch.eye(3, dtype=torch.float64)[:2], dim=3).params["orthonormality_error"]
    0.0
    """
    vectors = vectors.to(torch.float64)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise BasisError(f"user basis {source} has vectors of dimension {vectors.shape[-1]} but "
                         f"the model has {dim} parameters in θ; flatten directions in the "
                         "parameter order of polca.functional.ParameterSpace")
    if not torch.isfinite(vectors).all():
        raise BasisError(f"user basis {source} contains non-finite entries")
    error = float((vectors @ vectors.T - torch.eye(len(vectors), dtype=torch.float64)).abs().max())
    if error > tol:
        raise BasisError(
            f"user basis {source} is not orthonormal: max |V Vᵀ − I| = {error:.3g} > tol "
            f"{tol:g}. Orthonormalise its rows first, e.g. V = torch.linalg.qr(V.T).Q.T (float64)."
        )
    return Basis(name, "user", vectors, [{} for _ in range(len(vectors))],
                 {"path": source, "orthonormality_error": error})


def with_rayleigh_eigenvalues(basis: Basis, operator, step: int | None = None) -> Basis:
    """Fill missing eigenvalues with Rayleigh quotients ``bᵀ H b`` of ``operator`` (the Hessian
    at the last checkpoint), marked ``eigenvalue_source = "rayleigh-last-checkpoint"``."""
    quotients = rayleigh_quotients(operator, basis.vectors).tolist()
    provenance = [
        entry if entry["eigenvalue"] is not None else
        {**entry, "eigenvalue": q, "eigenvalue_source": RAYLEIGH, "eigenvalue_step": step}
        for entry, q in zip(basis.provenance, quotients)
    ]
    return Basis(basis.name, basis.kind, basis.vectors, provenance, basis.params)
