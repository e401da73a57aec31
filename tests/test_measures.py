"""Progress measures on constructed inputs with known values, and against brute-force loops and
a hand-written forward pass of the 1-layer linear-attention model. The model's forward-mode
second derivatives are checked against the dense Hessian in float64."""

import itertools
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from torch.autograd.functional import hessian
from torch.func import jvp

from polca.config import parse_config
from polca.functional import ModuleTokenLoss
from polca.measures import (
    attention_progress,
    checkpoint_measures,
    compute_measures,
    greedy_outputs,
    pairwise_cosine,
    plateau_summary,
    position_accuracy,
    reference_measures,
    repetition_frequency,
    representation_collapse,
    sequence_entropy,
    weight_norms,
)
from polca.models.decoder import Decoder, DecoderConfig
from polca.report.plateau import measures_with_breaks, plateau_figure
from polca.stages.common import open_run
from polca.stages.measures import run_measures
from polca.stages.train import run_train
from polca.tasks.plateau import MovingWindowSum


def one_hot_logits(next_token, vocab):
    """A causal 'model' whose prediction at each position is ``next_token(ids)`` there."""
    def logits_fn(ids):
        return torch.nn.functional.one_hot(next_token(ids), vocab).double()
    return logits_fn


def test_greedy_generation_of_a_repeating_model():
    prompt = torch.tensor([[4, 7, 2, 0, 0, 0], [1, 1, 5, 0, 0, 0]])
    positions = torch.tensor([2, 3, 4, 5])
    copy_last = one_hot_logits(lambda ids: ids, 9)  # predicts the token it reads: repeats it
    out = greedy_outputs(copy_last, prompt, positions)
    assert out.tolist() == [[2, 2, 2, 2], [5, 5, 5, 5]]
    assert repetition_frequency(out) == 1.0 and sequence_entropy(out) == 0.0
    # a model that adds one: the chain must feed each generated token back in
    plus_one = one_hot_logits(lambda ids: (ids + 1) % 9, 9)
    assert greedy_outputs(plus_one, prompt, positions).tolist() == [[3, 4, 5, 6], [6, 7, 8, 0]]


def test_repetition_entropy_and_accuracy_against_loops():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randint(0, 4, (50, 7), generator=g)
    targets = torch.randint(0, 4, (50, 7), generator=g)
    pairs = same = 0
    entropies = []
    for row in outputs.tolist():
        for a, b in itertools.pairwise(row):
            pairs, same = pairs + 1, same + (a == b)
        counts = Counter(row)
        entropies.append(-sum(c / 7 * math.log(c / 7) for c in counts.values()))
    assert repetition_frequency(outputs) == pytest.approx(same / pairs, abs=1e-15)
    assert sequence_entropy(outputs) == pytest.approx(sum(entropies) / 50, abs=1e-12)
    per_position = [sum(outputs[b, j] == targets[b, j] for b in range(50)) / 50 for j in range(7)]
    torch.testing.assert_close(position_accuracy(outputs, targets),
                               torch.tensor(per_position, dtype=torch.float64))
    assert sequence_entropy(torch.arange(8)[None]) == pytest.approx(math.log(8))


def test_representation_collapse_known_values_and_loops():
    same = torch.randn(5, 1, 6).expand(5, 4, 6)  # every output position has the same state
    assert representation_collapse(same) == pytest.approx(1.0)
    orthogonal = torch.eye(4)[None].expand(3, 4, 4) * 2.5
    assert representation_collapse(orthogonal) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    total, count = 0.0, 0
    for i in range(1, 5):           # output 0 excluded, as the paper leaves out y1
        for j in range(i + 1, 5):
            cos = [float(hidden[b, i] @ hidden[b, j] / hidden[b, i].norm() / hidden[b, j].norm())
                   for b in range(6)]
            total, count = total + sum(cos) / 6, count + 1
    assert representation_collapse(hidden, exclude=[0]) == pytest.approx(total / count, abs=1e-12)
    assert pairwise_cosine(hidden).diagonal().tolist() == pytest.approx([1.0] * 5)
    with pytest.raises(ValueError, match="two outputs"):
        representation_collapse(hidden[:, :2], exclude=[0])


