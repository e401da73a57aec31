"""The jet engine (Taylor-mode propagation through the built-in decoder) against float64 oracles.

Oracles, none of which the jet calls: the decoder's own forward pass (token losses), per-token
``torch.autograd.grad`` (first order), dense per-token Hessians from
``torch.autograd.functional.hessian`` (second order), and nested ``torch.func.jvp`` of the
module on the models of the shipped configs.
"""

from pathlib import Path

import pytest
import torch
from oracles import orthonormal, token_gradients, token_hessians
from torch.func import jvp

from polca.config import load_config
from polca.directional import directional_derivatives, jet_chunks, jet_engine
from polca.functional import ModuleTokenLoss, ProbeBatch, next_token_losses
from polca.models.decoder import Decoder, DecoderConfig
from polca.models.jet import token_loss_jet
from polca.sources import open_source


def tiny_model(attention="softmax", tied=False, n_layers=2, seed=0):
    """A float64 decoder with O(1) weights, so that every second-order term is far from zero."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=9, context_length=10, n_layers=n_layers, d_model=4,
                        n_heads=2, d_mlp=6, tied_head=tied, attention=attention)
    model = Decoder(cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


def mixed_batch(vocab=9, length=10, seed=1):
    """Rows with different scored patterns (one scores nothing, one only its first position)
    and a last scored position before the end, so truncation and column selection matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (5, length), generator=g)
    targets = torch.randint(0, vocab, (5, length), generator=g)
    scored = torch.zeros(5, length, dtype=torch.bool)
    scored[0, [3, 4, 5]] = True
    scored[1, [0]] = True
    scored[2, [5, 7]] = True
    scored[4, [1, 7]] = True
    return ProbeBatch(ids, targets, scored)


def per_token_oracles(loss, theta, batch):
    return token_gradients(loss, theta, batch), token_hessians(loss, theta, batch)


