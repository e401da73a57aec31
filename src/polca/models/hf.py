"""Hugging Face causal LMs as the seam, and ordered series of their checkpoints (``[hf]`` extra).

A series is a list of local checkpoint directories (``save_pretrained`` output, a Trainer's
``checkpoint-*`` folders) or a local hub cache with revisions (Pythia's ``step1000`` branches):
``models--org--name/snapshots/<hash>`` and ``refs/<branch>``. Nothing is downloaded.

* Weights are loaded by transformers itself (``from_pretrained`` with ``local_files_only``,
  safetensors whenever the folder has them, else a weights-only ``pytorch_model.bin``), so
  renamed keys (GPT-NeoX's ``embed_out`` is the model's ``lm_head``), tied embeddings and
  sharded checkpoints load exactly as transformers defines them. Each checkpoint is cast from
  its stored dtype (:attr:`HFCheckpointSeries.checkpoint_dtype`) to the analysis dtype.
* Steps: ``steps=[...]`` if given, else a series manifest (a JSON file
  ``{"checkpoints": [{"step": 1000, "path": "dir"}, ...]}``), else ``trainer_state.json``'s
  ``global_step``, else a number in the directory or revision name (``step1000``,
  ``checkpoint-1000``).
* All checkpoints must share one architecture (``config.json`` equal on
  :data:`ARCHITECTURE_KEYS`); otherwise the error names both directories and the key.
* Consecutive checkpoints with identical weights (same content hash) are flagged with a
  warning when first looked for (:attr:`HFCheckpointSeries.duplicates`, also read by
  ``metadata``) and listed in the metadata; published series have held such duplicates, and
  their interval has no parameter change to decompose.
* Tokens seen: ``step × tokens_per_step`` when that is known: given, or for
  ``EleutherAI/pythia-*`` hub caches Pythia's published batch of 1024 × 2048 tokens
  (:data:`PYTHIA_TOKENS_PER_STEP`), stated as such in the metadata.

:class:`HFTokenLoss` prepares the model for exact forward-mode derivatives in float64:

* attention: an eager (explicit softmax) attention registered as ``"polca_exact"``; SDPA's
  fused CPU kernels have no forward-mode AD, and HF's own eager attention of GPT-NeoX/Llama
  rounds the softmax to float32;
* normalisation modules replaced by exact equivalents sharing their parameters: LayerNorms by
  the primitive :func:`polca.models.decoder.layer_norm` (``F.layer_norm`` gives a wrong second
  directional derivative under jvp-of-jvp, pytorch#196700; OLMo's computes in float32),
  RMSNorms by one that keeps float64 (HF's compute in float32).

Every replacement is checked to give the original's output before it is used.

Example:
    >>> series = hf_series("runs/my-gpt2/checkpoint-*")                  # doctest: +SKIP
    >>> loss = series.token_loss()             # float64, exact derivatives  # doctest: +SKIP
    >>> theta = loss.space.flatten(series.load(series.steps[-1]))  # [d]     # doctest: +SKIP
    >>> loss(theta, probe_batch).shape                             # [tokens] # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from itertools import pairwise
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.func import functional_call

from polca.byo import CheckpointSeriesError, StateSeries, expand_dirs, order_by_step, step_from_name
from polca.functional import ModuleTokenLoss
from polca.models.decoder import layer_norm

try:
    from huggingface_hub import scan_cache_dir
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.utils import logging as hf_logging
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "polca.models.hf needs transformers: pip install 'polca-breakthroughs[hf]' (or pip "
        f"install transformers) ({err})"
    ) from None

# config.json keys that fix the parameter shapes and the forward computation
ARCHITECTURE_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "n_embd", "d_model",
    "num_hidden_layers", "n_layer", "num_layers", "num_attention_heads", "n_head",
    "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "hidden_act",
    "activation_function", "max_position_embeddings", "n_positions", "rotary_pct",
    "partial_rotary_factor", "rope_theta", "rope_scaling", "rope_parameters", "rotary_emb_base",
    "use_parallel_residual", "tie_word_embeddings", "layer_norm_eps", "layer_norm_epsilon",
    "rms_norm_eps", "attention_bias", "mlp_bias", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
)

# Pythia's published batch: 1024 sequences of 2048 tokens per optimizer step, 2,097,152 tokens
# (Biderman et al. 2023, "Pythia: A Suite for Analyzing Large Language Models"). Only the
# stated default for EleutherAI/pythia-* hub caches; tokens_per_step= overrides it.
PYTHIA_TOKENS_PER_STEP = 1024 * 2048
_PYTHIA_REPO = re.compile(r"EleutherAI/pythia-[\w.-]+")


# -- exact normalisation --------------------------------------------------------------------------

class ExactLayerNorm(nn.Module):
    """:func:`~polca.models.decoder.layer_norm` on a module's own parameters (either may be
    ``None``), computed in at least float32 and never below the input's precision."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return layer_norm(wide, self.weight, self.bias, self.eps).to(x.dtype)