def test_attention_progress_known_value_and_loops():
    targets = torch.tensor([[True, False, False], [True, True, False]])
    # row 0 puts 1 on its target and -1 (absolute value 1) elsewhere: 1 of 2;
    # row 1 puts 3 and 1 on its targets and 4 elsewhere: 4 of 8; together 5 of 10
    pattern = torch.tensor([[[[1.0, -1.0, 0.0], [3.0, 1.0, 4.0]]]])
    assert attention_progress(pattern, targets) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(2)
    pattern = torch.randn(4, 2, 2, 3, generator=g, dtype=torch.float64)
    shares = []
    for b in range(4):
        on = off = 0.0
        for h in range(2):
            for q in range(2):
                for k in range(3):
                    value = abs(float(pattern[b, h, q, k]))
                    on, off = (on + value, off) if targets[q, k] else (on, off + value)
        shares.append(on / (on + off))
    assert attention_progress(pattern, targets) == pytest.approx(sum(shares) / 4, abs=1e-12)
    with pytest.raises(ValueError, match="attention targets"):
        attention_progress(pattern, targets[:, :2])


def tiny_task_and_model(seed=0):
    task = MovingWindowSum(n_inputs=5, n_probe=12, seed=seed)
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(task.vocab_size, task.sequence_length, n_layers=1, d_model=8,
                                  n_heads=1, d_mlp=16, attention="linear"))
    with torch.no_grad():  # away from the initialisation, so attention is not uniform noise
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return task, model


def test_weight_norms_match_a_hand_sum():
    _, model = tiny_task_and_model()
    space = ModuleTokenLoss(model).space
    norms = weight_norms(space, space.flatten(model.state_dict()))
    squares = 0.0
    for name, p in model.named_parameters():
        tensor_squares = sum(float(v) ** 2 for v in p.detach().reshape(-1))
        assert norms[f"weight_norm/{name}"] == pytest.approx(math.sqrt(tensor_squares), rel=1e-6)
        squares += tensor_squares
    assert norms["weight_norm"] == pytest.approx(math.sqrt(squares), rel=1e-6)


def hand_forward(model, ids):
    """Attention pattern and pre-head states of a 1-layer 1-head linear-attention decoder,
    written out with torch.nn.functional (not the model's own methods)."""
    f = torch.nn.functional
    block, d = model.blocks[0], model.cfg.d_model
    x = model.token_embedding.weight[ids] + model.position_embedding.weight[: ids.shape[1]]
    h = f.layer_norm(x, (d,), block.ln_attn.weight, block.ln_attn.bias, eps=1e-5)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(d, dim=-1)
    pattern = torch.tril(q @ k.transpose(1, 2) / math.sqrt(d))
    x = x + (pattern @ v) @ block.attn.out.weight.T + block.attn.out.bias
    m = f.layer_norm(x, (d,), block.ln_mlp.weight, block.ln_mlp.bias, eps=1e-5)
    x = x + f.gelu(m @ block.mlp_in.weight.T + block.mlp_in.bias) @ block.mlp_out.weight.T \
        + block.mlp_out.bias
    final = f.layer_norm(x, (d,), model.ln_final.weight, model.ln_final.bias, eps=1e-5)
    return pattern, final


@torch.no_grad()
def test_checkpoint_measures_match_a_hand_written_forward_and_loop_generation():
    task, model = tiny_task_and_model()
    probe = task.train_batch(0, 12)
    result = checkpoint_measures(model, probe, task.attention_targets(), task.early_outputs,
                                 batch_size=5)
    positions = task.output_positions
    pattern, final = hand_forward(model, probe.input_ids)
    mask = torch.as_tensor(task.attention_targets())
    expected_apm = np.mean([float((pattern[b, positions].abs() * mask).sum()
                                  / pattern[b, positions].abs().sum()) for b in range(12)])
    assert result["attention_progress"] == pytest.approx(expected_apm, rel=1e-5)
    assert result["cosine"] == pytest.approx(
        representation_collapse(final[:, positions], exclude=[0]), rel=1e-5)
    # greedy generation by growing the prefix one token at a time
    generated = []
    for row in probe.input_ids:
        prefix = row[: task.prompt_length].tolist()
        for _ in range(task.n_outputs):
            prefix.append(int(model(torch.tensor([prefix]))[0, -1].argmax()))
        generated.append(prefix[task.prompt_length:])
    generated = torch.tensor(generated)
    truth = probe.input_ids[:, task.prompt_length:]
    for j in range(task.n_outputs):
        assert result[f"accuracy_out{j:02d}"] == pytest.approx(
            float((generated[:, j] == truth[:, j]).double().mean()))
    assert result["repetition"] == pytest.approx(repetition_frequency(generated))
    logp = torch.log_softmax(model(probe.input_ids), -1)
    loss = -logp[probe.scored].gather(1, probe.targets[probe.scored][:, None]).mean()
    assert result["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert reference_measures(probe)["repetition"] == pytest.approx(
        repetition_frequency(truth))


