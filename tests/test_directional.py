"""Directional derivatives against independent float64 oracles (autograd loops, dense Hessians)."""

import pytest
import torch
from oracles import orthonormal, token_gradients, token_hessians

from polca.directional import choose_engine, directional_derivatives, mean_loss_gradient
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig

ENGINES = ["jet", "forward", "reverse", "auto"]


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


@pytest.fixture(scope="module")
def problem():
    loss, theta, batch = tiny_problem()
    V = orthonormal(loss.space.dim, 3)
    gradients = token_gradients(loss, theta, batch)
    hessians = token_hessians(loss, theta, batch)
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


@pytest.mark.parametrize("engine", ENGINES)
def test_no_directions_give_empty_results(problem, engine):
    loss, theta, batch, *_ = problem
    for directions in (theta.new_zeros(0, loss.space.dim), torch.tensor([], dtype=torch.long)):
        first, second = directional_derivatives(loss, theta, directions, batch, order=2,
                                                engine=engine)
        assert first.shape == second.shape == (0, batch.n_tokens)


def test_engines_agree_on_a_two_layer_model():
    loss, theta, batch = tiny_problem(d_model=8, n_layers=2, seed=3)
    V = orthonormal(loss.space.dim, 4, seed=4)
    forward = directional_derivatives(loss, theta, V, batch, order=2, engine="forward")
    for engine in ("reverse", "jet"):
        other = directional_derivatives(loss, theta, V, batch, order=2, engine=engine)
        for a, b in zip(forward, other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_auto_picks_the_jet_for_the_decoder_and_reverse_for_many_first_order_directions():
    assert choose_engine(10, 4, order=2, jet=True) == "jet"
    assert choose_engine(10, 4, order=1, jet=True) == "jet"
    assert choose_engine(8, 4, order=2) == "forward"
    assert choose_engine(1, 4, order=1) == "forward"
    assert choose_engine(100, 4, order=1) == "reverse"
    assert choose_engine(200, 4, order=1, jet=True) == "reverse"


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


def hf_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (3, 8), generator=g)
    scored = torch.zeros(3, 8, dtype=torch.bool)
    scored[0, [2, 7]] = scored[1, [0, 4]] = scored[2, 5] = True
    return ProbeBatch(ids, torch.randint(0, 20, (3, 8), generator=g), scored)


def tiny_hf_model(family, pad_token_id=None):
    """A tiny Hugging Face causal LM built offline from a config (float64, O(0.2) weights)."""
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": 20, "initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 1,
              "pad_token_id": pad_token_id}
    config = {
        "gpt2": lambda: transformers.GPT2Config(n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                                **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            max_position_embeddings=8, hidden_size=8, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=16, rotary_pct=0.5, **common),
        "llama": lambda: transformers.LlamaConfig(
            max_position_embeddings=8, hidden_size=8, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, **common),
    }[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).double()


# one tensor in each of the first block's attention, its MLP and the final norm: every
# replaced module (norms, attention) lies on the differentiated path, and dense Hessians stay small
HF_TENSORS = {
    "gpt2": ["transformer.h.0.attn.c_attn.bias", "transformer.h.0.mlp.c_fc.bias",
             "transformer.ln_f.*"],
    "gpt_neox": ["gpt_neox.layers.0.attention.query_key_value.bias",
                 "gpt_neox.layers.0.mlp.dense_h_to_4h.bias", "gpt_neox.final_layer_norm.*"],
    "llama": ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.norm.weight"],
}


@pytest.mark.parametrize("family", list(HF_TENSORS))
def test_hugging_face_models_go_through_the_generic_engines(family):
    from polca.models.hf import HFTokenLoss

    model = tiny_hf_model(family)
    loss = HFTokenLoss(model, include=HF_TENSORS[family])
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    batch = hf_batch()
    V = orthonormal(loss.space.dim, 2, seed=3)
    gradients = token_gradients(loss, theta, batch)
    hessians = token_hessians(loss, theta, batch)
    expected_second = torch.einsum("md,xde,me->mx", V, hessians, V)
    assert expected_second.abs().max() > 1e-3
    with pytest.raises(ValueError, match="engine='jet' needs the built-in Decoder"):
        directional_derivatives(loss, theta, V, batch, engine="jet")
    for engine in ("auto", "forward", "reverse"):
        first, second = directional_derivatives(loss, theta, V, batch, order=2, engine=engine)
        torch.testing.assert_close(first, V @ gradients.T, rtol=0, atol=1e-10)
        torch.testing.assert_close(second, expected_second, rtol=0, atol=1e-10)
        first_only, _ = directional_derivatives(loss, theta, V, batch, order=1, engine=engine)
        torch.testing.assert_close(first_only, V @ gradients.T, rtol=0, atol=1e-10)


def test_auto_falls_back_to_forward_mode_when_the_model_cannot_be_vmapped():
    """With a pad token id and no attention mask, Hugging Face models test the input ids for
    padding in Python, which vmap over sequences (reverse mode) cannot do."""
    from polca.models.hf import HFTokenLoss

    model = tiny_hf_model("gpt2", pad_token_id=1)
    loss = HFTokenLoss(model, include=HF_TENSORS["gpt2"])
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    batch = hf_batch()
    index = torch.arange(0, loss.space.dim, 2)  # many coordinate directions: auto picks reverse
    assert choose_engine(len(index), batch.n_tokens / len(batch), order=1) == "reverse"
    with pytest.raises(RuntimeError, match="use engine='forward'"):
        directional_derivatives(loss, theta, index, batch, order=1, engine="reverse")
    first, _ = directional_derivatives(loss, theta, index, batch, order=1, engine="auto")
    torch.testing.assert_close(first, token_gradients(loss, theta, batch)[:, index].T,
                               rtol=0, atol=1e-10)


class _Identity(torch.autograd.Function):
    """An identity with a forward-mode rule but no vmap rule (a user's custom operation)."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, tangent):
        return tangent.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_forward_mode_falls_back_to_a_loop_when_directions_cannot_be_vmapped(problem):
    loss, theta, batch, V, gradients, _ = problem

    def custom(point, probe):  # a user's token loss (first order only: the custom
        return _Identity.apply(loss(point, probe))  # operation has no second-order rule)

    custom.space = loss.space
    with pytest.warns(RuntimeWarning, match="vmap over directions failed"):
        first, _ = directional_derivatives(custom, theta, V, batch, order=1, engine="forward")
    torch.testing.assert_close(first, V @ gradients.T, rtol=0, atol=1e-10)