VARIANTS = {
    "softmax": {"attention": "softmax"},
    "softmax-tied": {"attention": "softmax", "tied": True},
    "linear": {"attention": "linear"},
    "one-layer": {"n_layers": 1},
    "no-blocks": {"n_layers": 0},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jet_matches_autograd_gradients_and_dense_hessians(variant):
    model = tiny_model(**VARIANTS[variant])
    loss = ModuleTokenLoss(model)
    assert loss.module.jet_engine(loss) is not None
    batch = mixed_batch()
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    V = orthonormal(loss.space.dim, 3)
    gradients, hessians = per_token_oracles(loss, theta, batch)
    expected_second = torch.einsum("md,xde,me->mx", V, hessians, V)
    assert expected_second.abs().max() > 1e-2  # the oracle is not trivially zero

    out = token_loss_jet(loss, theta, V, batch, order=2)

    torch.testing.assert_close(out.value, loss(theta, batch), rtol=0, atol=1e-13)
    torch.testing.assert_close(out.first, V @ gradients.T, rtol=0, atol=1e-11)
    torch.testing.assert_close(out.second, expected_second, rtol=0, atol=1e-11)
    first_only = token_loss_jet(loss, theta, V, batch, order=1)
    assert first_only.second is None
    torch.testing.assert_close(first_only.first, V @ gradients.T, rtol=0, atol=1e-11)


@pytest.mark.parametrize("include", [["blocks.1.*", "ln_final.*"], ["token_embedding.weight"],
                                     ["blocks.0.attn.*", "head.weight"]])
@pytest.mark.parametrize("tied", [False, True])
def test_jet_holds_parameters_outside_theta_fixed(include, tied):
    model = tiny_model(tied=tied)
    if tied and "head.weight" in include:
        include = [*include[:-1], "token_embedding.weight"]  # the tied head has no name of its own
    loss = ModuleTokenLoss(model, include=include)
    # the fixed parameters come from another checkpoint, not from the module
    other = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    loss.set_fixed(other)
    batch = mixed_batch()
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    V = orthonormal(loss.space.dim, 2, seed=5)
    gradients, hessians = per_token_oracles(loss, theta, batch)

    out = token_loss_jet(loss, theta, V, batch, order=2)

    torch.testing.assert_close(out.value, loss(theta, batch), rtol=0, atol=1e-13)
    torch.testing.assert_close(out.first, V @ gradients.T, rtol=0, atol=1e-11)
    torch.testing.assert_close(out.second, torch.einsum("md,xde,me->mx", V, hessians, V),
                               rtol=0, atol=1e-11)


def shipped_model_and_probe(name):
    """The decoder of a shipped config and probe sequences of its task (text: random tokens
    of its vocabulary, every position scored, as the text probe is)."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.toml")
    if cfg.task.kind == "text":
        vocab, length = cfg.task.options["vocab_size"], cfg.task.options["context_length"]
        model = Decoder(DecoderConfig(vocab, length, cfg.model.n_layers, cfg.model.d_model,
                                      cfg.model.n_heads, cfg.model.d_mlp, cfg.model.tied_head,
                                      cfg.model.attention))
        ids = torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(0))
        return model, ProbeBatch(ids, torch.roll(ids, -1, 1), torch.ones_like(ids).bool())
    source, task = open_source(cfg)
    return source.build_model(), task.basis_sample(24)


@pytest.mark.parametrize("name", ["demo-addition", "demo-text", "plateau-mws"])
def test_jet_equals_nested_jvp_on_the_shipped_configs(name):
    """Weights moved off the initialisation so every term is sizeable; the paper configs'
    models are compared the same way by benchmarks/bench_decompose.py --configs."""
    model, batch = shipped_model_and_probe(name)
    model = model.double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    V = orthonormal(loss.space.dim, 3, seed=7)

    first, second = directional_derivatives(loss, theta, V, batch, order=2, engine="jet")

    expected = [jvp(lambda p, v=v: jvp(lambda t: loss(t, batch), (p,), (v,)), (theta,), (v,))[1]
                for v in V]
    expected_first = torch.stack([f for f, _ in expected])
    expected_second = torch.stack([s for _, s in expected])
    for got, want in ((first, expected_first), (second, expected_second)):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-10


def test_chunks_over_sequences_and_directions_give_the_same_numbers():
    model = tiny_model()
    loss = ModuleTokenLoss(model)
    batch = mixed_batch()
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    V = orthonormal(loss.space.dim, 4)
    whole = directional_derivatives(loss, theta, V, batch, order=2, engine="jet")
    # one sequence per chunk, and a budget so small that directions are split too
    assert jet_chunks(model.cfg, batch, 4, 2, theta, batch_size=1, memory_budget=1) == (1, 1)
    split = directional_derivatives(loss, theta, V, batch, order=2, engine="jet",
                                    batch_size=1, memory_budget=1)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    index = torch.tensor([0, 5, loss.space.dim - 1])  # coordinate directions, materialised
    first, second = directional_derivatives(loss, theta, index, batch, order=2, engine="jet",
                                            memory_budget=1)
    dense = torch.eye(loss.space.dim, dtype=torch.float64)[index]
    expected = directional_derivatives(loss, theta, dense, batch, order=2, engine="jet")
    torch.testing.assert_close(first, expected[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(second, expected[1], rtol=0, atol=1e-14)


def test_a_batch_without_scored_tokens_gives_empty_results():
    model = tiny_model()
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    ids = torch.zeros(2, 10, dtype=torch.long)
    batch = ProbeBatch(ids, ids, torch.zeros(2, 10, dtype=torch.bool))
    first, second = directional_derivatives(loss, theta, orthonormal(loss.space.dim, 2), batch,
                                            engine="jet")
    assert first.shape == second.shape == (2, 0)


def test_only_the_built_in_decoder_with_cross_entropy_is_supported():
    model = tiny_model()

    class Subclass(ModuleTokenLoss):
        pass

    def another_loss(logits, batch):
        return 2 * next_token_losses(logits, batch)

    assert jet_engine(ModuleTokenLoss(model)) is not None
    assert jet_engine(ModuleTokenLoss(model, loss_fn=another_loss)) is None
    assert jet_engine(Subclass(model)) is None
    assert jet_engine(ModuleTokenLoss(torch.nn.Sequential(torch.nn.Embedding(9, 4)))) is None
    loss = ModuleTokenLoss(model, loss_fn=another_loss)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    V = orthonormal(loss.space.dim, 2)
    with pytest.raises(ValueError, match="engine='jet' needs the built-in Decoder"):
        directional_derivatives(loss, theta, V, mixed_batch(), engine="jet")
    # auto falls back to a generic engine, which differentiates the other loss function
    first, _ = directional_derivatives(loss, theta, V, mixed_batch(), engine="auto")
    plain = ModuleTokenLoss(model)
    reference, _ = directional_derivatives(plain, theta, V, mixed_batch(), engine="jet")
    torch.testing.assert_close(first, 2 * reference, rtol=0, atol=1e-12)
