"""Tests for harmonize.corex (Linear CorEx) and the `corex` pipeline stage.

The reference package ``linearcorex`` 0.53 (class ``linearcorex.Corex``; test-only dependency) is the oracle for
the objective and the baseline for the optimum reached.  Run with ``-rP`` to see the comparisons printed.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.linalg import solve_triangular
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from harmonize.corex import (
    CorexConvergenceWarning,
    LinearCorex,
    _column_stats,
    _Design,
    _evaluate,
    _free_from_weights,
    _objective_from_free,
    _Vec,
    _weights_from_free,
    corex_moments,
    corex_objective,
    fit_restarts,
    site_leakage_audit,
)

linearcorex = pytest.importorskip("linearcorex")

N_GROUPS, GROUP_SIZE = 3, 8


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """These fits are small: on a shared machine, spinning OpenMP threads make them 10x slower, not faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextmanager
def _preserve_numpy_rng() -> Iterator[None]:
    """The reference seeds numpy's global RNG in its constructor; undo that so tests stay independent."""
    state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what needs protecting
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _reference_fit(x: np.ndarray, n_hidden: int, seed: int = 0) -> linearcorex.Corex:
    # One BLAS thread: on a shared 2-core machine numpy's threaded BLAS makes these small fits 10x slower.
    with _preserve_numpy_rng(), threadpool_limits(limits=1):
        return linearcorex.Corex(n_hidden=n_hidden, seed=seed).fit(x)


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / x.std(axis=0)


def _rescore(x: np.ndarray, w: np.ndarray) -> float:
    """Our float64 objective at weights w (e.g. the reference's float32 weights): like-for-like TC."""
    return float(corex_objective(torch.as_tensor(_standardize(x)), torch.as_tensor(w, dtype=torch.float64)))


def _dense_loglik(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Gaussian log-density with a dense covariance (Cholesky; one BLAS thread, see _reference_fit)."""
    with threadpool_limits(limits=1):
        chol = np.linalg.cholesky(np.asarray(cov, dtype=np.float64))
        z = solve_triangular(chol, (x - mean).T, lower=True)
    logdet = 2.0 * np.log(np.diag(chol)).sum()
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + logdet + (z * z).sum(axis=0))


def _planted(n: int, seed: int, noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Each variable is its group's latent factor plus independent noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, N_GROUPS))
    x = np.repeat(z, GROUP_SIZE, axis=1) + noise * rng.standard_normal((n, N_GROUPS * GROUP_SIZE))
    return x, z


def _modular(n: int, p: int, m: int, seed: int, n_test: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m latent factors, variable i loads on factor i % m (loading 0.5..1) plus unit noise; train and test rows."""
    rng = np.random.default_rng(seed)
    groups = np.arange(p) % m
    loads = rng.uniform(0.5, 1.0, p)
    z = rng.standard_normal((n + n_test, m))
    x = z[:, groups] * loads + rng.standard_normal((n + n_test, p))
    return x[:n], x[n:], groups


def _correlated_data(n: int, p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((4, p))
    return _standardize(rng.standard_normal((n, 4)) @ mixing + rng.standard_normal((n, p)))


@dataclass
class Planted:
    x: np.ndarray
    z: np.ndarray
    model: LinearCorex
    ref_tc: float
    ref_tc64: float


@pytest.fixture(scope="module")
def planted() -> Planted:
    x, z = _planted(300, seed=0)
    x_before = x.copy()
    model = LinearCorex(n_hidden=N_GROUPS, seed=0).fit(x)
    assert np.array_equal(x, x_before), "fit must not modify its input"
    ref = _reference_fit(x, N_GROUPS)
    return Planted(x=x, z=z, model=model, ref_tc=float(ref.tc), ref_tc64=_rescore(x, ref.ws))


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.36])
def test_objective_matches_reference(eps: float) -> None:
    """At identical weights on the same standardized data, our objective is the reference's (<= 1e-6 rel.)."""
    n, p, m = 80, 15, 3
    xs = _correlated_data(n, p, seed=1)
    w = 0.08 * np.random.default_rng(2).standard_normal((m, p))
    with _preserve_numpy_rng():
        ref = linearcorex.Corex(n_hidden=m)
    ref.eps, ref.n_samples, ref.nv = eps, n, p
    expected = ref._calculate_moments_ns(xs, w, quick=False)
    assert 0.05 < expected["uj"].max() < 1.0, "test weights should be feasible and non-trivial"

    xt, wt = torch.as_tensor(xs), torch.as_tensor(w)
    got = float(corex_objective(xt, wt, eps))
    print(f"eps={eps}: ours TC={got:.12f}, reference TC={expected['TC']:.12f}")
    assert got == pytest.approx(expected["TC"], rel=1e-6)

    moments = corex_moments(xt, wt, eps)
    assert moments.tc == pytest.approx(got, rel=1e-12)
    np.testing.assert_allclose(moments.tcs, expected["TCs"], rtol=1e-6)
    np.testing.assert_allclose(moments.mis, expected["MI"], rtol=1e-6)

    # The free parametrization reproduces the same weights and the same objective.
    v = _free_from_weights(xt, wt, eps)
    w_back, _, _ = _weights_from_free(xt, v, eps)
    np.testing.assert_allclose(w_back.numpy(), w, rtol=1e-10)
    assert float(_objective_from_free(xt, v, eps)) == pytest.approx(got, rel=1e-9)


