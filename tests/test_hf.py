"""Hugging Face adapter: checkpoint series loaded by transformers, exact derivatives through the seam.

Every family's series is saved with ``save_pretrained`` and read back through
:func:`hf_series` (transformers' ``from_pretrained``). The oracle is the *plain* in-memory model
that was saved, in float64: HF's own modules with SDPA attention on the math backend, reverse
mode only (per-token ``torch.autograd.grad`` and double backward, a dense
``torch.autograd.functional.hessian``), per-token cross-entropy written here, never through
polca's adapter. HF normalisations that compute in float32 even for a float64 model are swapped,
in the oracle only, for torch's own ``nn.RMSNorm``/``nn.LayerNorm`` (checked to reproduce them),
so the reference is float64 throughout.
"""

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

transformers = pytest.importorskip("transformers")

from polca.byo import CheckpointSeriesError
from polca.functional import ProbeBatch
from polca.models.hf import (
    PYTHIA_TOKENS_PER_STEP,
    HFTokenLoss,
    hf_series,
    make_forward_exact,
    weights_fingerprint,
)

AutoModelForCausalLM = transformers.AutoModelForCausalLM
VOCAB = 50
# initializer_range 0.2: logits far from uniform, so curvature terms are not vanishingly small
INIT = {"initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
SHAPE = {"vocab_size": VOCAB, "max_position_embeddings": 16, "hidden_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
# the smallest configuration of each family; what a family needs beyond SHAPE
FAMILIES = {
    "gpt_neox": {"rotary_pct": 0.5},                       # Pythia; untied embed_out head
    "gpt2": {},                                             # tied head
    "llama": {"num_key_value_heads": 1},                   # grouped-query attention
    "olmo": {},                                             # parameter-free float32 LayerNorm
    "olmo2": {"num_key_value_heads": 1},                   # RMSNorm on whole q and k
    "qwen2": {"num_key_value_heads": 1},
    "qwen3": {"num_key_value_heads": 1, "head_dim": 8},    # per-head q/k RMSNorm
    "mistral": {"num_key_value_heads": 1},
    "phi": {"partial_rotary_factor": 0.5},
    "phi3": {},
    "gemma": {"num_key_value_heads": 1, "head_dim": 8},    # (1 + weight) RMSNorm
    "stablelm": {"partial_rotary_factor": 0.5, "num_key_value_heads": 2},
    "starcoder2": {"num_key_value_heads": 1},
    "opt": {"ffn_dim": 32, "word_embed_proj_dim": 16},
}


def tiny_config(family: str, **overrides):
    return transformers.AutoConfig.for_model(family, **{**SHAPE, **FAMILIES[family], **INIT,
                                                        **overrides})


def save_series(root: Path, steps, family="gpt2", name="checkpoint-{}", shard_at=(), **overrides):
    """Tiny models of one run, saved by ``save_pretrained`` at ``steps`` (``shard_at``: in
    several safetensors shards); returns ``{step: (folder, in-memory model copy)}``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    saved = {}
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = root / name.format(step)
        model.save_pretrained(path, **({"max_shard_size": "8KB"} if step in shard_at else {}))
        reference = AutoModelForCausalLM.from_config(model.config)
        reference.load_state_dict(model.state_dict())
        saved[step] = (path, reference)
    return saved


class _GemmaNorm(nn.Module):
    """torch's ``F.rms_norm`` with Gemma's ``1 + weight`` scale, in the input dtype."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], eps=self.eps) * (1 + self.weight)


def _float64_norm(module: nn.Module) -> nn.Module | None:
    """torch's own norm computing what an HF float32-internal norm computes, or None."""
    name = type(module).__name__
    if name.startswith("Gemma") and name.endswith("RMSNorm"):
        return _GemmaNorm(module.weight, module.eps)
    if name.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        norm = nn.RMSNorm(module.weight.shape, eps=eps)
        norm.weight = module.weight
        return norm
    if name == "OlmoLayerNorm":  # eps 1e-5 is written in its forward
        return nn.LayerNorm(module.normalized_shape, eps=1e-5, elementwise_affine=False)
    return None


def oracle(model: nn.Module) -> nn.Module:
    """The saved model in float64 with SDPA attention and float64 norms (see module doc)."""
    model = model.double().eval()
    model.set_attn_implementation("sdpa")
    for name, module in list(model.named_modules()):
        norm = _float64_norm(module)
        if norm is None:
            continue
        x = torch.randn(3, 5, module.weight.shape[-1] if hasattr(module, "weight")
                        else module.normalized_shape[-1], dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), module(x), rtol=1e-5, atol=1e-5)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, norm)
    return model


