"""Curvature operator, eigensolvers and Algorithm 1 against dense float64 Hessians.

Oracle: ``torch.autograd.functional.hessian`` of the mean token loss of a tiny decoder
(d = 244), and ``torch.linalg.eigh`` of the dense (projected) matrix.
"""

import numpy as np
import pytest
import torch

from polca.curvature import (
    Algorithm1Options,
    HessianOperator,
    hessian_basis,
    rayleigh_quotients,
    top_eigenpairs,
)
from polca.functional import ModuleTokenLoss, ProbeBatch
from polca.models.decoder import Decoder, DecoderConfig

SOLVERS = ["eigsh", "lanczos"]
TWO = Algorithm1Options(per_checkpoint=2, tol=1e-10)  # two eigenvectors per checkpoint


def tiny_problem(seed=0, n=6, scale=0.5):
    """A float64 decoder (d = 244), random parameters of order ``scale``, and a sample."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=5, context_length=6, n_layers=1, d_model=4, n_heads=2, d_mlp=8)
    model = Decoder(cfg).double()
    loss = ModuleTokenLoss(model)
    theta = scale * torch.randn(loss.space.dim, dtype=torch.float64)
    ids = torch.randint(0, 5, (n, 6))
    scored = torch.zeros(n, 6, dtype=torch.bool)
    scored[:, 2:] = True
    return loss, theta, ProbeBatch(ids, torch.roll(ids, -1, 1), scored)


def dense_hessian(loss, theta, sample):
    return torch.autograd.functional.hessian(lambda t: loss(t, sample).mean(), theta,
                                             vectorize=True)


def orthonormal_rows(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64)).Q.T


def assert_same_directions(found, expected, atol):
    """Rows equal up to sign: |<found_i, expected_i>| = 1."""
    overlaps = (found * expected).sum(dim=1).abs()
    np.testing.assert_allclose(overlaps.numpy(), 1.0, atol=atol)


@pytest.fixture(scope="module")
def problem():
    loss, theta, sample = tiny_problem()
    return loss, theta, sample, dense_hessian(loss, theta, sample)


def test_hvp_matches_dense_hessian_for_vectors_and_matrices(problem):
    loss, theta, sample, dense = problem
    operator = HessianOperator(loss, theta, sample, batch_size=4)  # 2 chunks of unequal size
    g = torch.Generator().manual_seed(1)
    v = torch.randn(loss.space.dim, generator=g, dtype=torch.float64)
    V = torch.randn(loss.space.dim, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(operator @ v, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(operator @ V, dense @ V, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(operator @ V.numpy(), (dense @ V).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(operator.to_scipy() @ v.numpy(), (dense @ v).numpy(),
                               rtol=1e-10, atol=1e-12)
    assert operator.n_products == 1 + 3 + 3 + 1


def test_cached_graph_hvp_matches_dense_hessian(problem):
    loss, theta, sample, dense = problem
    operator = HessianOperator(loss, theta, sample, batch_size=4, cache_graph=True)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):  # the second product reuses the graphs of the first
        V = torch.randn(loss.space.dim, 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(operator @ V, dense @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(operator @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_hvp_is_deterministic(problem):
    loss, theta, sample, _ = problem
    v = torch.ones(loss.space.dim, dtype=torch.float64)
    first = HessianOperator(loss, theta, sample) @ v
    assert torch.equal(first, HessianOperator(loss, theta, sample) @ v)


@pytest.mark.parametrize("solver", SOLVERS)
def test_top_eigenpairs_match_dense_eigh(problem, solver):
    loss, theta, sample, dense = problem
    values, vectors = torch.linalg.eigh(dense)
    k = 3
    expected_values, expected_vectors = values.flip(0)[:k], vectors.flip(1)[:, :k].T
    gaps = expected_values[:-1] - values.flip(0)[1:k]
    assert bool((gaps > 1e-3 * expected_values[0]).all()), "oracle needs separated eigenvalues"
    found_values, found_vectors, residuals = top_eigenpairs(
        HessianOperator(loss, theta, sample), k, tol=1e-10, solver=solver)
    torch.testing.assert_close(found_values, expected_values, rtol=1e-8, atol=1e-12)
    assert_same_directions(found_vectors, expected_vectors, atol=1e-6)
    dense_residuals = torch.linalg.vector_norm(
        found_vectors @ dense - found_values[:, None] * found_vectors, dim=1)
    torch.testing.assert_close(residuals, dense_residuals, rtol=1e-6, atol=1e-12)
    assert bool((residuals <= 1e-7 * found_values.abs()).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_projected_top_eigenpairs_match_dense_projected_eigh(problem, solver):
    loss, _, _, dense = problem
    d = loss.space.dim
    basis = orthonormal_rows(4, d, seed=2)
    projector = torch.eye(d, dtype=torch.float64) - basis.T @ basis
    values, vectors = torch.linalg.eigh(projector @ dense @ projector)
    k = 2
    expected_values, expected_vectors = values.flip(0)[:k], vectors.flip(1)[:, :k].T
    assert bool((expected_values > 0).all())  # not the zero eigenvalues of range(B)
    found_values, found_vectors, residuals = top_eigenpairs(dense, k, basis, tol=1e-10,
                                                            solver=solver)
    torch.testing.assert_close(found_values, expected_values, rtol=1e-8, atol=1e-12)
    assert_same_directions(found_vectors, expected_vectors, atol=1e-6)
    assert float((found_vectors @ basis.T).abs().max()) < 1e-10
    assert bool((residuals <= 1e-7 * found_values.abs()).all())


def test_solvers_agree_and_are_seed_deterministic(problem):
    _, _, _, dense = problem
    runs = [top_eigenpairs(dense, 2, tol=1e-10, solver=s, seed=3) for s in SOLVERS]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-6)  # signs are fixed
    again = top_eigenpairs(dense, 2, tol=1e-10, solver="lanczos", seed=3)
    assert torch.equal(again[1], runs[1][1])


def test_top_eigenpairs_rejects_bad_arguments(problem):
    _, _, _, dense = problem
    with pytest.raises(ValueError, match="free dimensions"):
        top_eigenpairs(dense, dense.shape[0] + 1)
    with pytest.raises(ValueError, match="choose 'eigsh' or 'lanczos'"):
        top_eigenpairs(dense, 1, solver="arnoldi")


def test_rayleigh_quotients_match_dense(problem):
    loss, theta, sample, dense = problem
    vectors = orthonormal_rows(3, loss.space.dim, seed=4)
    expected = torch.stack([v @ dense @ v for v in vectors])
    torch.testing.assert_close(rayleigh_quotients(HessianOperator(loss, theta, sample), vectors),
                               expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def algorithm_one():
    loss, theta, sample = tiny_problem(seed=5)
    g = torch.Generator().manual_seed(6)
    thetas = [theta + 0.3 * t * torch.randn(theta.shape, generator=g, dtype=torch.float64)
              for t in range(3)]
    checkpoints = [(i, 100 * i, th) for i, th in enumerate(thetas)]
    vectors, provenance = hessian_basis(loss, checkpoints, sample, TWO)
    hessians = [dense_hessian(loss, th, sample) for th in thetas]
    return loss, sample, checkpoints, vectors, provenance, hessians


@pytest.mark.parametrize("solver", SOLVERS)
def test_algorithm_one_against_dense_projected_hessians(algorithm_one, solver):
    loss, sample, checkpoints, reference, _, hessians = algorithm_one
    vectors, provenance = hessian_basis(loss, checkpoints, sample,
                                        Algorithm1Options(per_checkpoint=2, tol=1e-10,
                                                          solver=solver))
    d, k = loss.space.dim, 2
    assert vectors.shape == (len(checkpoints) * k, d)
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(len(vectors), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    for position, (index, step, theta) in enumerate(checkpoints):
        earlier, new = vectors[: position * k], vectors[position * k: (position + 1) * k]
        projector = torch.eye(d, dtype=torch.float64) - earlier.T @ earlier
        values, eigvecs = torch.linalg.eigh(projector @ hessians[position] @ projector)
        assert bool((values.flip(0)[:k] > 0).all())
        assert_same_directions(new, eigvecs.flip(1)[:, :k].T, atol=1e-6)
        entries = provenance[position * k: (position + 1) * k]
        np.testing.assert_allclose([e["eigenvalue"] for e in entries], values.flip(0)[:k].numpy(),
                                   rtol=1e-8)
        assert [e["checkpoint"] for e in entries] == [index] * k
        assert [e["step"] for e in entries] == [step] * k
        assert all(e["residual"] < 1e-7 * abs(e["eigenvalue"]) for e in entries)
    assert [e["index"] for e in provenance] == list(range(len(vectors)))
    torch.testing.assert_close(vectors, reference, rtol=0, atol=1e-6)


def test_algorithm_one_resumes_and_caps(algorithm_one):
    loss, sample, checkpoints, reference, provenance, _ = algorithm_one
    saved = []
    first, first_info = hessian_basis(loss, checkpoints[:1], sample, TWO,
                                      on_checkpoint=lambda v, p: saved.append(len(v)))
    resumed, info = hessian_basis(loss, checkpoints[1:], sample, TWO,
                                  vectors=first, provenance=first_info)
    assert saved == [2]
    torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-12)
    assert [e["checkpoint"] for e in info] == [e["checkpoint"] for e in provenance]
    capped, capped_info = hessian_basis(
        loss, checkpoints, sample, Algorithm1Options(per_checkpoint=2, tol=1e-10, max_vectors=3))
    torch.testing.assert_close(capped, reference[:3], rtol=0, atol=1e-12)
    assert [e["checkpoint"] for e in capped_info] == [0, 0, 1]


@pytest.mark.parametrize("solver", ["eigsh", "lanczos"])
def test_largest_algebraic_not_largest_magnitude(solver):
    # a dominant negative eigenvalue must not be returned: Algorithm 1 wants the top of P H P
    values = torch.tensor([-10.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64))[0]
    matrix = rotation @ torch.diag(values) @ rotation.T
    found, vectors, _ = top_eigenpairs(matrix, 2, tol=1e-10, solver=solver)
    torch.testing.assert_close(found, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert abs(float(vectors[0] @ rotation[:, 1])) == pytest.approx(1.0, abs=1e-6)
