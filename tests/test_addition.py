"""Addition data and labels, checked by brute-force arithmetic on the decoded strings."""

import numpy as np
import pytest

from polca.tasks.addition import Addition


def brute_force_labels(text: str, digits: int):
    a, rest = text.split("+")
    b, s = rest.split("=")
    a, b = int(a), int(b)
    assert int(s) == a + b and len(s) == digits + 1
    rows = []
    for i, ch in enumerate(s):
        place = 10 ** (digits - i)
        # carry into this place: the lower places of a and b sum to at least the place value
        carry = place > 1 and (a % place) + (b % place) >= place
        rows.append((place, carry, int(ch)))
    return rows


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_probe_labels_match_brute_force(digits):
    task = Addition(digits=digits, n_probe=40, seed=3)
    sequences, tokens = task.probe_set()
    assert len(tokens) == 40 * (digits + 1)
    for seq, row in sequences.iterrows():
        text = task.decode(row.input_ids)
        assert text == row.text
        mine = tokens[tokens.sequence == row.sequence]
        expected = brute_force_labels(text, digits)
        assert list(zip(mine.place, mine.carry, mine.digit)) == expected
        # the scored position predicts the next token of the sequence
        for _, tok in mine.iterrows():
            assert row.input_ids[tok.position + 1] == tok.target
            assert tok.context == text[: tok.position + 1]


def test_train_and_probe_problems_are_disjoint_and_deterministic():
    task = Addition(digits=2, n_probe=300, seed=0)
    sequences, _ = task.probe_set()
    probe = {(a, b) for a, b in zip(sequences.a, sequences.b)}
    seen = set()
    for step in range(60):
        batch = task.train_batch(step, 64)
        for row in batch.input_ids.tolist():
            text = task.decode(row)
            a, b = text.split("=")[0].split("+")
            seen.add((int(a), int(b)))
    assert not probe & seen
    first = task.train_batch(7, 16).input_ids
    assert np.array_equal(first, Addition(digits=2, n_probe=300, seed=0).train_batch(7, 16).input_ids)
    assert not np.array_equal(first, task.train_batch(8, 16).input_ids)


def test_scored_positions_are_the_output_digits():
    task = Addition(digits=3, n_probe=5)
    batch = task.train_batch(0, 4)
    assert batch.scored.sum(1).tolist() == [4] * 4
    assert (batch.input_ids[:, 7] == 11).all()  # '=' predicts the first output digit
    assert batch.scored[:, 7:11].all()


def test_bad_probe_size_is_rejected():
    with pytest.raises(ValueError, match="n_probe"):
        Addition(digits=1, n_probe=60)


def column_carries(text: str) -> dict[int, bool]:
    """Schoolbook column addition of the decoded problem: {place: a carry enters it}."""
    a, rest = text.split("+")
    b = rest.split("=")[0]
    carries, carry = {}, 0
    for k, (da, db) in enumerate(zip(reversed(a), reversed(b))):
        carry = int(int(da) + int(db) + carry >= 10)
        carries[10 ** (k + 1)] = bool(carry)
    return carries


def decoded_problems(task, batch):
    return [task.decode(row) for row in batch.input_ids.tolist()]


def operands(text):
    a, rest = text.split("=")[0].split("+")
    return int(a), int(rest)


def test_carry_schedule_withholds_carries_before_the_onset():
    task = Addition(digits=3, n_probe=50, seed=1, carry_onset=20)
    for step in (0, 7, 19):
        for text in decoded_problems(task, task.train_batch(step, 64)):
            carries = column_carries(text)
            assert not carries[10] and not carries[100], text
    after = [column_carries(t) for s in range(20, 40)
             for t in decoded_problems(task, task.train_batch(s, 64))]
    # natural distribution: P(carry into 10s or 100s) = 1 − 0.55² ≈ 0.70
    share = np.mean([c[10] or c[100] for c in after])
    assert 0.65 < share < 0.75
    # the early batches are still disjoint from the probe set
    probe = {(a, b) for a, b in zip(*task.probe_set()[0][["a", "b"]].values.T)}
    early = {operands(t) for s in range(20)
             for t in decoded_problems(task, task.train_batch(s, 64))}
    assert not probe & early