def test_compute_measures_takes_state_dicts_or_thetas_and_leaves_the_model_alone():
    task, model = tiny_task_and_model()
    _, other = tiny_task_and_model(seed=1)
    probe = task.train_batch(3, 8)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    theta = ModuleTokenLoss(model).space.flatten(other.state_dict())
    table = compute_measures(model, task, [(0, model.state_dict()), (10, theta)], probe)
    assert table.index.tolist() == [0, 10]
    direct = checkpoint_measures(other, probe, task.attention_targets(), task.early_outputs)
    assert table.loc[10].to_dict() == pytest.approx(direct)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_forward_mode_second_derivative_is_exact_for_one_linear_attention_head():
    task = MovingWindowSum(n_inputs=3, max_value=4, modulus=5, n_probe=2)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(task.vocab_size, task.sequence_length, n_layers=1, d_model=4,
                                  n_heads=1, d_mlp=8, attention="linear")).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    probe = task.train_batch(0, 2)
    loss = ModuleTokenLoss(model)
    theta = loss.space.flatten(dict(model.named_parameters())).detach()
    v = torch.randn(loss.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    first, second = jvp(lambda t: jvp(lambda s: loss(s, probe), (t,), (v,))[1], (theta,), (v,))
    for x in range(probe.n_tokens):
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(t, probe)[x], t)
        dense = hessian(lambda t, x=x: loss(t, probe)[x], theta, vectorize=True)
        torch.testing.assert_close(first[x], grad @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(second[x], v @ dense @ v, rtol=1e-9, atol=1e-10)


def test_plateau_summary_and_figures_on_a_constructed_table():
    steps = np.arange(0, 100, 10)
    rest = np.where(steps >= 60, 1.0, 0.05)
    table = pd.DataFrame({
        "loss": 3 - 2.5 * rest, "accuracy": rest, "accuracy_out00": np.where(steps >= 20, 1, 0.),
        "accuracy_out01": rest, "accuracy_out02": rest,
        "repetition": np.where(steps < 60, 0.8, 0.05), "entropy": 1 + rest,
        "cosine": np.where((steps > 0) & (steps < 60), 0.95, 0.1),
        "attention_progress": steps / 100, "weight_norm": 10 + steps / 10,
        "weight_norm/a": 1 + steps / 10, "weight_norm/b": np.zeros(10)},
        index=pd.Index(steps, name="step"))
    summary = plateau_summary(table)
    assert summary["drop_step"] == 60 and summary["first_output_learned_step"] == 20
    assert summary["repetition_peak_before_drop"] == 0.8 and summary["cosine_final"] == 0.1
    assert summary["attention_progress_at_drop"] == pytest.approx(0.6)
    fig = plateau_figure(table)
    assert len(fig.axes) == 8
    fig = measures_with_breaks(table, [15, 45], measures=["cosine", "repetition"])
    assert [line.get_xdata()[0] for line in fig.axes[0].lines[1:]] == [15, 45]
    with pytest.raises(KeyError, match="not in the table"):
        measures_with_breaks(table, [1], measures=["nothing"])


def test_stage_stores_one_row_per_checkpoint_and_resumes(tmp_path, monkeypatch):
    cfg = parse_config({
        "name": "m", "task": {"kind": "moving_window_sum", "n_probe": 6,
                              "options": {"n_inputs": 4}},
        "model": {"n_layers": 1, "n_heads": 1, "d_model": 8, "attention": "linear"},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 0},
        "checkpoints": {"every": 2}})
    ctx = open_run(tmp_path / "run", cfg)
    run_train(ctx, progress=False)
    run_measures(ctx, progress=False)
    table = ctx.run.read_measures()
    assert table.index.tolist() == [0, 2, 4]
    direct = compute_measures(ctx.model, ctx.task,
                              [(s, ctx.checkpoints.load(s)) for s in ctx.checkpoints.steps],
                              ctx.probe)
    pd.testing.assert_frame_equal(table, direct, check_dtype=False, rtol=1e-6)
    assert table.attrs["reference"] == reference_measures(ctx.probe)
    # lose checkpoint 1's row: only it is recomputed
    arrays = ctx.run.arrays()
    arrays.group["measures"][1, :] = np.nan
    (arrays.progress / "measures" / "1").unlink()
    calls = []
    import polca.stages.measures as stage
    original = stage.checkpoint_measures
    monkeypatch.setattr(stage, "checkpoint_measures",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    run_measures(ctx, progress=False)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(ctx.run.read_measures(), table)