def probe_batch() -> ProbeBatch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=generator)
    scored = torch.zeros(3, 9, dtype=torch.bool)
    scored[0, [2, 7]] = scored[1, [0, 4]] = scored[2, [5, 8]] = True
    targets = torch.randint(0, VOCAB, (3, 9), generator=generator)
    return ProbeBatch(ids, targets, scored)


def plain_token_losses(model, params, batch: ProbeBatch) -> torch.Tensor:
    # SDPA's math backend: the fused CPU kernel has no double backward
    with sdpa_kernel(SDPBackend.MATH):
        logits = functional_call(model, params, args=(),
                                 kwargs={"input_ids": batch.input_ids, "use_cache": False}).logits
    rows, cols = batch.scored.nonzero(as_tuple=True)
    return torch.stack([F.cross_entropy(logits[r, c], batch.targets[r, c])
                        for r, c in zip(rows.tolist(), cols.tolist())])


def directional_references(model, v_of, batch):
    """Per token: loss, ⟨v, ∇ℓ⟩ and vᵀ∇²ℓ v by reverse mode (double backward)."""
    params = dict(model.named_parameters())
    losses = plain_token_losses(model, params, batch)
    first, second = [], []
    for token_loss in losses:
        grads = torch.autograd.grad(token_loss, list(params.values()), create_graph=True)
        slope = sum((g * v_of[n]).sum() for n, g in zip(params, grads))
        curvature = torch.autograd.grad(slope, list(params.values()), retain_graph=True)
        first.append(slope.detach())
        second.append(sum((h * v_of[n]).sum() for n, h in zip(params, curvature)).detach())
    return losses.detach(), torch.stack(first), torch.stack(second)


def adapter_derivatives(loss, theta, v, batch):
    """Loss, first and second directional derivative by forward mode (jvp, jvp of jvp)."""
    def first(th):
        return jvp(lambda t: loss(t, batch), (th,), (v,))[1]

    values, slope = jvp(lambda t: loss(t, batch), (theta,), (v,))
    return values, slope, jvp(first, (theta,), (v,))[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_series_loads_and_matches_float64_reverse_mode(family, tmp_path):
    saved = save_series(tmp_path, [0, 5], family=family)
    series = hf_series(str(tmp_path / "checkpoint-*"))
    assert series.steps == [0, 5]
    loss = series.token_loss()
    assert loss.replaced, "no normalisation was made exact"
    plain = oracle(saved[5][1])
    state = series.load(5)
    # transformers' loading gives the saved parameters exactly (float32 -> float64 is exact)
    expected_params = dict(plain.named_parameters())
    assert list(state) == list(expected_params) == loss.space.names
    for name, value in expected_params.items():
        torch.testing.assert_close(state[name], value.detach(), rtol=0, atol=0)

    batch = probe_batch()
    theta = loss.space.flatten(state)
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values, first, second = adapter_derivatives(loss, theta, v, batch)
    ref_values, ref_first, ref_second = directional_references(plain, loss.space.unflatten(v),
                                                               batch)
    assert ref_second.abs().max() > 1e-2  # curvature along v is not negligible
    torch.testing.assert_close(values, ref_values, rtol=1e-10, atol=1e-10)
    for got, expected in ((first, ref_first), (second, ref_second)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


def test_second_directional_derivative_matches_dense_hessian(tmp_path):
    saved = save_series(tmp_path, [0, 1], family="gpt_neox")
    # a first-layer norm and the final norm: a small dense Hessian, with replaced modules on
    # the differentiated path
    include = ["gpt_neox.layers.0.input_layernorm.*", "gpt_neox.final_layer_norm.weight"]
    series = hf_series([saved[0][0], saved[1][0]])
    loss = series.token_loss(include=include)
    plain = oracle(saved[0][1])
    batch = probe_batch()
    theta = loss.space.flatten(series.load(0))
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    second = adapter_derivatives(loss, theta, v, batch)[2]

    fixed = {n: p.detach() for n, p in plain.named_parameters()}

    def plain_loss(sub):
        return plain_token_losses(plain, {**fixed, **loss.space.unflatten(sub)}, batch)

    expected = torch.stack([
        v @ torch.autograd.functional.hessian(lambda s, i=i: plain_loss(s)[i], theta) @ v
        for i in range(batch.n_tokens)
    ])
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(second, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


def test_sharded_tied_series_loads_like_from_pretrained(tmp_path):
    saved = save_series(tmp_path, [0, 1, 2], family="llama", shard_at=(1, 2),
                        tie_word_embeddings=True)
    assert (saved[1][0] / "model.safetensors.index.json").is_file()
    series = hf_series(str(tmp_path / "checkpoint-*"))
    loss = series.token_loss()
    assert "lm_head.weight" not in loss.space.names  # tied: θ holds the embedding once
    batch = probe_batch()
    for step in series.steps:
        plain = oracle(saved[step][1])
        expected = plain_token_losses(plain, dict(plain.named_parameters()), batch)
        got = loss(loss.space.flatten(series.load(step)), batch)
        torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)


def test_neox_checkpoint_keeps_its_embed_out_name_on_disk(tmp_path):
    # the case the hand-written reader refused: the file says embed_out, the model lm_head
    from safetensors import safe_open

    path = save_series(tmp_path, [0], family="gpt_neox")[0][0]
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        names = handle.keys()
    assert "embed_out.weight" in names
    series = hf_series([path], steps=[0])
    assert "lm_head.weight" in series.load(0)


def test_checkpoint_dtype_is_cast_to_the_analysis_dtype(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "step7")
    series = hf_series([tmp_path / "step7"])
    assert series.checkpoint_dtype == torch.bfloat16
    state = series.load(7)
    assert {t.dtype for t in state.values()} == {torch.float64}
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p.detach().double())  # bf16 -> f64 is exact
    single = hf_series([tmp_path / "step7"], dtype=torch.float32)
    assert single.load(7)["lm_head.weight"].dtype == torch.float32
    assert single.metadata["checkpoint_dtype"] == "bfloat16"


def test_adapter_replaces_norms_and_attention(tmp_path):
    path = save_series(tmp_path, [0], family="gpt2")[0][0]
    loss = hf_series([path], steps=[0]).token_loss()
    assert sorted(loss.replaced) == sorted(
        ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
         "transformer.h.1.ln_2", "transformer.ln_f"])
    assert loss.module.config._attn_implementation == "polca_exact"
    assert loss.space.names == [n for n, _ in loss.module.named_parameters()]


