"""Linear CorEx: latent factors that maximally explain the total correlation among variables.

Our own torch implementation of the non-overlapping ("discourage overlap") Linear CorEx model of
Ver Steeg & Galstyan, "Fast structure learning with modular regularization" (NeurIPS 2019), matched to the
reference package ``linearcorex`` 0.53 (same objective, same annealing schedule, same initial factor size) but
built to scale to many more variables than samples.  In the harmonization pipeline it finds groups of co-varying
features (regional or downsampled voxel intensities) and a few factor scores per subject that summarize them;
:func:`site_leakage_audit` then checks whether any factor still tracks the acquisition site.

The objective (a lower bound on total correlation, maximized), for standardized ``x`` (n x p), weights
``W`` (m x p) and annealing noise ``eps``, with ``C = (1 - eps^2) x^T x / n + eps^2 I``::

    rho = W C,  u_j = w_j^T C w_j,  ry = W C W^T with its diagonal set to 1
    r = rho / (1 - rho^2),  S_i = sum_j rho_ji r_ji,  Q_i = sum_jk r_ji ry_jk r_ki
    TC = sum_i log(1 + S_i) - 1/2 sum_i log(1 + Q_i - S_i^2) + 1/2 sum_j log(1 - u_j)

Annealing optimizes it at decreasing noise levels ``eps`` (``0.6**1 .. 0.6**6``, then 0); the noise smooths the
landscape early on, which helps avoid poor local optima.

How this differs from the reference, and why:

* **The constraint u_j < 1 holds by construction.**  We optimize free parameters ``V`` and map them to weights
  ``w_j = v_j / sqrt(1 + s_j)``, ``s_j = v_j^T C v_j``, so ``u_j = s_j / (1 + s_j) < 1`` for every ``V``; with
  ``diag(C) = 1``, Cauchy-Schwarz gives ``|rho_ji| <= sqrt(u_j) < 1``: every logarithm stays finite and an
  unconstrained quasi-Newton method can be used (the reference backtracks whenever a step leaves the feasible
  set, and rescales ``W`` by hand between annealing stages).
* **Deterministic L-BFGS in float64** with a strong-Wolfe line search and a hand-derived gradient, stopped by a
  *relative* tolerance on the objective (the reference's absolute ``tol=1e-5`` is below float32 resolution once
  TC is in the thousands, i.e. at large p): a stage ends when the last step changed TC by at most ``tol`` and
  the quasi-Newton model predicts no more from the next one.  The intermediate annealing stages, which only
  seed the next one, use the looser ``anneal_tol`` and hand their curvature pairs on to the next stage.  For
  float32 data the two products with the data run in float32 (the data's own precision, as in the reference),
  the objective and gradient around them in float64: twice as fast, and the optimum is the float64 fit's to
  1e-6 (tests; ~1e-7 measured).
* **One streaming pass over the data per evaluation, no p x p matrix, no copy of the data.**  Everything the
  objective needs depends on the data only through ``C``, i.e. through any ``R`` with ``R^T R = x^T x``.  For
  wide data (n <= p) ``R`` is the standardized data itself, standardized chunk by chunk from the caller's array
  (float32 or float64, never modified or copied); for tall data (n > p) it is a p x p triangular factor, smaller
  than the data.  Every vector the optimizer handles (weights, gradients, L-BFGS history) is kept in the factored
  form ``Z R + E`` (``Z``: m x rows, ``E``: m x p) together with its image ``E R^T``, so inner products and the
  factor scores ``x V^T`` cost O(m rows^2 + m p) without touching the data, and one evaluation reads the data
  once (two m x rows x chunk products per chunk, while the chunk is in cache).  Memory is O(m p + rows^2) on top
  of the caller's array.
* **Inputs are checked, never mutated**: NaNs raise a clear error unless ``missing_values="impute"``, which
  replaces them by the column means on the fly; the random start comes from a private ``torch.Generator``.
* **The fitted covariance is returned as factors**: ``Sigma = L^T L + diag(d)`` (:meth:`LinearCorex.
  covariance_factors`), the same matrix the reference's ``get_covariance`` forms densely; the held-out
  Gaussian log-likelihood (:meth:`LinearCorex.score_samples`) uses it through the Woodbury identity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "CorexConvergenceWarning",
    "CorexMoments",
    "LinearCorex",
    "RestartResult",
    "anneal_schedule",
    "corex_moments",
    "corex_objective",
    "fit_restarts",
    "site_leakage_audit",
]

_DTYPE = torch.float64
# Initial size of each factor, u_j = 0.01 (as in the reference): factors start almost uninformative so that the
# (annealed) optimization, not the random draw, decides which variables they pick up.
_INIT_U = 0.01
# L-BFGS: curvature pairs kept in the annealing stages (each pair holds two m x p arrays; 3 and 5 pairs need about
# as many evaluations) and in the final stage (where pairs have no m x p part), line-search evaluations per
# iteration, Wolfe constants.
_LBFGS_HISTORY = 3
_FINAL_HISTORY = 20
_MAX_LINE_SEARCH = 25
_WOLFE_C1, _WOLFE_C2 = 1e-4, 0.9
_MISSING_VALUE_OPTIONS = (None, "impute")
# Working-set size of one data chunk (rows x columns float64); see _chunk_budget for the CPU.
_CHUNK_BYTES = {"cpu": (2 * 2**20, 32 * 2**20), "other": 512 * 2**20}  # CPU: (least, most), see _chunk_budget
_CHUNK_FRACTION = 16  # on the CPU a column chunk is 1/16 of the (float64) data, within _CHUNK_BYTES["cpu"]
# The dense covariance is only built on request, and only up to this many features by default.
_MAX_DENSE_FEATURES = 5000


class CorexConvergenceWarning(UserWarning):
    """Emitted when the final annealing stage stops at ``max_iter`` before meeting ``tol``."""


def anneal_schedule(anneal: bool = True) -> list[float]:
    """Noise levels ``eps`` optimized in turn: ``0.6**k`` for k = 1..6, then 0 (only 0 without annealing)."""
    if not anneal:
        return [0.0]
    return [0.6**k for k in range(1, 7)] + [0.0]


# --------------------------------------------------------------------------------------------------
# The objective, written out directly (small problems, tests, re-scoring another package's weights)
# --------------------------------------------------------------------------------------------------


def _tc_and_rho(
    x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float, log_one_minus_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TC bound and rho, given ``y = x W^T`` and ``log(1 - u)``."""
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
    """The Linear CorEx lower bound on total correlation for given weights (differentiable, explicit).

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
    """Map free parameters V to feasible weights W; also return ``y = x W^T`` and ``s_j = v_j^T C v_j``."""
    e2 = eps * eps
    xv = x @ v.T  # (n, m)
    s = (1.0 - e2) * (xv * xv).mean(dim=0) + e2 * (v * v).sum(dim=1)
    scale = torch.rsqrt(1.0 + s)
    return v * scale[:, None], xv * scale, s


def _objective_from_free(x: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """TC bound as a function of the free parameters V, explicit (the streamed evaluator must agree with it)."""
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
# Input handling (no copies of the caller's array; column chunks only)
# --------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _describe_columns(cols: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(c)) for c in cols[:limit])
    more = f", ... ({len(cols) - limit} more)" if len(cols) > limit else ""
    return f"[{shown}{more}]"


def _as_2d_float(x: Any, name: str = "x") -> np.ndarray:
    """A float32/float64 2-D view of x: no copy for float arrays; other dtypes are converted to float64 once."""
    if hasattr(x, "to_numpy"):  # pandas / xarray
        x = x.to_numpy()
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a numeric array-like: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features); got an array with shape {arr.shape}")
    if any(stride < 0 for stride in arr.strides):  # e.g. x[::-1]; torch cannot view it
        arr = np.ascontiguousarray(arr)
    return arr


def _chunk_budget(n: int, p: int, device: torch.device) -> int:
    """Bytes of one float64 column chunk of the data. On the CPU a fixed fraction of the data, within bounds:
    each chunk costs ~25 small torch calls, whose dispatch dominated at 2 MiB chunks for p = 50,000
    (96 chunks per evaluation; 8 MiB chunks fit 18 % faster there), while small data keep small chunks so
    that the fit's own memory stays a fraction of the data's."""
    if device.type != "cpu":
        return _CHUNK_BYTES["other"]
    low, high = _CHUNK_BYTES["cpu"]
    return int(min(max(8 * n * p // _CHUNK_FRACTION, low), high))


def _column_chunks(p: int, width: int) -> Iterator[slice]:
    for c0 in range(0, p, width):
        yield slice(c0, min(p, c0 + width))


def _numpy_chunk_width(n: int) -> int:
    # 2 MiB float64 blocks: the column statistics hold ~3 such temporaries, which at p = 10,000 (n = 500) were
    # most of the fit's memory high-water mark with 8 MiB blocks
    return max(16, (2 * 2**20) // (8 * max(n, 1)))


def _column_stats(arr: np.ndarray, missing_values: str | None, name: str = "x") -> tuple[np.ndarray, np.ndarray, bool]:
    """Mean and (ddof=0, after mean imputation) scale per column, streamed in float64; validates the values."""
    n, p = arr.shape
    mean = np.empty(p)
    scale = np.empty(p)
    nan_cols: list[np.ndarray] = []
    inf_cols: list[np.ndarray] = []
    all_nan: list[np.ndarray] = []
    n_nan = 0
    max_abs = np.empty(p)
    for sl in _column_chunks(p, _numpy_chunk_width(n)):
        block = np.array(arr[:, sl], dtype=np.float64)  # a chunk-sized copy (changed below); never the caller's
        inf = np.isinf(block)
        if inf.any():
            inf_cols.append(np.flatnonzero(inf.any(axis=0)) + sl.start)
            continue
        nan = np.isnan(block)
        has_nan = bool(nan.any())
        if has_nan:
            n_nan += int(nan.sum())
            nan_cols.append(np.flatnonzero(nan.any(axis=0)) + sl.start)
            empty = nan.all(axis=0)
            if empty.any():
                all_nan.append(np.flatnonzero(empty) + sl.start)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are reported below
                mu = np.nanmean(block, axis=0)
        else:
            mu = block.mean(axis=0)
        mean[sl] = mu
        max_abs[sl] = np.nanmax(np.abs(block), axis=0, initial=0.0)
        centered = np.subtract(block, mu, out=block)  # in place: block is our own copy
        if has_nan:
            centered[nan] = 0.0
        # ddof=0 over the (imputed) column so that every standardized column has variance exactly 1, which the
        # objective assumes (and the argument for |rho| < 1 relies on).
        scale[sl] = np.sqrt(np.square(centered, out=centered).mean(axis=0))
    if inf_cols:
        raise ValueError(f"{name} contains infinite values in column(s) {_describe_columns(np.concatenate(inf_cols))}")
    if nan_cols and missing_values is None:
        cols = np.concatenate(nan_cols)
        raise ValueError(
            f"{name} contains {n_nan} NaN value(s) in column(s) {_describe_columns(cols)}; "
            "pass missing_values='impute' to replace them with column means (the input is not modified)"
        )
    if all_nan:
        cols = np.concatenate(all_nan)
        raise ValueError(f"column(s) {_describe_columns(cols)} contain only NaNs and cannot be imputed; remove them")
    # Relative threshold: a constant column can have a round-off "standard deviation" of ~1e-17.
    constant = np.flatnonzero(~(scale > 1e-10 * max_abs))
    if constant.size:
        raise ValueError(
            f"column(s) {_describe_columns(constant)} are constant and cannot be standardized; remove them"
        )
    return mean, scale, bool(nan_cols)


def _check_missing(arr: np.ndarray, missing_values: str | None, name: str = "x") -> bool:
    """Whether arr has NaNs (streamed); raises if it does and imputation was not requested, or on infinities."""
    has_nan = False
    for sl in _column_chunks(arr.shape[1], _numpy_chunk_width(arr.shape[0])):
        block = arr[:, sl]
        if np.isinf(block).any():
            cols = np.flatnonzero(np.isinf(block).any(axis=0)) + sl.start
            raise ValueError(f"{name} contains infinite values in column(s) {_describe_columns(cols)}")
        nan = np.isnan(block)
        if nan.any():
            if missing_values is None:
                cols = np.flatnonzero(nan.any(axis=0)) + sl.start
                raise ValueError(
                    f"{name} contains NaN value(s) in column(s) {_describe_columns(cols)} (and maybe more); "
                    "pass missing_values='impute' to replace them with the training means"
                )
            has_nan = True
    return has_nan


def _standardized_chunks(
    arr: np.ndarray, mean: np.ndarray, scale: np.ndarray, has_nan: bool
) -> Iterator[tuple[slice, np.ndarray]]:
    """(column slice, standardized float64 block) for the caller's array; NaNs become 0 (the mean)."""
    for sl in _column_chunks(arr.shape[1], _numpy_chunk_width(arr.shape[0])):
        block = (np.asarray(arr[:, sl], dtype=np.float64) - mean[sl]) / scale[sl]
        if has_nan:
            block = np.nan_to_num(block, nan=0.0, copy=False)
        yield sl, block


