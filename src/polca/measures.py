"""Progress measures per checkpoint (METHOD §8), as defined by Gopalani & Hu (NeurIPS 2025).

Pure functions on tensors, then :func:`checkpoint_measures` / :func:`compute_measures` that
evaluate them for a model on a probe set whose rows share the same scored (output) positions:

* ``accuracy`` and ``accuracy_outJJ``: greedy autoregressive generation from the prompt, the
  fraction of outputs (at output index JJ) equal to the target (the paper's per-position check).
* ``repetition``: fraction of adjacent output pairs whose greedy tokens are equal,
  ρ = mean over sequences and i = 1…n−1 of 1[ŷᵢ₊₁ = ŷᵢ] (the paper's ``model_repeat_frac``).
* ``entropy``: mean over sequences of the entropy (nats) of the token histogram of the greedy
  output sequence (the paper's sequence entropy, without its 1e-6 smoothing).
* ``cosine``: representation collapse; the cosine of the pre-head hidden states (after the
  final LayerNorm) of two output positions, averaged over sequences, then over all pairs of
  output positions outside the task's ``early_outputs`` (the paper leaves out y₁ on MWS).
* ``attention_progress``: Σ_{Ω}|A| / Σ|A| over the output query rows of one layer's attention
  (all heads), per sequence, then averaged; Ω is the task's ``attention_targets()``. Absolute
  values because linear attention weights can be negative (as the paper does).
* ``weight_norm`` (L2 of θ) and ``weight_norm/<tensor>`` per parameter tensor.
* ``loss``: the mean teacher-forced token loss of the probe set.

Example:
    >>> outputs = torch.tensor([[3, 3, 3, 5], [1, 2, 3, 4]])
    >>> repetition_frequency(outputs)            # (2 + 0) / 6 pairs
    0.3333333333333333
    >>> round(sequence_entropy(outputs), 4)       # (H(¾,¼) + log 4) / 2
    0.9743
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from polca.functional import ModuleTokenLoss, ParameterSpace, ProbeBatch, next_token_losses


# -- the measures, on tensors ------------------------------------------------------------------
def has_output_positions(batch: ProbeBatch) -> bool:
    """Whether every row scores the same positions (a prompt followed by outputs), which the
    measures of generated outputs need."""
    return bool((batch.scored == batch.scored[0]).all()) and bool(batch.scored[0].any())


def output_positions(batch: ProbeBatch) -> torch.Tensor:
    """``[outputs]`` scored positions, which must be the same in every row (prompt, outputs)."""
    if not has_output_positions(batch):
        raise ValueError("progress measures need probe rows that share their scored positions "
                         "(a prompt followed by outputs), as the loss-plateau tasks have")
    return batch.scored[0].nonzero()[:, 0]


@torch.no_grad()
def greedy_outputs(logits_fn: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """``[batch, outputs]`` greedy tokens generated from the prompt before ``positions[0]``.

    ``logits_fn(ids [batch, length]) -> [batch, length, vocab]`` is called on the prefix up to
    each output position; each generated token is written after its position before the next
    output is predicted.
    """
    ids = input_ids.clone()
    out = torch.empty(len(ids), len(positions), dtype=torch.long, device=ids.device)
    for j, p in enumerate(positions.tolist()):
        out[:, j] = logits_fn(ids[:, : p + 1])[:, p].argmax(-1)
        if p + 1 < ids.shape[1]:
            ids[:, p + 1] = out[:, j]
    return out


def position_accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[outputs]`` fraction of sequences whose token at each output index is right."""
    return (predicted == targets).double().mean(0)


def repetition_frequency(outputs: torch.Tensor) -> float:
    """Fraction of adjacent pairs of ``outputs [batch, outputs]`` holding the same token."""
    if outputs.shape[1] < 2:
        raise ValueError("repetition frequency needs at least two outputs per sequence")
    return float((outputs[:, 1:] == outputs[:, :-1]).double().mean())


def sequence_entropy(outputs: torch.Tensor) -> float:
    """Mean over rows of the entropy (nats) of each row's token histogram, ``[batch, outputs]``."""
    counts = torch.zeros(len(outputs), int(outputs.max()) + 1, dtype=torch.float64,
                         device=outputs.device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float64))
    p = counts / outputs.shape[1]
    return float(-(p * torch.log(torch.where(p > 0, p, 1.0))).sum(1).mean())


