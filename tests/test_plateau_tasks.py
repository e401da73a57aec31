"""Loss-plateau tasks, checked by brute force: Python loops recompute every output and label
from the decoded sequences; attention targets are compared with lists written from the paper's
definitions."""

import numpy as np
import pytest

from polca.config import parse_config
from polca.tasks import make_task
from polca.tasks.plateau import MovingWindowSum, PrefixSum, ReversedAddition


def integer_rows(task, sequences):
    """(inputs, outputs) as Python lists, parsed from the decoded text."""
    for text in sequences.text:
        inputs, outputs = text.split(" | ")
        yield [int(v) for v in inputs.split()], [int(v) for v in outputs.split()]


def check_scoring(task, sequences, tokens):
    assert len(tokens) == len(sequences) * task.n_outputs
    for tok in tokens.itertuples():
        ids = sequences.input_ids[tok.sequence]
        assert ids[tok.position + 1] == tok.target
        assert tok.position == task.prompt_length - 1 + tok.out_position
        assert tok.context == task.decode(ids[: tok.position + 1])


@pytest.mark.parametrize("window", [1, 2, 3])
def test_moving_window_sum_matches_loops(window):
    task = MovingWindowSum(n_inputs=6, max_value=9, modulus=11, window=window, n_probe=30,
                           seed=4)
    sequences, tokens = task.probe_set()
    check_scoring(task, sequences, tokens)
    for s, (x, y) in enumerate(integer_rows(task, sequences)):
        assert len(x) == 6 and all(1 <= v <= 9 for v in x)
        expected = []
        for i in range(6):
            if i < window - 1:
                expected.append(x[i])
            else:
                total = 0
                for j in range(i - window + 1, i + 1):
                    total += x[j]
                expected.append(total % 11)
        assert y == expected
        mine = tokens[tokens.sequence == s]
        assert mine.out_position.tolist() == list(range(6))
        assert mine.x_curr.tolist() == x
        assert mine.x_prev.tolist() == [-1] + x[:-1]
        wraps = [i >= window - 1 and sum(x[i - window + 1: i + 1]) >= 11 for i in range(6)]
        assert mine.wraps.tolist() == wraps


def test_prefix_sum_matches_loops():
    task = PrefixSum(n_inputs=7, n_probe=30, seed=1)
    sequences, tokens = task.probe_set()
    check_scoring(task, sequences, tokens)
    for s, (x, y) in enumerate(integer_rows(task, sequences)):
        total, expected, wraps = 0, [], []
        for v in x:
            wraps.append(total % 17 + v >= 17)
            total += v
            expected.append(total % 17)
        assert y == expected
        mine = tokens[tokens.sequence == s]
        assert mine.x_curr.tolist() == x
        assert mine.prev_sum.tolist() == [-1] + expected[:-1]
        assert mine.wraps.tolist() == wraps


def test_reversed_addition_matches_arithmetic():
    task = ReversedAddition(digits=3, n_probe=40, seed=2)
    sequences, tokens = task.probe_set()
    check_scoring(task, sequences, tokens)
    for s, text in enumerate(sequences.text):
        a, rest = text.split("+")
        b, out = rest.split("=")
        assert len(a) == len(b) == 3 and 1 <= int(a) and 1 <= int(b)
        assert out == str(int(a) + int(b)).zfill(4)[::-1]
        mine = tokens[tokens.sequence == s]
        for k, tok in enumerate(mine.itertuples()):
            place = 10**k
            assert tok.place == place and tok.digit == int(out[k])
            assert tok.carry == ((int(a) % place) + (int(b) % place) >= place)
            assert tok.a_digit == (int(a[2 - k]) if k < 3 else -1)
            assert tok.b_digit == (int(b[2 - k]) if k < 3 else -1)


def test_attention_targets_follow_the_papers_masks():
    def keys(mask):
        return [np.flatnonzero(row).tolist() for row in mask]

    # MWS, n = 4: sequence x1..x4 | y1..y4; y1 reads x1, yi reads x(i-1), xi
    assert keys(MovingWindowSum(n_inputs=4, n_probe=2).attention_targets()) == [
        [0], [0, 1], [1, 2], [2, 3]]
    # prefix sum, n = 4: y1 reads x1; yi reads xi and y(i-1), which sits at its query position
    assert keys(PrefixSum(n_inputs=4, n_probe=2).attention_targets()) == [
        [0], [1, 5], [2, 6], [3, 7]]
    # reversed addition, 2 digits: a1 a0 + b1 b0 = s0 s1 s2 (positions 0 1 2 3 4 5 ...)
    assert keys(ReversedAddition(digits=2, n_probe=2).attention_targets()) == [
        [1, 4], [0, 1, 3, 4], [0, 3]]


@pytest.mark.parametrize("train_size", [None, 64])
def test_training_data_never_holds_a_probe_prompt_and_is_deterministic(train_size):
    # 1-digit reversed addition has only 81 prompts, so collisions would happen if not excluded
    task = ReversedAddition(digits=1, n_probe=20, seed=0, train_size=train_size and 40)
    probe = {tuple(ids[:4]) for ids in task.probe_set()[0].input_ids}
    seen = set()
    for step in range(30):
        batch = task.train_batch(step, 16)
        assert batch.scored.sum().item() == 16 * 2
        seen |= {tuple(row[:4]) for row in batch.input_ids.tolist()}
    seen |= {tuple(row[:4]) for row in task.basis_sample(10).input_ids.tolist()}
    assert not probe & seen
    if train_size:
        assert seen <= {tuple(row[:4]) for row in task.train_ids}
    again = ReversedAddition(digits=1, n_probe=20, seed=0, train_size=train_size and 40)
    assert np.array_equal(task.train_batch(5, 8).input_ids, again.train_batch(5, 8).input_ids)
    assert not np.array_equal(task.train_batch(5, 8).input_ids, task.train_batch(6, 8).input_ids)


def test_from_config_reads_options_and_rejects_unknown_ones():
    cfg = parse_config({"name": "x", "seed": 3, "task": {
        "kind": "moving_window_sum", "n_probe": 5, "options": {"n_inputs": 8, "train_size": 50}}})
    task = make_task(cfg)
    assert (task.n_inputs, task.seed, len(task.probe_ids), len(task.train_ids)) == (8, 3, 5, 50)
    assert task.sequence_length == 17 and task.vocab_size == 18
    cfg = parse_config({"name": "x", "task": {"kind": "prefix_sum", "options": {"digits": 2}}})
    with pytest.raises(ValueError, match="not known to prefix_sum"):
        make_task(cfg)
    cfg = parse_config({"name": "x", "task": {"kind": "reversed_addition", "digits": 2}})
    assert make_task(cfg).sequence_length == 9


def test_bad_sizes_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="modulus"):
        MovingWindowSum(max_value=17, modulus=17)
    with pytest.raises(ValueError, match="distinct"):
        ReversedAddition(digits=1, n_probe=82)