class ExactRMSNorm(nn.Module):
    """``(offset + weight) * x / sqrt(mean(x²) + eps)`` (offset 1 for Gemma's ``1 + weight``),
    computed in at least float32 like Llama's but never below the input's precision (so
    float64 stays float64)."""

    def __init__(self, weight: nn.Parameter | None, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight, self.eps, self.offset = weight, eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed if self.weight is None else (self.weight + self.offset) * normed


_EXACT = (ExactLayerNorm, ExactRMSNorm, nn.RMSNorm)  # F.rms_norm is exact under jvp-of-jvp
_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


def _candidates(module: nn.Module) -> Iterator[nn.Module]:
    """Exact modules that may compute what ``module`` computes, most likely first."""
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    eps = next((getattr(module, a) for a in _EPS_ATTRIBUTES
                if isinstance(getattr(module, a, None), float)), None)
    kinds = ("rms", "layer") if "RMS" in type(module).__name__ else ("layer", "rms")
    # OLMo's LayerNorm has no eps attribute (1e-5 is written in its forward)
    for e in (eps,) if eps is not None else (1e-5, 1e-6):
        for kind in kinds:
            if kind == "layer":
                yield ExactLayerNorm(weight, bias, e)
            elif bias is None:
                yield ExactRMSNorm(weight, e)
                if weight is not None:
                    yield ExactRMSNorm(weight, e, offset=1.0)


def _width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[-1]
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def _exact_equivalent(name: str, module: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """The exact replacement of a normalisation module, or ``None`` if it needs none.

    A module is a normalisation when it is an ``nn.LayerNorm`` or its class name ends in
    ``Norm``; its replacement is the first candidate that reproduces it (see
    :func:`_reproduces`), and a normalisation no candidate reproduces is an error.
    """
    kind = type(module).__name__
    if isinstance(module, _EXACT) or not (isinstance(module, nn.LayerNorm) or kind.endswith("Norm")):
        return None
    params = dict(module.named_parameters(recurse=False))
    width = _width(module)
    if (set(params) - {"weight", "bias"} or any(p.ndim != 1 for p in params.values())
            or width is None):
        raise NotImplementedError(
            f"module {name} ({kind}, parameters {[(n, tuple(p.shape)) for n, p in params.items()]})"
            " is a normalisation polca has no exact forward-mode replacement for; open an "
            "issue with the model name")
    for candidate in _candidates(module):
        if _reproduces(module, candidate, width, dtype):
            return candidate
    raise NotImplementedError(
        f"module {name} ({kind}) is not a standard LayerNorm or RMSNorm (none reproduces its "
        "output); polca cannot replace it by an exact forward-mode equivalent. Open an issue "
        "with the model name")


@torch.no_grad()
def _reproduces(original: nn.Module, exact: nn.Module, width: int, dtype: torch.dtype) -> bool:
    """Same output on random inputs at unit scale and at the scale where eps matters, with the
    module's own parameters and with random ones (so the formula, not the values, agrees)."""
    generator = torch.Generator().manual_seed(0)
    params = dict(original.named_parameters(recurse=False))
    eps = exact.eps
    settings = [params, {n: torch.randn(p.shape, generator=generator).to(p) + 1
                         for n, p in params.items()}]
    for scale in (3.0, eps ** 0.5):
        x = (torch.randn(3, width, generator=generator) * scale + scale / 3).to(dtype)
        for values in settings:
            expected = functional_call(original, values, (x,))
            got = functional_call(exact, values, (x,))
            # same formula up to rounding; HF norms may compute in float32 for a float64 model
            coarse = dtype if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps else (
                torch.float32)
            tol = 50 * torch.finfo(coarse).eps * float(expected.abs().max().clamp_min(1))
            if expected.shape != got.shape or not torch.allclose(expected, got, rtol=0, atol=tol):
                return False
    return True


def make_forward_exact(model: nn.Module) -> list[str]:
    """Replace, in place, every normalisation module whose forward-mode second derivative or
    precision may be wrong by an exact equivalent sharing its parameters; returns the replaced
    module names. Each replacement is checked against the original (:func:`_reproduces`).
    """
    dtype = next(model.parameters()).dtype
    replaced = []
    for name, module in list(model.named_modules()):
        exact = _exact_equivalent(name, module, dtype)
        if exact is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, exact)
        replaced.append(name)
    return replaced


# -- exact attention ------------------------------------------------------------------------------

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


# registered on import too: a model unpickled in another process (a Ray worker) finds it
AttentionInterface.register(EXACT_ATTENTION, exact_attention)
AttentionMaskInterface.register(EXACT_ATTENTION, eager_mask)


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
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return exact_attention(*args, **kwargs)

    ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()  # dropout off for the comparison
    try:
        with torch.no_grad(), _quiet_transformers():
            model.set_attn_implementation("eager")
            expected = model(input_ids=ids, use_cache=False).logits
            AttentionInterface.register(EXACT_ATTENTION, counted)
            model.set_attn_implementation(EXACT_ATTENTION)
            got = model(input_ids=ids, use_cache=False).logits
    finally:
        AttentionInterface.register(EXACT_ATTENTION, exact_attention)
        model.train(training)
    if not calls:  # the model computes attention in its own code, which polca cannot check
        model.set_attn_implementation("eager")
        raise NotImplementedError(
            f"{type(model).__name__} does not use transformers' AttentionInterface, so polca "
            "cannot give it an exact float64 attention; this architecture is not supported. "
            "Open an issue with the model name")
    # HF's float32 softmax differs from ours by float32 rounding, far below any structural error
    tol = 1e-4 * float(expected.abs().max().clamp_min(1))
    if not torch.allclose(expected, got, rtol=0, atol=tol):
        model.set_attn_implementation("eager")
        raise NotImplementedError(
            f"{type(model).__name__}: polca's exact attention does not reproduce the model's "
            f"eager attention (max logit difference {(expected - got).abs().max():.3g}); this "
            "architecture is not supported yet. Open an issue with the model name"
        )


class HFTokenLoss(ModuleTokenLoss):
    """A Hugging Face causal LM as a :class:`~polca.functional.TokenLoss`.

    The model is prepared in place: eval mode, no key/value cache, exact attention and
    normalisation modules (see :func:`use_exact_attention`, :func:`make_forward_exact`).
    Parameters are named as in ``model.named_parameters()`` (tied weights once, e.g. GPT-2's
    ``transformer.wte.weight`` also serves as the head).

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
        model.config.use_cache = False  # a key/value cache is for generation; here it only costs
        super().__init__(model, include=include, **kwargs)

    def logits(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, vocab]`` logits (the ``logits`` field of the model's output)."""
        return super().logits(theta, input_ids).logits


# -- loading checkpoints through transformers ------------------------------------------------------

@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load report off (polca reports what matters)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files transformers loads from a checkpoint directory: its safetensors files
    (one, or the shards of ``model.safetensors.index.json``), else its ``pytorch_model*.bin``."""
    path = Path(path)
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise CheckpointSeriesError(
        f"{path} has no weights (model.safetensors, sharded safetensors, or pytorch_model.bin)")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float64,
                    config=None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a local checkpoint directory, in ``dtype``,
    eager attention, eval mode. Local files only; safetensors when the folder has them, else
    ``pytorch_model.bin`` through a weights-only unpickler (a pickle that would run code is
    refused, never executed). A parameter the checkpoint lacks is an error, never a random
    initialisation; tensors the model does not use are ignored with a warning.
    """
    path = Path(path)
    safetensors = weight_files(path)[0].suffix == ".safetensors"
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), config=config, local_files_only=True, use_safetensors=safetensors,
                weights_only=True, dtype=dtype, attn_implementation="eager",
                output_loading_info=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling error"
        raise CheckpointSeriesError(
            f"{path} holds a pytorch_model.bin that is not weights-only and was NOT loaded: "
            f"unpickling it could run arbitrary code ({first_line}). If you trust it, convert it "
            "once: model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=False, "
            "weights_only=False); model.save_pretrained(path)") from None
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointSeriesError(
            f"transformers cannot load {path} ({type(err).__name__}: {first_line})") from None
    missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    if missing:
        raise CheckpointSeriesError(
            f"{path} lacks parameters {missing[:5]} of {type(model).__name__} (or has them in "
            "another shape); is it a checkpoint of this architecture?")
    if info["unexpected_keys"]:
        warnings.warn(f"checkpoints of {type(model).__name__} hold tensors the model does not "
                      f"use ({sorted(info['unexpected_keys'])[:5]}); they are ignored",
                      stacklevel=2)
    return model.eval()


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype of the first floating tensor in a checkpoint's safetensors files (read from
    their headers only), else the ``dtype``/``torch_dtype`` its config.json states, else None."""
    for file in weight_files(path):
        if file.suffix != ".safetensors":
            break
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            for key in names:
                dtype = handle.get_slice(key).get_dtype()
                torch_dtype = _SAFETENSORS_DTYPES.get(dtype)
                if torch_dtype is not None:
                    return torch_dtype
    stated = read_config(path)
    name = stated.get("dtype") or stated.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}


def weights_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the names and contents of a checkpoint's :func:`weight_files`.

    In a hub cache a file is a link to ``blobs/<sha256 of its content>`` (the hub's content
    addressing of large files), so that name is used without reading the file.
    """
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.name.encode())
        digest.update(_file_sha256(file).encode())
    return digest.hexdigest()


