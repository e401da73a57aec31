"""HessianOperator keeps its gradient graphs only when they fit its budget, and its products
equal the dense float64 Hessian's either way (oracle: ``torch.autograd.functional.hessian``)."""

import pytest
import torch

from polca.curvature import HessianOperator
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=5, context_length=6, n_layers=1, d_model=4,
                                  n_heads=2, d_mlp=8)).double()
    loss = ModuleTokenLoss(model)
    theta = 0.5 * torch.randn(loss.space.dim, dtype=torch.float64)
    ids = torch.randint(0, 5, (6, 6))
    scored = torch.zeros(6, 6, dtype=torch.bool)
    scored[:, 2:] = True
    sample = ProbeBatch(ids, torch.roll(ids, -1, 1), scored)
    dense = torch.autograd.functional.hessian(lambda t: loss(t, sample).mean(), theta,
                                              vectorize=True)
    return loss, theta, sample, dense


@pytest.mark.parametrize("budget,kept", [(2**29, True), (0, False)])
def test_graphs_are_kept_only_within_the_budget_and_products_stay_exact(problem, budget, kept):
    loss, theta, sample, dense = problem
    operator = HessianOperator(loss, theta, sample, batch_size=4, graph_budget=budget)
    assert operator.cache_graph is None  # decided on the first product
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second product reuses the kept graphs, or rebuilds them
        V = torch.randn(loss.space.dim, 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(operator @ V, dense @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(operator @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert operator.cache_graph is kept
    assert (operator._graphs is not None) is kept
    assert operator.n_products == 6