# --------------------------------------------------------------------------------------------------
# Streaming design: R with R^T R = x_std^T x_std, read chunk by chunk
# --------------------------------------------------------------------------------------------------

# Above this |mean| / std ratio, chunks are centered before the products (exact) rather than corrected after
# them (one pass less, but the correction cancels digits in proportion to the ratio).
_MAX_FOLDED_OFFSET = 1e4


class _Design:
    """The standardized data as seen by the objective: ``R`` (rows x p) with ``R^T R = x_std^T x_std``.

    Wide data (n <= p): ``R = x_std``, read chunk by chunk from the caller's array (a zero-copy torch view on the
    CPU), so no standardized copy is ever stored; the centering and scaling are folded into the small (m x chunk)
    side of the products where that is exact enough.  Tall data (n > p): ``R`` is the p x p upper Cholesky factor
    of ``x_std^T x_std`` (eigen-decomposition if that is singular), smaller than the data.  ``K = R R^T``
    (rows x rows) is computed once.
    """

    def __init__(
        self, arr: np.ndarray, mean: np.ndarray, scale: np.ndarray, has_nan: bool, device: torch.device,
        chunk_columns: int | None = None,
    ) -> None:
        n, p = arr.shape
        self.n, self.p, self.device = n, p, device
        self.mean = torch.as_tensor(mean, dtype=_DTYPE, device=device)
        self.inv_scale = torch.as_tensor(1.0 / scale, dtype=_DTYPE, device=device)
        self._has_nan = has_nan
        self.wide = n <= p
        budget = _chunk_budget(n, p, device)
        self._r: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        if self.wide:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._x = torch.from_numpy(arr).to(device)  # a view on the CPU: nothing is copied
            self.rows = n
            # Products may use the raw chunk and correct for the mean afterwards (see _MAX_FOLDED_OFFSET).
            self.folded = bool(np.max(np.abs(mean) / scale) <= _MAX_FOLDED_OFFSET)
        else:
            self.rows = p
            self._r = self._tall_factor(arr, mean, scale, has_nan)
            self.folded = False
        width = chunk_columns or max(8, budget // (8 * self.rows))
        self.width = int(min(width, p))
        # float32 data: the two big products of each evaluation run in float32 on a standardized float32 copy of
        # the chunk (as precise as the data; the reference computes everything in float32), while the objective,
        # the gradient and every sum over features stay float64.  Half the bytes and twice the BLAS rate of
        # casting each chunk to float64: the evaluation at n = 500, p = 50,000 takes ~2x less time.
        self.single = self.wide and arr.dtype == np.float32
        self._buffer = torch.empty(self.rows, self.width, dtype=_DTYPE, device=device) if self.wide else None
        if self.single:
            self._mean32 = self.mean.to(torch.float32)
            self._inv_scale32 = self.inv_scale.to(torch.float32)
            # The chunks are centred on the float32-rounded mean; what that rounding leaves, per column, is a
            # constant (float64, exact) that _evaluate adds back on the small side of its products (rank one), so
            # that columns far from zero stay exactly centred (their |mean| / std can be ~1e4 and more).
            self.offset32 = (self._mean32.to(_DTYPE) - self.mean) * self.inv_scale
            self._buffer32 = torch.empty(self.rows, self.width, dtype=torch.float32, device=device)
        k = torch.zeros(self.rows, self.rows, dtype=_DTYPE, device=device)
        for _, rc in self.chunks():
            k.addmm_(rc, rc.T)
        self.k = k

    def _tall_factor(self, arr: np.ndarray, mean: np.ndarray, scale: np.ndarray, has_nan: bool) -> torch.Tensor:
        n, p = arr.shape
        gram = torch.zeros(p, p, dtype=_DTYPE, device=self.device)
        rows_per_block = max(1, (8 * 2**20) // (8 * p))
        for r0 in range(0, n, rows_per_block):
            block = (np.asarray(arr[r0 : r0 + rows_per_block], dtype=np.float64) - mean) / scale
            if has_nan:
                block = np.nan_to_num(block, nan=0.0, copy=False)
            b = torch.as_tensor(block, device=self.device)
            gram.addmm_(b.T, b)
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            return factor.T.contiguous()
        # Collinear columns: x^T x is singular; any square root works, e.g. from the eigen-decomposition.
        evals, evecs = torch.linalg.eigh(gram)
        return (evecs * evals.clamp(min=0.0).sqrt()).T.contiguous()

    def _raw_chunk(self, sl: slice, copy: bool) -> torch.Tensor:
        """x[:, sl] as float64 with NaNs replaced by the column means; in the reused buffer if ``copy`` or if a
        cast or imputation is needed, else a strided view of the caller's data (BLAS reads it in place)."""
        assert self._x is not None and self._buffer is not None
        src = self._x[:, sl]
        if not copy and src.dtype == _DTYPE and not self._has_nan:
            return src
        block = self._buffer[:, : sl.stop - sl.start]
        block.copy_(src)
        if self._has_nan:
            torch.where(torch.isnan(block), self.mean[sl], block, out=block)
        return block

    def chunks(self, folded: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """(column slice, R[:, slice] as float64); use each block before asking for the next (buffers are reused).

        With ``folded`` (only honoured when ``self.folded``) the block is the *raw* chunk, and the caller undoes
        the centering and scaling on the small side of its products (see ``_evaluate``).
        """
        for sl in _column_chunks(self.p, self.width):
            if self._r is not None:
                yield sl, self._r[:, sl]
            elif folded and self.folded:
                yield sl, self._raw_chunk(sl, copy=False)
            else:
                yield sl, self._raw_chunk(sl, copy=True).sub_(self.mean[sl]).mul_(self.inv_scale[sl])

    def chunks32(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(column slice, R[:, slice] standardized in float32), for float32 data (``self.single``); the same
        reused buffer each time."""
        assert self._x is not None and self.single
        for sl in _column_chunks(self.p, self.width):
            block = self._buffer32[:, : sl.stop - sl.start]
            block.copy_(self._x[:, sl])
            if self._has_nan:
                torch.where(torch.isnan(block), self._mean32[sl], block, out=block)
            yield sl, block.sub_(self._mean32[sl]).mul_(self._inv_scale32[sl])

    def image(self, e: torch.Tensor) -> torch.Tensor:
        """``e R^T`` (m x rows) for an explicit (m x p) array."""
        out = torch.zeros(e.shape[0], self.rows, dtype=_DTYPE, device=self.device)
        for sl, rc in self.chunks():
            out.addmm_(e[:, sl], rc.T)
        return out

    def explicit(self, z: torch.Tensor) -> torch.Tensor:
        """``z R`` (m x p) for coefficients z (m x rows)."""
        out = torch.empty(z.shape[0], self.p, dtype=_DTYPE, device=self.device)
        for sl, rc in self.chunks():
            out[:, sl] = z @ rc
        return out


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


@dataclass
class _Vec:
    """A point or direction in the (m x p) parameter space, kept as ``Z R + E`` with its images.

    ``z``: (m, rows) coefficients on the rows of R; ``zk = z K``; ``e``: (m, p) explicit part or None (zero);
    ``er = e R^T`` (m, rows).  Linear combinations keep the form; inner products need no pass over the data:
    ``<Z1 R + E1, Z2 R + E2> = <Z1 K, Z2> + <Z1, E2 R^T> + <E1 R^T, Z2> + <E1, E2>``.
    """

    z: torch.Tensor
    zk: torch.Tensor
    e: torch.Tensor | None = None
    er: torch.Tensor | None = None

    def image(self) -> torch.Tensor:
        """``V R^T`` (m x rows)."""
        return self.zk if self.er is None else self.zk + self.er

    def copy(self) -> _Vec:
        return _Vec(self.z.clone(), self.zk.clone(), None if self.e is None else self.e.clone(),
                    None if self.er is None else self.er.clone())

    def axpy_(self, alpha: float, other: _Vec) -> _Vec:
        """``self += alpha * other``, in place; returns self."""
        self.z.add_(other.z, alpha=alpha)
        self.zk.add_(other.zk, alpha=alpha)
        if other.e is not None:
            assert other.er is not None
            if self.e is None:
                self.e, self.er = alpha * other.e, alpha * other.er
            else:
                assert self.er is not None
                self.e.add_(other.e, alpha=alpha)
                self.er.add_(other.er, alpha=alpha)
        return self

    def scale_(self, alpha: float) -> _Vec:
        for part in (self.z, self.zk, self.e, self.er):
            if part is not None:
                part.mul_(alpha)
        return self

    def combine(self, alpha: float, other: _Vec) -> _Vec:
        """``self + alpha * other`` (new vector)."""
        return self.copy().axpy_(alpha, other)

    def scaled(self, alpha: float) -> _Vec:
        return self.copy().scale_(alpha)

    def dot(self, other: _Vec) -> float:
        total = _flat_dot(self.zk, other.z)
        if other.er is not None:
            total = total + _flat_dot(self.z, other.er)
        if self.er is not None:
            total = total + _flat_dot(self.er, other.z)
        if self.e is not None and other.e is not None:
            total = total + _flat_dot(self.e, other.e)
        return float(total)

    def gram(self, other: _Vec) -> torch.Tensor:
        """(m x m) inner products between the rows of self and other."""
        g = self.zk @ other.z.T
        if other.er is not None:
            g = g + self.z @ other.er.T
        if self.er is not None:
            g = g + self.er @ other.z.T
        if self.e is not None and other.e is not None:
            g = g + self.e @ other.e.T
        return g


@dataclass
class _Evaluation:
    tc: float
    grad: _Vec | None  # gradient of TC (to be maximized)
    s: torch.Tensor  # (m,) s_j = v_j^T C v_j
    rho: torch.Tensor | None = None  # (m, p), when asked for


@torch.no_grad()
def _evaluate(design: _Design, v: _Vec, eps: float, want_grad: bool = True, keep_rho: bool = False) -> _Evaluation:
    """TC(V) and its gradient in one pass over the data (see the module docstring for the notation).

    Gradient (derived by hand; checked against autograd of the explicit formula in the tests): with
    ``rho = diag(c) V C``, ``c_j = (1 + s_j)^(-1/2)``, ``ry_jk = c_j c_k (V C V^T)_jk``::

        dTC/dV = diag(c) G_rho C + 2 (G_ry o c c^T + diag(gamma)) V C
        G_rho_ji = [2 rho (1/A_i + S_i/B_i) - T_ji (1 + rho^2) / B_i] / (1 - rho^2)^2,   T = ry r
        G_ry = -1/2 (r / B) r^T (zero diagonal),   A = 1 + S,  B = 1 + Q - S^2
        gamma_j = -1/2 / (1 + s_j) - 1/2 c_j^3 [sum_i G_rho_ji (VC)_ji + 2 sum_k G_ry_jk c_k (VCV^T)_jk]

    ``V C = B R + eps^2 E`` with ``B = (1 - eps^2)/n (V R^T) + eps^2 Z``, so each chunk of the data is used for
    exactly two (m x rows x chunk) products: ``B R_c`` and ``G_c R_c^T``.
    """
    e2 = eps * eps
    a = 1.0 - e2
    n = design.n
    xv = v.image()  # (m, rows) = V R^T
    mfull = (a / n) * (xv @ xv.T)  # V C V^T
    if e2:
        mfull = mfull + e2 * v.gram(v)
    s = torch.diagonal(mfull).clone()
    c = torch.rsqrt(1.0 + s)
    ry = (c[:, None] * c[None, :]) * mfull
    ry.fill_diagonal_(1.0)
    bmat = (a / n) * xv  # (m, rows): V C = bmat R + e2 E
    if e2:
        bmat = bmat + e2 * v.z
    single = design.single
    folded = design.folded and not single
    m = v.z.shape[0]
    dev = design.device
    # Row scaling by c folded into the left factor: rho = diag(c) (B R_c + e2 E_c).
    bmat_c = c[:, None] * bmat
    if folded:  # raw chunks: B R_c = (B X_c - (B 1) mean_c^T) / scale_c
        bsum_c = bmat_c.sum(dim=1, keepdim=True)
        mean, inv_scale = design.mean, design.inv_scale
    ce2 = (e2 * c)[:, None]
    use_e = bool(e2) and v.e is not None
    one = torch.ones((), dtype=_DTYPE, device=dev)
    tc = torch.zeros((), dtype=_DTYPE, device=dev)
    rho_all = torch.empty(m, design.p, dtype=_DTYPE, device=dev) if keep_rho else None
    if want_grad:
        p_acc = torch.zeros(m, design.rows, dtype=_DTYPE, device=dev)
        p_corr = torch.zeros(m, dtype=_DTYPE, device=dev)
        g1 = torch.zeros(m, dtype=_DTYPE, device=dev)
        gry = torch.zeros(m, m, dtype=_DTYPE, device=dev)
        grho_all = torch.empty(m, design.p, dtype=_DTYPE, device=dev) if e2 else None
    if single:  # R = R32 + 1 offset^T: B R = B R32 + (B 1) offset^T, G R^T = G R32^T + (G offset) 1^T
        bmat_c32 = bmat_c.to(torch.float32)
        bsum_c = bmat_c.sum(dim=1, keepdim=True)
        offset = design.offset32
        p_acc32 = torch.empty(m, design.rows, dtype=torch.float32, device=dev) if want_grad else None
    for sl, rc in design.chunks32() if single else design.chunks(folded=True):
        if single:
            rho = (bmat_c32 @ rc).to(_DTYPE).addmm_(bsum_c, offset[None, sl])
        else:
            rho = bmat_c @ rc
        if folded:
            rho.addmm_(bsum_c, mean[None, sl], alpha=-1.0).mul_(inv_scale[sl])
        if use_e:
            rho.addcmul_(v.e[:, sl], ce2)  # type: ignore[index]
        om = torch.sub(one, rho).mul_(rho + 1.0)  # (1 - rho)(1 + rho): no cancellation near |rho| = 1
        rr = rho / om
        ssum = torch.linalg.vecdot(rho, rr, dim=0)  # S
        t = ry @ rr
        dq = torch.linalg.vecdot(rr, t, dim=0) - ssum * ssum  # Q - S^2 (sum_j r_j rho_j = S)
        tc += torch.log1p(ssum).sum() - 0.5 * torch.log1p(dq).sum()
        if rho_all is not None:
            rho_all[:, sl] = rho
        if not want_grad:
            continue
        inv_b = 1.0 / (1.0 + dq)
        coef = 2.0 / (1.0 + ssum) + 2.0 * ssum * inv_b
        # minus G_rho = [T inv_b (1 + rho^2) - coef rho] / om^2, built in place in t
        neg_g = t.mul_(inv_b).mul_(torch.addcmul(one, rho, rho)).addcmul_(rho, coef, value=-1.0)
        neg_g.div_(om.mul_(om))
        g1 -= torch.linalg.vecdot(neg_g, rho, dim=1)  # sum_i G_rho rho_ji = c_j sum_i G_rho (VC)_ji
        gry.addmm_(rr * inv_b, rr.T)
        if single:
            torch.mm(neg_g.to(torch.float32), rc.T, out=p_acc32)
            p_acc.sub_(p_acc32)
            p_corr.addmv_(neg_g, offset[sl])
        elif folded:
            gs = neg_g * inv_scale[sl]
            p_acc.addmm_(gs, rc.T, alpha=-1.0)
            p_corr.addmv_(gs, mean[sl], alpha=-1.0)
        else:
            p_acc.addmm_(neg_g, rc.T, alpha=-1.0)
        if grho_all is not None:
            grho_all[:, sl] = neg_g
    tc += -0.5 * torch.log1p(s).sum()
    if not want_grad:
        return _Evaluation(float(tc), None, s, rho_all)
    if folded or single:  # the rank-one part of the products: the mean (folded) or the rounding offset (single)
        p_acc.sub_(p_corr[:, None])
    p_acc.mul_(c[:, None])  # P = diag(c) G_rho R^T
    g1 = g1 / c
    g_ry = -0.5 * gry
    g_ry.fill_diagonal_(0.0)
    gamma = -0.5 / (1.0 + s) - 0.5 * c**3 * (g1 + 2.0 * (g_ry * c[None, :] * mfull).sum(dim=1))
    h = 2.0 * (g_ry * (c[:, None] * c[None, :])) + torch.diag(2.0 * gamma)
    z = (a / n) * p_acc + h @ bmat
    zk = z @ design.k
    e = er = None
    if e2:
        assert grho_all is not None
        e = grho_all.mul_((-e2) * c[:, None])  # e2 diag(c) G_rho (grho_all holds -G_rho)
        er = e2 * p_acc
        if v.e is not None:
            assert v.er is not None
            e.addmm_(h, v.e, alpha=e2)
            er.addmm_(h, v.er, alpha=e2)
    return _Evaluation(float(tc), _Vec(z, zk, e, er), s, rho_all)


# --------------------------------------------------------------------------------------------------
# Deterministic L-BFGS with a strong-Wolfe line search, on factored vectors
# --------------------------------------------------------------------------------------------------


def _cubic_min(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
               bounds: tuple[float, float] | None = None) -> float:
    """Minimizer of the cubic through two points with slopes, clipped to bounds (bisection if degenerate)."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    values = (x1, f1, g1, x2, f2, g2)
    if not all(math.isfinite(val) for val in values) or x1 == x2:
        return 0.5 * (lo + hi)
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square < 0:
        return 0.5 * (lo + hi)
    d2 = math.sqrt(d2_square)
    if x1 <= x2:
        denom = g2 - g1 + 2.0 * d2
        pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / denom) if denom != 0 else 0.5 * (lo + hi)
    else:
        denom = g1 - g2 + 2.0 * d2
        pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / denom) if denom != 0 else 0.5 * (lo + hi)
    if not math.isfinite(pos):
        return 0.5 * (lo + hi)
    return min(max(pos, lo), hi)


@dataclass
class _Point:
    t: float
    f: float  # loss = -TC (minimized); +inf where the objective is not finite
    g: _Vec | None  # gradient of the loss
    gtd: float


def _strong_wolfe(phi, f0: float, gtd0: float, t: float, max_evals: int) -> tuple[_Point, int]:
    """Bracketing + zoom line search for the strong Wolfe conditions (Nocedal & Wright, Alg. 3.5/3.6).

    ``phi(t)`` returns a _Point.  The same cubic-interpolation scheme as torch.optim.LBFGS (minFunc), rewritten
    for our factored vectors; returns the accepted (or best found) point and the number of evaluations.
    """
    start = _Point(0.0, f0, None, gtd0)
    prev = start
    new = phi(t)
    evals = 1
    bracket: list[_Point] | None = None
    done = False
    while evals < max_evals:
        if new.f > f0 + _WOLFE_C1 * t * gtd0 or (evals > 1 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if abs(new.gtd) <= -_WOLFE_C2 * gtd0:
            bracket, done = [new], True
            break
        if new.gtd >= 0:
            bracket = [prev, new]
            break
        t_next = _cubic_min(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd, bounds=(t + 0.01 * (t - prev.t), 10 * t))
        prev, t = new, t_next
        new = phi(t)
        evals += 1
    if bracket is None:
        bracket = [start, new]
    if done:
        return bracket[0], evals
    insufficient = False
    while evals < max_evals:
        lo_i, hi_i = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        b_lo, b_hi = min(bracket[0].t, bracket[1].t), max(bracket[0].t, bracket[1].t)
        if b_hi - b_lo <= 1e-12 * max(b_hi, 1e-300):
            break
        t = _cubic_min(bracket[0].t, bracket[0].f, bracket[0].gtd, bracket[1].t, bracket[1].f, bracket[1].gtd)
        margin = 0.1 * (b_hi - b_lo)
        if min(b_hi - t, t - b_lo) < margin:
            if insufficient or t >= b_hi or t <= b_lo:
                t = b_hi - margin if abs(t - b_hi) < abs(t - b_lo) else b_lo + margin
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        new = phi(t)
        evals += 1
        if new.f > f0 + _WOLFE_C1 * t * gtd0 or new.f >= bracket[lo_i].f:
            bracket[hi_i] = new
        else:
            if abs(new.gtd) <= -_WOLFE_C2 * gtd0:
                return new, evals
            if new.gtd * (bracket[hi_i].t - bracket[lo_i].t) >= 0:
                bracket[hi_i] = bracket[lo_i]
            bracket[lo_i] = new
    best = min(bracket, key=lambda pt: pt.f)
    return best, evals


def _two_loop(g: _Vec, pairs: list[tuple[_Vec, _Vec, float]], h_diag: float) -> _Vec:
    """The L-BFGS direction ``d = -H g`` (two-loop recursion over the curvature pairs (s, y, 1 / y.s))."""
    d = g.scaled(-1.0)
    alphas = []
    for s_i, y_i, rho_i in reversed(pairs):
        alpha = rho_i * s_i.dot(d)
        alphas.append(alpha)
        d.axpy_(-alpha, y_i)
    d.scale_(h_diag)
    for (s_i, y_i, rho_i), alpha in zip(pairs, reversed(alphas), strict=True):
        d.axpy_(alpha - rho_i * y_i.dot(d), s_i)
    return d


@dataclass
class _StageResult:
    n_iter: int
    n_evals: int
    converged: bool
    history: list[float]


def _optimize_stage(
    design: _Design, v: _Vec, eps: float, max_iter: int, tol: float, history_size: int = _LBFGS_HISTORY,
    pairs: list[tuple[_Vec, _Vec, float]] | None = None,
) -> tuple[_Vec, _StageResult]:
    """Maximize the TC bound over V at a fixed noise level until the relative change is <= tol (L-BFGS).

    ``v`` is updated in place.  ``pairs``, if given, are curvature pairs from the previous stage to start from;
    the list is updated in place (so the caller can hand it to the next stage).
    """

    def loss_at(point: _Vec) -> tuple[float, _Vec]:
        ev = _evaluate(design, point, eps)
        assert ev.grad is not None
        f = -ev.tc if math.isfinite(ev.tc) else math.inf
        return f, ev.grad.scale_(-1.0)

    f, g = loss_at(v)
    n_evals = 1
    if not math.isfinite(f):
        raise FloatingPointError(f"the TC bound is not finite at the start of the eps={eps:.4g} stage")
    pairs = pairs if pairs is not None else []
    h_diag = 1.0
    steepest = not pairs  # the direction is -g (no curvature information yet)
    if pairs:
        h_diag = 1.0 / (pairs[-1][2] * pairs[-1][1].dot(pairs[-1][1]))
        d = _two_loop(g, pairs, h_diag)
    else:
        d = g.scaled(-1.0)
    history: list[float] = []
    for _ in range(max_iter):  # iterations, including a retry along -g after a failed line search
        gtd = g.dot(d)
        if not gtd < 0:  # not a descent direction (round-off): restart from steepest descent
            pairs.clear()
            d, steepest = g.scaled(-1.0), True
            gtd = g.dot(d)
            if not gtd < 0:
                return v, _StageResult(len(history), n_evals, True, history)  # zero gradient: stationary
        # Steepest descent: a first step that moves V by about its own size (or unit length from V = 0).
        t = min(1.0, max(math.sqrt(v.dot(v)), 1e-3) / math.sqrt(-gtd)) if steepest else 1.0

        def phi(step: float, v0: _Vec = v, direction: _Vec = d) -> _Point:
            f_t, g_t = loss_at(v0.combine(step, direction))  # the point itself is rebuilt for the accepted step
            return _Point(step, f_t, g_t, g_t.dot(direction) if math.isfinite(f_t) else math.nan)

        best, used = _strong_wolfe(phi, f, gtd, t, _MAX_LINE_SEARCH)
        n_evals += used
        if best.g is None or not best.f < f:
            if not steepest:  # the quasi-Newton model misled the line search: forget it, retry along -g
                pairs.clear()
                d, steepest = g.scaled(-1.0), True
                continue
            # No decrease even along -g: converged as far as round-off allows.
            if not math.isfinite(best.f):
                warnings.warn(
                    f"TC became non-finite at eps={eps:.4g}; keeping the last finite solution (TC={-f:.6g}). "
                    "This usually means near-duplicate variables.",
                    RuntimeWarning,
                    stacklevel=4,  # _optimize_stage <- _fit <- fit <- the caller
                )
            return v, _StageResult(len(history), n_evals, True, history)
        assert best.g is not None
        # In place, so that no extra (m x p) arrays are held: v += t d, then s = t d and y = g_new - g_old reuse
        # the memory of d and of the old gradient, which are not needed any more.
        v.axpy_(best.t, d)
        s = d.scale_(best.t)
        y = g.scale_(-1.0).axpy_(1.0, best.g)
        ys = y.dot(s)
        if ys > 1e-10:
            if len(pairs) == history_size:
                pairs.pop(0)
            pairs.append((s, y, 1.0 / ys))
            h_diag = ys / y.dot(y)
        f_old = f
        f, g = best.f, best.g
        history.append(-f)
        small_change = abs(f - f_old) <= tol * max(abs(f_old), abs(f))
        d, steepest = _two_loop(g, pairs, h_diag), not pairs
        # Converged when the last step changed TC by at most tol (relative) *and* the quasi-Newton model predicts
        # no more than that from the next one (-g.d / 2 estimates the remaining gain): one short step alone
        # does not stop the stage.
        if small_change and -0.5 * g.dot(d) <= tol * abs(f):
            return v, _StageResult(len(history), n_evals, True, history)
    return v, _StageResult(len(history), n_evals, False, history)


# --------------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------------


class LinearCorex:
    """Linear CorEx (non-overlapping variant) with an sklearn-style interface.

    Args:
        n_hidden: number of latent factors m (1 <= m <= n_features).
        max_iter: maximum L-BFGS iterations per annealing stage.
        tol: relative tolerance that stops the final (eps = 0) stage: the last step changed TC by at most
            ``tol * |TC|`` and the quasi-Newton model predicts no more from the next one.  1e-8 reaches the
            reference's optimum to ~1e-6 (relative); 1e-7 is about 25 % faster and ~1e-5 short of it.
        anneal_tol: the same for the intermediate annealing stages (eps > 0), whose solutions only seed the next
            stage; the effective value is ``max(tol, anneal_tol)``.  Polishing them further costs about a third
            more evaluations without changing the final TC (the reference uses one tolerance for all stages).
        anneal: optimize at decreasing noise levels (see ``anneal_schedule``) rather than only at eps = 0; it
            makes the result much less dependent on the random start.
        missing_values: ``None`` rejects NaNs with a ValueError; ``"impute"`` replaces them by the column
            means (of the training data, also in ``transform``), without modifying the caller's array.
        seed: seed of the private generator used for the random initialization.
        device: torch device to compute on (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).  Everything is float64
            except, for float32 data with n <= p, the two products with the data in each evaluation (see
            ``_Design``).
        history_size: L-BFGS curvature pairs kept in the annealing stages (memory: about 2 * history_size * m * p
            * 8 bytes); the final stage keeps at least 20, which costs no memory there (see ``_fit``).
        chunk_columns: data columns per streamed chunk (default: a cache-sized chunk on the CPU, large on a GPU).
        n_threads: torch CPU threads during ``fit`` (restored afterwards); None keeps torch's setting.  One thread
            per fit is usually best when several fits run side by side (restarts as Dask tasks) or the machine is
            shared: the per-chunk work is small, and oversubscribed threads spin.
        verbose: print a line per annealing stage.

    Attributes (after ``fit``):
        weights_: (m, p) weights W on the standardized data, factors sorted by ``tcs_`` (largest first).
        loadings_: (m, p) correlation between each factor and each (standardized) variable, ``rho``.
        tc_: the final TC bound (nats).  tcs_: (m,) per-factor TC.  mis_: (m, p) factor/variable MI.
        clusters_: (p,) index of the factor with the largest |weight| for each variable.
        mean_, scale_: (p,) standardization parameters.  n_iter_, n_evals_: L-BFGS iterations / evaluations.
        history_: TC after every iteration, over all stages.  converged_: whether the last stage met ``tol``.
    """

    def __init__(
        self,
        n_hidden: int = 5,
        max_iter: int = 500,
        tol: float = 1e-8,
        anneal_tol: float = 1e-5,
        anneal: bool = True,
        missing_values: str | None = None,
        seed: int = 0,
        device: str = "cpu",
        history_size: int = _LBFGS_HISTORY,
        chunk_columns: int | None = None,
        n_threads: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.n_hidden = n_hidden
        self.max_iter = max_iter
        self.tol = tol
        self.anneal_tol = anneal_tol
        self.anneal = anneal
        self.missing_values = missing_values
        self.seed = seed
        self.device = device
        self.history_size = history_size
        self.chunk_columns = chunk_columns
        self.n_threads = n_threads
        self.verbose = verbose
        self._check_params()

    # -- validation ----------------------------------------------------------------------

    def _check_params(self) -> None:
        """Fail fast on hyperparameters that can never work, whatever the data."""
        if not _is_int(self.n_hidden) or self.n_hidden < 1:
            raise ValueError(f"n_hidden must be an integer >= 1 (the number of factors); got {self.n_hidden!r}")
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1; got {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"tol must be a non-negative number; got {self.tol!r}")
        if not (isinstance(self.anneal_tol, (int, float)) and self.anneal_tol >= 0):
            raise ValueError(f"anneal_tol must be a non-negative number; got {self.anneal_tol!r}")
        if self.missing_values not in _MISSING_VALUE_OPTIONS:
            raise ValueError(f"missing_values must be None or 'impute'; got {self.missing_values!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        if not _is_int(self.history_size) or self.history_size < 1:
            raise ValueError(f"history_size must be an integer >= 1; got {self.history_size!r}")
        if self.chunk_columns is not None and (not _is_int(self.chunk_columns) or self.chunk_columns < 1):
            raise ValueError(f"chunk_columns must be None or an integer >= 1; got {self.chunk_columns!r}")
        if self.n_threads is not None and (not _is_int(self.n_threads) or self.n_threads < 1):
            raise ValueError(f"n_threads must be None or an integer >= 1; got {self.n_threads!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda'; got {self.device!r}") from exc

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise RuntimeError("this LinearCorex instance is not fitted yet; call fit() first")

    def _torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={self.device!r} was requested but torch sees no CUDA device; use device='cpu'")
        return device

    def _check_features(self, arr: np.ndarray) -> None:
        if arr.shape[1] != self.n_features_in_:
            raise ValueError(f"x has {arr.shape[1]} features but LinearCorex was fitted with {self.n_features_in_}")

    # -- public API ----------------------------------------------------------------------

    def fit(self, x: Any, y: Any = None) -> LinearCorex:
        """Learn the weights from data x (n_samples, n_features); ``y`` is ignored (sklearn convention)."""
        self._check_params()
        if self.n_threads is None:
            return self._fit(x)
        previous = torch.get_num_threads()
        torch.set_num_threads(int(self.n_threads))
        try:
            return self._fit(x)
        finally:
            torch.set_num_threads(previous)

    def _fit(self, x: Any) -> LinearCorex:
        arr = _as_2d_float(x)
        n, p = arr.shape
        if n < 3:
            raise ValueError(f"need at least 3 samples to fit LinearCorex; got {n}")
        if self.n_hidden > p:
            raise ValueError(f"n_hidden={self.n_hidden} exceeds the number of features ({p}); lower n_hidden")
        device = self._torch_device()
        mean, scale, has_nan = _column_stats(arr, self.missing_values)
        design = _Design(arr, mean, scale, has_nan, device, self.chunk_columns)
        m = int(self.n_hidden)
        schedule = anneal_schedule(self.anneal)

        v = self._init_free(design, m, schedule[0])
        pairs: list[tuple[_Vec, _Vec, float]] = []
        history: list[float] = []
        n_iter = n_evals = 0
        converged = False
        for eps in schedule:
            # V is carried over unchanged: the weights keep their directions and are rescaled by the new C,
            # which keeps them feasible at the new noise level (the reference must rescale W by hand).
            tol = float(self.tol) if eps == 0 else max(float(self.tol), float(self.anneal_tol))
            # At eps = 0 the gradients have no explicit (m x p) part, so a longer history costs no memory and
            # shortens the slow tail of the final stage.
            history_size = int(self.history_size) if eps > 0 else max(int(self.history_size), _FINAL_HISTORY)
            # The curvature pairs are carried from one annealing stage to the next (the objective changes little
            # between noise levels; about 10 % fewer evaluations); the final stage starts afresh, with pairs that
            # have no explicit part.
            if eps == 0:
                pairs.clear()  # frees their (m x p) parts before the final stage
            v, result = _optimize_stage(design, v, eps, int(self.max_iter), tol, history_size,
                                        pairs if eps > 0 else None)
            history.extend(result.history)
            n_iter += result.n_iter
            n_evals += result.n_evals
            converged = result.converged
            if self.verbose:
                tc = history[-1] if history else float("nan")
                state = "converged" if result.converged else "max_iter reached"
                print(f"LinearCorex eps={eps:.4f}: {result.n_iter} iterations, {result.n_evals} evaluations "
                      f"({state}), TC={tc:.6f}")
        if not converged:
            warnings.warn(
                f"LinearCorex did not reach tol={self.tol:g} within max_iter={self.max_iter} iterations "
                "in the final annealing stage; raise max_iter (`harmonize corex --max-iter`, or max_iter under "
                "corex: in a pipeline spec) or tol",
                CorexConvergenceWarning,
                stacklevel=3,  # the caller of fit()
            )

        final = _evaluate(design, v, schedule[-1], want_grad=False, keep_rho=True)
        assert final.rho is not None
        c = torch.rsqrt(1.0 + final.s)
        w = design.explicit(v.z)
        if v.e is not None:
            w.add_(v.e)
        w.mul_(c[:, None])
        rho = final.rho
        mis = -0.5 * torch.log1p(-rho * rho)
        mi_y_x = 0.5 * torch.log1p(final.s)  # I(Y_j; X) = 1/2 log Y_j^2 = -1/2 log(1 - u_j)
        tcs = (mis.sum(dim=1) - mi_y_x).cpu().numpy()
        order = np.argsort(-tcs, kind="stable")  # largest TC first, like the reference
        order_t = torch.as_tensor(order, device=rho.device)
        self.weights_ = w[order_t].cpu().numpy()
        self.loadings_ = rho[order_t].cpu().numpy()
        self.mis_ = mis[order_t].cpu().numpy()
        self.tcs_ = tcs[order]
        self.tc_ = final.tc
        self.u_ = (final.s / (1.0 + final.s))[order_t].cpu().numpy()
        self.clusters_ = np.argmax(np.abs(self.weights_), axis=0)
        self.mean_ = mean
        self.scale_ = scale
        self.n_features_in_ = p
        self.n_iter_ = n_iter
        self.n_evals_ = n_evals
        self.history_ = history
        self.converged_ = converged
        self.eps_ = schedule[-1]
        return self

    def _init_free(self, design: _Design, m: int, eps: float) -> _Vec:
        """Random directions scaled so that every factor starts at ``u_j = _INIT_U`` (as the reference does).

        Drawn on the CPU from a private generator, so the global RNGs are untouched and the draw does not depend
        on the device.
        """
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        g = torch.randn(m, design.p, generator=generator, dtype=_DTYPE).to(design.device)
        er = design.image(g)
        e2 = eps * eps
        s_g = (1.0 - e2) * (er * er).sum(dim=1) / design.n + e2 * (g * g).sum(dim=1)
        k = torch.sqrt((_INIT_U / (1.0 - _INIT_U)) / s_g)[:, None]  # s = u / (1 - u)
        z = torch.zeros(m, design.rows, dtype=_DTYPE, device=design.device)
        return _Vec(z, z.clone(), g * k, er * k)

    def transform(self, x: Any) -> np.ndarray:
        """Factor scores ``y = x_std W^T`` (n_samples, n_hidden) for data in the original units."""
        self._check_fitted()
        arr = _as_2d_float(x)
        self._check_features(arr)
        has_nan = _check_missing(arr, self.missing_values)
        out = np.zeros((arr.shape[0], self.weights_.shape[0]))
        for sl, block in _standardized_chunks(arr, self.mean_, self.scale_, has_nan):
            out += block @ self.weights_[:, sl].T
        return out

    def fit_transform(self, x: Any, y: Any = None) -> np.ndarray:
        """Fit on x and return its factor scores."""
        return self.fit(x).transform(x)

    # -- the fitted covariance -----------------------------------------------------------

    def _standardized_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """F (m, p) and d (p,) with ``Sigma_std = F^T F + diag(d)``: the reference's ``get_covariance`` model.

        ``F = rho / (1 - rho^2) / (1 + S_i)`` (divided by sqrt(1 - eps^2)); its diagonal is set to 1 by d, and
        ``d_i >= 1 / (1 + S_i) > 0``, so Sigma is positive definite.
        """
        self._check_fitted()
        rho = self.loadings_
        r = rho / ((1.0 - rho) * (1.0 + rho))
        f = r / (1.0 + (rho * r).sum(axis=0))
        f = f / math.sqrt(1.0 - self.eps_**2)
        d = 1.0 - (f * f).sum(axis=0)
        return f, d

    def covariance_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """The fitted covariance in the original units as factors: ``Sigma = L^T L + diag(d)``.

        Returns:
            L: (n_hidden, n_features) loadings; d: (n_features,) positive diagonal.  No p x p array is formed.
        """
        f, d = self._standardized_factors()
        return f * self.scale_, d * self.scale_**2

    def get_covariance(self, max_features: int = _MAX_DENSE_FEATURES) -> np.ndarray:
        """The dense (p, p) covariance, only for small p; use ``covariance_factors`` for large p."""
        self._check_fitted()
        p = self.n_features_in_
        if p > max_features:
            raise ValueError(
                f"the dense covariance would be {p} x {p} ({p * p * 8 / 2**30:.1f} GiB); use covariance_factors() "
                f"(Sigma = L^T L + diag(d)), or pass max_features >= {p} if you really want it"
            )
        loadings, d = self.covariance_factors()
        cov = loadings.T @ loadings
        cov[np.diag_indices(p)] += d
        return cov

    def score_samples(self, x: Any) -> np.ndarray:
        """Gaussian log-likelihood of each sample under ``N(mean_, Sigma)`` (nats), via the Woodbury identity."""
        self._check_fitted()
        arr = _as_2d_float(x)
        self._check_features(arr)
        has_nan = _check_missing(arr, self.missing_values)
        f, d = self._standardized_factors()
        p = self.n_features_in_
        m = f.shape[0]
        inner = np.eye(m) + (f / d) @ f.T  # I + F D^-1 F^T
        chol = np.linalg.cholesky(inner)
        logdet = 2.0 * np.log(np.diag(chol)).sum() + np.log(d).sum() + 2.0 * np.log(self.scale_).sum()
        quad = np.zeros(arr.shape[0])
        proj = np.zeros((arr.shape[0], m))
        for sl, block in _standardized_chunks(arr, self.mean_, self.scale_, has_nan):
            scaled = block / d[sl]
            quad += (block * scaled).sum(axis=1)
            proj += scaled @ f[:, sl].T
        solved = np.linalg.solve(chol, proj.T)  # L^-1 (F D^-1 z)
        quad -= (solved * solved).sum(axis=0)
        return -0.5 * (p * math.log(2.0 * math.pi) + logdet + quad)

    def score(self, x: Any, y: Any = None) -> float:
        """Mean held-out log-likelihood per sample (sklearn convention: higher is better)."""
        return float(self.score_samples(x).mean())

    # -- sklearn plumbing ----------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments (sklearn convention, so that e.g. ``sklearn.base.clone`` works)."""
        return {
            "n_hidden": self.n_hidden,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "anneal_tol": self.anneal_tol,
            "anneal": self.anneal,
            "missing_values": self.missing_values,
            "seed": self.seed,
            "device": self.device,
            "history_size": self.history_size,
            "chunk_columns": self.chunk_columns,
            "n_threads": self.n_threads,
            "verbose": self.verbose,
        }

    def set_params(self, **params: Any) -> LinearCorex:
        """Set constructor arguments (sklearn convention)."""
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for LinearCorex; valid: {sorted(valid)}")
            setattr(self, key, value)
        self._check_params()
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"LinearCorex({args})"


# --------------------------------------------------------------------------------------------------
# Restarts (optionally as parallel Dask tasks)
# --------------------------------------------------------------------------------------------------


@dataclass
class RestartResult:
    """Fits from several seeds: the best (highest TC bound) and how much the restarts disagree.

    Attributes:
        best: the fitted model with the highest ``tc_`` (ties go to the earliest seed).
        seeds, tcs: each restart's seed and final TC bound, in the order given.
        agreement: adjusted Rand index between each restart's ``clusters_`` and the best one's (1 = same grouping).
    """

    best: LinearCorex
    seeds: list[int]
    tcs: list[float]
    agreement: list[float] = field(default_factory=list)

    @property
    def spread(self) -> dict[str, float]:
        """TC range over restarts (absolute and relative to the best) and the lowest cluster agreement."""
        tcs = np.asarray(self.tcs, dtype=float)
        best = float(tcs.max())
        return {
            "tc_min": float(tcs.min()),
            "tc_max": best,
            "tc_range": float(tcs.max() - tcs.min()),
            "tc_relative_range": float((tcs.max() - tcs.min()) / max(abs(best), 1e-300)),
            "agreement_min": float(min(self.agreement)) if self.agreement else 1.0,
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (for the store's attributes and the report)."""
        return {"seeds": list(map(int, self.seeds)), "tcs": list(map(float, self.tcs)),
                "agreement": list(map(float, self.agreement)), "best_seed": int(self.best.seed), **self.spread}


def _fit_one(x: Any, params: dict[str, Any], seed: int) -> LinearCorex:
    """One restart; a Dask task (module level so that workers can unpickle it)."""
    return LinearCorex(**{**params, "seed": int(seed)}).fit(x)


def fit_restarts(
    x: Any, n_hidden: int, seeds: Iterable[int], client: Any = None, resources: dict[str, float] | None = None,
    **kw: Any,
) -> RestartResult:
    """Fit one model per seed and keep the one with the highest TC bound.

    The objective is non-convex, so a few restarts are a cheap guard against a poor local optimum.  With a
    ``distributed.Client`` the restarts run as parallel tasks (``client.submit``; the data are scattered once);
    without one they run here, one after the other.  ``resources`` (e.g. ``{"GPU": 1}``) is passed to
    ``client.submit`` so that ``device="cuda"`` restarts land on GPU workers.  Keyword arguments go to
    ``LinearCorex``.
    """
    from sklearn.metrics import adjusted_rand_score

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must contain at least one seed")
    params = LinearCorex(n_hidden=n_hidden, **kw).get_params()  # validates before any work is sent out
    if client is None:
        models = [_fit_one(x, params, seed) for seed in seeds]
    else:
        data = client.scatter(_as_2d_float(x), hash=False)  # a fresh key: no race with an earlier identical scatter
        futures = [client.submit(_fit_one, data, params, seed, pure=False, resources=resources,
                                 key=f"corex-restart-{seed}-{data.key}") for seed in seeds]
        models = client.gather(futures)
    tcs = [float(model.tc_) for model in models]
    best = models[int(np.argmax(tcs))]  # argmax returns the first maximum: ties go to the earliest seed
    agreement = [float(adjusted_rand_score(best.clusters_, model.clusters_)) for model in models]
    return RestartResult(best=best, seeds=seeds, tcs=tcs, agreement=agreement)


# --------------------------------------------------------------------------------------------------
# Site-leakage audit of factor scores
# --------------------------------------------------------------------------------------------------


def _fold_ids(n: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled K-fold assignment that does not look at the labels (so the permutation test is exact)."""
    ids = np.empty(n, dtype=int)
    for k, part in enumerate(np.array_split(rng.permutation(n), folds)):
        ids[part] = k
    return ids


def _cv_lda_accuracy(features: np.ndarray, labels: np.ndarray, n_classes: int, fold_ids: np.ndarray) -> np.ndarray:
    """Cross-validated accuracy of linear discriminant analysis, for many label vectors at once.

    Args:
        features: (n, q) predictors.  labels: (P, n) integer class labels, one row per label vector (the observed
        labels and their permutations).  fold_ids: (n,) fold of each sample.

    Returns:
        (P,) accuracy for each label vector.  LDA: class means, pooled within-class covariance (slightly
        regularized), training-class frequencies as priors; a class absent from a training fold is never predicted.
    """
    n_perm, n = labels.shape
    q = features.shape[1]
    correct = np.zeros(n_perm)
    classes = np.arange(n_classes)
    for fold in np.unique(fold_ids):
        test = fold_ids == fold
        train = ~test
        x_tr, x_te = features[train], features[test]
        onehot = (labels[:, train][:, :, None] == classes).astype(float)  # (P, n_tr, K)
        counts = onehot.sum(axis=1)  # (P, K)
        means = np.einsum("pnk,nq->pkq", onehot, x_tr) / np.maximum(counts, 1.0)[:, :, None]
        scatter = x_tr.T @ x_tr - np.einsum("pk,pkq,pkr->pqr", counts, means, means)
        dof = max(int(train.sum()) - n_classes, 1)
        cov = scatter / dof
        ridge = 1e-6 * np.trace(cov, axis1=1, axis2=2) / q + 1e-12
        cov = cov + ridge[:, None, None] * np.eye(q)
        coef = np.linalg.solve(cov, np.swapaxes(means, 1, 2))  # (P, q, K): Sigma^-1 mu_k
        offset = -0.5 * np.einsum("pkq,pqk->pk", means, coef)
        with np.errstate(divide="ignore"):
            log_prior = np.where(counts > 0, np.log(counts / max(int(train.sum()), 1)), -np.inf)
        disc = np.einsum("nq,pqk->pnk", x_te, coef) + (offset + log_prior)[:, None, :]
        correct += (disc.argmax(axis=2) == labels[:, test]).sum(axis=1)
    return correct / n


def _correlation(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    from scipy import stats

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None, None
    r, p = stats.pearsonr(a[ok], b[ok])
    return float(r), float(p)


def site_leakage_audit(
    scores: np.ndarray,
    sites: Sequence[Any],
    age: Sequence[float] | None = None,
    sex: Sequence[Any] | None = None,
    n_permutations: int = 999,
    folds: int = 5,
    margin: float = 0.10,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """How well factor scores predict site (each factor alone, and all together), and how they relate to age/sex.

    Site prediction: cross-validated accuracy of linear discriminant analysis (``folds``-fold, shuffled with
    ``seed``), against chance (the majority-site rate), with a permutation test (site labels permuted
    ``n_permutations`` times, same folds; ``p = (1 + #{permuted accuracy >= observed}) / (1 + n_permutations)``).

    **Flag**: a factor (or the set of all factors) *tracks site* when its accuracy exceeds chance by at least
    ``margin`` *and* its permutation p-value is at most ``alpha / (n_factors + 1)`` (Bonferroni over the
    per-factor tests and the joint one).  ``n_permutations`` is raised if needed so that this p-value is
    reachable.

    Age: Pearson r (and p) of each score with age.  Sex: point-biserial r with the second of the two sex labels
    (sorted), when there are exactly two.

    Returns:
        A JSON-ready dict: ``chance``, ``threshold_p``, per-factor entries under ``factors`` and the joint entry
        under ``all``, each with ``site_accuracy``, ``p_value`` and ``flagged``.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (subjects, factors); got shape {scores.shape}")
    sites = np.asarray(sites).astype(str)
    if len(sites) != scores.shape[0]:
        raise ValueError(f"{len(sites)} site labels for {scores.shape[0]} subjects")
    keep = np.isfinite(scores).all(axis=1)
    scores, sites = scores[keep], sites[keep]
    age_arr = None if age is None else np.asarray(age, dtype=float)[keep]
    sex_arr = None if sex is None else np.asarray(sex).astype(str)[keep]
    n, m = scores.shape
    names, labels = np.unique(sites, return_inverse=True)
    counts = np.bincount(labels)
    out: dict[str, Any] = {
        "n_subjects": int(n), "n_sites": int(len(names)), "chance": float(counts.max() / max(n, 1)),
        "margin": float(margin), "alpha": float(alpha), "classifier": "LDA", "factors": [], "all": None,
    }
    n_tests = m + 1
    threshold = alpha / n_tests
    n_perm = max(int(n_permutations), int(math.ceil(2.0 / threshold)))
    out.update({"threshold_p": float(threshold), "n_permutations": n_perm})
    applicable = len(names) >= 2 and n >= 4
    out["applicable"] = bool(applicable)
    rng = np.random.default_rng(seed)
    k = int(min(folds, n)) if applicable else 0
    out["folds"] = k
    if applicable:
        fold_ids = _fold_ids(n, k, rng)
        perms = np.stack([labels] + [rng.permutation(labels) for _ in range(n_perm)])

        def test(features: np.ndarray) -> dict[str, Any]:
            acc = np.concatenate([_cv_lda_accuracy(features, perms[i : i + 200], len(names), fold_ids)
                                  for i in range(0, len(perms), 200)])
            p_value = (1.0 + np.sum(acc[1:] >= acc[0])) / (1.0 + n_perm)
            flagged = bool(acc[0] - out["chance"] >= margin and p_value <= threshold)
            return {"site_accuracy": float(acc[0]), "p_value": float(p_value), "flagged": flagged}

    sex_levels = None
    if sex_arr is not None:
        levels = sorted(set(sex_arr.tolist()) - {"", "nan", "n/a"})
        if len(levels) == 2:
            sex_levels = levels
    out["sex_levels"] = sex_levels
    for j in range(m):
        entry: dict[str, Any] = {"factor": j}
        entry.update(test(scores[:, [j]]) if applicable else {"site_accuracy": None, "p_value": None,
                                                               "flagged": False})
        entry["age_r"], entry["age_p"] = (None, None) if age_arr is None else _correlation(scores[:, j], age_arr)
        if sex_levels is not None and sex_arr is not None:
            known = np.isin(sex_arr, sex_levels)
            coded = np.where(sex_arr == sex_levels[1], 1.0, np.where(known, 0.0, np.nan))
            entry["sex_r"], entry["sex_p"] = _correlation(scores[:, j], coded)
        else:
            entry["sex_r"], entry["sex_p"] = None, None
        out["factors"].append(entry)
    out["all"] = test(scores) if applicable else {"site_accuracy": None, "p_value": None, "flagged": False}
    out["flagged_factors"] = [e["factor"] for e in out["factors"] if e["flagged"]]
    return out