def _file_sha256(file: Path) -> str:
    if file.is_symlink():  # the first hop, as huggingface_hub's scan_cache_dir reads it
        blob = Path(os.path.abspath(file.parent / os.readlink(file)))
        if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
            return blob.name
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


class HFCheckpointSeries(StateSeries):
    """An ordered series of Hugging Face checkpoint directories of one architecture.

    ``load(step)`` returns the checkpoint's parameters in ``dtype``, keyed by the model's
    parameter names (see :class:`StateSeries` for the rest of the reader interface).

    Args:
        entries: ``[(step, checkpoint directory)]`` in step order.
        dtype: the analysis dtype every checkpoint is cast to from its stored dtype.
        revisions: ``{step: hub revision}`` of a hub cache series.
        repo_id: the hub repository (``"EleutherAI/pythia-70m"``) of a hub cache series.
        tokens_per_step: training tokens per optimizer step; default: Pythia's published
            :data:`PYTHIA_TOKENS_PER_STEP` for ``EleutherAI/pythia-*``, otherwise unknown.

    ``fingerprints``, ``duplicates`` and ``metadata`` (which holds both) read the weight
    files' hashes on first use: a run source should read ``metadata`` when it creates a run,
    so the duplicate warning is shown and recorded.
    """

    def __init__(self, entries: Sequence[tuple[int, Path]], *, dtype: torch.dtype = torch.float64,
                 revisions: Mapping[int, str] | None = None, repo_id: str | None = None,
                 tokens_per_step: int | None = None):
        super().__init__(entries, reader=self._read)
        self.dtype, self.repo_id = dtype, repo_id
        self.revisions = dict(revisions) if revisions else None
        self.config_dict = read_config(self.paths[0])
        for path in self.paths[1:]:
            differ = architecture_difference(self.config_dict, read_config(path))
            if differ:
                raise CheckpointSeriesError(
                    f"checkpoints {self.paths[0]} and {path} have different architectures "
                    f"({differ}); a series must come from one run of one model"
                )
        self.config = AutoConfig.from_pretrained(str(self.paths[0]), local_files_only=True)
        self.checkpoint_dtype = stored_dtype(self.paths[0])
        if tokens_per_step is not None:
            self.tokens_per_step, self.tokens_per_step_source = int(tokens_per_step), "given"
        elif repo_id is not None and _PYTHIA_REPO.fullmatch(repo_id):
            self.tokens_per_step = PYTHIA_TOKENS_PER_STEP
            self.tokens_per_step_source = (
                "default for EleutherAI/pythia-*: Pythia's published batch of 1024 sequences x "
                "2048 tokens; pass tokens_per_step= if this run differs")
        else:
            self.tokens_per_step, self.tokens_per_step_source = None, "unknown"

    @cached_property
    def fingerprints(self) -> list[str]:
        """Weights hash per checkpoint (:func:`weights_fingerprint`), in step order; computed on
        first use (free in a hub cache, one read of every weight file otherwise)."""
        return [weights_fingerprint(p) for p in self.paths]

    @cached_property
    def duplicates(self) -> list[tuple[int, int]]:
        """``[(step, next step)]`` of consecutive checkpoints with identical weights; a warning
        names them when they are first looked for."""
        found = [(a, b) for (a, fa), (b, fb) in pairwise(zip(self.steps, self.fingerprints))
                 if fa == fb]
        if found:
            warnings.warn(
                f"consecutive checkpoints with identical weights at steps {found}: their "
                "interval has no parameter change (zero loss change, zero POLCA terms). Leave "
                "one of each pair out (steps=/revisions=) unless that is what you want",
                stacklevel=2)
        return found

    @property
    def tokens_seen(self) -> list[int] | None:
        """Training tokens seen at each checkpoint (``step × tokens_per_step``), or None."""
        if self.tokens_per_step is None:
            return None
        return [step * self.tokens_per_step for step in self.steps]

    @property
    def metadata(self) -> dict:
        """What a run directory records about this series (JSON-serialisable)."""
        tokens = self.tokens_seen
        return {
            "source": "hf", "repo_id": self.repo_id, "model_type": self.config.model_type,
            "checkpoint_dtype": str(self.checkpoint_dtype).removeprefix("torch."),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_step_source": self.tokens_per_step_source,
            "duplicates": [list(pair) for pair in self.duplicates],
            "checkpoints": [
                {"step": step, "path": str(path), "fingerprint": fingerprint,
                 "revision": (self.revisions or {}).get(step),
                 "tokens_seen": None if tokens is None else tokens[i]}
                for i, (step, path, fingerprint) in enumerate(
                    zip(self.steps, self.paths, self.fingerprints))],
        }

    def model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The series' first checkpoint as a model in ``dtype`` (default: the series'), eager
        attention, eval mode; the parameters analysed come from ``load(step)``."""
        return load_pretrained(self.paths[0], dtype or self.dtype, config=self.config)

    def token_loss(self, include: Sequence[str] | None = None,
                   dtype: torch.dtype | None = None) -> HFTokenLoss:
        """The seam for this series' model in ``dtype``; parameters outside ``include`` stay at
        the first checkpoint's values."""
        return HFTokenLoss(self.model(dtype), include=include)

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        # a whole from_pretrained per checkpoint: its model is built on the meta device, so
        # this costs about what reading the file does (benchmarks/bench_hf_adapter.py --loading)
        model = load_pretrained(path, self.dtype, config=self.config)
        return {name: p.detach() for name, p in model.named_parameters()}


