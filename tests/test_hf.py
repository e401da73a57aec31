"""Hugging Face adapter: exact derivatives through the seam, and checkpoint series on disk.

Oracles: per-token ``torch.autograd.grad`` and dense ``torch.autograd.functional.hessian`` of
the *plain* Hugging Face model (its own LayerNorm/RMSNorm and SDPA attention on the math
backend, reverse mode only), with per-token cross-entropy written here, never through the adapter.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jvp
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

transformers = pytest.importorskip("transformers")

from polca.byo import CheckpointSeriesError
from polca.functional import ProbeBatch
from polca.models.hf import HFTokenLoss, hf_series

AutoModelForCausalLM = transformers.AutoModelForCausalLM
INIT = {"initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def tiny_config(family: str, **overrides):
    # initializer_range 0.2: logits far from uniform, so curvature terms are not vanishingly small
    if family == "gpt2":
        settings = {"vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}
        return transformers.GPT2Config(**{**settings, **INIT, **overrides})
    if family == "gpt_neox":
        settings = {"vocab_size": 50, "max_position_embeddings": 16, "hidden_size": 16,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                    "rotary_pct": 0.5}
        return transformers.GPTNeoXConfig(**{**settings, **INIT, **overrides})
    settings = {"vocab_size": 50, "max_position_embeddings": 16, "hidden_size": 16,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "intermediate_size": 32}
    return transformers.LlamaConfig(**{**settings, **INIT, **overrides})


# a first-layer norm and the final norm: a small dense Hessian, with every replaced module
# on the differentiated path
HESSIAN_TENSORS = ["transformer.h.0.ln_1.*", "transformer.ln_f.weight"]
# HF's LlamaRMSNorm computes in float32 even for a float64 model, so the plain Llama model (the
# oracle) carries float32 rounding; the adapter's own RMSNorm keeps float64.
ORACLE_RTOL = {"gpt2": 1e-9, "gpt_neox": 1e-9, "llama": 1e-5}
FAMILIES = list(ORACLE_RTOL)


def plain_and_adapted(family: str):
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_config(family)).double().eval()
    adapted = AutoModelForCausalLM.from_config(tiny_config(family)).double()
    adapted.load_state_dict(plain.state_dict())
    return plain, adapted


def probe_batch() -> ProbeBatch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 9), generator=generator)
    scored = torch.zeros(3, 9, dtype=torch.bool)
    scored[0, [2, 7]] = scored[1, [0, 4]] = scored[2, [5, 8]] = True
    targets = torch.randint(0, 50, (3, 9), generator=generator)
    return ProbeBatch(ids, targets, scored)


def plain_token_losses(model, params, batch: ProbeBatch) -> torch.Tensor:
    # SDPA's math backend: the fused CPU kernel has no double backward
    with sdpa_kernel(SDPBackend.MATH):
        logits = functional_call(model, params, args=(),
                                 kwargs={"input_ids": batch.input_ids}).logits
    rows, cols = batch.scored.nonzero(as_tuple=True)
    return torch.stack([F.cross_entropy(logits[r, c], batch.targets[r, c])
                        for r, c in zip(rows.tolist(), cols.tolist())])


@pytest.mark.parametrize("family", FAMILIES)
def test_first_directional_derivative_matches_per_token_autograd(family):
    plain, adapted = plain_and_adapted(family)
    loss = HFTokenLoss(adapted)
    batch = probe_batch()
    theta = loss.space.flatten(dict(adapted.named_parameters())).detach()
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    values, first = jvp(lambda th: loss(th, batch), (theta,), (v,))

    params = dict(plain.named_parameters())
    reference = plain_token_losses(plain, params, batch)
    v_of = loss.space.unflatten(v)
    expected = []
    for token_loss in reference:
        grads = torch.autograd.grad(token_loss, list(params.values()), retain_graph=True)
        expected.append(sum((g * v_of[n]).sum() for n, g in zip(params, grads)))
    expected = torch.stack(expected)
    rtol = ORACLE_RTOL[family]
    torch.testing.assert_close(values, reference.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(first, expected, rtol=rtol, atol=rtol * expected.abs().max())


def second_derivative(loss, theta, v, batch):
    """vᵀ∇²ℓ_x v for every token by forward-over-forward (jvp of jvp) through the adapter."""
    def first(th):
        return jvp(lambda t: loss(t, batch), (th,), (v,))[1]

    return jvp(first, (theta,), (v,))[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_second_directional_derivative_matches_double_backward(family):
    plain, adapted = plain_and_adapted(family)
    loss = HFTokenLoss(adapted)
    batch = probe_batch()
    theta = loss.space.flatten(dict(adapted.named_parameters())).detach()
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    second = second_derivative(loss, theta, v, batch)

    params = dict(plain.named_parameters())
    v_of = loss.space.unflatten(v)
    expected = []
    for token_loss in plain_token_losses(plain, params, batch):
        grads = torch.autograd.grad(token_loss, list(params.values()), create_graph=True)
        slope = sum((g * v_of[n]).sum() for n, g in zip(params, grads))
        curvature = torch.autograd.grad(slope, list(params.values()), retain_graph=True)
        expected.append(sum((h * v_of[n]).sum() for n, h in zip(params, curvature)))
    expected = torch.stack(expected)
    assert expected.abs().max() > 1e-2  # curvature along v is not negligible
    rtol = ORACLE_RTOL[family]
    torch.testing.assert_close(second, expected, rtol=rtol, atol=rtol * expected.abs().max())


def test_second_directional_derivative_matches_dense_hessian():
    plain, adapted = plain_and_adapted("gpt2")
    loss = HFTokenLoss(adapted, include=HESSIAN_TENSORS)
    batch = probe_batch()
    theta = loss.space.flatten(dict(adapted.named_parameters())).detach()
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    second = second_derivative(loss, theta, v, batch)

    fixed = {n: p.detach() for n, p in plain.named_parameters()}

    def plain_loss(sub):
        return plain_token_losses(plain, {**fixed, **loss.space.unflatten(sub)}, batch)

    expected = torch.stack([
        v @ torch.autograd.functional.hessian(lambda s, i=i: plain_loss(s)[i], theta) @ v
        for i in range(batch.n_tokens)
    ])
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(second, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


def test_adapter_replaces_norms_and_attention():
    _, adapted = plain_and_adapted("gpt2")
    loss = HFTokenLoss(adapted)
    assert sorted(loss.replaced) == sorted(
        ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
         "transformer.h.1.ln_2", "transformer.ln_f"])
    assert adapted.config._attn_implementation == "polca_exact"
    # parameter names are the model's own, so HF state dicts flatten directly
    assert loss.space.names == [n for n, _ in adapted.named_parameters()]


# -- checkpoint series on disk ------------------------------------------------------------------

def save_series(root: Path, steps, family="gpt2", name="checkpoint-{}", **overrides):
    """Tiny models of one run: the step-0 model, perturbed a little more at each step."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    saved = {}
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = root / name.format(step)
        model.save_pretrained(path)
        saved[step] = (path, {n: p.detach().clone() for n, p in model.named_parameters()})
    return saved


