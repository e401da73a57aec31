"""Any PyTorch model: state-dict series read safely, in step order, checked for one architecture."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from polca.byo import (
    CheckpointSeriesError,
    module_token_loss,
    state_series,
)
from polca.functional import ProbeBatch


class TinyLM(nn.Module):
    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).cumsum(1))


def states(n, width=4):
    torch.manual_seed(0)
    return [{k: v.clone() for k, v in TinyLM(width=width).state_dict().items()} for _ in range(n)]


def test_series_orders_by_metadata_then_name_and_reads_weights_only_pt(tmp_path):
    a, b, c = states(3)
    save_file(a, tmp_path / "late.safetensors", metadata={"step": "900"})
    torch.save(b, tmp_path / "checkpoint-20.pt")
    torch.save({"model": c, "step": 5, "note": "optimizer state omitted"}, tmp_path / "step5.pt")
    series = list(state_series(tmp_path).items())
    assert [s for s, _ in series] == [5, 20, 900]
    for (_, got), want in zip(series, (c, b, a)):
        for name in want:
            assert torch.equal(got[name], want[name])


def test_model_loss_matches_a_direct_computation(tmp_path):
    (state,) = states(1)
    save_file(state, tmp_path / "step_3.safetensors")
    series = state_series([tmp_path / "step_3.safetensors"])
    loss = module_token_loss(TinyLM, reference_state=series.load(3))
    ids = torch.tensor([[1, 2, 3, 4]])
    batch = ProbeBatch(ids, torch.tensor([[2, 3, 4, 0]]), torch.tensor([[1, 1, 1, 0]]).bool())
    model = TinyLM().double()
    model.load_state_dict(state)
    expected = F.cross_entropy(model(ids)[0, :3], torch.tensor([2, 3, 4]), reduction="none")
    got = loss(loss.space.flatten(series.load(3)).double(), batch)
    torch.testing.assert_close(got, expected.detach())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": _RunsCode(str(marker))}, tmp_path / "step_1.pt")
    with pytest.raises(CheckpointSeriesError, match="NOT loaded.*arbitrary code"):
        state_series([tmp_path / "step_1.pt"])
    assert not marker.exists()


def test_errors_name_the_problem(tmp_path):
    a, b = states(2)
    save_file(a, tmp_path / "step_1.safetensors")
    save_file(states(1, width=5)[0], tmp_path / "step_2.safetensors")
    with pytest.raises(CheckpointSeriesError, match=r"step_2.*shapes differ.*embed.weight"):
        state_series(tmp_path)
    save_file(b, tmp_path / "final.safetensors")
    with pytest.raises(CheckpointSeriesError, match="no training step for .*final"):
        state_series([tmp_path / "final.safetensors"])
    with pytest.raises(CheckpointSeriesError, match="both claim step 1"):
        state_series([tmp_path / "step_1.safetensors", tmp_path / "final.safetensors"],
                     steps=[1, 1])
    with pytest.raises(CheckpointSeriesError, match="do not fit the model.*embed.weight"):
        module_token_loss(lambda: TinyLM(width=5), reference_state=a)
