"""Curvature as a linear operator, its top eigenpairs, and the paper's Algorithm 1.

The Hessian of the mean token loss is never materialised: :class:`HessianOperator` applies it
to vectors by double backward (Hessian-vector products, HVPs). The eigensolver
(:func:`top_eigenpairs`) sees only an object with ``shape`` and ``@`` — a dense tensor works as
well as a Hessian operator — so it knows nothing of networks (curvlinops / SciPy style).

Example:
    >>> from polca.models.decoder import Decoder, DecoderConfig
    >>> from polca.functional import ModuleTokenLoss, ProbeBatch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = Decoder(DecoderConfig(vocab_size=5, context_length=6, n_layers=1, d_model=8,
    ...                               n_heads=2, d_mlp=16)).double()
    >>> loss = ModuleTokenLoss(model)
    >>> ids = torch.randint(0, 5, (4, 6))
    >>> sample = ProbeBatch(ids, torch.roll(ids, -1, 1), torch.ones(4, 6, dtype=torch.bool))
    >>> theta = loss.space.flatten(dict(model.named_parameters())).detach()
    >>> hessian = HessianOperator(loss, theta, sample)
    >>> values, vectors, residuals = top_eigenpairs(hessian, k=2, tol=1e-8)
    >>> vectors.shape                                   # [k, d]
    torch.Size([2, 744])
    >>> bool(residuals.max() < 1e-5 * values.abs().max())
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from polca.functional import ProbeBatch, TokenLoss

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HessianOperator:
    """``H = ∇²_θ`` of the mean token loss over ``sample`` at ``theta``, applied by double backward.

    ``H @ v`` takes ``v [d]`` or ``V [d, k]`` (torch or numpy) and returns the same shape. The
    sample is processed ``batch_size`` sequences at a time; for a matrix, each chunk's forward and
    first backward pass are shared by its ``k`` columns. ``n_products`` counts Hessian-vector
    products (a ``[d, k]`` product counts ``k``).

    With the first-derivative graph of every chunk kept (``cache_graph``), a product costs one
    backward pass instead of a forward and two backward passes (a product takes about 0.7 of
    the time on the demo model; ``benchmarks/bench_curvature.py --hvp``) at the price of
    holding the graphs of the whole sample in memory. By default the graphs are kept when they
    fit ``graph_budget``: the bytes autograd saves for the first chunk, scaled to the sample,
    are measured on the first product. (Batched columns through ``is_grads_batched``,
    forward-over-reverse and ``torch.compile`` were measured too and did not pay: same page.)

    Args:
        loss: the token-loss seam; its module must hold parameters of ``dtype``.
        theta: ``[d]`` parameters (cast to ``dtype``).
        sample: the sequences whose mean scored-token loss is differentiated.
        batch_size: sequences per forward pass.
        dtype: float64 (default) or float32.
        cache_graph: keep the gradient graphs between products (True), rebuild them for every
            product (False), or keep them when they fit ``graph_budget`` (None, the default).
        graph_budget: bytes the kept graphs may hold when ``cache_graph`` is None.
    """

    def __init__(
        self,
        loss: TokenLoss,
        theta: torch.Tensor,
        sample: ProbeBatch,
        batch_size: int = 256,
        dtype: torch.dtype | str = torch.float64,
        cache_graph: bool | None = None,
        graph_budget: int = 2**29,
    ):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if theta.ndim != 1:
            raise ValueError(f"theta must be a flat vector [d]; got shape {tuple(theta.shape)}")
        if sample.n_tokens == 0:
            raise ValueError("the Hessian sample has no scored tokens; pass sequences with scored "
                             "positions (ProbeBatch.scored)")
        self.loss = loss
        self.theta = theta.detach().to(dtype)
        self.sample = sample.to(self.theta.device)
        self.batch_size = batch_size
        self.dtype = dtype
        self.shape = (theta.numel(), theta.numel())
        self.n_products = 0
        self.cache_graph = cache_graph
        self.graph_budget = graph_budget
        self._graphs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __matmul__(self, vectors):
        if isinstance(vectors, np.ndarray):
            out = self._apply(torch.as_tensor(vectors, dtype=self.dtype, device=self.theta.device))
            return out.cpu().numpy().astype(vectors.dtype, copy=False)
        # the solver's vectors may live elsewhere (the CPU): products come back where they came
        # from, so only the Hessian-vector products run on the model's device
        out = self._apply(vectors.to(device=self.theta.device, dtype=self.dtype))
        return out.to(vectors.device)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self @ vector

    def _apply(self, vectors: torch.Tensor) -> torch.Tensor:
        single = vectors.ndim == 1
        columns = vectors[:, None] if single else vectors
        if columns.shape[0] != self.shape[0]:
            raise ValueError(f"vectors have {columns.shape[0]} rows; the Hessian is {self.shape}")
        total = torch.zeros_like(columns)
        graphs = self._graphs if self._graphs is not None else self._build_graphs()
        kept = []
        for theta, gradient in graphs:
            with torch.enable_grad():
                for j in range(columns.shape[1]):
                    (product,) = torch.autograd.grad(
                        gradient, theta, grad_outputs=columns[:, j],
                        retain_graph=self.cache_graph or j + 1 < columns.shape[1])
                    total[:, j] += product
            if self.cache_graph:
                kept.append((theta, gradient))
        if self.cache_graph:
            self._graphs = kept
        self.n_products += columns.shape[1]
        total /= self.sample.n_tokens
        return total[:, 0] if single else total

    def _build_graphs(self):
        """The chunks' gradient graphs, one at a time; on the first call with ``cache_graph``
        None, the first chunk's saved bytes decide whether the graphs are kept."""
        chunks = self.sample.split(self.batch_size)
        if self.cache_graph is None:
            first = next(chunks)
            saved = {}  # storage -> bytes: tensors saved twice, or views, count once

            def pack(tensor):
                storage = tensor.untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                graph = self._gradient_graph(first)
            graphs = sum(saved.values()) * len(self.sample) / len(first)
            self.cache_graph = graphs <= self.graph_budget
            yield graph
        yield from map(self._gradient_graph, chunks)

    def _gradient_graph(self, chunk: ProbeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(θ leaf, ∇ of the chunk's summed token loss with its graph)`` for double backward."""
        theta = self.theta.clone().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(self.loss(theta, chunk).sum(), theta,
                                              create_graph=True)
        return theta, gradient

    def to_scipy(self) -> LinearOperator:
        """The same operator as a float64 ``scipy.sparse.linalg.LinearOperator`` (symmetric)."""
        return _as_scipy(self)


def _as_scipy(operator) -> LinearOperator:
    d = operator.shape[0]

    def apply(v):
        v = np.asarray(v, dtype=np.float64)
        out = operator @ torch.as_tensor(v, dtype=_dtype_of(operator))
        return out.detach().cpu().double().numpy()

    return LinearOperator((d, d), matvec=apply, rmatvec=apply, matmat=apply, dtype=np.float64)


def _dtype_of(operator) -> torch.dtype:
    return getattr(operator, "dtype", torch.float64)


class ProjectedOperator:
    """``P A P`` with ``P = I − BᵀB`` for ``basis [m, d]`` with orthonormal rows (or None: ``A``)."""

    def __init__(self, operator, basis: torch.Tensor | None = None):
        self.operator = operator
        self.shape = operator.shape
        self.dtype = _dtype_of(operator)
        self.basis = None if basis is None or len(basis) == 0 else basis.to(self.dtype)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v [d]`` or ``[d, k]``; classical Gram–Schmidt twice for stability."""
        if self.basis is None:
            return vectors
        for _ in range(2):
            vectors = vectors - self.basis.T @ (self.basis @ vectors)
        return vectors

    def __matmul__(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.project(self.operator @ self.project(vectors.to(self.dtype)))


def top_eigenpairs(
    operator,
    k: int,
    projector_basis: torch.Tensor | None = None,
    tol: float = 1e-3,
    solver: str = "eigsh",
    seed: int = 0,
    max_iter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (largest algebraic eigenvalue) of the symmetric ``P A P``.

    ``P = I − BᵀB`` projects out ``projector_basis`` B ``[m, d]`` (orthonormal rows; None: P = I).
    ``operator`` is anything symmetric with ``shape`` ``(d, d)`` and ``@`` on ``[d]``/``[d, k]``
    torch tensors (a :class:`HessianOperator`, a dense tensor). The Krylov start vector is drawn
    from ``seed`` and projected, so the search stays in the complement of B and the result is
    deterministic. Eigenvector signs are fixed: the entry of largest magnitude is positive.

    Args:
        tol: relative tolerance: a pair converges when ``‖P A P b − λ b‖ ≤ tol·|λ|`` (ARPACK's
            criterion, used by both solvers).
        solver: ``"eigsh"`` (SciPy ARPACK on a LinearOperator) or ``"lanczos"`` (torch Lanczos
            with full reorthogonalisation, run just until the top ``k`` Ritz pairs converge).
        max_iter: iteration cap (eigsh: ARPACK's ``maxiter``; lanczos: Krylov dimension).

    Returns:
        ``eigenvalues [k]`` (descending), ``vectors [k, d]`` (orthonormal rows, orthogonal to B),
        ``residuals [k]`` = ``‖P A P b − λ b‖`` measured with ``k`` extra products.
    """
    projected = ProjectedOperator(operator, projector_basis)
    d = operator.shape[0]
    free = d - (0 if projected.basis is None else len(projected.basis))
    if not 1 <= k <= free:
        raise ValueError(f"k={k} eigenpairs requested but the projected operator has only {free} "
                         f"free dimensions (d={d} minus {d - free} basis vectors)")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(d, generator=generator, dtype=torch.float64).to(projected.dtype)
    start = projected.project(start)
    if solver == "eigsh":
        values, vectors = _eigsh(projected, k, start, tol, max_iter)
    elif solver == "lanczos":
        values, vectors = _lanczos(projected, k, start, tol, max_iter)
    else:
        raise ValueError(f"solver={solver!r}; choose 'eigsh' or 'lanczos'")
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[order]
    rows = torch.arange(len(vectors))
    signs = torch.sign(vectors[rows, vectors.abs().argmax(dim=1)])
    vectors = vectors * signs[:, None]
    residuals = torch.linalg.vector_norm(
        (projected @ vectors.T).T - values[:, None] * vectors, dim=1)
    return values, vectors, residuals


def _eigsh(projected: ProjectedOperator, k: int, start, tol, max_iter):
    d = projected.shape[0]
    if k >= d - 1:  # ARPACK needs k < d - 1; tiny problems are solved densely
        dense = projected @ torch.eye(d, dtype=projected.dtype)
        values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
        return values[-k:], vectors[:, -k:].T
    values, vectors = eigsh(_as_scipy(projected), k=k, which="LA", tol=tol, maxiter=max_iter,
                            v0=start.double().cpu().numpy())
    return (torch.as_tensor(values, dtype=projected.dtype),
            torch.as_tensor(vectors.T.copy(), dtype=projected.dtype))


def _lanczos(projected: ProjectedOperator, k: int, start, tol, max_iter):
    """Lanczos with full reorthogonalisation; stops when the top-k Ritz residuals ``|β s_j|``
    (exact for the Krylov relation ``AQ = QT + β q eᵀ``) meet the tolerance."""
    d = projected.shape[0]
    free = d if projected.basis is None else d - len(projected.basis)
    limit = min(free, max_iter if max_iter is not None else max(20 * k, 100))
    q = start / torch.linalg.vector_norm(start)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(limit):
        w = projected @ basis[j]
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        krylov = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan–Parlett)
            w = w - krylov.T @ (krylov @ w)
        w = projected.project(w)
        beta = float(torch.linalg.vector_norm(w))
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
        top = ritz_values[-k:]
        estimates = beta * ritz_vectors[-1, -k:].abs()
        invariant = beta <= 1e-12 * max(1.0, float(ritz_values.abs().max()))
        if len(alphas) >= k and (invariant or bool((estimates <= tol * top.abs()).all())):
            break
        if j + 1 == limit:
            warnings.warn(f"Lanczos stopped at its iteration cap {limit} before the top {k} Ritz "
                          f"pairs met tol={tol}; raise max_iter or tol", stacklevel=3)
            break
        betas.append(beta)
        basis.append(w / beta)
    krylov = torch.stack(basis[: len(alphas)])
    vectors = ritz_vectors[:, -k:].T.to(krylov.dtype) @ krylov
    return top.to(krylov.dtype), vectors


def rayleigh_quotients(operator, vectors: torch.Tensor) -> torch.Tensor:
    """``[m]`` curvatures ``bᵀ A b`` of ``vectors [m, d]`` (unit rows): the eigenvalue stand-in
    for bases made without one (``eigenvalue_source = "rayleigh-last-checkpoint"``)."""
    vectors = vectors.to(_dtype_of(operator))
    return ((operator @ vectors.T).T * vectors).sum(dim=1)


@dataclass(frozen=True)
class BasisCheckpoint:
    """One checkpoint of Algorithm 1: its position in the run, its step and ``theta [d]`` (or a
    function returning it, so checkpoints are loaded only when their turn comes)."""

    index: int
    step: int
    theta: torch.Tensor | Callable[[], torch.Tensor]


def orthonormalise_against(basis: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Rows of ``new [k, d]`` made orthonormal to ``basis [m, d]`` and to each other, in order
    (modified Gram–Schmidt, two passes), so each vector moves as little as possible."""
    rows = []
    for vector in new:
        for _ in range(2):
            for earlier in (basis, *(r[None] for r in rows)):
                if len(earlier):
                    vector = vector - earlier.T @ (earlier @ vector)
        norm = torch.linalg.vector_norm(vector)
        if norm < 1e-8:
            raise ValueError("a new basis vector lies in the span of the earlier ones")
        rows.append(vector / norm)
    return torch.stack(rows)


@dataclass(frozen=True)
class Algorithm1Options:
    """The options of the paper's Algorithm 1 (METHOD §3), in one place.

    Args:
        per_checkpoint: eigenvectors taken at each basis checkpoint (the paper's k = 1).
        max_vectors: cap on the basis size m (None: per_checkpoint × checkpoints).
        tol: relative eigen-residual tolerance of the solver (see :func:`top_eigenpairs`).
        solver: ``"eigsh"`` (SciPy ARPACK) or ``"lanczos"`` (torch Lanczos).
        batch_size: sample sequences per Hessian-vector-product chunk.
        dtype: arithmetic of the Hessian-vector products (``"float64"`` or ``"float32"``).
        seed: Krylov start vectors (checkpoint ``index`` uses ``seed + index``) and the
            permutation of the shuffled-checkpoint variant.

    >>> Algorithm1Options(per_checkpoint=2, tol=1e-6).solver
    'eigsh'
    """

    per_checkpoint: int = 1
    max_vectors: int | None = None
    tol: float = 1e-3
    solver: str = "eigsh"
    batch_size: int = 256
    dtype: str = "float64"
    seed: int = 0


def hessian_basis(
    loss: TokenLoss,
    checkpoints: Iterable[BasisCheckpoint | tuple[int, int, torch.Tensor]],
    sample: ProbeBatch,
    options: Algorithm1Options = Algorithm1Options(),
    vectors: torch.Tensor | None = None,
    provenance: Sequence[dict] | None = None,
    on_checkpoint: Callable[[torch.Tensor, list[dict]], None] | None = None,
    make_operator: Callable[[torch.Tensor], object] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Algorithm 1: top-k eigenvectors of ``P H_t P`` at each basis checkpoint, in order.

    For each checkpoint ``t`` (``(index, step, theta)``, theta ``[d]`` or a function returning
    it): P = I − BᵀB for the vectors B found so far, the top-``options.per_checkpoint``
    eigenpairs of P H_t P (H_t: Hessian of the mean token loss over ``sample``),
    re-orthogonalised against B and appended. Resume by passing the ``vectors`` and
    ``provenance`` found so far together with the checkpoints not yet processed;
    ``on_checkpoint(vectors, provenance)`` is called after every checkpoint (to save progress).
    ``make_operator(theta)`` builds the Hessian at a checkpoint (default: a
    :class:`HessianOperator` over ``sample``; :class:`polca.parallel.ShardedHessian` sums
    sample shards held by an executor).

    Returns:
        ``vectors [m, d]`` (orthonormal rows) and one provenance dict per vector: ``index``,
        ``checkpoint``, ``step``, ``eigenvalue``, ``eigenvalue_source`` ("lanczos"),
        ``residual``, ``hvps`` (HVPs spent at its checkpoint, shared by its k vectors).

    Example (ℓ(θ) = ½ Σ aᵢθᵢ², so H = diag(a) at every θ):
        >>> from polca.functional import ParameterSpace
        >>> class Quadratic:
        ...     space = ParameterSpace({"w": (3,)})
        ...     def __call__(self, theta, batch):
        ...         a = torch.tensor([3.0, 1.0, 2.0], dtype=theta.dtype)
        ...         return (0.5 * a * theta**2).sum().expand(batch.n_tokens)
        >>> ids = torch.zeros(1, 1, dtype=torch.long)
        >>> sample = ProbeBatch(ids, ids, torch.ones(1, 1, dtype=torch.bool))
        >>> theta = torch.ones(3, dtype=torch.float64)
        >>> vectors, info = hessian_basis(Quadratic(), [(0, 0, theta), (1, 100, theta)], sample,
        ...                               Algorithm1Options(tol=1e-10, solver="lanczos"))
        >>> vectors.abs().argmax(dim=1).tolist(), [round(e["eigenvalue"], 6) for e in info]
        ([0, 2], [3.0, 2.0])
    """
    provenance = [dict(p) for p in provenance or []]
    found = vectors if vectors is not None else None
    if found is not None and len(found) != len(provenance):
        raise ValueError(f"resuming with {len(found)} vectors but {len(provenance)} provenance "
                         "entries; pass both from the same partial basis")
    k, cap = options.per_checkpoint, options.max_vectors
    for checkpoint in checkpoints:
        index, step, theta = (checkpoint.index, checkpoint.step, checkpoint.theta) if isinstance(
            checkpoint, BasisCheckpoint) else checkpoint
        have = 0 if found is None else len(found)
        wanted = k if cap is None else min(k, cap - have)
        if wanted <= 0:
            break
        theta = theta() if callable(theta) else theta
        if found is None:
            found = torch.zeros(0, theta.numel(), dtype=torch.float64)
        hessian = make_operator(theta) if make_operator is not None else HessianOperator(
            loss, theta, sample, batch_size=options.batch_size, dtype=options.dtype)
        values, new, residuals = top_eigenpairs(hessian, wanted, found, tol=options.tol,
                                                solver=options.solver, seed=options.seed + index)
        new = orthonormalise_against(found, new.double())
        for value, residual in zip(values.tolist(), residuals.tolist()):
            provenance.append({
                "index": len(provenance), "checkpoint": int(index), "step": int(step),
                "eigenvalue": value, "eigenvalue_source": "lanczos", "residual": residual,
                "hvps": hessian.n_products,
            })
        found = torch.cat([found, new])
        if on_checkpoint is not None:
            on_checkpoint(found, provenance)
    if found is None:
        raise ValueError("hessian_basis got no checkpoints")
    return found, provenance


__all__ = [
    "Algorithm1Options", "BasisCheckpoint", "HessianOperator", "ProjectedOperator", "hessian_basis",
    "orthonormalise_against", "rayleigh_quotients", "top_eigenpairs",
]
