"""Bases and the basis stage, against NumPy SVD, dense float64 Hessians and uninterrupted runs."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from polca import bases
from polca.bases import BasisError
from polca.config import RunConfig
from polca.curvature import Algorithm1Options, BasisCheckpoint, HessianOperator
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig
from polca.parallel import InProcess
from polca.stages.basis import basis_checkpoint_positions, run_basis
from polca.store import RunDir, batch_sha256, read_vectors

STEPS = [0, 100, 200, 300, 400]


def tiny_model():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=5, context_length=6, n_layers=1, d_model=4, n_heads=2, d_mlp=8)
    return Decoder(cfg).double()


def tiny_sample(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5, (n, 6), generator=g)
    scored = torch.zeros(n, 6, dtype=torch.bool)
    scored[:, 2:] = True
    return ProbeBatch(ids, torch.roll(ids, -1, 1), scored)


def tiny_trajectory(dim, seed=2):
    """``[len(STEPS), d]`` parameters of a random walk with a drift."""
    g = torch.Generator().manual_seed(seed)
    start = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)
    drift = 0.1 * torch.randn(dim, generator=g, dtype=torch.float64)
    steps = [0.1 * torch.randn(dim, generator=g, dtype=torch.float64) + drift for _ in STEPS[1:]]
    return torch.cumsum(torch.stack([start, *steps]), dim=0)


def dense_hessian(loss, theta, sample):
    return torch.autograd.functional.hessian(lambda t: loss(t, sample).mean(), theta,
                                             vectorize=True)


def test_random_basis_is_orthonormal_and_seeded():
    first, again, other = (bases.random_basis(300, 7, seed=s) for s in (3, 3, 4))
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(first.vectors @ first.vectors.T, eye, rtol=0, atol=1e-13)
    assert torch.equal(first.vectors, again.vectors)
    assert float((first.vectors - other.vectors).abs().max()) > 0.1
    assert all(e["eigenvalue"] is None and e["kind"] == "random" for e in first.provenance)


def test_trajectory_pca_matches_numpy_svd():
    thetas = tiny_trajectory(50)
    updates = np.diff(thetas.numpy(), axis=0)
    _, singular, right = np.linalg.svd(updates, full_matrices=False)
    basis = bases.trajectory_pca(thetas, m=3)
    overlaps = np.abs((basis.vectors.numpy() * right[:3]).sum(axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-10)
    np.testing.assert_allclose([e["singular_value"] for e in basis.provenance], singular[:3],
                               rtol=1e-10)
    capped = bases.trajectory_pca(thetas, m=10)  # 4 updates span at most 4 directions
    assert len(capped) == len(STEPS) - 1 and capped.params["m_requested"] == 10


def user_basis(path, dim):
    return bases.user_basis(read_vectors(path), dim, source=str(path))


def test_user_basis_loads_and_validates(tmp_path):
    good = torch.linalg.qr(torch.randn(40, 3, dtype=torch.float64)).Q.T.contiguous()
    save_file({"vectors": good}, tmp_path / "good.safetensors")
    loaded = user_basis(tmp_path / "good.safetensors", dim=40)
    torch.testing.assert_close(loaded.vectors, good, rtol=0, atol=0)

    skewed = good.clone()
    skewed[1] += 0.01 * good[0]
    error = float((skewed @ skewed.T - torch.eye(3, dtype=torch.float64)).abs().max())
    save_file({"vectors": skewed}, tmp_path / "skewed.safetensors")
    with pytest.raises(BasisError, match="skewed.safetensors is not orthonormal") as info:
        user_basis(tmp_path / "skewed.safetensors", dim=40)
    assert f"{error:.3g}" in str(info.value) and "torch.linalg.qr" in str(info.value)

    with pytest.raises(BasisError, match="dimension 40 but the model has 41"):
        user_basis(tmp_path / "good.safetensors", dim=41)
    save_file({"matrix": good}, tmp_path / "named.safetensors")
    with pytest.raises(BasisError, match="no tensor named 'vectors'"):
        user_basis(tmp_path / "named.safetensors", dim=40)
    with pytest.raises(BasisError, match="does not exist"):
        user_basis(tmp_path / "absent.safetensors", dim=40)


def test_basis_round_trip_and_dimension_mismatch(tmp_path):
    basis = bases.trajectory_pca(tiny_trajectory(30), m=2)
    run = RunDir(tmp_path)
    run.save_basis(basis)
    loaded = run.load_basis("trajectory-pca", dim=30)
    assert torch.equal(loaded.vectors, basis.vectors)
    assert loaded.provenance == basis.provenance and loaded.params == basis.params
    assert set(bases.PROVENANCE_KEYS) <= set(loaded.provenance[0])
    with pytest.raises(BasisError, match="dimension 30 but the model has 31 parameters"):
        run.load_basis("trajectory-pca", dim=31)


def test_rayleigh_eigenvalues_match_dense_hessian():
    model = tiny_model()
    loss, sample = ModuleTokenLoss(model), tiny_sample()
    theta = tiny_trajectory(loss.space.dim)[-1]
    basis = bases.random_basis(loss.space.dim, 3, seed=0)
    filled = bases.with_rayleigh_eigenvalues(basis, HessianOperator(loss, theta, sample), step=7)
    dense = dense_hessian(loss, theta, sample)
    expected = [float(v @ dense @ v) for v in basis.vectors]
    np.testing.assert_allclose([e["eigenvalue"] for e in filled.provenance], expected,
                               rtol=1e-10)
    assert {e["eigenvalue_source"] for e in filled.provenance} == {"rayleigh-last-checkpoint"}


def test_shuffled_hessian_follows_a_seeded_permutation():
    model = tiny_model()
    loss, sample = ModuleTokenLoss(model), tiny_sample()
    thetas = tiny_trajectory(loss.space.dim)
    checkpoints = [BasisCheckpoint(i, STEPS[i], thetas[i]) for i in range(len(STEPS))]
    order = bases.shuffled_order(len(STEPS), seed=5)
    assert sorted(order) == list(range(len(STEPS))) and order != sorted(order)
    basis = bases.hessian(loss, checkpoints, sample,
                          Algorithm1Options(tol=1e-10, max_vectors=2, seed=5), shuffled=True)
    assert basis.kind == basis.name == "shuffled-hessian"
    assert [e["checkpoint"] for e in basis.provenance] == order[:2]
    values, vectors = torch.linalg.eigh(dense_hessian(loss, thetas[order[0]], sample))
    assert abs(float(basis.vectors[0] @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-6)
    assert basis.provenance[0]["eigenvalue"] == pytest.approx(float(values[-1]), rel=1e-8)


def test_basis_checkpoint_positions_pick_nearest_multiples():
    assert basis_checkpoint_positions(STEPS, every=200) == [2, 4]
    assert basis_checkpoint_positions([0, 30, 250, 420], every=100) == [1, 2, 3]
    assert basis_checkpoint_positions(STEPS, every=1000) == [4]


# -- the stage --------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


@dataclass
class FakeCheckpoints:
    steps: list


class FakeContext:
    """The parts of RunContext the basis stage uses; ``fail_at`` interrupts a checkpoint load."""

    def __init__(self, root, cfg, fail_at=None):
        self.said = []
        self.run, self.cfg = RunDir(root, say=self.said.append), cfg
        self.model = tiny_model()
        self.loss = ModuleTokenLoss(self.model)
        self.dtype = torch.float64
        self.checkpoints = FakeCheckpoints(STEPS)
        self.trajectory = tiny_trajectory(self.loss.space.dim)
        self.fail_at, self.loaded = fail_at, []

    def loss_in(self, dtype):
        assert dtype == self.dtype
        return self.loss

    def theta(self, step):
        if step == self.fail_at:
            raise Interrupted
        self.loaded.append(step)
        return self.trajectory[STEPS.index(step)].clone()

    def thetas(self):
        for step in STEPS:
            yield step, self.theta(step)

    def reader(self, dtype=None):
        return lambda index: self.theta(STEPS[index])

    def arithmetic(self, stage_default=None):
        return stage_default or "float64"

    executor = InProcess()

    def basis_sample(self, n):
        return tiny_sample(n)

    def inputs(self, *names, **values):
        return {**{name: "unchanged" for name in names}, **values}

    def sample_sha256(self, sample):
        return batch_sha256(sample)


def stage_config(**basis):
    settings = {"kinds": ["hessian", "shuffled-hessian", "random", "trajectory-pca"],
                "every": 100, "per_checkpoint": 2, "max_vectors": 7, "sample_size": 6,
                "tol": 1e-10, "seed": 3, **basis}
    return RunConfig.model_validate({"name": "t", "basis": settings})


@pytest.mark.parametrize("solver", ["eigsh", "lanczos"])
def test_stage_resume_equals_uninterrupted_run(tmp_path, solver):
    cfg = stage_config(solver=solver)
    reference = run_basis(FakeContext(tmp_path / "whole", cfg), progress=False)

    interrupted = FakeContext(tmp_path / "resumed", cfg, fail_at=300)
    with pytest.raises(Interrupted):
        run_basis(interrupted, progress=False)
    partial = RunDir(tmp_path / "resumed").load_basis("hessian", partial=True)
    assert [e["step"] for e in partial.provenance] == [100, 100, 200, 200]

    resumed_ctx = FakeContext(tmp_path / "resumed", cfg)
    resumed = run_basis(resumed_ctx, progress=False)
    assert resumed_ctx.loaded[:2] == [300, 400]  # the hessian basis went on at step 300
    for name, basis in reference.items():
        torch.testing.assert_close(resumed[name].vectors, basis.vectors, rtol=0, atol=1e-12)
        assert len(basis) == (len(STEPS) - 1 if name == "trajectory-pca" else 7)
        on_disk = RunDir(tmp_path / "resumed").load_basis(name, dim=basis.dim)
        torch.testing.assert_close(on_disk.vectors, basis.vectors, rtol=0, atol=0)
        assert all(e["eigenvalue"] is not None for e in on_disk.provenance)
    assert not (tmp_path / "resumed" / "basis" / ".partial" / "hessian.json").exists()
    assert [e["step"] for e in reference["hessian"].provenance] == [100, 100, 200, 200, 300, 300,
                                                                    400]
    vectors = reference["hessian"].vectors
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(7, dtype=torch.float64), rtol=0,
                               atol=1e-12)

    again = FakeContext(tmp_path / "resumed", cfg)
    run_basis(again, progress=False)
    assert again.loaded == [] and again.said == []  # complete bases are kept, silently
    # a changed setting: the bases that depend on it are rebuilt, and the stage says so
    changed = FakeContext(tmp_path / "resumed", stage_config(solver=solver, tol=1e-4))
    rebuilt = run_basis(changed, progress=False)
    assert [line.split(":")[0] for line in changed.said] == ["basis/hessian",
                                                             "basis/shuffled-hessian"]
    assert all("inputs changed (params)" in line for line in changed.said)
    assert rebuilt["hessian"].params["tol"] == 1e-4 == RunDir(
        tmp_path / "resumed").load_basis("hessian").params["tol"]
    torch.testing.assert_close(rebuilt["random"].vectors, reference["random"].vectors,
                               rtol=0, atol=0)


def test_stage_user_basis_needs_a_path(tmp_path):
    with pytest.raises(BasisError, match="basis.user_path"):
        run_basis(FakeContext(tmp_path, stage_config(kinds=["user"])), progress=False)