def test_series_from_glob_orders_steps_and_matches_from_pretrained(tmp_path):
    saved = save_series(tmp_path, [30, 0, 200])
    series = hf_series(str(tmp_path / "checkpoint-*"))
    assert series.steps == [0, 30, 200]
    loss = series.token_loss()
    batch = probe_batch()
    for step, (path, params) in saved.items():
        state = series.load(step)
        for name, value in params.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
        # independent loader: transformers' own from_pretrained of the same directory
        reference = AutoModelForCausalLM.from_pretrained(path).double().eval()
        expected = plain_token_losses(reference, dict(reference.named_parameters()), batch)
        got = loss(loss.space.flatten(state).double(), batch)
        torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)


def test_step_from_trainer_state_wins_over_the_name(tmp_path):
    saved = save_series(tmp_path, [1, 2], name="run-{}")
    for step, global_step in ((1, 500), (2, 100)):
        (saved[step][0] / "trainer_state.json").write_text(json.dumps({"global_step": global_step}))
    series = hf_series([saved[1][0], saved[2][0]])
    assert series.steps == [100, 500]
    assert series.paths == [saved[2][0], saved[1][0]]


def test_hub_cache_revisions_are_read_by_ref(tmp_path):
    cache = tmp_path / "models--org--tiny"
    saved = save_series(cache / "snapshots", [0, 1000], name="hash{}")
    (cache / "refs").mkdir()
    for step, (path, _) in saved.items():
        (cache / "refs" / f"step{step}").write_text(path.name)
    (cache / "refs" / "main").write_text(saved[1000][0].name)
    series = hf_series(cache)
    assert series.steps == [0, 1000]
    torch.testing.assert_close(series.load(1000)["transformer.wte.weight"],
                               saved[1000][1]["transformer.wte.weight"])


def test_series_manifest_gives_steps(tmp_path):
    saved = save_series(tmp_path, [1, 2], name="ckpt_{}")
    manifest = tmp_path / "series.json"
    manifest.write_text(json.dumps({"checkpoints": [{"step": 7, "path": "ckpt_2"},
                                                    {"step": 3, "path": "ckpt_1"}]}))
    series = hf_series(manifest)
    assert series.steps == [3, 7]
    assert series.paths == [saved[1][0].resolve(), saved[2][0].resolve()]


def test_base_model_keys_and_weights_only_bin_are_read(tmp_path):
    saved = save_series(tmp_path, [5], name="step{}")
    path, params = saved[5]
    (path / "model.safetensors").unlink()
    # old GPT-2 files: keys of the base model (no "transformer." prefix), pickled tensors
    torch.save({n.removeprefix("transformer."): p for n, p in params.items()},
               path / "pytorch_model.bin")
    state = hf_series([path]).load(5)
    torch.testing.assert_close(state["transformer.h.1.mlp.c_fc.weight"],
                               params["transformer.h.1.mlp.c_fc.weight"])


def test_mixed_architectures_name_both_dirs_and_the_key(tmp_path):
    a = save_series(tmp_path, [0], name="a{}")[0][0]
    b = save_series(tmp_path, [1], name="b{}", n_layer=3)[1][0]
    with pytest.raises(CheckpointSeriesError, match=r"n_layer: 2 vs 3") as err:
        hf_series([a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_missing_step_is_an_error(tmp_path):
    saved = save_series(tmp_path, [0], name="final")
    with pytest.raises(CheckpointSeriesError, match="no training step for .*final"):
        hf_series([saved[0][0]])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path):
    path = save_series(tmp_path, [3], name="step{}")[3][0]
    (path / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    torch.save({"weight": _RunsCode(str(marker))}, path / "pytorch_model.bin")
    series = hf_series([path])
    with pytest.raises(CheckpointSeriesError, match="NOT loaded.*arbitrary code"):
        series.load(3)
    assert not marker.exists()
