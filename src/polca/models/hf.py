"""Hugging Face causal LMs as the seam, and ordered series of their checkpoints (``[hf]`` extra).

A series is a list of local checkpoint directories (``save_pretrained`` output, a Trainer's
``checkpoint-*`` folders) or a local hub cache with revisions (Pythia's ``step1000`` branches):
``models--org--name/snapshots/<hash>`` and ``refs/<branch>``. Nothing is downloaded.

* Steps: ``steps=[...]`` if given, else a series manifest (a JSON file
  ``{"checkpoints": [{"step": 1000, "path": "dir"}, ...]}``), else ``trainer_state.json``'s
  ``global_step``, else a number in the directory or revision name (``step1000``,
  ``checkpoint-1000``).
* All checkpoints must share one architecture (``config.json`` equal on
  :data:`ARCHITECTURE_KEYS`); otherwise the error names both directories and the key.
* Weights are read from safetensors (sharded or not); ``pytorch_model.bin`` only through
  ``torch.load(weights_only=True)``, so a pickle that would run code is refused.

:class:`HFTokenLoss` prepares the model for exact forward-mode derivatives in float64:

* attention: an eager (explicit softmax) attention registered as ``"polca_exact"``; SDPA's
  fused CPU kernels have no forward-mode AD, and HF's own eager attention of GPT-NeoX/Llama
  rounds the softmax to float32;
* normalisation modules replaced by exact equivalents sharing their parameters:
  ``nn.LayerNorm`` by a primitive LayerNorm (``F.layer_norm`` gives a wrong second directional
  derivative under jvp-of-jvp, pytorch#196700), Llama-style RMSNorm by one that keeps float64
  (HF's computes in float32).

Every replacement is checked to give the original's output before it is used.

Example:
    >>> series = hf_series("runs/my-gpt2/checkpoint-*")                  # doctest: +SKIP
    >>> loss = series.token_loss()             # float64, exact derivatives  # doctest: +SKIP
    >>> theta = loss.space.flatten(series.load(series.steps[-1]))  # [d]     # doctest: +SKIP
    >>> loss(theta, probe_batch).shape                             # [tokens] # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from polca.byo import (
    CheckpointSeriesError,
    StateSeries,
    expand_dirs,
    order_by_step,
    read_state_file,
    step_from_name,
)
from polca.functional import ModuleTokenLoss

try:
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "polca.models.hf needs transformers: pip install 'polca[hf]' (or pip install "
        f"transformers) ({err})"
    ) from None

# config.json keys that fix the parameter shapes and the forward computation
ARCHITECTURE_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "n_embd", "d_model",
    "num_hidden_layers", "n_layer", "num_layers", "num_attention_heads", "n_head",
    "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "hidden_act",
    "activation_function", "max_position_embeddings", "n_positions", "rotary_pct",
    "partial_rotary_factor", "rope_theta", "rope_scaling", "rotary_emb_base",
    "use_parallel_residual", "tie_word_embeddings", "layer_norm_eps", "layer_norm_epsilon",
    "rms_norm_eps", "attention_bias", "mlp_bias", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
)


class ExactLayerNorm(nn.Module):
    """LayerNorm over the last dimension from primitives; exact under jvp-of-jvp."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        variance = (centred * centred).mean(dim=-1, keepdim=True)
        out = centred / torch.sqrt(variance + self.eps)
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out


class ExactRMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, computed in at least float32 like Llama's but
    never below the input's precision (so float64 stays float64)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _exact_equivalent(module: nn.Module) -> nn.Module | None:
    """The exact replacement of a normalisation module, or ``None`` if it needs none."""
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise NotImplementedError(
                f"{type(module).__name__} over {module.normalized_shape}: only LayerNorm over "
                "the last dimension has an exact forward-mode replacement"
            )
        return ExactLayerNorm(module.weight, module.bias, module.eps)
    name = type(module).__name__
    if name.endswith("RMSNorm") and not isinstance(module, nn.RMSNorm):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        params = dict(module.named_parameters(recurse=False))
        if eps is None or set(params) != {"weight"} or params["weight"].ndim != 1:
            raise NotImplementedError(
                f"{name} has no exact forward-mode replacement in polca (parameters "
                f"{list(params)}, eps attribute {'found' if eps else 'missing'}); open an issue "
                "with the model name"
            )
        return ExactRMSNorm(params["weight"], float(eps))
    return None