def _design_case(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(data as given to fit, the same data in float64 for the explicit formula)."""
    rng = np.random.default_rng(7)
    n, p = (20, 9) if case == "tall" else (12, 41)
    x = rng.standard_normal((n, 3)) @ rng.standard_normal((3, p)) + rng.standard_normal((n, p))
    if case == "offset":  # |mean| / std far above the folding threshold: chunks are centered before the products
        x = x + 1e6
    if case == "float32":
        x = x.astype(np.float32)
    if case == "offset32":  # float32 far from zero: centred on the float32-rounded mean, the rest added back exactly
        x = (x + 3e4).astype(np.float32)
    if case == "nan":
        x[1, 3] = x[4, 30] = np.nan
    return x, x.astype(np.float64)


@pytest.mark.parametrize("case", ["float64", "float32", "offset32", "nan", "offset", "tall"])
@pytest.mark.parametrize("eps", [0.0, 0.36])
def test_streamed_evaluation_matches_explicit_objective_and_autograd(case: str, eps: float) -> None:
    """The one-pass evaluator (chunks of 5 columns, factored vectors, hand-derived gradient) equals the explicit
    formula and its autograd gradient, for every data path: float64 view, float32 products (to float32
    precision), NaN imputation, large offsets (centered chunks), tall data (Cholesky factor)."""
    x, x64 = _design_case(case)
    mean, scale, has_nan = _column_stats(x, "impute")
    design = _Design(x, mean, scale, has_nan, torch.device("cpu"), chunk_columns=5)
    assert design.wide == (case != "tall")
    if case in ("offset", "offset32"):
        assert not design.folded
    elif case != "tall":
        assert design.folded
    xs = np.nan_to_num((x64 - mean) / scale)
    gen = torch.Generator().manual_seed(3)
    m = 3
    z = 0.05 * torch.randn(m, design.rows, dtype=torch.float64, generator=gen)
    e = 0.1 * torch.randn(m, x.shape[1], dtype=torch.float64, generator=gen)
    v = _Vec(z, z @ design.k, e, design.image(e))
    r = design.explicit(torch.eye(design.rows, dtype=torch.float64))  # R itself, (rows, p)
    np.testing.assert_allclose((r.T @ r).numpy(), xs.T @ xs, rtol=1e-9, atol=1e-8)

    v_explicit = (z @ r + e).requires_grad_(True)
    expected = _objective_from_free(torch.as_tensor(xs), v_explicit, eps)
    expected.backward()
    got = _evaluate(design, v, eps)
    # float32 data: the data products run in float32 (the data's own precision), the rest in float64
    assert design.single == (case in ("float32", "offset32"))
    rel = 1e-6 if design.single else 1e-10
    assert got.tc == pytest.approx(float(expected.detach()), rel=rel)
    grad = got.grad.z @ r + (got.grad.e if got.grad.e is not None else 0.0)
    scale_g = float(v_explicit.grad.abs().max())
    np.testing.assert_allclose(grad.numpy(), v_explicit.grad.numpy(), rtol=0, atol=10 * rel * scale_g)
    # inner products and images of factored vectors need no pass over the data, and are exact (to the precision
    # of the products that built the gradient's image)
    assert v.dot(got.grad) == pytest.approx(float((v_explicit.detach() * grad).sum()), rel=rel)
    np.testing.assert_allclose(v.image().numpy(), (v_explicit.detach() @ r.T).numpy(), rtol=1e-10, atol=1e-10)


def test_directional_derivative_matches_finite_difference() -> None:
    x, _ = _planted(40, seed=4)
    mean, scale, _ = _column_stats(x, None)
    design = _Design(x, mean, scale, False, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    m, p = 2, x.shape[1]
    v = _Vec(torch.zeros(m, design.rows, dtype=torch.float64), torch.zeros(m, design.rows, dtype=torch.float64),
             *(lambda e: (e, design.image(e)))(0.1 * torch.randn(m, p, dtype=torch.float64, generator=gen)))
    d_e = torch.randn(m, p, dtype=torch.float64, generator=gen)
    d = _Vec(torch.zeros_like(v.z), torch.zeros_like(v.z), d_e, design.image(d_e))
    h = 1e-6
    for eps in (0.0, 0.6):
        slope = _evaluate(design, v, eps).grad.dot(d)
        fd = (_evaluate(design, v.combine(h, d), eps, want_grad=False).tc
              - _evaluate(design, v.combine(-h, d), eps, want_grad=False).tc) / (2 * h)
        assert fd == pytest.approx(slope, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.36])
def test_parametrization_is_always_feasible(eps: float) -> None:
    """However large V gets, u_j < 1 and |rho| < 1, so the objective stays finite."""
    xt = torch.as_tensor(_correlated_data(50, 12, seed=3))
    for magnitude in (1e-3, 1.0, 1e3):
        v = magnitude * torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        w, _, s = _weights_from_free(xt, v, eps)
        moments = corex_moments(xt, w, eps)
        assert (moments.u < 1).all() and (np.abs(moments.rho) < 1).all()
        assert np.isfinite(float(_objective_from_free(xt, v, eps)))
        np.testing.assert_allclose(moments.u, (s / (1 + s)).numpy(), rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# Fitting, against the reference
# --------------------------------------------------------------------------------------------------


def test_recovers_planted_structure(planted: Planted) -> None:
    model = planted.model
    print(
        f"\nplanted 3x8: ours TC={model.tc_:.6f} ({model.n_iter_} iterations, {model.n_evals_} evaluations); "
        f"reference TC={planted.ref_tc:.6f} (float32; {planted.ref_tc64:.6f} rescored in float64)"
    )
    # Each planted group gets one label, and the groups get different labels (labels are arbitrary).
    labels = model.clusters_.reshape(N_GROUPS, GROUP_SIZE)
    assert (labels == labels[:, :1]).all(), f"a planted group was split: {labels}"
    assert len(set(labels[:, 0])) == N_GROUPS, f"planted groups were merged: {labels}"
    assert model.tc_ >= planted.ref_tc64 - 1e-3 * abs(planted.ref_tc64)

    assert model.weights_.shape == model.loadings_.shape == model.mis_.shape == (N_GROUPS, N_GROUPS * GROUP_SIZE)
    assert model.tcs_.shape == (N_GROUPS,)
    assert (np.diff(model.tcs_) <= 0).all(), "factors must be sorted by TC, largest first"
    assert model.converged_
    assert len(model.history_) == model.n_iter_
    assert model.history_[-1] == pytest.approx(model.tc_, rel=1e-9)
    # The reported statistics are those of the returned weights.
    moments = corex_moments(torch.as_tensor(_standardize(planted.x)), torch.as_tensor(model.weights_))
    assert moments.tc == pytest.approx(model.tc_, rel=1e-9)
    np.testing.assert_allclose(moments.tcs, model.tcs_, rtol=1e-8)
    np.testing.assert_allclose(moments.rho, model.loadings_, rtol=1e-8, atol=1e-12)


def test_matches_reference_on_modular_data() -> None:
    """20 latent factors, p = 1,000, n = 500: TC within 0.1 % of the reference's, identical clusters (ARI = 1),
    held-out log-likelihood within 0.05 % (the reference's dense covariance vs our factored one)."""
    m = 20
    x, x_test, groups = _modular(500, 1000, m, seed=0, n_test=300)
    ours = LinearCorex(n_hidden=m, seed=0).fit(x)
    ref = _reference_fit(x, m)
    ref64 = _rescore(x, ref.ws)
    ari = adjusted_rand_score(ref.clusters(), ours.clusters_)
    cov_ref = ref.get_covariance().astype(np.float64)
    ll_ref = _dense_loglik(x_test, ref.theta[0].astype(np.float64), cov_ref).mean()
    ll_ours = ours.score(x_test)
    print(f"\np=1000, m=20: TC ours {ours.tc_:.6f}, reference {ref64:.6f} (float64 rescore; {ref.tc:.4f} float32); "
          f"ARI {ari}; held-out log-lik ours {ll_ours:.6f}, reference {ll_ref:.6f}")
    assert abs(ours.tc_ - ref64) <= 1e-3 * abs(ref64)
    assert abs(ours.tc_ - float(ref.tc)) <= 1e-3 * abs(float(ref.tc))
    assert ari == 1.0
    assert adjusted_rand_score(groups, ours.clusters_) == 1.0  # and both found the planted modules
    assert abs(ll_ours - ll_ref) <= 5e-4 * abs(ll_ref)
    # Our log-likelihood (Woodbury, factors only) is exactly the Gaussian density of the dense covariance.
    dense = _dense_loglik(x_test, ours.mean_, ours.get_covariance())
    np.testing.assert_allclose(ours.score_samples(x_test), dense, rtol=1e-9)


def test_float32_data_reach_the_float64_optimum() -> None:
    """float32 input runs the data products in float32 (2x faster); the optimum it reaches, re-scored in
    float64, is the float64 fit's to 1e-6 relative, with the same clusters and loadings."""
    m = 20
    x, _, groups = _modular(500, 1000, m, seed=0)
    x32 = x.astype(np.float32)
    fit64 = LinearCorex(n_hidden=m, seed=0).fit(x32.astype(np.float64))
    fit32 = LinearCorex(n_hidden=m, seed=0).fit(x32)
    rescored = corex_moments(torch.as_tensor(_standardize(x32.astype(np.float64))), torch.as_tensor(fit32.weights_))
    print(f"\nTC float64 fit {fit64.tc_:.8f}, float32 fit {fit32.tc_:.8f} (re-scored {rescored.tc:.8f}); "
          f"evaluations {fit64.n_evals_} vs {fit32.n_evals_}")
    assert rescored.tc == pytest.approx(fit64.tc_, rel=1e-6)
    assert fit32.tc_ == pytest.approx(fit64.tc_, rel=1e-6)
    assert adjusted_rand_score(fit64.clusters_, fit32.clusters_) == 1.0
    assert adjusted_rand_score(groups, fit32.clusters_) == 1.0
    # loadings agree to what tol=1e-8 on TC pins down (the optimum is flat along small loadings)
    np.testing.assert_allclose(np.abs(fit32.loadings_), np.abs(fit64.loadings_), atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_reference_on_larger_modular_data(seed: int) -> None:
    """The same comparison at p = 4,000 with 20 factors and only n = 300 samples (p >> n), other seeds."""
    m = 20
    x, x_test, _ = _modular(300, 4000, m, seed=seed, n_test=200)
    ours = LinearCorex(n_hidden=m, seed=seed).fit(x)
    ref = _reference_fit(x, m, seed=seed)
    ref64 = _rescore(x, ref.ws)
    assert abs(ours.tc_ - ref64) <= 1e-3 * abs(ref64)
    assert adjusted_rand_score(ref.clusters(), ours.clusters_) == 1.0
    ll_ref = _dense_loglik(x_test, ref.theta[0].astype(np.float64), ref.get_covariance()).mean()
    assert abs(ours.score(x_test) - ll_ref) <= 5e-4 * abs(ll_ref)


def test_transform_scores_track_latents(planted: Planted) -> None:
    model, x, z = planted.model, planted.x, planted.z
    y = model.transform(x)
    assert y.shape == (x.shape[0], N_GROUPS)
    np.testing.assert_allclose(model.fit_transform(x), y, rtol=1e-10, atol=1e-12)  # same seed, same fit
    np.testing.assert_allclose(y, _standardize(x) @ model.weights_.T, rtol=1e-10, atol=1e-12)

    corr = np.corrcoef(y.T, z.T)[:N_GROUPS, N_GROUPS:]  # factors x latents
    best = np.abs(corr).argmax(axis=0)
    print(f"\n|corr(factor, latent)| best matches: {np.abs(corr).max(axis=0).round(4)}")
    assert sorted(best) == list(range(N_GROUPS)), "each latent should be captured by its own factor"
    assert (np.abs(corr).max(axis=0) > 0.9).all()

    with pytest.raises(ValueError, match="features"):
        model.transform(x[:, :-1])


def test_dtype_layout_and_chunking_do_not_change_the_fit() -> None:
    """float32 input is used as is (cast chunk by chunk), Fortran order and read-only arrays work, and the chunk
    width only changes round-off."""
    x, _, _ = _modular(60, 200, 4, seed=3)
    base = LinearCorex(n_hidden=4, seed=1).fit(x)
    chunked = LinearCorex(n_hidden=4, seed=1, chunk_columns=17).fit(np.asfortranarray(x))
    assert chunked.tc_ == pytest.approx(base.tc_, rel=1e-7)
    assert adjusted_rand_score(base.clusters_, chunked.clusters_) == 1.0
    x32 = x.astype(np.float32)
    x32.flags.writeable = False
    single = LinearCorex(n_hidden=4, seed=1).fit(x32)
    assert single.tc_ == pytest.approx(base.tc_, rel=1e-5)  # the data differ by float32 rounding
    assert single.transform(x32).dtype == np.float64


def test_deterministic_and_leaves_global_rngs_alone() -> None:
    x, _ = _planted(120, seed=5)
    np.random.seed(123)  # noqa: NPY002 - the global RNG is the subject of this test
    torch.manual_seed(456)
    random.seed(789)
    np_state = np.random.get_state()  # noqa: NPY002
    torch_state, py_state = torch.get_rng_state(), random.getstate()

    first = LinearCorex(n_hidden=3, seed=7).fit(x)
    second = LinearCorex(n_hidden=3, seed=7).fit(x)

    assert np.array_equal(first.weights_, second.weights_)
    assert first.tc_ == second.tc_ and first.n_iter_ == second.n_iter_
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_fit_restarts_local_and_as_dask_tasks(planted: Planted, client) -> None:
    local = fit_restarts(planted.x, N_GROUPS, seeds=[0, 1], max_iter=200)
    assert len(local.tcs) == 2 and local.best.tc_ == max(local.tcs)
    assert local.tcs[local.seeds.index(local.best.seed)] == local.best.tc_
    assert local.agreement[local.seeds.index(local.best.seed)] == 1.0
    spread = local.spread
    assert spread["tc_range"] == pytest.approx(max(local.tcs) - min(local.tcs))
    # the same restarts as parallel tasks on the cluster: same numbers (deterministic), same winner
    remote = fit_restarts(planted.x, N_GROUPS, seeds=[0, 1], client=client, max_iter=200)
    assert remote.tcs == pytest.approx(local.tcs, rel=1e-12)
    assert remote.best.seed == local.best.seed
    np.testing.assert_allclose(remote.best.weights_, local.best.weights_, rtol=1e-10, atol=1e-13)
    assert remote.summary()["best_seed"] == local.best.seed
    with pytest.raises(ValueError, match="seed"):
        fit_restarts(planted.x, N_GROUPS, seeds=[])


def test_no_anneal_and_convergence_warning() -> None:
    x, _ = _planted(100, seed=6)
    model = LinearCorex(n_hidden=2, anneal=False).fit(x)
    assert np.isfinite(model.tc_) and model.converged_
    with pytest.warns(CorexConvergenceWarning, match="max_iter"):
        LinearCorex(n_hidden=2, max_iter=1).fit(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    x, _, _ = _modular(200, 600, 6, seed=4)
    cpu = LinearCorex(n_hidden=6, seed=0).fit(x)
    gpu = LinearCorex(n_hidden=6, seed=0, device="cuda").fit(x)
    assert gpu.tc_ == pytest.approx(cpu.tc_, rel=1e-6)
    assert adjusted_rand_score(cpu.clusters_, gpu.clusters_) == 1.0


# --------------------------------------------------------------------------------------------------
# The fitted covariance
# --------------------------------------------------------------------------------------------------


def test_covariance_factors_and_log_likelihood(planted: Planted) -> None:
    model, x = planted.model, planted.x
    loadings, diag = model.covariance_factors()
    p = x.shape[1]
    assert loadings.shape == (N_GROUPS, p) and diag.shape == (p,) and (diag > 0).all()
    dense = model.get_covariance()
    np.testing.assert_allclose(dense, loadings.T @ loadings + np.diag(diag), rtol=1e-12)
    np.testing.assert_allclose(np.diag(dense), model.scale_**2, rtol=1e-12)  # unit variance when standardized
    assert np.linalg.eigvalsh(dense).min() > 0
    expected = multivariate_normal(mean=model.mean_, cov=dense).logpdf(x)
    np.testing.assert_allclose(model.score_samples(x), expected, rtol=1e-10)
    assert model.score(x) == pytest.approx(expected.mean(), rel=1e-10)
    with pytest.raises(ValueError, match="covariance_factors"):
        model.get_covariance(max_features=10)


# --------------------------------------------------------------------------------------------------
# Missing values and input validation
# --------------------------------------------------------------------------------------------------


def _with_nans() -> np.ndarray:
    x, _ = _planted(100, seed=8)
    x[3, 2] = np.nan
    x[10, 2] = np.nan
    x[5, 17] = np.nan
    return x


def test_nan_rejected_by_default() -> None:
    x = _with_nans()
    with pytest.raises(ValueError, match=r"3 NaN value\(s\) in column\(s\) \[2, 17\].*missing_values='impute'"):
        LinearCorex(n_hidden=3).fit(x)


def test_nan_imputed_without_mutating_input() -> None:
    x = _with_nans()
    x_before = x.copy()
    model = LinearCorex(n_hidden=3, missing_values="impute").fit(x)
    assert np.array_equal(x, x_before, equal_nan=True)
    assert np.isfinite(model.tc_) and np.isfinite(model.weights_).all()
    np.testing.assert_allclose(model.mean_[2], np.nanmean(x[:, 2]))
    # the same as fitting the mean-imputed copy
    imputed = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
    assert LinearCorex(n_hidden=3).fit(imputed).tc_ == pytest.approx(model.tc_, rel=1e-9)
    y = model.transform(x)
    assert y.shape == (100, 3) and np.isfinite(y).all()
    assert np.array_equal(x, x_before, equal_nan=True)
    with pytest.raises(ValueError, match="NaN"):
        LinearCorex(n_hidden=3).fit(imputed).transform(x)

    all_nan = x.copy()
    all_nan[:, 4] = np.nan
    with pytest.raises(ValueError, match=r"\[4\].*only NaNs"):
        LinearCorex(n_hidden=3, missing_values="impute").fit(all_nan)


def test_bad_inputs() -> None:
    x, _ = _planted(50, seed=9)
    with pytest.raises(ValueError, match="2-D"):
        LinearCorex(n_hidden=2).fit(x[:, 0])
    with pytest.raises(ValueError, match="at least 3 samples"):
        LinearCorex(n_hidden=2).fit(x[:2])
    constant = x.copy()
    constant[:, 5] = 0.1
    with pytest.raises(ValueError, match=r"column\(s\) \[5\] are constant"):
        LinearCorex(n_hidden=2).fit(constant)
    with_inf = x.copy()
    with_inf[0, 7] = np.inf
    with pytest.raises(ValueError, match=r"infinite values in column\(s\) \[7\]"):
        LinearCorex(n_hidden=2).fit(with_inf)
    with pytest.raises(ValueError, match="exceeds the number of features"):
        LinearCorex(n_hidden=x.shape[1] + 1).fit(x)
    for bad in (0, None, 2.5):  # the reference crashes on n_hidden=None; we say what is wrong
        with pytest.raises(ValueError, match="n_hidden must be an integer"):
            LinearCorex(n_hidden=bad)
    with pytest.raises(ValueError, match="missing_values"):
        LinearCorex(missing_values="drop")
    with pytest.raises(ValueError, match="device"):
        LinearCorex(device="not-a-device")
    with pytest.raises(ValueError, match="invalid parameter"):
        LinearCorex().set_params(n_factors=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearCorex(n_hidden=2).transform(x)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            LinearCorex(n_hidden=2, device="cuda").fit(x)


# --------------------------------------------------------------------------------------------------
# Site-leakage audit
# --------------------------------------------------------------------------------------------------


def _cohort_scores(n_per_site: int = 30, site_effect: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    sites = np.repeat(["A", "B", "C"], n_per_site)
    offsets = {"A": -site_effect, "B": 0.0, "C": site_effect}
    age = rng.uniform(20, 60, len(sites))
    sex = rng.choice(["F", "M"], len(sites))
    scores = np.column_stack([
        np.array([offsets[s] for s in sites]) + rng.standard_normal(len(sites)),  # tracks site
        rng.standard_normal(len(sites)),  # nothing
        (age - 40) / 10 + 0.5 * rng.standard_normal(len(sites)),  # tracks age
    ])
    return scores, sites, age, sex


def test_site_leakage_audit_flags_the_site_factor_only() -> None:
    scores, sites, age, sex = _cohort_scores()
    audit = site_leakage_audit(scores, sites, age, sex, n_permutations=199, seed=0)
    assert audit["chance"] == pytest.approx(1 / 3)
    assert audit["threshold_p"] == pytest.approx(0.05 / 4)
    assert audit["n_permutations"] >= 199 and audit["folds"] == 5
    first, noise, aging = audit["factors"]
    assert first["flagged"] and first["site_accuracy"] > 0.6 and first["p_value"] <= 1 / 200 + 1e-12
    assert not noise["flagged"] and not aging["flagged"]
    assert aging["age_r"] > 0.8 and aging["age_p"] < 1e-6 and abs(noise["age_r"]) < 0.3
    assert audit["sex_levels"] == ["F", "M"] and abs(first["sex_r"]) < 0.3
    assert audit["all"]["flagged"]
    assert audit["flagged_factors"] == [0]


def test_site_leakage_audit_without_site_signal_flags_nothing() -> None:
    scores, sites, age, sex = _cohort_scores(site_effect=0.0, seed=1)
    audit = site_leakage_audit(scores, sites, age, sex, n_permutations=199, seed=0)
    assert audit["flagged_factors"] == [] and not audit["all"]["flagged"]
    assert all(f["p_value"] > 0.01 for f in audit["factors"])
    # 30 factors: p must be able to reach 0.05 / 31, so the permutation count is raised
    many = site_leakage_audit(np.tile(scores, (1, 10)), sites, n_permutations=99)
    assert many["n_permutations"] >= 2 * 31 / 0.05
    single_site = site_leakage_audit(scores, np.repeat("A", len(sites)))
    assert not single_site["applicable"] and single_site["flagged_factors"] == []


# --------------------------------------------------------------------------------------------------
# The pipeline stage and the report
# --------------------------------------------------------------------------------------------------


def _store_with_harmonized(small_store, tmp_path):
    """A copy of the small store with a stand-in `harmonized` array: each volume divided by its brain mean (a
    crude intensity normalization); enough to exercise the stage without training a model."""
    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore, read_volume, write_volume

    path = tmp_path / "cohort.zarr"
    shutil.copytree(small_store, path)
    store = CohortStore(path)
    mask = store.mask()
    store.ensure_volume_array(S.HARMONIZED, {"model_kind": "stand-in", "model_checksum": "none",
                                             "reference_site": "NYU"})
    for i in range(store.n_subjects):
        volume = read_volume(store.array_path(S.IMAGES), i)
        write_volume(store.array_path(S.HARMONIZED), i, volume / volume[mask].mean())
    store.set_field(S.HARMONIZED_STATUS, np.arange(store.n_subjects), np.full(store.n_subjects, S.DONE))
    return path


def test_corex_stage_writes_store_and_report(small_store, tmp_path, client) -> None:
    from harmonize import pipeline
    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore
    from harmonize.report import make_report

    path = _store_with_harmonized(small_store, tmp_path)
    out = pipeline.corex(path, client, n_factors=2, restarts=2, features="voxels", downsample=2,
                         n_permutations=99, progress=False)
    store = CohortStore(path)
    g = store.group
    n, p = store.n_subjects, out["n_features"]
    assert out["features"] == "voxels" and out["feature_info"]["downsample"] == 2 and p > 100
    assert g[S.COREX_SCORES].shape == g[S.COREX_RAW_SCORES].shape == (n, 2)
    assert g[S.COREX_WEIGHTS].shape == g[S.COREX_LOADINGS].shape == (2, p)
    assert np.isfinite(g[S.COREX_SCORES][...]).all() and np.isfinite(g[S.COREX_RAW_SCORES][...]).all()
    feature_map = g[S.COREX_FEATURE_MAP][...]
    assert feature_map.shape == store.grid.shape and feature_map.max() == p
    assert not (feature_map[~store.mask()] > 0).any()
    attrs = dict(g[S.COREX_TCS].attrs)
    assert set(attrs["audit"]) == {"raw", "harmonized"} and len(attrs["restarts"]["tcs"]) == 2
    assert attrs["tc"] == pytest.approx(max(attrs["restarts"]["tcs"]))
    for audit in attrs["audit"].values():
        assert len(audit["factors"]) == 2 and 0 <= audit["all"]["site_accuracy"] <= 1

    report = make_report(path, out_dir=tmp_path / "report")
    numbers = (report / "report.json").read_text()
    html_text = (report / "report.html").read_text()
    assert '"corex"' in numbers and "tracks site</b> when" in html_text and "corex.png" in html_text
    assert (report / "corex.png").stat().st_size > 0

    # regional features on the raw images: the stale raw-score baseline is removed
    out = pipeline.corex(path, client, n_factors=3, n_regions=8, restarts=1, source=S.IMAGES,
                         n_permutations=99, progress=False)
    assert out["features"] == "regions" and out["n_features"] == 8 and list(out["audit"]) == ["raw"]
    assert S.COREX_RAW_SCORES not in store.group and g[S.COREX_WEIGHTS].shape == (3, 8)
    with pytest.raises(ValueError, match="features"):
        pipeline.corex(path, client, features="vertices", progress=False)
    with pytest.raises(ValueError, match="harmonized_combat"):
        pipeline.corex(path, client, source="harmonized_combat", progress=False)
