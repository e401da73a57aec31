"""POLCA: projection-oriented loss change allocation (METHOD §4), as pure tensor functions.

For one interval t → t+1 with Δθ_t = θ_{t+1} − θ_t and a basis ``vectors [m, d]``:

* ``delta [m]``: δ_{t,b} = ⟨b, Δθ_t⟩ (:func:`interval_deltas`);
* ``grad [m, tokens]``: g_x(t) = ⟨b, ∇ℓ_x(θ_t)⟩ (from :mod:`polca.directional`);
* first order G = g·δ (:func:`first_order`); second order ½κδ² (:func:`second_order`) with
  κ exact (second directional derivative) or the paper's κ̃ (:func:`paper_curvature`);
* ``integrated``: Simpson's rule of ∫₀¹ g_x(θ_t + sΔθ_t) ds · δ (:func:`integrated`);
* Fisher g² (:func:`fisher`); LCA baselines (:func:`top_parameters`, :func:`lca_per_tensor`).

The pure kernel :func:`interval_terms` computes all of them for one interval in memory
(and :func:`lca_interval_terms` the LCA baselines); :func:`block_terms` and
:func:`lca_block_terms` do the same for consecutive intervals, computing the derivatives at a
shared checkpoint once. The decompose stage maps them over blocks of intervals with an
executor (:mod:`polca.parallel`) and writes the results.

Diagnostics (residual, explained fraction, first- vs second-order agreement, paper-vs-exact
RMSE) are accumulated interval by interval in :class:`DecompositionDiagnostics`, and
:func:`polca.cluster.cumulate` cumulates interval terms into the clustered trajectories.

Example:
    >>> grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64)   # [m=1, tokens=2]
    >>> delta = torch.tensor([0.5], dtype=torch.float64)
    >>> first_order(grad, delta)
    tensor([[ 0.5000, -1.0000]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from polca.bases import Basis
from polca.directional import directional_derivatives, mean_loss_gradient
from polca.functional import ProbeBatch, TokenLoss
from polca.precision import arithmetic, model_dtype


def interval_deltas(theta_start: torch.Tensor, theta_end: torch.Tensor,
                    vectors: torch.Tensor) -> torch.Tensor:
    """``[m]`` float64 δ_b = ⟨b, θ_end − θ_start⟩ for ``vectors [m, d]``."""
    if not (theta_start.shape == theta_end.shape == vectors.shape[1:]):
        raise ValueError(
            f"checkpoints of shapes {tuple(theta_start.shape)}, {tuple(theta_end.shape)} and a "
            f"basis of shape {tuple(vectors.shape)} do not share one parameter count: the basis "
            "was made for another model or parameter selection"
        )
    step = theta_end.to(torch.float64) - theta_start.to(torch.float64)
    return vectors.to(torch.float64) @ step


def first_order(grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[m, tokens]`` G = ⟨b, ∇ℓ_x(θ_t)⟩ · δ_b from ``grad [m, tokens]`` and ``delta [m]``."""
    return grad * delta[:, None]