def make_forward_exact(model: nn.Module) -> list[str]:
    """Replace, in place, every normalisation module whose forward-mode second derivative or
    precision is wrong by an exact equivalent sharing its parameters; returns the replaced
    module names. Each replacement is checked against the original on a random input.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        exact = _exact_equivalent(module)
        if exact is None:
            continue
        _check_same_output(name, module, exact)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, exact)
        replaced.append(name)
    return replaced


@torch.no_grad()
def _check_same_output(name: str, original: nn.Module, exact: nn.Module) -> None:
    weight = next(original.parameters(), None)
    width = weight.shape[-1] if weight is not None else original.normalized_shape[-1]
    dtype = weight.dtype if weight is not None else torch.float32
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(dtype) * 3 + 1
    expected, got = original(probe), exact(probe)
    # same formula up to rounding; HF norms may compute in float32 even for a float64 model
    coarse = dtype if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps else torch.float32
    tol = 50 * torch.finfo(coarse).eps * float(expected.abs().max().clamp_min(1))
    if not torch.allclose(expected, got, rtol=0, atol=tol):
        raise NotImplementedError(
            f"module {name} ({type(original).__name__}) is not the standard normalisation its "
            f"name suggests (max difference {(expected - got).abs().max():.3g}); polca cannot "
            "replace it by an exact forward-mode equivalent. Open an issue with the model name"
        )


class HFTokenLoss(ModuleTokenLoss):
    """A Hugging Face causal LM as a :class:`~polca.functional.TokenLoss`.

    The model is prepared in place: eval mode, eager attention, exact normalisation modules
    (see :func:`make_forward_exact`). Parameters are named as in ``model.named_parameters()``
    (tied weights once, e.g. GPT-2's ``transformer.wte.weight`` also serves as the head).

    Args:
        model: a ``PreTrainedModel`` for causal LM (``...ForCausalLM``/``...LMHeadModel``).
        include: glob patterns of the parameters that form θ (default: all).
        loss_fn: ``(logits, batch) -> [tokens]``; default next-token cross-entropy.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16,
        ...                                    n_layer=2, n_head=2)).double()
        >>> loss = HFTokenLoss(model)
        >>> loss.logits(loss.space.flatten(dict(model.named_parameters())),
        ...             torch.zeros(1, 4, dtype=torch.long)).shape
        torch.Size([1, 4, 50])
    """

    def __init__(self, model: nn.Module, include: Sequence[str] | None = None, **kwargs):
        model.eval()
        self.replaced = make_forward_exact(model)
        use_exact_attention(model)
        super().__init__(model, include=include, **kwargs)

    def logits(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        params = {**self.fixed, **self.space.unflatten(theta), **self.buffers}
        out = functional_call(self.module, params, args=(),
                              kwargs={"input_ids": input_ids, "use_cache": False})
        return out.logits


EXACT_ATTENTION = "polca_exact"
# attention features the exact attention function does not implement
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    """Eager attention whose softmax keeps the input precision (HF's eager attention of
    GPT-NeoX/Llama rounds the weights to float32, which caps float64 derivatives at float32
    accuracy). ``query [batch, heads, q, dim]``, ``key, value [batch, kv_heads, k, dim]``;
    returns ``([batch, q, heads, dim], weights)`` like every HF attention function."""
    used = [k for k in _UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(k) is not None]
    if used:
        raise NotImplementedError(f"{type(module).__name__} uses attention {used}, which "
                                  "polca's exact attention does not implement")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    wide = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.to(wide), dim=-1).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def use_exact_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to :func:`exact_attention` (registered with transformers as
    ``"polca_exact"``, with the eager additive mask), after checking that it gives the
    model's own eager attention's logits."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face model; use "
                        "polca.byo.module_token_loss for plain PyTorch modules")
    AttentionInterface.register(EXACT_ATTENTION, exact_attention)
    AttentionMaskInterface.register(EXACT_ATTENTION, eager_mask)
    if config._attn_implementation == EXACT_ATTENTION:
        return
    model.set_attn_implementation("eager")
    ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()  # dropout off for the comparison
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation(EXACT_ATTENTION)
        got = model(input_ids=ids, use_cache=False).logits
    model.train(training)
    # HF's float32 softmax differs from ours by float32 rounding, far below any structural error
    tol = 1e-4 * float(expected.abs().max().clamp_min(1))
    if not torch.allclose(expected, got, rtol=0, atol=tol):
        model.set_attn_implementation("eager")
        raise NotImplementedError(
            f"{type(model).__name__}: polca's exact attention does not reproduce the model's "
            f"eager attention (max logit difference {(expected - got).abs().max():.3g}); this "
            "architecture is not supported yet. Open an issue with the model name"
        )


# -- reading checkpoint directories ---------------------------------------------------------------

def read_config(path: str | os.PathLike) -> dict:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointSeriesError(
            f"{path} has no config.json: not a Hugging Face checkpoint directory (save it with "
            "model.save_pretrained(path))"
        )
    return json.loads(config.read_text())


def architecture_difference(a: Mapping, b: Mapping) -> str | None:
    """The first :data:`ARCHITECTURE_KEYS` entry on which two config dicts differ, described."""
    for key in ARCHITECTURE_KEYS:
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
    return None


def read_hf_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights in one checkpoint directory (safetensors, sharded or not; else a
    weights-only ``pytorch_model.bin``)."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_file(path / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_state_file(path / name)
    raise CheckpointSeriesError(
        f"{path} has no weights (model.safetensors, a sharded index, or pytorch_model.bin)"
    )


def align_state(state: Mapping[str, torch.Tensor], names: Sequence[str], prefix: str,
                where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state`` keyed by the model's parameter ``names``: checkpoints saved from the base model
    lack ``prefix.`` (old GPT-2 files), ones from a wrapper may carry it where the model does not."""
    out = {}
    missing = []
    for name in names:
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in state:
                out[name] = state[key]
                break
        else:
            missing.append(name)
    if missing:
        raise CheckpointSeriesError(
            f"{where} lacks parameters {missing[:5]} of the model (it has {list(state)[:5]}…); "
            "is it a checkpoint of this architecture?"
        )
    return out


