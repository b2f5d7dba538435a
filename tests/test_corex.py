"""Tests for harmonize.corex (Linear CorEx).

The reference package ``linearcorex`` (class ``linearcorex.Corex``) is an oracle for the objective and a
baseline for the optimum reached.  Run with ``-rP`` to see the TC comparison the planted test prints.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from harmonize.corex import (
    CorexConvergenceWarning,
    LinearCorex,
    _free_from_weights,
    _objective_from_free,
    _weights_from_free,
    corex_moments,
    corex_objective,
    fit_restarts,
)

linearcorex = pytest.importorskip("linearcorex")

N_GROUPS, GROUP_SIZE = 3, 8


@contextmanager
def _preserve_numpy_rng() -> Iterator[None]:
    """The reference seeds numpy's global RNG in its constructor; undo that so tests stay independent."""
    state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what needs protecting
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _reference(n_hidden: int, seed: int = 0) -> linearcorex.Corex:
    with _preserve_numpy_rng():
        return linearcorex.Corex(n_hidden=n_hidden, seed=seed)


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / x.std(axis=0)


def _planted(n: int, seed: int, noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Each variable is its group's latent factor plus independent noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, N_GROUPS))
    x = np.repeat(z, GROUP_SIZE, axis=1) + noise * rng.standard_normal((n, N_GROUPS * GROUP_SIZE))
    return x, z


def _groups() -> np.ndarray:
    return np.repeat(np.arange(N_GROUPS), GROUP_SIZE)


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
    ref = _reference(N_GROUPS, seed=0).fit(x)
    # The reference works in float32; also score its weights with our float64 objective (like for like).
    ref_w = torch.as_tensor(ref.ws, dtype=torch.float64)
    ref_tc64 = float(corex_objective(torch.as_tensor(_standardize(x)), ref_w))
    return Planted(x=x, z=z, model=model, ref_tc=float(ref.tc), ref_tc64=ref_tc64)


def _correlated_data(n: int, p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((4, p))
    return _standardize(rng.standard_normal((n, 4)) @ mixing + rng.standard_normal((n, p)))


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.36])
def test_objective_matches_reference(eps: float) -> None:
    n, p, m = 80, 15, 3
    xs = _correlated_data(n, p, seed=1)
    w = 0.08 * np.random.default_rng(2).standard_normal((m, p))
    ref = _reference(m)
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


def test_gradient_matches_finite_differences() -> None:
    xt = torch.as_tensor(_correlated_data(30, 6, seed=4))
    v = 0.3 * torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda vv: _objective_from_free(xt, vv, 0.36), (v.requires_grad_(True),))


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


def test_recovers_planted_structure(planted: Planted) -> None:
    model = planted.model
    print(
        f"\nplanted 3x8: ours TC={model.tc_:.6f} ({model.n_iter_} iterations); "
        f"reference TC={planted.ref_tc:.6f} (float32; {planted.ref_tc64:.6f} rescored in float64)"
    )
    # Each planted group gets one label, and the groups get different labels (labels are arbitrary).
    labels = model.clusters_.reshape(N_GROUPS, GROUP_SIZE)
    assert (labels == labels[:, :1]).all(), f"a planted group was split: {labels}"
    assert len(set(labels[:, 0])) == N_GROUPS, f"planted groups were merged: {labels}"
    assert model.tc_ >= planted.ref_tc - 1e-3 * abs(planted.ref_tc)
    assert model.tc_ >= planted.ref_tc64 - 1e-3 * abs(planted.ref_tc64)

    assert model.weights_.shape == (N_GROUPS, N_GROUPS * GROUP_SIZE)
    assert model.mis_.shape == model.weights_.shape
    assert model.tcs_.shape == (N_GROUPS,)
    assert (np.diff(model.tcs_) <= 0).all(), "factors must be sorted by TC, largest first"
    assert model.converged_
    assert len(model.history_) == model.n_iter_
    assert model.history_[-1] == pytest.approx(model.tc_, rel=1e-9)


def test_transform_scores_track_latents(planted: Planted) -> None:
    model, x, z = planted.model, planted.x, planted.z
    y = model.transform(x)
    assert y.shape == (x.shape[0], N_GROUPS)
    np.testing.assert_allclose(model.fit_transform(x), y, rtol=1e-10, atol=1e-12)  # same seed, same fit

    corr = np.corrcoef(y.T, z.T)[:N_GROUPS, N_GROUPS:]  # factors x latents
    best = np.abs(corr).argmax(axis=0)
    print(f"\n|corr(factor, latent)| best matches: {np.abs(corr).max(axis=0).round(4)}")
    assert sorted(best) == list(range(N_GROUPS)), "each latent should be captured by its own factor"
    assert (np.abs(corr).max(axis=0) > 0.9).all()

    with pytest.raises(ValueError, match="features"):
        model.transform(x[:, :-1])


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


def test_fit_restarts_returns_best(planted: Planted) -> None:
    best, tcs = fit_restarts(planted.x, N_GROUPS, seeds=[0, 1], max_iter=200)
    assert len(tcs) == 2 and best.tc_ == max(tcs)
    assert best.seed in (0, 1) and tcs[[0, 1].index(best.seed)] == best.tc_
    with pytest.raises(ValueError, match="seed"):
        fit_restarts(planted.x, N_GROUPS, seeds=[])


def test_no_anneal_and_convergence_warning() -> None:
    x, _ = _planted(100, seed=6)
    model = LinearCorex(n_hidden=2, anneal=False).fit(x)
    assert np.isfinite(model.tc_) and model.converged_
    with pytest.warns(CorexConvergenceWarning):
        LinearCorex(n_hidden=2, max_iter=1).fit(x)


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
    with pytest.raises(ValueError, match=r"3 NaN value\(s\) in column\(s\) \[2, 17\]"):
        LinearCorex(n_hidden=3).fit(x)


def test_nan_imputed_without_mutating_input() -> None:
    x = _with_nans()
    x_before = x.copy()
    model = LinearCorex(n_hidden=3, missing_values="impute").fit(x)
    assert np.array_equal(x, x_before, equal_nan=True)
    assert np.isfinite(model.tc_) and np.isfinite(model.weights_).all()
    np.testing.assert_allclose(model.mean_[2], np.nanmean(x[:, 2]))
    y = model.transform(x)
    assert y.shape == (100, 3) and np.isfinite(y).all()
    assert np.array_equal(x, x_before, equal_nan=True)

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
    with pytest.raises(ValueError, match="infinite"):
        LinearCorex(n_hidden=2).fit(with_inf)
    with pytest.raises(ValueError, match="exceeds the number of features"):
        LinearCorex(n_hidden=x.shape[1] + 1).fit(x)
    with pytest.raises(ValueError, match="n_hidden"):
        LinearCorex(n_hidden=0)
    with pytest.raises(ValueError, match="missing_values"):
        LinearCorex(missing_values="drop")
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearCorex(n_hidden=2).transform(x)