def _trainer_step(path: Path) -> int | None:
    state = path / "trainer_state.json"
    if not state.is_file():
        return None
    step = json.loads(state.read_text()).get("global_step")
    return int(step) if step is not None else None


def hub_cache_repo(repo_cache: str | os.PathLike):
    """huggingface_hub's ``CachedRepoInfo`` of a local hub cache folder ``models--org--name``
    (its refs, snapshots and files, as ``scan_cache_dir`` reads them)."""
    root = Path(repo_cache).resolve()
    if not (root / "refs").is_dir():
        raise CheckpointSeriesError(f"{root} is not a hub cache repository (no refs/ folder)")
    info = scan_cache_dir(root.parent)
    for repo in info.repos:
        if repo.repo_path.resolve() == root:
            return repo
    problems = "; ".join(str(w) for w in info.warnings if str(root) in str(w))
    problems = problems or "its folder name must be models--ORG--NAME"
    raise CheckpointSeriesError(
        f"{root} is not a readable hub cache repository ({problems}); download it again with "
        "huggingface_hub.snapshot_download")


def hub_cache_revisions(repo_cache: str | os.PathLike,
                        revisions: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """``[(revision, snapshot dir)]`` of a local hub cache ``models--org--name``.

    Default: every ref whose name holds a step number (``step1000``); ``main`` and other
    refs without one are left out unless named in ``revisions``.
    """
    return _revisions_of(hub_cache_repo(repo_cache), revisions)


def _revisions_of(repo, revisions: Sequence[str] | None) -> list[tuple[str, Path]]:
    available = {ref: rev.snapshot_path for rev in repo.revisions for ref in rev.refs}
    if revisions is None:
        chosen = sorted(r for r in available if step_from_name(r) is not None)
        if not chosen:
            raise CheckpointSeriesError(
                f"no ref in {repo.repo_path / 'refs'} names a step ({sorted(available)}); pass "
                "revisions=[...] and steps=[...]"
            )
    else:
        unknown = [r for r in revisions if r not in available]
        if unknown:
            raise CheckpointSeriesError(
                f"revisions {unknown} are not in {repo.repo_path / 'refs'} (has "
                f"{sorted(available)[:10]}); download them first, e.g. "
                "huggingface_hub.snapshot_download(repo, revision=...)"
            )
        chosen = list(revisions)
    return [(rev, available[rev]) for rev in chosen]


def hf_series(source: str | os.PathLike | Sequence[str | os.PathLike],
              steps: Sequence[int] | None = None,
              revisions: Sequence[str] | None = None,
              dtype: torch.dtype = torch.float64,
              tokens_per_step: int | None = None) -> HFCheckpointSeries:
    """An ordered :class:`HFCheckpointSeries` from local files; nothing is downloaded.

    ``source`` is one of: a list of checkpoint directories; a glob pattern of them; a folder
    whose sub-folders are checkpoints (a Trainer ``output_dir``); a hub cache repository folder
    ``models--org--name`` (``revisions`` picks refs, default every ``step*`` ref); a series
    manifest ``.json`` (``{"checkpoints": [{"step", "path"}]}``, paths relative to it).
    ``dtype`` and ``tokens_per_step``: see :class:`HFCheckpointSeries`.
    """
    options = {"dtype": dtype, "tokens_per_step": tokens_per_step}
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".json"):
        entries = _read_series_manifest(Path(source))
        if steps is not None:
            raise CheckpointSeriesError("a series manifest gives the steps; do not pass steps=")
        return HFCheckpointSeries(order_by_step([p for _, p in entries], [s for s, _ in entries]),
                                  **options)
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "refs").is_dir():
        repo = hub_cache_repo(source)
        revision_of = {snapshot: rev for rev, snapshot in _revisions_of(repo, revisions)}

        def step_of(snapshot: Path) -> int | None:
            step = _trainer_step(snapshot)
            return step if step is not None else step_from_name(revision_of[snapshot])

        entries = order_by_step(list(revision_of), steps, step_of=step_of)
        return HFCheckpointSeries(entries, revisions={s: revision_of[p] for s, p in entries},
                                  repo_id=repo.repo_id, **options)
    dirs = expand_dirs(source, marker="config.json")
    return HFCheckpointSeries(order_by_step(dirs, steps, step_of=_trainer_step), **options)


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
    "PYTHIA_TOKENS_PER_STEP",
    "ExactLayerNorm",
    "ExactRMSNorm",
    "HFCheckpointSeries",
    "HFTokenLoss",
    "architecture_difference",
    "exact_attention",
    "hf_series",
    "hub_cache_repo",
    "hub_cache_revisions",
    "load_pretrained",
    "make_forward_exact",
    "stored_dtype",
    "use_exact_attention",
    "weight_files",
    "weights_fingerprint",
]