class HFCheckpointSeries(StateSeries):
    """An ordered series of Hugging Face checkpoint directories of one architecture.

    ``load(step)`` returns the weights keyed by the model's parameter names (see
    :class:`StateSeries` for the rest of the reader interface).
    """

    def __init__(self, entries: Sequence[tuple[int, Path]]):
        super().__init__(entries, reader=self._read)
        self.config_dict = read_config(self.paths[0])
        for path in self.paths[1:]:
            differ = architecture_difference(self.config_dict, read_config(path))
            if differ:
                raise CheckpointSeriesError(
                    f"checkpoints {self.paths[0]} and {path} have different architectures "
                    f"({differ}); a series must come from one run of one model"
                )
        self.config = AutoConfig.from_pretrained(str(self.paths[0]), local_files_only=True)
        with torch.device("meta"):  # names only: no memory for the weights
            skeleton = AutoModelForCausalLM.from_config(self.config)
        self.parameter_names = [n for n, _ in skeleton.named_parameters()]
        self.base_model_prefix = skeleton.base_model_prefix

    def model(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        """A model of the series' architecture in ``dtype`` (eager attention); its weights are
        placeholders: the parameters analysed come from ``load(step)``."""
        model = AutoModelForCausalLM.from_config(self.config, attn_implementation="eager")
        # from_config initialises randomly; every analysed θ comes from a checkpoint
        return model.to(dtype).eval()

    def token_loss(self, include: Sequence[str] | None = None,
                   dtype: torch.dtype = torch.float64) -> HFTokenLoss:
        """The seam for this series' model in ``dtype``; the excluded parameters are taken from
        the first checkpoint."""
        loss = HFTokenLoss(self.model(dtype), include=include)
        if loss.fixed:
            loss.set_fixed(self.load(self.steps[0]))
        return loss

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        return align_state(read_hf_state(path), self.parameter_names, self.base_model_prefix,
                           where=str(path))


def _trainer_step(path: Path) -> int | None:
    state = path / "trainer_state.json"
    if not state.is_file():
        return None
    step = json.loads(state.read_text()).get("global_step")
    return int(step) if step is not None else None


def hub_cache_revisions(repo_cache: str | os.PathLike,
                        revisions: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """``[(revision, snapshot dir)]`` of a local hub cache ``models--org--name``.

    Default: every ref whose name holds a step number (``step1000``); ``main`` and other
    refs without one are left out unless named in ``revisions``.
    """
    root = Path(repo_cache)
    refs = root / "refs"
    if not refs.is_dir():
        raise CheckpointSeriesError(f"{root} is not a hub cache repository (no refs/ folder)")
    available = {p.relative_to(refs).as_posix(): p for p in refs.rglob("*") if p.is_file()}
    if revisions is None:
        chosen = sorted(r for r in available if step_from_name(r) is not None)
        if not chosen:
            raise CheckpointSeriesError(
                f"no ref in {refs} names a step ({sorted(available)}); pass revisions=[...] and "
                "steps=[...]"
            )
    else:
        unknown = [r for r in revisions if r not in available]
        if unknown:
            raise CheckpointSeriesError(
                f"revisions {unknown} are not in {refs} (has {sorted(available)[:10]}); download "
                "them first, e.g. huggingface_hub.snapshot_download(repo, revision=...)"
            )
        chosen = list(revisions)
    out = []
    for rev in chosen:
        snapshot = root / "snapshots" / available[rev].read_text().strip()
        if not snapshot.is_dir():
            raise CheckpointSeriesError(f"ref {rev} points to missing snapshot {snapshot}")
        out.append((rev, snapshot))
    return out


def hf_series(source: str | os.PathLike | Sequence[str | os.PathLike],
              steps: Sequence[int] | None = None,
              revisions: Sequence[str] | None = None) -> HFCheckpointSeries:
    """An ordered :class:`HFCheckpointSeries` from local files; nothing is downloaded.

    ``source`` is one of: a list of checkpoint directories; a glob pattern of them; a folder
    whose sub-folders are checkpoints (a Trainer ``output_dir``); a hub cache repository folder
    ``models--org--name`` (``revisions`` picks refs, default every ``step*`` ref); a series
    manifest ``.json`` (``{"checkpoints": [{"step", "path"}]}``, paths relative to it).
    """
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".json"):
        entries = _read_series_manifest(Path(source))
        if steps is not None:
            raise CheckpointSeriesError("a series manifest gives the steps; do not pass steps=")
        return HFCheckpointSeries(order_by_step([p for _, p in entries], [s for s, _ in entries]))
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "refs").is_dir():
        found = hub_cache_revisions(source, revisions)
        revision_of = {snapshot: rev for rev, snapshot in found}

        def step_of(snapshot: Path) -> int | None:
            step = _trainer_step(snapshot)
            return step if step is not None else step_from_name(revision_of[snapshot])

        return HFCheckpointSeries(order_by_step(list(revision_of), steps, step_of=step_of))
    dirs = expand_dirs(source, marker="config.json")
    return HFCheckpointSeries(order_by_step(dirs, steps, step_of=_trainer_step))


def _read_series_manifest(path: Path) -> list[tuple[int, Path]]:
    try:
        entries = json.loads(path.read_text())["checkpoints"]
        return [(int(e["step"]), (path.parent / e["path"]).resolve()) for e in entries]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointSeriesError(
            f"{path} is not a series manifest ({type(err).__name__}: {err}); it must be "
            '{"checkpoints": [{"step": 1000, "path": "checkpoint-1000"}, ...]}'
        ) from None


__all__ = [
    "ARCHITECTURE_KEYS",
    "ExactLayerNorm",
    "ExactRMSNorm",
    "HFCheckpointSeries",
    "HFTokenLoss",
    "align_state",
    "architecture_difference",
    "exact_attention",
    "hf_series",
    "hub_cache_revisions",
    "make_forward_exact",
    "read_hf_state",
    "use_exact_attention",
]