def second_order(curvature: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[m, tokens]`` ½ κ δ_b² from ``curvature [m, tokens]`` and ``delta [m]``."""
    return 0.5 * curvature * (delta * delta)[:, None]


def paper_curvature(
    grad_start: torch.Tensor,
    grad_end: torch.Tensor,
    eigenvalues: torch.Tensor,
    tol: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's κ̃ = λ_b · (g_x(t+1) − g_x(t)) / (ḡ(t+1) − ḡ(t)) (Appendix A).

    ``grad_start, grad_end [m, tokens]`` are g_x at θ_t and θ_{t+1}; ḡ is their mean over
    tokens (the projected gradient of the mean probe loss); ``eigenvalues [m]`` are λ_b.
    Returns ``kappa [m, tokens]`` and ``small [m]`` (bool): where |ḡ(t+1) − ḡ(t)| ≤ ``tol``,
    κ̃ is set to 0 instead of dividing by (almost) zero.

    >>> g0 = torch.tensor([[1.0, 3.0]]); g1 = torch.tensor([[2.0, 6.0]])
    >>> paper_curvature(g0, g1, torch.tensor([4.0]))[0]      # 4 · (1, 3) / 2
    tensor([[2., 6.]])
    """
    difference = grad_end - grad_start
    denominator = difference.mean(dim=1)
    small = denominator.abs() <= tol
    safe = torch.where(small, torch.ones_like(denominator), denominator)
    kappa = eigenvalues[:, None] * difference / safe[:, None]
    return torch.where(small[:, None], torch.zeros_like(kappa), kappa), small


def simpson_nodes(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``s [n]`` in [0, 1] and composite Simpson weights ``[n]`` (n odd, ≥ 3).

    >>> simpson_nodes(3)[1] * 6
    tensor([1., 4., 1.], dtype=torch.float64)
    """
    if n < 3 or n % 2 == 0:
        raise ValueError(f"Simpson's rule needs an odd number of points ≥ 3, got {n}")
    nodes = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    weights = torch.full((n,), 2.0, dtype=torch.float64)
    weights[1::2] = 4.0
    weights[0] = weights[-1] = 1.0
    return nodes, weights / (3.0 * (n - 1))


def integrated(path_grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[m, tokens]`` Simpson estimate of ∫₀¹ ⟨b, ∇ℓ_x(θ_t + sΔθ_t)⟩ ds · δ_b.

    ``path_grad [n, m, tokens]`` holds g_x at the ``n`` nodes of :func:`simpson_nodes` (the
    first and last are the checkpoint gradients, shared with the neighbouring intervals).
    """
    _, weights = simpson_nodes(path_grad.shape[0])
    return torch.einsum("n,nmx->mx", weights.to(path_grad), path_grad) * delta[:, None]


def fisher(grad: torch.Tensor) -> torch.Tensor:
    """``[m, tokens]`` projected empirical Fisher ⟨b, ∇ℓ_x(θ_t)⟩²."""
    return grad * grad


def top_parameters(theta: torch.Tensor, k: int = 50) -> torch.Tensor:
    """``[k]`` indices of the ``k`` coordinates of largest |θ| (ties broken by lower index),
    sorted ascending: the axis-aligned basis of the paper's token-level LCA baseline."""
    if not 0 < k <= theta.numel():
        raise ValueError(f"k={k} top parameters requested from a θ of size {theta.numel()}")
    magnitude = theta.detach().abs().to(torch.float64)
    order = torch.argsort(-magnitude, stable=True)
    return torch.sort(order[:k]).values


def lca_per_tensor(
    path_gradients: torch.Tensor, theta_delta: torch.Tensor, slices: Mapping[str, slice]
) -> torch.Tensor:
    """Original LCA (Lan et al. 2020) of the aggregate loss, summed per parameter tensor.

    ``path_gradients [n, d]`` are ∇L_X at the :func:`simpson_nodes` of the interval,
    ``theta_delta [d]`` is Δθ_t; per parameter i the allocation is Simpson's
    ∫₀¹ ∂_i L_X(θ_t + sΔθ_t) ds · Δθ_{t,i}. Returns ``[tensors]`` in the order of ``slices``.
    """
    _, weights = simpson_nodes(path_gradients.shape[0])
    per_parameter = (weights.to(path_gradients) @ path_gradients) * theta_delta.to(path_gradients)
    return torch.stack([per_parameter[s].sum() for s in slices.values()])


@dataclass(frozen=True)
class TermOptions:
    """What :func:`interval_terms` computes, and how.

    Args:
        curvature: the second-order estimators: ``"exact"`` (κ = bᵀ∇²ℓ_x b) and/or
            ``"paper"`` (the paper's κ̃).
        integrated: also the Simpson path integral with ``simpson_points`` nodes.
        fisher: also the projected empirical Fisher g².
        denominator_tol: κ̃ is 0 where |ḡ(t+1) − ḡ(t)| ≤ this.
        engine, batch_size: how directional derivatives are computed
            (:func:`polca.directional.directional_derivatives`); results do not depend on them.
        dtype: the model's arithmetic (:mod:`polca.precision`: ``"float64"``, ``"float32"``,
            ``"tf32"``, ``"bfloat16"``); δ and the terms are float64 either way.
    """

    curvature: tuple[str, ...] = ("exact", "paper")
    integrated: bool = True
    simpson_points: int = 3
    fisher: bool = True
    denominator_tol: float = 1e-12
    engine: str = "auto"
    batch_size: int = 512
    dtype: str = "float64"

    @property
    def terms(self) -> tuple[str, ...]:
        """The ``[vector, interval, token]`` terms computed, in the contract's names."""
        return (("first",) + tuple(f"second_{c}" for c in self.curvature)
                + ("integrated",) * self.integrated + ("fisher",) * self.fisher)


@dataclass
class IntervalTerms:
    """Every estimator's terms for one interval t → t+1, as float64 tensors.

    ``delta [m]``, ``grad``/``grad_next [m, tokens]`` (g_x at θ_t and θ_{t+1}), the terms
    ``first``, ``second_exact``, ``second_paper``, ``integrated``, ``fisher`` ``[m, tokens]``
    (None when not asked for) and ``paper_small [m]`` (bool: κ̃ set to 0)."""

    delta: torch.Tensor
    grad: torch.Tensor
    grad_next: torch.Tensor
    first: torch.Tensor
    second_exact: torch.Tensor | None = None
    second_paper: torch.Tensor | None = None
    paper_small: torch.Tensor | None = None
    integrated: torch.Tensor | None = None
    fisher: torch.Tensor | None = None

    def arrays(self) -> dict[str, torch.Tensor]:
        """The computed terms by the contract's array names (``grad`` is g_x at θ_t)."""
        names = ("delta", "grad", "first", "second_exact", "second_paper", "paper_small",
                 "integrated", "fisher")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def eigenvalues(basis: Basis) -> torch.Tensor:
    """``[m]`` the eigenvalue λ_b recorded with each basis vector (for κ̃)."""
    values = [entry.get("eigenvalue") for entry in basis.provenance]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(
            f"basis {basis.name!r} has no eigenvalue for vectors {missing[:5]}; the paper "
            "curvature needs one per vector. Rebuild the basis with `polca basis` (it adds "
            "Rayleigh quotients), or set decompose.curvature = ['exact']")
    return torch.tensor(values, dtype=torch.float64)


def _checkpoint_derivatives(loss: TokenLoss, theta: torch.Tensor, tangents: torch.Tensor,
                            probe: ProbeBatch, order: int, options: TermOptions):
    """``(grad, curvature)`` ``[m, tokens]`` float64 along ``tangents`` at ``theta`` (float64
    ``[d]``, cast to the model's arithmetic); curvature None for ``order`` 1."""
    grad, curvature = directional_derivatives(
        loss, theta.to(model_dtype(options.dtype)), tangents, probe, order=order,
        engine=options.engine, batch_size=options.batch_size)
    return grad.to(torch.float64), None if curvature is None else curvature.to(torch.float64)


def block_terms(loss: TokenLoss, thetas: Iterable[torch.Tensor], basis: Basis, probe: ProbeBatch,
                options: TermOptions = TermOptions()) -> Iterator[IntervalTerms]:
    """:class:`IntervalTerms` of the consecutive intervals θ₀ → θ₁ → … → θ_B, one at a time.

    ``thetas`` yields the checkpoints ``[d]`` in order (a generator that loads them streams the
    block: at most two checkpoints are held). The derivatives at a checkpoint shared by two
    intervals (the end of one, the start of the next) are computed once, and every checkpoint
    gets the same derivatives whichever block it falls in (order 2 everywhere when the exact
    curvature is asked for), so the results do not depend on how intervals are grouped into
    blocks: B intervals cost B + 1 checkpoint passes (plus the Simpson nodes inside each).
    """
    order = 2 if "exact" in options.curvature else 1
    with arithmetic(options.dtype):
        previous = None
        for theta in thetas:
            theta = theta.to(torch.float64)
            if previous is None:
                vectors64 = basis.vectors.to(device=theta.device, dtype=torch.float64)
                tangents = vectors64.to(model_dtype(options.dtype))  # the model's arithmetic
            here = _checkpoint_derivatives(loss, theta, tangents, probe, order, options)
            if previous is not None:
                yield _assemble(loss, previous, (theta, *here), vectors64, tangents, basis,
                                probe, options)
            previous = (theta, *here)


def _assemble(loss, start, end, vectors64, tangents, basis, probe, options) -> IntervalTerms:
    """One interval's terms from the derivatives at its two ends ``(theta, grad, curvature)``."""
    (theta, grad, curvature), (theta_next, grad_next, _) = start, end
    delta = interval_deltas(theta, theta_next, vectors64)
    terms = IntervalTerms(delta=delta, grad=grad, grad_next=grad_next,
                          first=first_order(grad, delta))
    if "exact" in options.curvature:
        terms.second_exact = second_order(curvature, delta)
    if "paper" in options.curvature:
        kappa, terms.paper_small = paper_curvature(grad, grad_next, eigenvalues(basis).to(grad),
                                                   options.denominator_tol)
        terms.second_paper = second_order(kappa, delta)
    if options.fisher:
        terms.fisher = fisher(grad)
    if options.integrated:
        nodes, _ = simpson_nodes(options.simpson_points)
        step = theta_next - theta
        inner = [_checkpoint_derivatives(loss, theta + float(s) * step, tangents, probe, 1,
                                         options)[0] for s in nodes[1:-1]]
        terms.integrated = integrated(torch.stack([grad, *inner, grad_next]), delta)
    return terms


def interval_terms(loss: TokenLoss, theta_t: torch.Tensor, theta_t1: torch.Tensor, basis: Basis,
                   probe: ProbeBatch, options: TermOptions = TermOptions()) -> IntervalTerms:
    """POLCA and its baselines for one interval, in memory: a pure function of its arguments
    (:func:`block_terms` of the two checkpoints; a block of consecutive intervals shares the
    derivatives at its inner checkpoints and gives the same values).

    ``theta_t, theta_t1 [d]`` are the checkpoints (float64 for the projections), ``basis`` the
    vectors ``[m, d]`` with their eigenvalues, ``probe`` the scored tokens.

    Example (one token, ℓ(θ) = ½‖θ‖², along b = e₁: g = θ₁, κ = 1):
        >>> from polca.functional import ParameterSpace
        >>> class Half:
        ...     space = ParameterSpace({"w": (2,)})
        ...     def __call__(self, theta, batch):
        ...         return (0.5 * theta @ theta).expand(batch.n_tokens)
        >>> ids = torch.zeros(1, 1, dtype=torch.long)
        >>> probe = ProbeBatch(ids, ids, torch.ones(1, 1, dtype=torch.bool))
        >>> basis = Basis("e1", "user", torch.eye(2)[:1], [{"eigenvalue": 1.0}])
        >>> terms = interval_terms(Half(), torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]),
        ...                        basis, probe)
        >>> terms.delta.item(), terms.first.item(), terms.second_exact.item()   # 1·2, ½·1·2²
        (2.0, 2.0, 2.0)
        >>> terms.integrated.item()                        # ΔL = ½·9 − ½·1, exact for a quadratic
        4.0
    """
    return next(block_terms(loss, (theta_t, theta_t1), basis, probe, options))


def lca_block_terms(loss: TokenLoss, thetas: Iterable[torch.Tensor], top: torch.Tensor,
                    probe: ProbeBatch, options: TermOptions = TermOptions()
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lca_interval_terms` of consecutive intervals, one at a time; the aggregate
    gradient at a checkpoint shared by two intervals is computed once (the Simpson end nodes
    are the checkpoints themselves)."""
    dtype = model_dtype(options.dtype)

    def aggregate(point: torch.Tensor) -> torch.Tensor:
        return mean_loss_gradient(loss, point.to(dtype), probe,
                                  options.batch_size).to(torch.float64)

    nodes, _ = simpson_nodes(options.simpson_points)
    with arithmetic(options.dtype):
        previous = None
        for theta in thetas:
            theta = theta.to(torch.float64)
            here = (theta, aggregate(theta))
            if previous is not None:
                (start, start_grad), (end, end_grad) = previous, here
                step = end - start
                tangents = top.to(start.device)
                grad, _ = directional_derivatives(loss, start.to(dtype), tangents, probe,
                                                  order=1, engine=options.engine,
                                                  batch_size=options.batch_size)
                allocation = first_order(grad.to(torch.float64), step[tangents])
                path = torch.stack([start_grad, *(aggregate(start + float(s) * step)
                                                  for s in nodes[1:-1]), end_grad])
                yield allocation, lca_per_tensor(path, step, loss.space.slices)
            previous = here


def lca_interval_terms(loss: TokenLoss, theta_t: torch.Tensor, theta_t1: torch.Tensor,
                       top: torch.Tensor, probe: ProbeBatch,
                       options: TermOptions = TermOptions()) -> tuple[torch.Tensor, torch.Tensor]:
    """The LCA baselines for one interval: ``([k, tokens]`` token-level allocation along the
    parameters ``top [k]`` (first order, as :func:`first_order` on unit vectors), ``[tensors]``
    aggregate LCA per parameter tensor (:func:`lca_per_tensor`, Simpson's rule with
    ``options.simpson_points`` nodes)``)``, float64.

    >>> from polca.functional import ParameterSpace
    >>> class Half:
    ...     space = ParameterSpace({"a": (1,), "b": (1,)})
    ...     def __call__(self, theta, batch):
    ...         return (0.5 * theta @ theta).expand(batch.n_tokens)
    >>> ids = torch.zeros(1, 1, dtype=torch.long)
    >>> probe = ProbeBatch(ids, ids, torch.ones(1, 1, dtype=torch.bool))
    >>> first, tensors = lca_interval_terms(Half(), torch.tensor([1.0, 1.0]),
    ...                                     torch.tensor([3.0, 2.0]), torch.tensor([0]), probe)
    >>> first.tolist(), tensors.round(decimals=12).tolist()   # g·Δθ₀ = 1·2; ½(θ₁² − θ₀²) each
    ([[2.0]], [4.0, 1.5])
    """
    return next(lca_block_terms(loss, (theta_t, theta_t1), top, probe, options))


def residual(delta_loss: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``[tokens]`` R = ΔL − Σ_b terms[b] for ``delta_loss [tokens]``, ``terms [m, tokens]``."""
    return delta_loss - terms.sum(dim=0)


class DecompositionDiagnostics:
    """Diagnostics of one basis, accumulated one interval at a time (METHOD §4).

    Call :meth:`update` per interval with ``delta_loss [tokens]``, ``delta [m]`` and the
    ``[m, tokens]`` term tensors that exist; :meth:`summary` returns a JSON-ready dict with,
    per estimator, the mean |residual| and the fraction of |ΔL| explained
    (1 − Σ|R| / Σ|ΔL|), over the run and per interval (None where ΔL = 0), the first- vs
    full-order agreement, the paper-vs-exact RMSE of the
    second-order terms, the count of small paper denominators, and the intervals where the
    checkpoints are identical (δ = 0 for every vector).

    >>> diag = DecompositionDiagnostics(n_vectors=1)
    >>> g = torch.ones(1, 3, dtype=torch.float64)
    >>> diag.update(0, torch.full((3,), 2.0, dtype=torch.float64), torch.ones(1), first=2 * g)
    >>> diag.summary()["estimators"]["first_order"]["explained_fraction"]
    1.0
    """

    def __init__(self, n_vectors: int):
        self.n_vectors = n_vectors
        self.sums: dict[str, dict[str, float]] = {}
        self.per_interval: dict[str, list[float | None]] = {}
        self.agreement = {"dot": 0.0, "first_sq": 0.0, "full_sq": 0.0, "diff_sq": 0.0}
        self.paper_error = {"sum_sq": 0.0, "count": 0}
        self.small_denominators = 0
        self.zero_step_intervals: list[int] = []
        self.abs_delta_loss = 0.0
        self.n_intervals = 0

    def update(self, interval: int, delta_loss: torch.Tensor, delta: torch.Tensor,
               first: torch.Tensor, second_exact: torch.Tensor | None = None,
               second_paper: torch.Tensor | None = None, integrated: torch.Tensor | None = None,
               small_denominators: torch.Tensor | None = None) -> None:
        self.n_intervals += 1
        total = float(delta_loss.abs().sum())
        self.abs_delta_loss += total
        if bool((delta == 0).all()):
            self.zero_step_intervals.append(int(interval))
        estimators = {"first_order": first}
        if second_exact is not None:
            estimators["polca"] = first + second_exact
        if second_paper is not None:
            estimators["polca_paper"] = first + second_paper
        if integrated is not None:
            estimators["integrated"] = integrated
        for name, terms in estimators.items():
            r = residual(delta_loss, terms)
            entry = self.sums.setdefault(name, {"abs_residual": 0.0, "sq_residual": 0.0})
            entry["abs_residual"] += float(r.abs().sum())
            entry["sq_residual"] += float((r * r).sum())
            self.per_interval.setdefault(name, []).append(
                1.0 - float(r.abs().sum()) / total if total > 0 else None)
        if second_exact is not None:
            full = first + second_exact
            self.agreement["dot"] += float((first * full).sum())
            self.agreement["first_sq"] += float((first * first).sum())
            self.agreement["full_sq"] += float((full * full).sum())
            self.agreement["diff_sq"] += float((second_exact * second_exact).sum())
        if second_exact is not None and second_paper is not None:
            self.paper_error["sum_sq"] += float(((second_paper - second_exact) ** 2).sum())
            self.paper_error["count"] += second_exact.numel()
        if small_denominators is not None:
            self.small_denominators += int(small_denominators.sum())

    def summary(self) -> dict:
        estimators = {}
        for name, entry in self.sums.items():
            explained = (1.0 - entry["abs_residual"] / self.abs_delta_loss
                         if self.abs_delta_loss > 0 else None)
            estimators[name] = {"sum_abs_residual": entry["abs_residual"],
                                "sum_sq_residual": entry["sq_residual"],
                                "explained_fraction": explained}
        a = self.agreement
        norms = (a["first_sq"] * a["full_sq"]) ** 0.5
        agreement = None
        if a["full_sq"] > 0:
            agreement = {"cosine_similarity": a["dot"] / norms if norms > 0 else None,
                         "relative_l2_difference": (a["diff_sq"] / a["full_sq"]) ** 0.5}
        count = self.paper_error["count"]
        return {
            "n_vectors": self.n_vectors,
            "n_intervals": self.n_intervals,
            "sum_abs_delta_loss": self.abs_delta_loss,
            "estimators": estimators,
            "explained_per_interval": self.per_interval,
            "first_vs_second_order": agreement,
            "rmse_paper_vs_exact_second_order": (
                (self.paper_error["sum_sq"] / count) ** 0.5 if count else None),
            "paper_small_denominators": self.small_denominators,
            "paper_denominator_checks": self.n_intervals * self.n_vectors,
            "zero_step_intervals": self.zero_step_intervals,
        }
