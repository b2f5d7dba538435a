"""Linear CorEx: latent factors that maximally explain the total correlation among variables.

Our own torch implementation of the non-overlapping ("discourage overlap") Linear CorEx model of
Ver Steeg & Galstyan, "Fast structure learning with modular regularization" (NeurIPS 2019).  In a
harmonization pipeline it finds groups of co-varying features (e.g. regional MRI measures) and a small
number of factor scores that summarize them.

How this differs from the reference package (``linearcorex``), and why:

* **The constraint u_j < 1 holds by construction.**  The reference takes natural-gradient steps in the
  weights ``W`` and backtracks whenever a step leaves the feasible set.  We optimize free parameters ``V``
  instead and map them to weights ``w_j = v_j / sqrt(1 + v_j^T C v_j)`` with
  ``C = (1 - eps^2) Sigma_x + eps^2 I``.  Then ``u_j = w_j^T C w_j = s_j / (1 + s_j) < 1`` for every ``V``
  (``s_j = v_j^T C v_j >= 0``), and because ``diag(C) = 1`` for standardized data, Cauchy-Schwarz gives
  ``|rho_ji| <= sqrt(u_j) < 1``: every logarithm in the objective stays finite, so an off-the-shelf
  unconstrained optimizer can be used safely.
* **Deterministic quasi-Newton optimization in float64.**  ``torch.optim.LBFGS`` with a strong-Wolfe line
  search, stopped by a *relative* tolerance on the objective, so ``tol`` means the same whatever the size
  of TC.
* **No p x p matrix is ever formed.**  ``C v`` is computed as ``(1 - eps^2) x^T (x v) / n + eps^2 v``, so
  memory is O(n p + m p) and the method scales to far more variables than samples.

The objective (a lower bound on total correlation, maximized), for standardized ``x`` (n x p), weights
``W`` (m x p) and annealing noise ``eps``::

    y = x W^T,  u_j = (1 - eps^2) mean_n(y_j^2) + eps^2 |w_j|^2
    rho = (1 - eps^2) y^T x / n + eps^2 W,  ry = W rho^T with its diagonal set to 1
    r = rho / (1 - rho^2),  S_i = sum_j rho_ji r_ji,  Q_i = sum_jk r_ji ry_jk r_ki
    TC = sum_i log(1 + S_i) - 1/2 sum_i log(1 + Q_i - S_i^2) + 1/2 sum_j log(1 - u_j)

Annealing optimizes the objective at decreasing noise levels ``eps`` (``0.6**1 .. 0.6**6``, then 0); the
noise smooths the landscape early on, which helps avoid poor local optima.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "CorexConvergenceWarning",
    "CorexMoments",
    "LinearCorex",
    "anneal_schedule",
    "corex_moments",
    "corex_objective",
    "fit_restarts",
]

_DTYPE = torch.float64
# Initial size of each factor, u_j = 0.01: factors start almost uninformative so that the (annealed)
# optimization, not the random draw, decides which variables they pick up.
_INIT_U = 0.01
# L-BFGS memory and line-search budget per iteration (torch counts the initial evaluation in max_eval).
_LBFGS_HISTORY = 10
_MAX_LINE_SEARCH = 25
# Recent objective evaluations kept so the one L-BFGS asks for again is not recomputed (see _EvalCache).
_EVAL_CACHE_SIZE = 3
_MISSING_VALUE_OPTIONS = (None, "impute")


class CorexConvergenceWarning(UserWarning):
    """Emitted when the final annealing stage stops at ``max_iter`` before meeting ``tol``."""


def anneal_schedule(anneal: bool = True) -> list[float]:
    """Noise levels ``eps`` optimized in turn: ``0.6**k`` for k = 1..6, then 0 (only 0 without annealing)."""
    if not anneal:
        return [0.0]
    return [0.6**k for k in range(1, 7)] + [0.0]


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


def _tc_and_rho(
    x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float, log_one_minus_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TC bound and rho, given ``y = x W^T`` and ``log(1 - u)``.

    Both are passed in rather than recomputed so that the free parametrization can supply ``log(1 - u)``
    in the exact, cancellation-free form ``-log1p(s)``.
    """
    n = x.shape[0]
    e2 = eps * eps
    rho = (1.0 - e2) * (y.T @ x) / n + e2 * w  # (m, p) = C w_j for each factor
    ry = w @ rho.T  # (m, m): W C W^T
    eye = torch.eye(ry.shape[0], dtype=torch.bool, device=ry.device)
    ry = torch.where(eye, torch.ones_like(ry), ry)  # unit diagonal: the factors' own noise makes Var(Y_j) = 1
    # (1 - rho)(1 + rho) loses less precision than 1 - rho^2 when |rho| is close to 1.
    r = rho / ((1.0 - rho) * (1.0 + rho))
    s = (rho * r).sum(dim=0)  # (p,)
    # Q_i - S_i^2 = sum_j r_ji [(ry r)_ji - rho_ji S_i]: no p x p (or p x m x m) array is needed.
    q_minus_s2 = (r * (ry @ r - rho * s)).sum(dim=0)
    tc = torch.log1p(s).sum() - 0.5 * torch.log1p(q_minus_s2).sum() + 0.5 * log_one_minus_u.sum()
    return tc, rho