def test_early_carry_fraction_and_places():
    task = Addition(digits=3, n_probe=50, seed=0, carry_onset=10, carry_places=[100],
                    early_carry_fraction=0.25)
    for step in range(5):
        carries = [column_carries(t) for t in decoded_problems(task, task.train_batch(step, 64))]
        assert sum(c[100] for c in carries) == 16  # round(0.25 * 64)
        assert any(c[10] for c in carries)  # tens carries are not withheld
    assert task.train_batch(3, 64).input_ids.equal(
        Addition(digits=3, n_probe=50, seed=0, carry_onset=10, carry_places=[100],
                 early_carry_fraction=0.25).train_batch(3, 64).input_ids)


def test_fixed_training_set():
    task = Addition(digits=2, n_probe=100, seed=0, train_size=300)
    seen = {operands(t) for s in range(200)
            for t in decoded_problems(task, task.train_batch(s, 32))}
    fixed = {(int(p) // 100, int(p) % 100) for p in task.train_pairs}
    assert len(fixed) == 300 and seen == fixed  # 6400 draws cover all 300 problems
    probe = {(a, b) for a, b in zip(*task.probe_set()[0][["a", "b"]].values.T)}
    assert not probe & fixed
    basis = {operands(t) for t in decoded_problems(task, task.basis_sample(1000))}
    assert basis <= fixed and len(basis) == 300
    assert not task.train_batch(5, 32).input_ids.equal(task.train_batch(6, 32).input_ids)


def test_fixed_set_with_a_carry_schedule():
    task = Addition(digits=2, n_probe=100, seed=2, train_size=400, carry_onset=50)
    fixed = {(int(p) // 100, int(p) % 100) for p in task.train_pairs}
    early = [t for s in range(50) for t in decoded_problems(task, task.train_batch(s, 32))]
    assert {operands(t) for t in early} <= fixed
    assert not any(column_carries(t)[10] for t in early)
    assert any(column_carries(t)[10] for t in decoded_problems(task, task.train_batch(50, 64)))


@pytest.mark.parametrize("options, message", [
    ({"train_size": 0}, "train_size"),
    ({"train_size": 10**6}, "train_size"),
    ({"carry_onset": -1}, "carry_onset"),
    ({"carry_places": [10]}, "give task.options.carry_onset"),
    ({"carry_onset": 5, "carry_places": [10, 30]}, "carry_places"),
    ({"carry_onset": 5, "carry_places": [10000]}, "carry_places"),
    ({"carry_onset": 5, "early_carry_fraction": 1.0}, "early_carry_fraction"),
    ({"carry_onset": 5, "colour": 1}, "not known to addition"),
])
def test_bad_options_are_config_errors(options, message):
    from polca.config import ConfigError, parse_config
    from polca.tasks import make_task

    cfg = parse_config({"name": "x", "task": {"kind": "addition", "n_probe": 10,
                                              "options": options}})
    with pytest.raises(ConfigError, match=message):
        make_task(cfg)


def test_options_from_a_config():
    from polca.config import parse_config
    from polca.tasks import make_task

    cfg = parse_config({"name": "x", "seed": 3, "task": {"kind": "addition", "n_probe": 10,
                        "options": {"carry_onset": 100, "train_size": 500}}})
    task = make_task(cfg)
    assert (task.carry_onset, len(task.train_pairs), task.carry_places) == (100, 500, (10, 100))


def test_a_fixed_set_without_carry_free_problems_is_named():
    task = Addition(digits=1, n_probe=2, seed=0, train_size=1, carry_onset=5, carry_places=[10])
    task.train_pairs = np.array([99])  # 9 + 9: always a carry
    with pytest.raises(ValueError, match="no problem without a carry"):
        task.train_batch(0, 4)