def pairwise_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """``[outputs, outputs]`` cosine of the states of two outputs, mean over the batch.

    ``hidden`` is ``[batch, outputs, d]``.
    """
    unit = hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.einsum("bid,bjd->ij", unit, unit) / len(hidden)


def representation_collapse(hidden: torch.Tensor, exclude: Sequence[int] = ()) -> float:
    """Mean pairwise cosine over distinct output pairs outside ``exclude``, ``[batch, outputs, d]``."""
    keep = [i for i in range(hidden.shape[1]) if i not in set(exclude)]
    if len(keep) < 2:
        raise ValueError(f"need two outputs outside exclude={list(exclude)} to compare")
    cos = pairwise_cosine(hidden[:, keep])
    upper = torch.triu_indices(len(keep), len(keep), offset=1)
    return float(cos[upper[0], upper[1]].mean())


def attention_progress(pattern: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of |attention| on the optimal keys, per sequence, averaged over the batch.

    ``pattern [batch, heads, outputs, keys]`` is the attention of the output query rows;
    ``targets [outputs, keys]`` (bool) marks the optimal keys of each output.
    """
    if pattern.shape[-2:] != targets.shape:
        raise ValueError(f"attention rows/keys {tuple(pattern.shape[-2:])} do not match the "
                         f"task's attention targets {tuple(targets.shape)}")
    weight = pattern.abs()
    on_target = (weight * targets.to(weight.dtype)).sum(dim=(1, 2, 3))
    return float((on_target / weight.sum(dim=(1, 2, 3))).mean())


def weight_norms(space: ParameterSpace, theta: torch.Tensor) -> dict[str, float]:
    """``{"weight_norm": ‖θ‖₂, "weight_norm/<tensor>": ‖θ_tensor‖₂ …}``."""
    norms = {"weight_norm": float(theta.norm())}
    for name, tensor in space.unflatten(theta).items():
        norms[f"weight_norm/{name}"] = float(tensor.norm())
    return norms


# -- a model on a probe set --------------------------------------------------------------------
@torch.no_grad()
def checkpoint_measures(
    model: nn.Module,
    probe: ProbeBatch,
    attention_targets: np.ndarray | torch.Tensor | None = None,
    early_outputs: Sequence[int] = (),
    layer: int = -1,
    batch_size: int = 512,
) -> dict[str, float]:
    """Every measure for ``model`` as it is now (one checkpoint).

    ``loss`` and the weight norms are always there. The measures of greedy outputs need probe
    rows that share their scored positions (:func:`has_output_positions`; a free-form probe
    such as a jsonl task's gets only loss and norms), ``repetition`` and ``cosine`` need two
    such outputs. ``cosine`` and ``attention_progress`` need the built-in
    :class:`~polca.models.decoder.Decoder` (``hidden_states``, ``attention_pattern``);
    ``attention_progress`` also needs ``attention_targets [outputs, seq]``."""
    outputs = has_output_positions(probe)
    positions = output_positions(probe) if outputs else None
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters()))
    internals = outputs and hasattr(model, "hidden_states") and hasattr(model, "blocks")
    losses, generated, hidden, patterns = [], [], [], []
    for chunk in probe.split(batch_size):
        logits = model(chunk.input_ids)
        losses.append(next_token_losses(logits, chunk))
        if outputs:
            generated.append(greedy_outputs(model, chunk.input_ids, positions))
        if internals:
            states = model.hidden_states(chunk.input_ids)
            hidden.append(model.ln_final(states[-1])[:, positions])
            block = model.blocks[layer]
            block_input = states[layer % len(model.blocks)]
            patterns.append(block.attn.attention_pattern(block.ln_attn(block_input))
                            [:, :, positions])
    result = {"loss": float(torch.cat(losses).mean())}
    if outputs:
        generated = torch.cat(generated)
        accuracy = position_accuracy(generated, probe.targets[:, positions])
        result["accuracy"] = float(accuracy.mean())
        result.update({f"accuracy_out{j:02d}": float(a) for j, a in enumerate(accuracy)})
        if len(positions) >= 2:
            result["repetition"] = repetition_frequency(generated)
        result["entropy"] = sequence_entropy(generated)
    if internals:
        if len(set(range(len(positions))) - set(early_outputs)) >= 2:
            result["cosine"] = representation_collapse(torch.cat(hidden), exclude=early_outputs)
        if attention_targets is not None:
            targets = torch.as_tensor(np.asarray(attention_targets), device=theta.device)
            result["attention_progress"] = attention_progress(torch.cat(patterns), targets)
    result.update(weight_norms(loss.space, theta.detach()))
    return result


def reference_measures(probe: ProbeBatch) -> dict[str, float]:
    """Repetition and entropy of the true outputs (what a perfect model reaches); empty when
    the probe rows do not share their output positions."""
    if not has_output_positions(probe):
        return {}
    truth = probe.targets[:, output_positions(probe)]
    reference = {"repetition": repetition_frequency(truth)} if truth.shape[1] >= 2 else {}
    return reference | {"entropy": sequence_entropy(truth)}


def task_measure_inputs(task) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """``(attention_targets [outputs, seq] or None, early_outputs)`` of a task, where it has them."""
    targets = task.attention_targets() if hasattr(task, "attention_targets") else None
    return targets, tuple(getattr(task, "early_outputs", ()))


def compute_measures(
    model: nn.Module,
    task,
    checkpoints: Iterable[tuple[int, Mapping[str, torch.Tensor] | torch.Tensor]],
    probe: ProbeBatch,
    layer: int = -1,
    batch_size: int = 512,
) -> pd.DataFrame:
    """``[checkpoint × measure]`` table, index ``step``, for ``(step, state dict or θ [d])``
    pairs. ``model`` is not modified (a copy takes each checkpoint's parameters); ``task``
    supplies ``attention_targets()`` and ``early_outputs`` when it has them.

    Example:
        >>> from polca.tasks.plateau import MovingWindowSum
        >>> from polca.models.decoder import Decoder, DecoderConfig
        >>> task = MovingWindowSum(n_probe=8)
        >>> model = Decoder(DecoderConfig(task.vocab_size, task.sequence_length, 1, 16, 1))
        >>> probe = task.train_batch(0, 8)
        >>> table = compute_measures(model, task, [(0, model.state_dict())], probe)
        >>> bool(0 < table.loc[0, "attention_progress"] < 1)
        True
    """
    work = copy.deepcopy(model)
    space = ParameterSpace({n: p.shape for n, p in work.named_parameters()})
    targets, early = task_measure_inputs(task)
    rows = {}
    for step, params in checkpoints:
        state = space.unflatten(params) if isinstance(params, torch.Tensor) else params
        work.load_state_dict(dict(state), strict=False)
        rows[int(step)] = checkpoint_measures(work, probe, targets, early, layer, batch_size)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "step"
    return table


def plateau_summary(table: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of a measures table: the step where greedy accuracy of the outputs
    after the first reaches half its final value (the drop), and the peaks before it."""
    later = [c for c in table.columns if c.startswith("accuracy_out") and c != "accuracy_out00"]
    rest = table[later].mean(axis=1)
    low, high = rest.iloc[0], rest.max()
    drop = rest.index[np.argmax((rest >= low + 0.5 * (high - low)).to_numpy())]
    before = table.loc[:drop]
    summary = {"drop_step": float(drop), "first_output_learned_step": float(
        table.index[np.argmax((table["accuracy_out00"] >= 0.9).to_numpy())]
        if (table["accuracy_out00"] >= 0.9).any() else math.nan)}
    for name in ("repetition", "cosine"):
        if name in table:
            summary[f"{name}_peak_before_drop"] = float(before[name].max())
            summary[f"{name}_final"] = float(table[name].iloc[-1])
    if "attention_progress" in table:
        summary["attention_progress_start"] = float(table["attention_progress"].iloc[0])
        summary["attention_progress_at_drop"] = float(table.loc[drop, "attention_progress"])
        summary["attention_progress_final"] = float(table["attention_progress"].iloc[-1])
    return summary
