"""Directional derivatives against independent float64 oracles (autograd loops, dense Hessians)."""

import pytest
import torch

from polca.directional import choose_engine, directional_derivatives, mean_loss_gradient
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig

ENGINES = ["forward", "reverse"]


def tiny_problem(d_model=4, n_layers=1, seed=0):
    """A float64 decoder with O(1) weights (so curvature is far from zero) and a probe batch
    whose sequences have different scored patterns, one with none."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=12, context_length=12, n_layers=n_layers, d_model=d_model,
                        n_heads=2, d_mlp=2 * d_model)
    model = Decoder(cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach().clone()
    ids = torch.randint(0, 12, (5, 12))
    scored = torch.zeros(5, 12, dtype=torch.bool)
    scored[:3, -5:-1] = True           # 4 scored tokens, the addition pattern
    scored[3, [2, 6, 7]] = True        # another pattern
    # row 4 scores nothing
    batch = ProbeBatch(ids, torch.roll(ids, -1, 1), scored)
    return loss, theta, batch


def orthonormal(d, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))[0].T.contiguous()


def autograd_token_gradients(loss, theta, batch):
    """[tokens, d] by one backward pass per token (the oracle)."""
    point = theta.clone().requires_grad_(True)
    losses = loss(point, batch)
    return torch.stack([torch.autograd.grad(losses[i], point, retain_graph=True)[0]
                        for i in range(len(losses))])


def dense_token_hessians(loss, theta, batch):
    """[tokens, d, d] dense Hessian of every token's loss (the oracle)."""
    n = batch.n_tokens
    return torch.stack([
        torch.autograd.functional.hessian(lambda th, i=i: loss(th, batch)[i], theta,
                                          vectorize=True)
        for i in range(n)
    ])


@pytest.fixture(scope="module")
def problem():
    loss, theta, batch = tiny_problem()
    V = orthonormal(loss.space.dim, 3)
    gradients = autograd_token_gradients(loss, theta, batch)
    hessians = dense_token_hessians(loss, theta, batch)
    return loss, theta, batch, V, gradients, hessians


@pytest.mark.parametrize("engine", ENGINES)
def test_first_and_second_match_autograd_and_dense_hessian(problem, engine):
    loss, theta, batch, V, gradients, hessians = problem
    first, second = directional_derivatives(loss, theta, V, batch, order=2, engine=engine)
    expected_first = V @ gradients.T                                   # [m, tokens]
    expected_second = torch.einsum("md,xde,me->mx", V, hessians, V)
    assert first.shape == second.shape == (3, batch.n_tokens) == (3, 15)
    assert first.dtype == second.dtype == torch.float64
    assert expected_second.abs().max() > 1e-2   # the oracle is not trivially zero
    torch.testing.assert_close(first, expected_first, rtol=0, atol=1e-10)
    torch.testing.assert_close(second, expected_second, rtol=0, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_order_one_and_small_chunks_give_the_same_first_derivatives(problem, engine):
    loss, theta, batch, V, gradients, _ = problem
    first, second = directional_derivatives(loss, theta, V, batch, order=1, engine=engine,
                                            batch_size=1, memory_budget=1)
    assert second is None
    torch.testing.assert_close(first, V @ gradients.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_coordinate_directions_are_axis_aligned_unit_vectors(problem, engine):
    loss, theta, batch, _, gradients, hessians = problem
    index = torch.tensor([0, 17, loss.space.dim - 1])
    first, second = directional_derivatives(loss, theta, index, batch, order=2, engine=engine)
    torch.testing.assert_close(first, gradients[:, index].T, rtol=0, atol=1e-10)
    torch.testing.assert_close(second, hessians[:, index, index].T, rtol=0, atol=1e-10)


def test_engines_agree_on_a_two_layer_model():
    loss, theta, batch = tiny_problem(d_model=8, n_layers=2, seed=3)
    V = orthonormal(loss.space.dim, 4, seed=4)
    forward = directional_derivatives(loss, theta, V, batch, order=2, engine="forward")
    reverse = directional_derivatives(loss, theta, V, batch, order=2, engine="reverse")
    for a, b in zip(forward, reverse):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_auto_picks_reverse_for_many_directions_and_forward_for_few():
    assert choose_engine(50, 4, order=1) == "reverse"
    assert choose_engine(1, 4, order=1) == "forward"
    assert choose_engine(8, 4, order=2) == "forward"


def test_mean_loss_gradient_matches_autograd(problem):
    loss, theta, batch, _, gradients, _ = problem
    torch.testing.assert_close(mean_loss_gradient(loss, theta, batch, batch_size=2),
                               gradients.mean(0), rtol=0, atol=1e-12)


def test_bad_inputs_raise_clear_errors(problem):
    loss, theta, batch, V, _, _ = problem
    with pytest.raises(ValueError, match="directions have shape"):
        directional_derivatives(loss, theta, V[:, :-1], batch)
    with pytest.raises(ValueError, match="parameters"):
        directional_derivatives(loss, theta[:-1], V, batch)
    broken = theta.clone()
    broken[3] = float("nan")
    with pytest.raises(ValueError, match="θ contain 1 non-finite"):
        directional_derivatives(loss, broken, V, batch)
    huge = theta.clone()
    huge[: loss.space.slices["token_embedding.weight"].stop] = float("inf")  # losses go NaN
    with pytest.raises(ValueError, match="non-finite"):
        directional_derivatives(loss, huge, V, batch, engine="forward")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        directional_derivatives(loss, theta, V, batch, order=3)
    with pytest.raises(ValueError, match="coordinate index out of range"):
        directional_derivatives(loss, theta, torch.tensor([loss.space.dim]), batch)
