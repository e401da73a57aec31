"""Independent float64 oracles for per-token derivatives, shared by the engine tests: one
backward pass per token, and dense per-token Hessians from double backward."""

import torch


def orthonormal(d: int, m: int, seed: int = 1) -> torch.Tensor:
    """``[m, d]`` float64 rows with orthonormal directions (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))[0].T.contiguous()


def token_gradients(loss, theta: torch.Tensor, batch) -> torch.Tensor:
    """``[tokens, d]``: the gradient of every token's loss, one backward pass per token."""
    point = theta.clone().requires_grad_(True)
    losses = loss(point, batch)
    return torch.stack([torch.autograd.grad(losses[i], point, retain_graph=True)[0]
                        for i in range(len(losses))])


def token_hessians(loss, theta: torch.Tensor, batch) -> torch.Tensor:
    """``[tokens, d, d]``: the dense Hessian of every token's loss."""
    return torch.stack([
        torch.autograd.functional.hessian(lambda t, i=i: loss(t, batch)[i], theta,
                                          vectorize=True)
        for i in range(batch.n_tokens)
    ])
