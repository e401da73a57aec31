"""POLCA: projection-oriented loss change allocation (METHOD.md §4), as pure tensor functions.

For one interval t → t+1 with Δθ_t = θ_{t+1} − θ_t and a basis ``vectors [m, d]``:

* ``delta [m]``: δ_{t,b} = ⟨b, Δθ_t⟩ (:func:`interval_deltas`);
* ``grad [m, tokens]``: g_x(t) = ⟨b, ∇ℓ_x(θ_t)⟩ (from :mod:`polca.directional`);
* first order G = g·δ (:func:`first_order`); second order ½κδ² (:func:`second_order`) with
  κ exact (second directional derivative) or the paper's κ̃ (:func:`paper_curvature`);
* ``integrated``: Simpson's rule of ∫₀¹ g_x(θ_t + sΔθ_t) ds · δ (:func:`integrated`);
* Fisher g² (:func:`fisher`); LCA baselines (:func:`top_parameters`, :func:`lca_per_tensor`).

Diagnostics (residual, explained fraction, first- vs second-order agreement, paper-vs-exact
RMSE) are accumulated interval by interval in :class:`DecompositionDiagnostics`, and
:func:`polca.cluster.cumulate` cumulates interval terms into the clustered trajectories.

Example:
    >>> grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64)   # [m=1, tokens=2]
    >>> delta = torch.tensor([0.5], dtype=torch.float64)
    >>> first_order(grad, delta)
    tensor([[ 0.5000, -1.0000]], dtype=torch.float64)
    >>> projected_trajectory(first_order(grad, delta)[:, None]).shape   # [m, checkpoints, tokens]
    torch.Size([1, 2, 2])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


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


def residual(delta_loss: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``[tokens]`` R = ΔL − Σ_b terms[b] for ``delta_loss [tokens]``, ``terms [m, tokens]``."""
    return delta_loss - terms.sum(dim=0)


def order_agreement(first: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and relative L2 difference ‖first − full‖ / ‖full‖ of two POLCA
    tensors of any equal shape (paper, Appendix F)."""
    a, b = first.reshape(-1).to(torch.float64), full.reshape(-1).to(torch.float64)
    norms = float(a.norm() * b.norm())
    cosine = float(a @ b) / norms if norms > 0 else float("nan")
    full_norm = float(b.norm())
    relative = float((a - b).norm()) / full_norm if full_norm > 0 else float("nan")
    return cosine, relative


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean squared difference of two equally shaped tensors."""
    return float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean().sqrt())


class DecompositionDiagnostics:
    """Diagnostics of one basis, accumulated one interval at a time (METHOD §4).

    Call :meth:`update` per interval with ``delta_loss [tokens]``, ``delta [m]`` and the
    ``[m, tokens]`` term tensors that exist; :meth:`summary` returns a JSON-ready dict with,
    per estimator, the mean |residual| and the fraction of |ΔL| explained
    (1 − Σ|R| / Σ|ΔL|), the first- vs full-order agreement, the paper-vs-exact RMSE of the
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
        self.abs_delta_loss += float(delta_loss.abs().sum())
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
            "first_vs_second_order": agreement,
            "rmse_paper_vs_exact_second_order": (
                (self.paper_error["sum_sq"] / count) ** 0.5 if count else None),
            "paper_small_denominators": self.small_denominators,
            "paper_denominator_checks": self.n_intervals * self.n_vectors,
            "zero_step_intervals": self.zero_step_intervals,
        }
