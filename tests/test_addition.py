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