def test_unknown_normalisation_is_refused():
    class OddRMSNorm(nn.Module):  # a name that promises an RMSNorm, a formula that is not one
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return self.weight * torch.tanh(x)

    model = AutoModelForCausalLM.from_config(tiny_config("llama")).double()
    model.model.norm = OddRMSNorm(16).double()
    with pytest.raises(NotImplementedError, match="model.norm .*OddRMSNorm.*none reproduces"):
        make_forward_exact(model)


@pytest.mark.parametrize("family", ["gpt_neo", "bloom"])
def test_attention_outside_transformers_interface_is_refused(family):
    # GPT-Neo computes attention in float32 in its own code, BLOOM through an autograd.Function
    # without forward-mode support: neither can be made exact, so neither is accepted
    shape = {"gpt_neo": {"num_layers": 2, "num_heads": 2,
                         "attention_types": [[["global", "local"], 1]]},
             "bloom": {"n_layer": 2, "n_head": 2}}[family]
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=16, **shape)
    model = AutoModelForCausalLM.from_config(config).double()
    with pytest.raises(NotImplementedError, match="does not use transformers' AttentionInterface"):
        HFTokenLoss(model)


def test_missing_parameter_is_an_error_not_a_random_init(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_series(tmp_path, [3], family="gpt_neox", name="step{}")[3][0]
    state = load_file(path / "model.safetensors")
    del state["gpt_neox.final_layer_norm.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    series = hf_series([path])
    with pytest.raises(CheckpointSeriesError, match="lacks parameters.*final_layer_norm.weight"):
        series.load(3)


# -- series on disk -----------------------------------------------------------------------------

def test_step_from_trainer_state_wins_over_the_name(tmp_path):
    saved = save_series(tmp_path, [1, 2], name="run-{}")
    for step, global_step in ((1, 500), (2, 100)):
        (saved[step][0] / "trainer_state.json").write_text(json.dumps({"global_step": global_step}))
    series = hf_series([saved[1][0], saved[2][0]])
    assert series.steps == [100, 500]
    assert series.paths == [saved[2][0], saved[1][0]]
    assert series.tokens_per_step is None and series.tokens_seen is None


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hub_cache(root: Path, repo: str, revisions: dict[str, Path]) -> Path:
    """The hub cache layout of ``repo`` holding ``revisions`` (ref -> checkpoint folder): files
    in ``blobs/<sha256>``, linked from ``snapshots/<commit>/``, ``refs/<ref>`` naming the commit
    (huggingface_hub's layout, as snapshot_download writes it)."""
    cache = root / f"models--{repo.replace('/', '--')}"
    (cache / "blobs").mkdir(parents=True)
    for number, (ref, folder) in enumerate(revisions.items()):
        commit = hashlib.sha1(f"{repo}{number}".encode()).hexdigest()
        snapshot = cache / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in sorted(folder.iterdir()):
            blob = cache / "blobs" / sha256_file(file)
            if not blob.exists():
                shutil.copyfile(file, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
        (cache / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (cache / "refs" / ref).write_text(commit)
    return cache


def test_pythia_hub_cache_gives_steps_tokens_and_flags_duplicates(tmp_path):
    saved = save_series(tmp_path / "made", [0, 1000, 3000], family="gpt_neox", name="s{}")
    # a published series with a repeated checkpoint: step2000 holds step1000's files
    revisions = {"step0": saved[0][0], "step1000": saved[1000][0], "step2000": saved[1000][0],
                 "step3000": saved[3000][0], "main": saved[3000][0]}
    cache = hub_cache(tmp_path / "hub", "EleutherAI/pythia-tiny", revisions)
    series = hf_series(cache)
    assert series.steps == [0, 1000, 2000, 3000]  # main has no step: left out
    with pytest.warns(UserWarning, match=r"identical weights at steps \[\(1000, 2000\)\]"):
        meta = series.metadata
    assert series.tokens_per_step == PYTHIA_TOKENS_PER_STEP == 2_097_152
    assert series.tokens_seen == [0, 1000 * 2_097_152, 2000 * 2_097_152, 3000 * 2_097_152]
    assert meta["repo_id"] == "EleutherAI/pythia-tiny"
    assert meta["duplicates"] == [[1000, 2000]]
    assert "default for EleutherAI/pythia-*" in meta["tokens_per_step_source"]
    assert [c["revision"] for c in meta["checkpoints"]] == ["step0", "step1000", "step2000",
                                                            "step3000"]
    # fingerprints from the hub's blob names equal hashes of the files' contents
    for step, fingerprint in zip(series.steps, series.fingerprints):
        folder = saved[{2000: 1000}.get(step, step)][0]
        assert fingerprint == weights_fingerprint(folder)
        digest = hashlib.sha256(b"model.safetensors")
        digest.update(sha256_file(folder / "model.safetensors").encode())
        assert fingerprint == digest.hexdigest()
    assert torch.equal(series.load(3000)["lm_head.weight"],
                       saved[3000][1].lm_head.weight.detach().double())

    chosen = hf_series(cache, revisions=["step0", "step3000"], tokens_per_step=4096)
    assert chosen.steps == [0, 3000] and chosen.tokens_seen == [0, 3000 * 4096]
    assert chosen.metadata["tokens_per_step_source"] == "given"
    with pytest.raises(CheckpointSeriesError, match=r"revisions \['step9'\] are not in"):
        hf_series(cache, revisions=["step9"])


def test_other_hub_repos_have_no_token_default(tmp_path):
    saved = save_series(tmp_path / "made", [0, 10], name="s{}")
    cache = hub_cache(tmp_path / "hub", "someone/gpt2-run",
                      {"step0": saved[0][0], "step10": saved[10][0]})
    series = hf_series(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicate warning for distinct checkpoints
        assert series.duplicates == []
    assert series.tokens_per_step is None and series.metadata["tokens_per_step_source"] == "unknown"


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
    path, model = saved[5]
    (path / "model.safetensors").unlink()
    # old GPT-2 files: keys of the base model (no "transformer." prefix), pickled tensors
    torch.save({n.removeprefix("transformer."): p for n, p in model.state_dict().items()},
               path / "pytorch_model.bin")
    state = hf_series([path]).load(5)
    torch.testing.assert_close(state["transformer.h.1.mlp.c_fc.weight"],
                               model.transformer.h[1].mlp.c_fc.weight.double())


def test_mixed_architectures_name_both_dirs_and_the_key(tmp_path):
    a = save_series(tmp_path, [0], name="a{}")[0][0]
    b = save_series(tmp_path, [1], name="b{}", num_hidden_layers=3)[1][0]
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
    torch.save({"transformer.wte.weight": _RunsCode(str(marker))}, path / "pytorch_model.bin")
    series = hf_series([path])
    with pytest.raises(CheckpointSeriesError, match="NOT loaded.*arbitrary code"):
        series.load(3)
    assert not marker.exists()


def test_folder_without_weights_is_an_error(tmp_path):
    path = save_series(tmp_path, [3], name="step{}")[3][0]
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointSeriesError, match=re.escape(f"{path} has no weights")):
        hf_series([path])