def corex_objective(x: torch.Tensor, w: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The Linear CorEx lower bound on total correlation for given weights (differentiable).

    Args:
        x: standardized data (n_samples, n_features); every column must have mean 0 and (ddof=0) variance 1,
            which the bound assumes.
        w: weights (n_hidden, n_features); must satisfy u_j < 1 for every factor, otherwise the result is NaN.
        eps: annealing noise level in [0, 1).

    Returns:
        The scalar TC bound (to be maximized), in nats.
    """
    e2 = eps * eps
    y = x @ w.T
    u = (1.0 - e2) * (y * y).mean(dim=0) + e2 * (w * w).sum(dim=1)
    tc, _ = _tc_and_rho(x, w, y, eps, torch.log1p(-u))
    return tc


def _weights_from_free(
    x: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map free parameters V to feasible weights W; also return ``y = x W^T`` and ``s_j = v_j^T C v_j``.

    ``w_j = v_j / sqrt(1 + s_j)`` gives ``u_j = s_j / (1 + s_j) < 1`` for any V (see the module docstring).
    """
    e2 = eps * eps
    xv = x @ v.T  # (n, m)
    s = (1.0 - e2) * (xv * xv).mean(dim=0) + e2 * (v * v).sum(dim=1)
    scale = torch.rsqrt(1.0 + s)
    return v * scale[:, None], xv * scale, s


def _objective_from_free(x: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """TC bound as a function of the free parameters V (what the optimizer sees)."""
    w, y, s = _weights_from_free(x, v, eps)
    tc, _ = _tc_and_rho(x, w, y, eps, -torch.log1p(s))  # log(1 - u) = -log(1 + s), exactly
    return tc


def _free_from_weights(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of the weight map: ``v_j = w_j / sqrt(1 - u_j)``; requires u_j < 1."""
    e2 = eps * eps
    y = x @ w.T
    u = (1.0 - e2) * (y * y).mean(dim=0) + e2 * (w * w).sum(dim=1)
    if bool((u >= 1.0).any()):
        raise ValueError("weights are infeasible: u_j >= 1 for some factor")
    return w * torch.rsqrt(1.0 - u)[:, None]


@dataclass(frozen=True)
class CorexMoments:
    """Per-factor and per-variable statistics of a solution (all float64 numpy arrays).

    Attributes:
        tc: the TC bound (the objective).
        tcs: (m,) per-factor TC, ``sum_i MI_ji - I(Y_j; X)``; these do not sum to ``tc`` when factors overlap.
        mis: (m, p) mutual information ``-1/2 log(1 - rho_ji^2)`` between factor j and variable i, in nats.
        rho: (m, p) correlation between factor j and variable i.
        u: (m,) ``u_j = 1 - 1 / Y_j^2``.
        mi_y_x: (m,) ``I(Y_j; X) = 1/2 log Y_j^2``.
    """

    tc: float
    tcs: np.ndarray
    mis: np.ndarray
    rho: np.ndarray
    u: np.ndarray
    mi_y_x: np.ndarray


@torch.no_grad()
def corex_moments(x: torch.Tensor, w: torch.Tensor, eps: float = 0.0) -> CorexMoments:
    """The objective and the interpretable per-factor statistics for weights ``w`` (see CorexMoments)."""
    e2 = eps * eps
    y = x @ w.T
    u = (1.0 - e2) * (y * y).mean(dim=0) + e2 * (w * w).sum(dim=1)
    log_one_minus_u = torch.log1p(-u)
    tc, rho = _tc_and_rho(x, w, y, eps, log_one_minus_u)
    mis = -0.5 * torch.log1p(-rho * rho)
    mi_y_x = -0.5 * log_one_minus_u  # 1/2 log Y_j^2 with Y_j^2 = 1 / (1 - u_j)
    tcs = mis.sum(dim=1) - mi_y_x
    return CorexMoments(
        tc=float(tc),
        tcs=tcs.cpu().numpy(),
        mis=mis.cpu().numpy(),
        rho=rho.cpu().numpy(),
        u=u.cpu().numpy(),
        mi_y_x=mi_y_x.cpu().numpy(),
    )


# --------------------------------------------------------------------------------------------------
# Optimization
# --------------------------------------------------------------------------------------------------


class _EvalCache:
    """Remembers the last few (parameters, loss, gradient) evaluations.

    We call ``LBFGS.step`` one iteration at a time so that our own relative tolerance decides
    convergence.  Each ``step`` starts by re-evaluating the closure at the point its previous line search
    already evaluated; torch moves the parameters there with the same floating-point operation it used for
    that evaluation, so an exact comparison finds it here and the repeat costs nothing.  A miss just
    recomputes, so correctness never depends on the cache.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def get(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        for point, loss, grad in reversed(self._entries):
            if torch.equal(point, v):
                return loss, grad
        return None

    def put(self, v: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> None:
        self._entries.append((v.detach().clone(), loss.detach().clone(), grad.detach().clone()))
        if len(self._entries) > self._size:
            self._entries.pop(0)


def _make_closure(
    x: torch.Tensor, v: torch.Tensor, eps: float, optimizer: torch.optim.Optimizer, cache: _EvalCache
) -> Callable[[], torch.Tensor]:
    """Closure for LBFGS: returns the loss ``-TC`` and leaves its gradient in ``v.grad``."""

    def closure() -> torch.Tensor:
        hit = cache.get(v)
        if hit is not None:
            loss, grad = hit
            v.grad = grad.clone()
            return loss
        optimizer.zero_grad(set_to_none=False)
        loss = -_objective_from_free(x, v, eps)
        loss.backward()
        assert v.grad is not None
        cache.put(v, loss, v.grad)
        return loss.detach()

    return closure


@dataclass
class _StageResult:
    n_iter: int
    converged: bool
    history: list[float]


def _optimize_stage(x: torch.Tensor, v: torch.Tensor, eps: float, max_iter: int, tol: float) -> _StageResult:
    """Maximize the TC bound over V (in place) at a fixed noise level until the relative change is <= tol."""
    optimizer = torch.optim.LBFGS(
        [v],
        lr=1.0,
        max_iter=1,  # one iteration per step() so that we apply our own (relative) stopping rule
        max_eval=_MAX_LINE_SEARCH + 1,
        tolerance_grad=0.0,  # absolute gradient / change thresholds are scale-dependent; we use `tol` instead
        tolerance_change=0.0,
        history_size=_LBFGS_HISTORY,
        line_search_fn="strong_wolfe",
    )
    closure = _make_closure(x, v, eps, optimizer, _EvalCache(_EVAL_CACHE_SIZE))
    tc_old = -float(closure())
    history: list[float] = []
    for it in range(1, max_iter + 1):
        v_before = v.detach().clone()
        optimizer.step(closure)
        tc_new = -float(closure())  # a cache hit: the line search already evaluated this point
        if not math.isfinite(tc_new):
            # Cannot happen in exact arithmetic (the parametrization keeps every log finite) but can under
            # round-off when a factor becomes an exact copy of a variable; keep the last finite solution.
            with torch.no_grad():
                v.copy_(v_before)
            warnings.warn(
                f"TC became non-finite at eps={eps:.4g}; keeping the last finite solution (TC={tc_old:.6g}). "
                "This usually means near-duplicate variables.",
                RuntimeWarning,
                stacklevel=3,  # point at the caller of fit()
            )
            return _StageResult(it, True, history)
        history.append(tc_new)
        if abs(tc_new - tc_old) <= tol * max(abs(tc_old), abs(tc_new)):
            return _StageResult(it, True, history)
        tc_old = tc_new
    return _StageResult(max_iter, False, history)


def _init_free(x: torch.Tensor, m: int, eps: float, seed: int) -> torch.Tensor:
    """Random directions scaled so that every factor starts at ``u_j = _INIT_U``.

    Drawn on the CPU from a private generator so the global RNGs are untouched and the draw does not depend on
    the device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    g = torch.randn(m, x.shape[1], generator=generator, dtype=_DTYPE).to(x.device)
    e2 = eps * eps
    xg = x @ g.T
    s_g = (1.0 - e2) * (xg * xg).mean(dim=0) + e2 * (g * g).sum(dim=1)
    s0 = _INIT_U / (1.0 - _INIT_U)  # u = s / (1 + s)
    return g * torch.sqrt(s0 / s_g)[:, None]


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _describe_columns(cols: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(c)) for c in cols[:limit])
    more = f", ... ({len(cols) - limit} more)" if len(cols) > limit else ""
    return f"[{shown}{more}]"


def _as_2d_float(x: Any, name: str = "x") -> np.ndarray:
    """Convert to a float64 2-D array; the caller's data is never modified (callers only read the result)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array-like: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features); got an array with shape {arr.shape}")
    if np.isinf(arr).any():
        cols = np.flatnonzero(np.isinf(arr).any(axis=0))
        raise ValueError(f"{name} contains infinite values in column(s) {_describe_columns(cols)}")
    return arr


def _check_missing(arr: np.ndarray, missing_values: str | None, name: str = "x") -> np.ndarray:
    """Return a boolean NaN mask, raising if NaNs are present and imputation was not requested."""
    nan_mask = np.isnan(arr)
    if missing_values is None and nan_mask.any():
        cols = np.flatnonzero(nan_mask.any(axis=0))
        raise ValueError(
            f"{name} contains {int(nan_mask.sum())} NaN value(s) in column(s) {_describe_columns(cols)}; "
            "pass missing_values='impute' to replace them with column means"
        )
    return nan_mask


# --------------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------------


class LinearCorex:
    """Linear CorEx (non-overlapping variant) with an sklearn-style interface.

    Args:
        n_hidden: number of latent factors m (1 <= m <= n_features).
        max_iter: maximum L-BFGS iterations per annealing stage.
        tol: relative tolerance on the change of the objective between iterations, used to stop each stage.
        anneal: optimize at decreasing noise levels (see ``anneal_schedule``) rather than only at eps = 0; it
            makes the result much less dependent on the random start.
        missing_values: ``None`` rejects NaNs with a ValueError; ``"impute"`` replaces them by the column
            means (of the training data, also in ``transform``), without modifying the caller's array.
        seed: seed of the private generator used for the random initialization.
        device: torch device to compute on (e.g. ``"cpu"`` or ``"cuda"``); everything is float64.
        verbose: print a line per annealing stage.

    Attributes (after ``fit``):
        weights_: (m, p) weights W on the standardized data, factors sorted by ``tcs_`` (largest first).
        tc_: the final TC bound (nats).  tcs_: (m,) per-factor TC.  mis_: (m, p) factor/variable MI.
        clusters_: (p,) index of the factor with the largest |weight| for each variable.
        mean_, scale_: (p,) standardization parameters.  n_iter_: total L-BFGS iterations.
        history_: TC after every iteration, over all stages.  converged_: whether the last stage met ``tol``.
    """

    def __init__(
        self,
        n_hidden: int = 5,
        max_iter: int = 500,
        tol: float = 1e-7,
        anneal: bool = True,
        missing_values: str | None = None,
        seed: int = 0,
        device: str = "cpu",
        verbose: bool = False,
    ) -> None:
        self.n_hidden = n_hidden
        self.max_iter = max_iter
        self.tol = tol
        self.anneal = anneal
        self.missing_values = missing_values
        self.seed = seed
        self.device = device
        self.verbose = verbose
        self._check_params()

    # -- validation ----------------------------------------------------------------------

    def _check_params(self) -> None:
        """Fail fast on hyperparameters that can never work, whatever the data."""
        if not _is_int(self.n_hidden) or self.n_hidden < 1:
            raise ValueError(f"n_hidden must be an integer >= 1; got {self.n_hidden!r}")
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1; got {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"tol must be a non-negative number; got {self.tol!r}")
        if self.missing_values not in _MISSING_VALUE_OPTIONS:
            raise ValueError(f"missing_values must be None or 'impute'; got {self.missing_values!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise RuntimeError("this LinearCorex instance is not fitted yet; call fit() first")

    # -- preprocessing -------------------------------------------------------------------

    def _standardize_fit(self, x: Any) -> np.ndarray:
        """Learn mean/scale and return the standardized (and imputed) copy of x."""
        arr = _as_2d_float(x)
        n, p = arr.shape
        if n < 3:
            raise ValueError(f"need at least 3 samples to fit LinearCorex; got {n}")
        if self.n_hidden > p:
            raise ValueError(f"n_hidden={self.n_hidden} exceeds the number of features ({p})")
        nan_mask = _check_missing(arr, self.missing_values)
        if nan_mask.any():
            all_missing = np.flatnonzero(nan_mask.all(axis=0))
            if all_missing.size:
                raise ValueError(
                    f"column(s) {_describe_columns(all_missing)} contain only NaNs and cannot be imputed"
                )
            mean = np.nanmean(arr, axis=0)
            arr = np.where(nan_mask, mean, arr)  # a new array: the caller's data is left alone
        else:
            mean = arr.mean(axis=0)
        centered = arr - mean
        # ddof=0 so that every standardized column has variance exactly 1, which the objective assumes (and
        # the argument for |rho| < 1 relies on).  With imputation it is the variance of the imputed column.
        scale = np.sqrt((centered * centered).mean(axis=0))
        max_abs = np.abs(arr).max(axis=0)
        # Relative threshold: a constant column can have a round-off "standard deviation" of ~1e-17.
        constant = np.flatnonzero(~(scale > 1e-10 * max_abs))
        if constant.size:
            raise ValueError(
                f"column(s) {_describe_columns(constant)} are constant and cannot be standardized; "
                "remove them"
            )
        self.mean_ = mean
        self.scale_ = scale
        self.n_features_in_ = p
        return centered / scale

    def _standardize(self, x: Any) -> np.ndarray:
        """Apply the learned standardization; missing values (if allowed) become the training mean, i.e. 0."""
        arr = _as_2d_float(x)
        if arr.shape[1] != self.n_features_in_:
            raise ValueError(
                f"x has {arr.shape[1]} features but LinearCorex was fitted with {self.n_features_in_}"
            )
        nan_mask = _check_missing(arr, self.missing_values)
        z = (arr - self.mean_) / self.scale_
        if nan_mask.any():
            z[nan_mask] = 0.0
        return z

    # -- public API ----------------------------------------------------------------------

    def fit(self, x: Any) -> LinearCorex:
        """Learn the weights from data x (n_samples, n_features)."""
        self._check_params()
        xs = self._standardize_fit(x)
        xt = torch.as_tensor(xs, dtype=_DTYPE, device=torch.device(self.device))
        m = int(self.n_hidden)
        schedule = anneal_schedule(self.anneal)

        v = _init_free(xt, m, schedule[0], int(self.seed)).requires_grad_(True)
        history: list[float] = []
        n_iter = 0
        converged = False
        for eps in schedule:
            # V is carried over unchanged: the weights keep their directions and are rescaled by the new C,
            # which keeps them feasible at the new noise level (the reference must rescale W by hand).
            result = _optimize_stage(xt, v, eps, int(self.max_iter), float(self.tol))
            history.extend(result.history)
            n_iter += result.n_iter
            converged = result.converged
            if self.verbose:
                tc = history[-1] if history else float("nan")
                state = "converged" if result.converged else "max_iter reached"
                print(f"LinearCorex eps={eps:.4f}: {result.n_iter} iterations ({state}), TC={tc:.6f}")
        if not converged:
            warnings.warn(
                f"LinearCorex did not reach tol={self.tol:g} within max_iter={self.max_iter} iterations "
                "in the final annealing stage",
                CorexConvergenceWarning,
                stacklevel=2,
            )

        with torch.no_grad():
            w, _, _ = _weights_from_free(xt, v.detach(), schedule[-1])
            moments = corex_moments(xt, w, schedule[-1])
            order = torch.as_tensor(np.argsort(-moments.tcs, kind="stable"), device=w.device)
            w = w[order]
            moments = corex_moments(xt, w, schedule[-1])

        self.weights_ = w.cpu().numpy()
        self.tc_ = moments.tc
        self.tcs_ = moments.tcs
        self.mis_ = moments.mis
        self.clusters_ = np.argmax(np.abs(self.weights_), axis=0)
        self.n_iter_ = n_iter
        self.history_ = history
        self.converged_ = converged
        return self

    def transform(self, x: Any) -> np.ndarray:
        """Factor scores ``y = x_std W^T`` (n_samples, n_hidden) for data in the original units."""
        self._check_fitted()
        return self._standardize(x) @ self.weights_.T

    def fit_transform(self, x: Any) -> np.ndarray:
        """Fit on x and return its factor scores."""
        return self.fit(x).transform(x)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments (sklearn convention, so that e.g. ``sklearn.base.clone`` works)."""
        return {
            "n_hidden": self.n_hidden,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "anneal": self.anneal,
            "missing_values": self.missing_values,
            "seed": self.seed,
            "device": self.device,
            "verbose": self.verbose,
        }

    def set_params(self, **params: Any) -> LinearCorex:
        """Set constructor arguments (sklearn convention)."""
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for LinearCorex")
            setattr(self, key, value)
        self._check_params()
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"LinearCorex({args})"


def fit_restarts(x: Any, n_hidden: int, seeds: Iterable[int], **kw: Any) -> tuple[LinearCorex, list[float]]:
    """Fit one model per seed and return the one with the highest TC bound, plus every model's ``tc_``.

    The objective is non-convex, so a few restarts are a cheap guard against a poor local optimum; ties go
    to the earliest seed.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must contain at least one seed")
    best: LinearCorex | None = None
    tcs: list[float] = []
    for seed in seeds:
        model = LinearCorex(n_hidden=n_hidden, seed=seed, **kw).fit(x)
        tcs.append(model.tc_)
        if best is None or model.tc_ > best.tc_:
            best = model
    assert best is not None
    return best, tcs
