"""The built-in decoder's per-token directional derivatives are exact under forward-mode AD.

Oracles: reverse-mode gradients of each token's loss (one backward per token) and the dense
per-token Hessian from double backward, in float64.
"""

import pytest
import torch
from torch.autograd.functional import hessian
from torch.func import jvp

from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig


def tiny(attention="softmax", tied=False):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=12, context_length=8, n_layers=2, d_model=4, n_heads=2,
                        d_mlp=6, tied_head=tied, attention=attention)
    model = Decoder(cfg).double()
    with torch.no_grad():  # move off the initialisation so LayerNorm gains and biases matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def batch(n=3, length=8, vocab=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    scored = torch.zeros(n, length, dtype=torch.bool)
    scored[:, 3:7] = True
    return ProbeBatch(ids, torch.roll(ids, -1, 1), scored)


@pytest.mark.parametrize("attention,tied", [("softmax", False), ("softmax", True),
                                            ("linear", False)])
def test_first_and_second_directional_derivatives_match_double_backward(attention, tied):
    model, probe = tiny(attention, tied), batch()
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def along_v(t):
        return jvp(lambda s: loss(s, probe), (t,), (v,))[1]

    first, second = jvp(along_v, (theta,), (v,))
    assert first.shape == (probe.n_tokens,)

    for x in range(probe.n_tokens):
        def token_loss(t, x=x):
            return loss(t, probe)[x]

        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(token_loss(t), t)
        dense = hessian(token_loss, theta, vectorize=True)
        torch.testing.assert_close(first[x], grad @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(second[x], v @ dense @ v, rtol=1e-9, atol=1e-10)


def test_token_losses_equal_cross_entropy_of_forward_pass():
    model, probe = tiny(), batch()
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(model.state_dict())
    logits = model(probe.input_ids)
    expected = torch.nn.functional.cross_entropy(
        logits[probe.scored], probe.targets[probe.scored], reduction="none")
    torch.testing.assert_close(loss(theta, probe), expected)


def test_include_restricts_parameters_and_keeps_the_rest_fixed():
    model, probe = tiny(), batch()
    loss = ModuleTokenLoss(model, include=["blocks.1.*"])
    assert all(n.startswith("blocks.1.") for n in loss.space.names)
    theta = loss.space.flatten(model.state_dict())
    torch.testing.assert_close(loss(theta, probe),
                               ModuleTokenLoss(model)(ModuleTokenLoss(model).space.flatten(
                                   model.state_dict()), probe))
    with pytest.raises(ValueError, match="no parameter matches"):
        ModuleTokenLoss(model, include=["nothing.*"])


def test_flatten_rejects_wrong_shapes_and_dimension():
    model = tiny()
    space = ModuleTokenLoss(model).space
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="head.weight"):
        space.flatten(state)
    with pytest.raises(ValueError, match="dimension"):
        space.unflatten(torch.zeros(space.dim + 1))
