"""POLCA decomposition and the decompose stage against independent float64 oracles."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from oracles import orthonormal, token_gradients, token_hessians
from test_directional import tiny_problem

from polca import decompose as polca
from polca.bases import Basis, BasisError
from polca.config import RunConfig
from polca.directional import directional_derivatives
from polca.functional import ParameterSpace, ProbeBatch, token_losses
from polca.parallel import InProcess
from polca.stages.common import CheckpointReader
from polca.stages.decompose import run_decompose
from polca.store import RunDir, StoreError


# complete basis: the decomposition sums to the whole loss change -----------------------------
@pytest.fixture(scope="module")
def complete_basis_problem():
    loss, theta, batch = tiny_problem()
    d = loss.space.dim
    vectors = orthonormal(d, d, seed=5)                      # m = d: a complete basis
    step = 0.01 * torch.randn(d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return loss, theta, batch, vectors, step


def test_complete_basis_first_order_sums_to_the_gradient_step(complete_basis_problem):
    loss, theta, batch, vectors, step = complete_basis_problem
    delta = polca.interval_deltas(theta, theta + step, vectors)
    grad, _ = directional_derivatives(loss, theta, vectors, batch, order=1)
    expected = token_gradients(loss, theta, batch) @ step     # ∇ℓ_x · Δθ
    torch.testing.assert_close(polca.first_order(grad, delta).sum(0), expected,
                               rtol=0, atol=1e-12)


def test_complete_basis_integrated_recovers_the_loss_change_at_simpson_rate(
        complete_basis_problem):
    loss, theta, batch, vectors, step = complete_basis_problem
    delta_loss = token_losses(loss, theta + step, batch) - token_losses(loss, theta, batch)
    delta = polca.interval_deltas(theta, theta + step, vectors)
    errors = []
    for n in (3, 5, 9):
        nodes, _ = polca.simpson_nodes(n)
        path = torch.stack([directional_derivatives(loss, theta + float(s) * step, vectors, batch,
                                                    order=1)[0] for s in nodes])
        errors.append(polca.integrated(path, delta).sum(0) - delta_loss)
    # 3-point Simpson beats the first-order Taylor allocation by far (its error is O(‖Δθ‖⁵)
    # against O(‖Δθ‖²)) ...
    taylor_error = (path[0] * delta[:, None]).sum(0) - delta_loss
    assert errors[0].norm() < 0.01 * taylor_error.norm()
    # ... and halving h divides the error by 2⁴ = 16 per token (composite Simpson is O(h⁴))
    ratio = errors[1] / errors[2]
    assert torch.all((ratio - 16).abs() < 1.0), ratio


def test_simpson_weights_integrate_a_quartic_with_the_expected_error():
    # ∫₀¹ s⁴ ds = 1/5; composite Simpson's error is h⁴/180 · (b−a) · f⁗ = h⁴ · 24/180
    for n in (3, 5, 9):
        nodes, weights = polca.simpson_nodes(n)
        h = 1.0 / (n - 1)
        assert abs(float(weights @ nodes**4) - 0.2 - h**4 * 24 / 180) < 1e-14
    with pytest.raises(ValueError, match="odd number of points"):
        polca.simpson_nodes(4)


# the paper's curvature estimator ----------------------------------------------------------------
class QuadraticTokenLoss:
    """ℓ_x(θ) = ½ Σ_i a[x,i] (u_iᵀθ − c[x,i])² + log cosh(r_xᵀWᵀθ): per-token Hessians share the
    eigenvectors u_i (the second term lives in the complement W of span(U)).
    Token x is read from ``input_ids`` at the scored positions."""

    def __init__(self, d=7, k=3, n=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        self.U, self.W = q[:, :k], q[:, k:]
        self.a = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.5
        self.c = torch.randn(n, k, generator=g, dtype=torch.float64)
        self.r = torch.randn(n, d - k, generator=g, dtype=torch.float64)
        self.space = ParameterSpace({"theta": (d,)})
        self.batch = ProbeBatch(torch.arange(n)[:, None], torch.zeros(n, 1, dtype=torch.long),
                                torch.ones(n, 1, dtype=torch.bool))

    def __call__(self, theta, batch):
        x = batch.input_ids[batch.scored]
        p, q = theta @ self.U, theta @ self.W
        quadratic = 0.5 * (self.a[x] * (p - self.c[x]) ** 2).sum(-1)
        return quadratic + torch.log(torch.cosh(self.r[x] @ q))


class GeneralQuadraticTokenLoss:
    """ℓ_x(θ) = ½ (θ − c_x)ᵀ A_x (θ − c_x) with unrelated SPD A_x: eigenvectors not shared."""

    def __init__(self, d=7, n=6, seed=1):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(n, d, d, generator=g, dtype=torch.float64)
        self.A = m @ m.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64)
        self.c = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.space = ParameterSpace({"theta": (d,)})
        self.batch = ProbeBatch(torch.arange(n)[:, None], torch.zeros(n, 1, dtype=torch.long),
                                torch.ones(n, 1, dtype=torch.bool))

    def __call__(self, theta, batch):
        x = batch.input_ids[batch.scored]
        e = theta - self.c[x]
        return 0.5 * torch.einsum("xd,xde,xe->x", e, self.A[x], e)


def test_paper_curvature_equals_exact_when_token_hessians_share_the_eigenvectors():
    loss = QuadraticTokenLoss()
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(7, generator=g, dtype=torch.float64)
    step = 0.3 * torch.randn(7, generator=g, dtype=torch.float64)  # also moves along W
    vectors = loss.U.T.contiguous()
    grad, exact = directional_derivatives(loss, theta, vectors, loss.batch, engine="forward")
    grad_next, _ = directional_derivatives(loss, theta + step, vectors, loss.batch, order=1)
    eigenvalues = loss.a.mean(0)              # aggregate Hessian's eigenvalues along u_i
    paper, small = polca.paper_curvature(grad, grad_next, eigenvalues)
    assert not small.any()
    torch.testing.assert_close(exact, loss.a.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(paper, loss.a.T, rtol=0, atol=1e-12)


def test_paper_curvature_differs_measurably_when_eigenvectors_are_not_shared():
    loss = GeneralQuadraticTokenLoss()
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(7, generator=g, dtype=torch.float64)
    step = 0.3 * torch.randn(7, generator=g, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(loss.A.mean(0))
    vectors = eigenvectors.T.flip(0).contiguous()             # top eigenvector first
    eigenvalues = eigenvalues.flip(0)
    grad, exact = directional_derivatives(loss, theta, vectors, loss.batch, engine="reverse")
    grad_next, _ = directional_derivatives(loss, theta + step, vectors, loss.batch, order=1)
    paper, _ = polca.paper_curvature(grad, grad_next, eigenvalues)
    delta = vectors @ step
    # oracles: κ = bᵀA_x b and, for a quadratic, κ̃ = λ_b · bᵀA_xΔθ / (λ_b δ_b)
    torch.testing.assert_close(exact, torch.einsum("md,xde,me->mx", vectors, loss.A, vectors),
                               rtol=0, atol=1e-12)
    expected_paper = torch.einsum("md,xde,e->mx", vectors, loss.A, step) / delta[:, None]
    torch.testing.assert_close(paper, expected_paper, rtol=0, atol=1e-10)
    terms_exact = polca.second_order(exact, delta)
    terms_paper = polca.second_order(paper, delta)
    error = float((terms_paper - terms_exact).pow(2).mean().sqrt())
    print(f"RMSE paper vs exact second-order term: {error:.4g} "
          f"(exact terms' RMS {float(terms_exact.pow(2).mean().sqrt()):.4g}; paper run: 0.145)")
    assert error > 0.1 * float(terms_exact.pow(2).mean().sqrt())


def test_paper_curvature_zeroes_and_counts_tiny_denominators():
    grad = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    grad_next = torch.tensor([[2.0, 4.0], [1.0, 2.0]], dtype=torch.float64)  # 2nd row: no change
    kappa, small = polca.paper_curvature(grad, grad_next, torch.tensor([3.0, 5.0]), tol=1e-12)
    assert small.tolist() == [False, True]
    assert kappa.tolist() == [[2.0, 4.0], [0.0, 0.0]]   # 3 · (1, 2) / 1.5, then zeros


# diagnostics and trajectories ------------------------------------------------------------------
def test_diagnostics_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    m, T, n = 3, 4, 5
    first = torch.randn(m, T, n, generator=g, dtype=torch.float64)
    second = 0.1 * torch.randn(m, T, n, generator=g, dtype=torch.float64)
    paper = 0.1 * torch.randn(m, T, n, generator=g, dtype=torch.float64)
    delta_loss = torch.randn(T, n, generator=g, dtype=torch.float64)
    diag = polca.DecompositionDiagnostics(m)
    for t in range(T):
        diag.update(t, delta_loss[t], torch.ones(m), first[:, t], second_exact=second[:, t],
                    second_paper=paper[:, t], small_denominators=torch.tensor([t == 1, False, False]))
    summary = diag.summary()
    full = (first + second).numpy()
    f = first.numpy()
    resid = delta_loss.numpy() - full.sum(0)
    assert summary["estimators"]["polca"]["explained_fraction"] == pytest.approx(
        1 - np.abs(resid).sum() / np.abs(delta_loss.numpy()).sum(), rel=1e-12)
    cosine = (f * full).sum() / np.sqrt((f * f).sum() * (full * full).sum())
    relative = np.sqrt(((f - full) ** 2).sum() / (full**2).sum())
    assert summary["first_vs_second_order"]["cosine_similarity"] == pytest.approx(cosine, rel=1e-12)
    assert summary["first_vs_second_order"]["relative_l2_difference"] == pytest.approx(
        relative, rel=1e-12)
    assert summary["rmse_paper_vs_exact_second_order"] == pytest.approx(
        np.sqrt(((paper - second).numpy() ** 2).mean()), rel=1e-12)
    for t in range(T):  # per interval, from the same formula
        r = np.abs(delta_loss[t].numpy() - full[:, t].sum(0)).sum()
        assert summary["explained_per_interval"]["polca"][t] == pytest.approx(
            1 - r / np.abs(delta_loss[t].numpy()).sum(), rel=1e-12)
    assert summary["paper_small_denominators"] == 1
    assert summary["zero_step_intervals"] == []


def test_top_parameters_are_the_largest_magnitudes():
    theta = torch.randn(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = sorted(sorted(range(200), key=lambda i: -abs(float(theta[i])))[:50])
    assert polca.top_parameters(theta, 50).tolist() == expected


# the stage -------------------------------------------------------------------------------------
M_VECTORS = 3


def make_context(root, n_checkpoints=4, decompose=None, repeat_checkpoint=None, seed=0):
    """A tiny run opened as a stage sees it: float64 decoder, checkpoints, probe, a basis."""
    loss, theta, batch = tiny_problem(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    thetas = [theta]
    for i in range(1, n_checkpoints):
        if i == repeat_checkpoint:
            thetas.append(thetas[-1].clone())
        else:
            thetas.append(thetas[-1] + 0.05 * torch.randn(theta.shape, generator=g,
                                                          dtype=torch.float64))
    steps = [10 * i for i in range(n_checkpoints)]
    by_step = dict(zip(steps, thetas))
    said = []
    run = RunDir(root, say=said.append)
    vectors = orthonormal(loss.space.dim, M_VECTORS, seed=seed + 20)
    provenance = [{"eigenvalue": float(1.0 + i), "eigenvalue_source": "rayleigh-last-checkpoint"}
                  for i in range(M_VECTORS)]
    run.save_basis(Basis("random", "random", vectors, provenance))
    cfg = RunConfig.model_validate({"name": "t", "decompose": {"batch_size": 2,
                                                                **(decompose or {})}})
    series = SimpleNamespace(steps=steps,
                             load=lambda step: loss.space.unflatten(by_step[step].clone()))
    reader = CheckpointReader(series, loss.space, tuple(steps), torch.device("cpu"))
    return SimpleNamespace(
        run=run, cfg=cfg, loss=loss, loss_in=lambda dtype: loss, probe=batch,
        checkpoints=series, theta=lambda step: by_step[step].clone(),
        reader=lambda dtype=None: reader, arithmetic=lambda default=None: default or "float64",
        device=torch.device("cpu"), dtype=torch.float64, executor=InProcess(), said=said,
        inputs=lambda *names, **values: {**dict.fromkeys(names, "unchanged"), **values},
    ), thetas, vectors


def stored_arrays(root):
    group = RunDir(root).arrays().group
    return {name: node[...] for name, node in sorted(group.members(max_depth=None))
            if isinstance(node, zarr.Array)}


def test_stage_writes_the_contract_arrays_matching_autograd_oracles(tmp_path):
    ctx, thetas, vectors = make_context(tmp_path, repeat_checkpoint=2)
    summaries = run_decompose(ctx, progress=False)
    arrays = ctx.run.arrays()
    T, n = 3, ctx.probe.n_tokens
    for name in ("first", "second_exact", "second_paper", "integrated", "fisher"):
        assert arrays.read(f"polca/random/{name}").shape == (M_VECTORS, T, n)
        assert arrays.dims(f"polca/random/{name}") == ("vector", "interval", "token")
    grad = arrays.read("polca/random/grad")
    assert grad.shape == (M_VECTORS, T + 1, n)
    for c, theta in enumerate(thetas):
        oracle = vectors @ token_gradients(ctx.loss, theta, ctx.probe).T
        np.testing.assert_allclose(grad[:, c], oracle.numpy(), rtol=0, atol=1e-12)
    deltas = arrays.read("polca/random/delta")
    for t in range(T):
        np.testing.assert_allclose(deltas[:, t], (vectors @ (thetas[t + 1] - thetas[t])).numpy(),
                                   rtol=0, atol=1e-14)
        np.testing.assert_allclose(arrays.read("polca/random/first")[:, t],
                                   grad[:, t] * deltas[:, t, None], rtol=0, atol=1e-15)
    # second-order terms, Fisher and the integrated allocation, each from autograd oracles
    eigenvalues = np.array([1.0 + i for i in range(M_VECTORS)])  # the basis provenance above
    mean_grad = grad.mean(axis=2)  # ⟨b, ∇L_X(θ_c)⟩, L_X the mean probe loss
    for t in range(T):
        hessians = token_hessians(ctx.loss, thetas[t], ctx.probe)  # [tokens, d, d]
        curvature = torch.einsum("md,xde,me->mx", vectors, hessians, vectors).numpy()
        np.testing.assert_allclose(arrays.read("polca/random/second_exact")[:, t],
                                   0.5 * curvature * deltas[:, t, None] ** 2, rtol=1e-9,
                                   atol=1e-15)
        np.testing.assert_allclose(arrays.read("polca/random/fisher")[:, t], grad[:, t] ** 2,
                                   rtol=0, atol=1e-15)
        denominator = mean_grad[:, t + 1] - mean_grad[:, t]
        if t != 1:  # interval 1 repeats its checkpoint: checked below
            kappa = eigenvalues[:, None] * (grad[:, t + 1] - grad[:, t]) / denominator[:, None]
            np.testing.assert_allclose(arrays.read("polca/random/second_paper")[:, t],
                                       0.5 * kappa * deltas[:, t, None] ** 2, rtol=1e-9,
                                       atol=1e-15)
        step = thetas[t + 1] - thetas[t]
        middle = vectors @ token_gradients(ctx.loss, thetas[t] + 0.5 * step,
                                                    ctx.probe).T
        simpson = (grad[:, t] + 4 * middle.numpy() + grad[:, t + 1]) / 6
        np.testing.assert_allclose(arrays.read("polca/random/integrated")[:, t],
                                   simpson * deltas[:, t, None], rtol=1e-10, atol=1e-15)
    # LCA top-k: brute-force per-token autograd gradients at each interval start
    top = arrays.attrs("lca/top/first")["parameters"]
    assert top == sorted(sorted(range(len(thetas[-1])), key=lambda i: -abs(float(thetas[-1][i])))
                         [:50])
    lca_top = arrays.read("lca/top/first")
    for t in range(T):
        gradients = token_gradients(ctx.loss, thetas[t], ctx.probe)
        oracle = gradients[:, top].T * (thetas[t + 1] - thetas[t])[top, None]
        np.testing.assert_allclose(lca_top[:, t], oracle.numpy(), rtol=0, atol=1e-12)
    # aggregate LCA per tensor: autograd of the mean loss at s = 0, ½, 1 with weights 1, 4, 1 / 6
    lca_tensors = arrays.read("lca/tensors")
    names = arrays.attrs("lca/tensors")["tensors"]
    for t in range(T):
        step = thetas[t + 1] - thetas[t]
        integral = torch.zeros_like(step)
        for s, w in ((0.0, 1 / 6), (0.5, 4 / 6), (1.0, 1 / 6)):
            point = (thetas[t] + s * step).requires_grad_(True)
            integral += w * torch.autograd.grad(ctx.loss(point, ctx.probe).mean(), point)[0]
        params = ctx.loss.space.unflatten(integral * step)
        np.testing.assert_allclose(lca_tensors[:, t], [float(params[k].sum()) for k in names],
                                   rtol=0, atol=1e-13)
    # the repeated checkpoint: interval 1 has δ = 0, flagged, finite, paper denominators zeroed
    summary = summaries["random"]
    assert summary["zero_step_intervals"] == [1]
    assert summary["paper_small_denominators"] == M_VECTORS  # exactly interval 1's
    assert np.all(arrays.read("polca/random/second_paper")[:, 1] == 0)
    for name, value in stored_arrays(tmp_path).items():
        assert np.isfinite(value).all(), name
    on_disk = json.loads((tmp_path / "diagnostics" / "random.json").read_text())
    assert on_disk["zero_step_intervals"] == [1]
    losses = torch.stack([ctx.loss(theta, ctx.probe).detach() for theta in thetas]).numpy()
    residual = np.diff(losses, axis=0) - arrays.read("polca/random/integrated").sum(0)
    assert on_disk["estimators"]["integrated"]["explained_fraction"] == pytest.approx(
        1 - np.abs(residual).sum() / np.abs(np.diff(losses, axis=0)).sum(), rel=1e-10)


class Interrupt(Exception):
    pass


def test_stage_resumes_to_byte_identical_arrays(tmp_path):
    reference, _, _ = make_context(tmp_path / "reference")
    run_decompose(reference, progress=False)

    interrupted, _, _ = make_context(tmp_path / "interrupted")

    def stop_after_two(group, t):
        if group == "polca/random" and t == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_decompose(interrupted, progress=False, on_interval=stop_after_two)
    # also a torn write: interval 0's integrated block lost its marker and holds garbage
    arrays = interrupted.run.arrays()
    (interrupted.run.progress / "polca/random/integrated" / "0").unlink()
    arrays.group["polca/random/integrated"][:, 0, :] = 123.0
    calls = []
    run_decompose(interrupted, progress=False, on_interval=lambda g, t: calls.append((g, t)))
    assert ("polca/random", 0) in calls and ("polca/random", 1) not in calls  # 1 was complete
    expected, got = stored_arrays(tmp_path / "reference"), stored_arrays(tmp_path / "interrupted")
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].tobytes() == got[name].tobytes(), name
    assert ((tmp_path / "reference" / "diagnostics" / "random.json").read_text()
            == (tmp_path / "interrupted" / "diagnostics" / "random.json").read_text())


def test_stage_rejects_bad_inputs(tmp_path):
    ctx, thetas, _ = make_context(tmp_path / "dim")
    ctx.run.save_basis(Basis("random", "random", orthonormal(len(thetas[0]) - 1, 2), [{}, {}]))
    with pytest.raises(BasisError, match="dimension"):
        run_decompose(ctx, progress=False)

    ctx, thetas, _ = make_context(tmp_path / "nan")
    thetas[2][5] = float("nan")
    with pytest.raises(StoreError, match="step 20 has 1 non-finite"):
        run_decompose(ctx, progress=False)

    ctx, thetas, vectors = make_context(tmp_path / "noeig")
    ctx.run.save_basis(Basis("random", "random", vectors, [{}] * M_VECTORS))
    with pytest.raises(StoreError, match="no eigenvalue"):
        run_decompose(ctx, progress=False)


def test_stage_recomputes_on_a_changed_basis_and_says_so(tmp_path):
    ctx, _, vectors = make_context(tmp_path / "run", n_checkpoints=3, decompose={"lca": False})
    run_decompose(ctx, progress=False)
    basis = ctx.run.load_basis("random")
    other = orthonormal(vectors.shape[1], M_VECTORS, seed=99)
    ctx.run.save_basis(Basis("random", "random", other, basis.provenance))
    run_decompose(ctx, progress=False)
    assert len(ctx.said) == 1 and ctx.said[0].startswith("decompose/random: inputs changed "
                                                         "(basis)")
    # the same as a run that only ever saw the new basis
    fresh, _, _ = make_context(tmp_path / "fresh", n_checkpoints=3, decompose={"lca": False})
    fresh.run.save_basis(Basis("random", "random", other, basis.provenance))
    run_decompose(fresh, progress=False)
    expected, got = stored_arrays(tmp_path / "fresh"), stored_arrays(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].tobytes() == got[name].tobytes(), name


def test_gradient_kind_is_the_per_token_gradient_projection_and_clusters(tmp_path):
    """The ``gradient`` trajectory kind: ⟨b, ∇ℓ_x(θ_t)⟩ per checkpoint, not cumulated, against
    per-token autograd gradients in float64; the cluster stage clusters it like any kind."""
    from polca.stages.cluster import run_cluster

    ctx, thetas, vectors = make_context(tmp_path)
    run_decompose(ctx, progress=False)
    trajectories = ctx.run.projected("gradient", "random")  # [vector, checkpoint, token]
    oracle = np.stack([(vectors @ token_gradients(ctx.loss, theta, ctx.probe).T)
                       .numpy() for theta in thetas], axis=1)
    assert trajectories.shape == (M_VECTORS, len(thetas), ctx.probe.n_tokens)
    np.testing.assert_allclose(trajectories, oracle, rtol=0, atol=1e-12)
    for c in range(len(thetas)):  # the first-order engine's g, stored once (not recomputed)
        np.testing.assert_array_equal(
            trajectories[:, c], ctx.run.arrays().read("polca/random/grad")[:, c])

    loss = np.stack([token_losses(ctx.loss, theta, ctx.probe).numpy() for theta in thetas], 1)
    arrays = ctx.run.arrays()
    arrays.require("loss", loss.shape, loss.shape, ("token", "checkpoint"),
                   attrs={"steps": ctx.checkpoints.steps})
    arrays.write_block("loss", slice(None), loss, key="all")
    status = run_cluster(SimpleNamespace(run=ctx.run, cfg=RunConfig.model_validate(
        {"name": "t", "cluster": {"trajectories": ["gradient"], "min_cluster_size": 2,
                                  "min_samples": 1}})), progress=False)
    assert status == {"gradient-random": "written"}
    clustering = ctx.run.read_clustering("gradient-random")
    assert clustering.params["kind"] == "gradient" and not clustering.params["mean_filter"]
    assert len(clustering.frame) == M_VECTORS * ctx.probe.n_tokens
