"""ComBat: empirical-Bayes location/scale harmonization of site effects (Johnson et al., Biostatistics 2007),
in the neuroimaging form of Fortin et al. (NeuroImage 2017, 2018) as implemented by `neuroCombat`.

Model, per feature v and subject i at site j:  y_iv = alpha_v + x_i' beta_v + gamma_jv + sqrt(delta_jv) e_iv.
ComBat estimates the site location (gamma) and scale (delta) on standardized data, shrinks them towards
per-site priors that pool over ALL features (empirical Bayes), and removes them while keeping the
covariate effects x_i' beta_v.

Why this module is a set of pure per-chunk functions: a voxel-wise cohort has millions of features, so the
fit has to run out of core. Everything in ComBat is per feature except the hyper-priors, which are
per-site moments over features, and the stopping rule of the parametric iteration, which is a max over
features. Both are mergeable, so the fit is:

1. :func:`chunk_statistics` on each chunk of features (one pass over the data): regression, pooled
   variance, standardized site means/sums of squares, gamma_hat/delta_hat, plus
   :class:`HyperStatistics` (count, mean, M2 per site of gamma_hat and delta_hat);
2. :func:`merge_statistics` (Chan et al.'s parallel update, so any chunking gives the same moments to
   ~1e-15) and :func:`hyperpriors` -> gamma_bar, t2, a_prior, b_prior;
3. :func:`eb_chunk` per chunk (no data needed: the chunk statistics are sufficient), then
   :func:`parameters_chunk` -> :class:`ComBatParameters`, the small per-feature state that is saved;
4. :func:`adjust_chunk` per chunk of features (and of subjects) applies it.

The parametric iteration stops when the largest relative change over *all* features of a site drops
below 1e-4 (neuroCombat's rule, including its signed ratio ``|new - old| / old``), so a chunk cannot
decide alone when to stop. :func:`parametric_iterations` merges each chunk's own iteration count; a second
:func:`eb_chunk` pass with that fixed ``n_iter`` reproduces the unchunked result exactly, and its
``converged`` flags verify the global rule (see :func:`fit_parameters`, the in-memory driver).

Exactness: on the reference data this reproduces R and Python neuroCombat and neuroHarmonize to ~1e-13.
Two deliberate departures only in degenerate cases the references get wrong: features constant across all
subjects (background voxels) pass through unchanged instead of being replaced by neuroCombat's
``median(var_pooled != 0)``, and are left out of the hyper-priors; a NaN relative change (0/0) does not
stop the parametric iteration.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from harmonize.models.base import HarmonizerBase

MODEL_KIND = "combat-table"  # the image-level model (harmonize.models.voxel_combat) is "combat"
CONVERGENCE = 1e-4
MAX_ITER = 10_000
_NONPARAMETRIC_BLOCK = 1 << 22  # elements of the (features x prior features) work matrix per block


# ---------------------------------------------------------------------------------------------------------
# design
# ---------------------------------------------------------------------------------------------------------
def _level(value) -> int | float | str:
    """Canonical, JSON-stable key of a categorical level or site label: 1, 1.0 and np.int64(1) are the same
    level (codes often come back as floats from CSV), strings stay strings."""
    if isinstance(value, numbers.Real) and not isinstance(value, str):
        f = float(value)
        if math.isfinite(f) and f.is_integer():
            return int(f)
        return f
    return str(value)


def _level_sort_key(level) -> tuple:
    return (0, level, "") if isinstance(level, int | float) else (1, 0, str(level))


def site_label(value) -> str:
    """The string a site is known by (so that sites 1, 1.0 and "1" are one site)."""
    return str(_level(value))


def _missing(values: pd.Series) -> np.ndarray:
    return np.asarray(values.isna(), dtype=bool)


def _rows(mask: np.ndarray, limit: int = 10, offset: int = 0) -> str:
    idx = np.flatnonzero(mask) + offset
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", ... ({idx.size} in all)" if idx.size > limit else "")


@dataclass(frozen=True)
class DesignSpec:
    """How a design matrix is encoded, fixed at fit time so that new subjects (from any subset of the
    training sites) get exactly the same columns.

    Columns: one indicator per training site in ``sites`` order (with a reference site, its column is all
    ones, i.e. the intercept, as in ComBat), then each categorical covariate one-hot with its first level
    dropped, then the continuous covariates as floats.
    """

    sites: tuple[str, ...]
    categorical: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    levels: tuple[tuple, ...] = ()  # per categorical column, its sorted levels (first one is dropped)
    reference_site: str | None = None
    continuous_dtype: str = "float64"

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def reference(self) -> int | None:
        return None if self.reference_site is None else self.sites.index(self.reference_site)

    @property
    def covariate_names(self) -> list[str]:
        """Names of the non-site design columns, in order (e.g. ``sex[1]``, ``age``)."""
        names = [f"{col}[{lev}]" for col, levs in zip(self.categorical, self.levels, strict=True) for lev in levs[1:]]
        return names + list(self.continuous)

    @property
    def column_names(self) -> list[str]:
        return [f"site[{s}]" for s in self.sites] + self.covariate_names

    def site_codes(self, sites: Sequence) -> np.ndarray:
        """Position of each subject's site in :attr:`sites`; ValueError naming sites never seen in training."""
        labels = pd.Series([None if pd.isna(s) else site_label(s) for s in sites], dtype=object)
        if labels.isna().any():
            raise ValueError(f"site label missing for subject rows {_rows(_missing(labels))}")
        lookup = {s: k for k, s in enumerate(self.sites)}
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            raise ValueError(f"site(s) {unknown} were not seen in training (training sites: {list(self.sites)}); "
                             "ComBat can only remove effects it has estimated: refit including those sites")
        return np.array([lookup[s] for s in labels], dtype=np.int64)

    def covariate_matrix(self, covariates: pd.DataFrame | None, n_subjects: int) -> np.ndarray:
        """The non-site design columns for these subjects (n_subjects x len(covariate_names))."""
        needed = list(self.categorical) + list(self.continuous)
        if not needed:
            return np.zeros((n_subjects, 0))
        if covariates is None:
            raise ValueError(f"covariates {needed} are part of the model but no covariate table was given")
        if not isinstance(covariates, pd.DataFrame):
            raise TypeError(f"covariates must be a pandas DataFrame with columns {needed}, "
                            f"not {type(covariates).__name__}")
        absent = [c for c in needed if c not in covariates.columns]
        if absent:
            raise ValueError(f"covariate column(s) {absent} missing from the table (it has {list(covariates.columns)})")
        if len(covariates) != n_subjects:
            raise ValueError(f"the covariate table has {len(covariates)} rows but there are {n_subjects} subjects")
        bad = {c: _rows(_missing(covariates[c])) for c in needed if _missing(covariates[c]).any()}
        if bad:
            where = "; ".join(f"column {c!r} at subject rows {r}" for c, r in bad.items())
            raise ValueError(f"missing covariate values: {where}. ComBat cannot model a subject without its "
                             "covariates: fill them in or drop those subjects")
        blocks = []
        for col, levs in zip(self.categorical, self.levels, strict=True):
            values = [_level(v) for v in covariates[col]]
            lookup = {lev: k for k, lev in enumerate(levs)}
            unseen = sorted({v for v in values if v not in lookup}, key=_level_sort_key)
            if unseen:
                raise ValueError(f"categorical covariate {col!r} has level(s) {unseen} not seen in training "
                                 f"(levels: {list(levs)})")
            onehot = np.zeros((n_subjects, len(levs)))
            onehot[np.arange(n_subjects), [lookup[v] for v in values]] = 1.0
            blocks.append(onehot[:, 1:])
        for col in self.continuous:
            try:
                values = pd.to_numeric(covariates[col], errors="raise").to_numpy(dtype=np.float64)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"continuous covariate {col!r} is not numeric ({exc}); declare it categorical "
                                 "if it is a label") from exc
            if not np.isfinite(values).all():
                raise ValueError(f"continuous covariate {col!r} is not finite at subject rows "
                                 f"{_rows(~np.isfinite(values))}")
            blocks.append(values.astype(self.continuous_dtype).astype(np.float64)[:, None])
        return np.hstack(blocks)

    def build(self, sites: Sequence, covariates: pd.DataFrame | None = None) -> Design:
        """The design for these subjects (training or new ones, any subset of the training sites)."""
        codes = self.site_codes(sites)
        n = codes.size
        site_block = np.zeros((n, self.n_sites))
        site_block[np.arange(n), codes] = 1.0
        if self.reference is not None:
            site_block[:, self.reference] = 1.0
        matrix = np.hstack([site_block, self.covariate_matrix(covariates, n)])
        return Design(matrix=matrix, site_codes=codes, spec=self)

    def to_json(self) -> dict:
        return {"sites": list(self.sites), "categorical": list(self.categorical), "continuous": list(self.continuous),
                "levels": [list(levs) for levs in self.levels], "reference_site": self.reference_site,
                "continuous_dtype": self.continuous_dtype, "columns": self.column_names}

    @classmethod
    def from_json(cls, data: dict) -> DesignSpec:
        return cls(sites=tuple(data["sites"]), categorical=tuple(data["categorical"]),
                   continuous=tuple(data["continuous"]), levels=tuple(tuple(lv) for lv in data["levels"]),
                   reference_site=data["reference_site"], continuous_dtype=data.get("continuous_dtype", "float64"))


@dataclass(frozen=True)
class Design:
    """A design matrix plus what the chunk functions need to read it."""

    matrix: np.ndarray  # (n_subjects, n_sites + n_covariate_columns)
    site_codes: np.ndarray  # (n_subjects,) positions in spec.sites
    spec: DesignSpec

    @property
    def n_sites(self) -> int:
        return self.spec.n_sites

    @property
    def covariates(self) -> np.ndarray:
        """The non-site part of the design (what :func:`adjust_chunk` takes)."""
        return self.matrix[:, self.n_sites:]

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.site_codes, minlength=self.n_sites)


def make_design_spec(sites: Sequence, covariates: pd.DataFrame | None = None, *,
                     categorical: Sequence[str] = (), continuous: Sequence[str] = (),
                     reference_site=None, continuous_dtype: str = "float64") -> DesignSpec:
    """Record the encoding of the training design: sorted site labels, sorted levels of each categorical
    column (numeric codes and strings alike are categories), continuous columns as floats.

    ``continuous_dtype="float32"`` reproduces neuroCombat/neuroHarmonize, which round continuous covariates
    to float32 before the regression (this changes results by ~1e-7 relative to float64).
    """
    if continuous_dtype not in ("float64", "float32"):
        raise ValueError(f"continuous_dtype must be 'float64' or 'float32', not {continuous_dtype!r}")
    labels = [None if pd.isna(s) else site_label(s) for s in sites]
    if any(s is None for s in labels):
        raise ValueError(f"site label missing for subject rows {_rows(np.array([s is None for s in labels]))}")
    site_order = tuple(sorted(set(labels)))
    ref = None if reference_site is None else site_label(reference_site)
    if ref is not None and ref not in site_order:
        raise ValueError(f"reference site {reference_site!r} is not among the training sites {list(site_order)}")
    overlap = set(categorical) & set(continuous)
    if overlap:
        raise ValueError(f"column(s) {sorted(overlap)} declared both categorical and continuous")
    levels = []
    for col in categorical:
        if covariates is None or col not in covariates.columns:
            raise ValueError(f"categorical covariate {col!r} is not in the covariate table")
        present = covariates[col][~covariates[col].isna()]
        levels.append(tuple(sorted({_level(v) for v in present}, key=_level_sort_key)))
    return DesignSpec(sites=site_order, categorical=tuple(categorical), continuous=tuple(continuous),
                      levels=tuple(levels), reference_site=ref, continuous_dtype=continuous_dtype)


def build_design(sites: Sequence, covariates: pd.DataFrame | None = None, *, categorical: Sequence[str] = (),
                 continuous: Sequence[str] = (), reference_site=None, continuous_dtype: str = "float64") -> Design:
    """Training design: :func:`make_design_spec` then :meth:`DesignSpec.build`."""
    spec = make_design_spec(sites, covariates, categorical=categorical, continuous=continuous,
                            reference_site=reference_site, continuous_dtype=continuous_dtype)
    return spec.build(sites, covariates)


def check_design(design: Design, *, mean_only: bool = False) -> None:
    """Refuse designs ComBat cannot fit, with the reason: too few subjects at a site to estimate its scale,
    or covariates collinear with site (e.g. a diagnosis only one site scanned)."""
    counts = design.counts
    names = design.spec.sites
    empty = [names[j] for j in range(design.n_sites) if counts[j] == 0]
    if empty:
        raise ValueError(f"training site(s) {empty} have no subjects in the fitting data")
    if not mean_only:
        single = [f"{names[j]!r} ({counts[j]} subject)" for j in range(design.n_sites) if counts[j] < 2]
        if single:
            raise ValueError(f"site {', '.join(single)}: ComBat needs at least 2 subjects per site to estimate the "
                             "site's variance (scale). Merge or drop that site, or use mean_only=True")
    ref = design.spec.reference
    if ref is not None and counts[ref] < 2:
        raise ValueError(f"reference site {names[ref]!r} has {counts[ref]} subject; the pooled variance is "
                         "estimated on the reference site, which needs at least 2 subjects")
    rank = np.linalg.matrix_rank(design.matrix)
    if rank < design.matrix.shape[1]:
        raise ValueError(f"the design matrix is rank deficient ({rank} < {design.matrix.shape[1]} columns "
                         f"{design.spec.column_names}): a covariate is collinear with site or with another "
                         "covariate (e.g. a level seen at one site only); drop or recode it")


def _check_finite(Y: np.ndarray, what: str, feature_offset: int = 0, row_offset: int = 0) -> None:
    finite = np.isfinite(Y)
    if not finite.all():
        rows = ~finite.all(axis=1)
        cols = np.flatnonzero(~finite.all(axis=0)) + feature_offset
        shown = ", ".join(str(int(c)) for c in cols[:10]) + (f", ... ({cols.size} in all)" if cols.size > 10 else "")
        raise ValueError(f"{what} has NaN or infinite values at subject rows {_rows(rows, offset=row_offset)} "
                         f"(feature columns {shown}); ComBat needs complete data: impute, mask those features out, "
                         "or drop the subjects")


# ---------------------------------------------------------------------------------------------------------
# per-chunk statistics and their merge
# ---------------------------------------------------------------------------------------------------------
@dataclass
class HyperStatistics:
    """Per-site moments over features of gamma_hat and delta_hat: mergeable across chunks of features."""

    count: np.ndarray  # (S,) number of (non-constant) features
    gamma_mean: np.ndarray  # (S,)
    gamma_m2: np.ndarray  # (S,) sum of squared deviations
    delta_mean: np.ndarray
    delta_m2: np.ndarray

    @classmethod
    def of(cls, gamma_hat: np.ndarray, delta_hat: np.ndarray) -> HyperStatistics:
        """Moments of (S, F) arrays over features, two-pass (as numpy's mean/var)."""
        n = gamma_hat.shape[1]
        count = np.full(gamma_hat.shape[0], float(n))
        if n == 0:
            zero = np.zeros(gamma_hat.shape[0])
            return cls(count, zero, zero.copy(), zero.copy(), zero.copy())
        gm, dm = gamma_hat.mean(axis=1), delta_hat.mean(axis=1)
        return cls(count, gm, ((gamma_hat - gm[:, None]) ** 2).sum(axis=1),
                   dm, ((delta_hat - dm[:, None]) ** 2).sum(axis=1))


@dataclass
class ChunkStatistics:
    """Everything the rest of the fit needs from one chunk of features (features on the last axis).

    The standardized data z = (y - stand_mean - mod_mean) / sqrt(var_pooled) enter only through their
    per-site mean and sum of squares, which are sufficient for both EB variants: for any g,
    sum_i (z_i - g)^2 = site_ss + n_j (site_mean - g)^2.
    """

    feature_offset: int  # global index of the chunk's first feature
    counts: np.ndarray  # (S,) subjects per site
    B_hat: np.ndarray  # (S + P, F) regression coefficients of the full design
    grand_mean: np.ndarray  # (F,) the stand_mean: site-size weighted site intercepts (or the reference's)
    var_pooled: np.ndarray  # (F,) pooled residual variance; 0 marks a pass-through feature
    passthrough: np.ndarray  # (F,) bool: constant across subjects (across the reference site with one)
    site_mean: np.ndarray  # (S, F) per-site mean of z
    site_ss: np.ndarray  # (S, F) per-site sum of squared deviations of z
    gamma_hat: np.ndarray  # (S, F)
    delta_hat: np.ndarray  # (S, F)
    summary: HyperStatistics
    reference: int | None
    mean_only: bool

    @property
    def n_sites(self) -> int:
        return self.counts.size

    @property
    def beta(self) -> np.ndarray:
        """(P, F) covariate coefficients (the mod_mean part of the stand_mean)."""
        return self.B_hat[self.n_sites:]


def _stand_mean(B_hat: np.ndarray, design: Design) -> np.ndarray:
    """ComBat's stand_mean (grand_mean): the site intercepts weighted by site size, or the reference's."""
    ref = design.spec.reference
    if ref is None:
        return (design.counts / float(design.matrix.shape[0])) @ B_hat[:design.n_sites]
    return B_hat[ref].copy()


def _variance_rows(design: Design) -> np.ndarray:
    """(n,) bool: the subjects whose residuals make the pooled variance and that decide pass-through (all of
    them, or the reference site's)."""
    ref = design.spec.reference
    return np.ones(design.matrix.shape[0], bool) if ref is None else design.site_codes == ref


def _finish_statistics(design: Design, B_hat: np.ndarray, grand_mean: np.ndarray, var_pooled: np.ndarray,
                       constant: np.ndarray, site_mean_u: np.ndarray, site_m2_u: np.ndarray,
                       site_constant_u: np.ndarray, *, mean_only: bool, feature_offset: int) -> ChunkStatistics:
    """The end of :func:`chunk_statistics` from sufficient statistics, shared by the in-memory and the
    subject-batched (:class:`BatchedStatistics`) paths so that both run the same math.

    u = y - stand_mean - mod_mean is z before scaling (z = u / sqrt(var_pooled)), so z's per-site mean and sum
    of squared deviations are u's divided by the scale and its square. ``constant``: (F,) features constant
    over :func:`_variance_rows`; ``site_constant_u``: (S, F) u exactly constant within the site (its sum of
    squares is then set to 0, leaving no rounding residue). ``site_mean_u``/``site_m2_u`` are overwritten.
    """
    S, ref, counts = design.n_sites, design.spec.reference, design.counts
    passthrough = constant | (var_pooled == 0)
    var_pooled = np.where(passthrough, 0.0, var_pooled)
    scale = np.sqrt(np.where(passthrough, 1.0, var_pooled))
    # in place: the caller's u moments are scratch, and a block's (sites x voxels) arrays are the task's memory
    site_mean = np.divide(site_mean_u, scale, out=site_mean_u)
    site_ss = np.divide(site_m2_u, scale * scale, out=site_m2_u)
    site_ss[site_constant_u] = 0.0
    site_mean[:, passthrough] = 0.0
    site_ss[:, passthrough] = 0.0
    if mean_only:
        delta_hat = np.ones_like(site_ss)
    else:
        delta_hat = site_ss / (counts[:, None] - 1.0)
    delta_hat[delta_hat == 0] = 1.0  # zero within-site variance: scale left alone (as neuroCombat)
    gamma_hat = site_mean.copy()
    if ref is not None:  # the reference column of the batch design is the intercept
        others = np.arange(S) != ref
        gamma_hat[others] = site_mean[others] - site_mean[ref]
    gamma_hat[:, passthrough] = 0.0
    delta_hat[:, passthrough] = 1.0
    keep = ~passthrough
    summary = HyperStatistics.of(gamma_hat[:, keep], delta_hat[:, keep])
    return ChunkStatistics(feature_offset=feature_offset, counts=counts, B_hat=B_hat, grand_mean=grand_mean,
                           var_pooled=var_pooled, passthrough=passthrough, site_mean=site_mean, site_ss=site_ss,
                           gamma_hat=gamma_hat, delta_hat=delta_hat, summary=summary, reference=ref,
                           mean_only=mean_only)


def chunk_statistics(Y_chunk: np.ndarray, design: Design, *, mean_only: bool = False,
                     feature_offset: int = 0) -> ChunkStatistics:
    """One pass over a chunk of features (Y_chunk: n_subjects x F): per-feature estimates and the mergeable
    moments of the hyper-priors. Pure: depends on no other chunk.

    Pass-through features: constant across all subjects (with a reference site: across its subjects, whose
    variance is the pooled one, so no scale can be defined). They get var_pooled = 0, are returned unchanged
    by :func:`adjust_chunk` and are left out of the hyper-priors and of the non-parametric prior.

    :class:`BatchedStatistics` computes the same statistics with the subjects read in batches."""
    Y = np.asarray(Y_chunk, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[0] != design.matrix.shape[0]:
        raise ValueError(f"Y_chunk must be (n_subjects={design.matrix.shape[0]}, n_features), got {Y.shape}")
    _check_finite(Y, "the data", feature_offset)
    check_design(design, mean_only=mean_only)
    D, S, codes = design.matrix, design.n_sites, design.site_codes
    mask = _variance_rows(design)
    # every subject (no reference site): a slice, so that no n x F copy of Y or of the residuals is made
    rows = slice(None) if mask.all() else mask

    B_hat = np.linalg.solve(D.T @ D, D.T @ Y)
    grand_mean = _stand_mean(B_hat, design)
    resid = Y - D @ B_hat
    var_pooled = (resid[rows] ** 2).sum(axis=0) / float(mask.sum())
    basis = Y[rows]
    constant = basis.max(axis=0) == basis.min(axis=0)

    u = Y - grand_mean - D[:, S:] @ B_hat[S:]
    F = Y.shape[1]
    site_mean_u, site_m2_u = np.zeros((S, F)), np.zeros((S, F))
    site_constant_u = np.zeros((S, F), bool)
    for j in range(S):
        uj = u[codes == j]
        site_mean_u[j] = uj.mean(axis=0)
        site_m2_u[j] = ((uj - site_mean_u[j]) ** 2).sum(axis=0)
        site_constant_u[j] = uj.max(axis=0) == uj.min(axis=0)
    return _finish_statistics(design, B_hat, grand_mean, var_pooled, constant, site_mean_u, site_m2_u,
                              site_constant_u, mean_only=mean_only, feature_offset=feature_offset)


class BatchedStatistics:
    """:func:`chunk_statistics` of a chunk of F features whose subjects arrive in batches: two passes over
    the batches, so that memory is O(batch x F) for the data plus O((sites + covariates) x F) for the
    statistics, whatever the number of subjects (a voxel-wise fit reads one spatial block this way).

    Pass 1, :meth:`add_regression` on every batch: D'Y, and which features vary over the rows that decide
    pass-through; :meth:`solve` then gives B_hat and the stand_mean as chunk_statistics defines them.
    Pass 2, :meth:`add_residuals` on every batch: the pooled variance's sum of squared residuals and, per site,
    count/mean/M2 of u = y - stand_mean - mod_mean merged over batches with Chan et al.'s pairwise update
    (numerically stable, unlike sums of squares), and whether u varies within the site.
    :meth:`result` finishes with the very function chunk_statistics uses, so the two agree to rounding.

    Each pass must see the subjects in order (a batch is rows ``start .. start + len(Y)`` of the design, the
    next batch starts where it ends); within a batch the features may come in several calls (``features``,
    e.g. sub-chunks), each (subject, feature) once per pass.
    """

    def __init__(self, design: Design, n_features: int, *, mean_only: bool = False, feature_offset: int = 0):
        check_design(design, mean_only=mean_only)
        S, F, width = design.n_sites, int(n_features), design.matrix.shape[1]
        self.design, self.n_features, self.mean_only, self.feature_offset = design, F, mean_only, feature_offset
        self._rows = _variance_rows(design)
        # pass 1
        self._DtY = np.zeros((width, F))
        self._basis_first = np.zeros(F)  # value at the first pass-through-deciding row
        self._basis_varies = np.zeros(F, bool)
        self.B_hat: np.ndarray | None = None
        self.grand_mean: np.ndarray | None = None
        # pass 2
        self._resid_ss = np.zeros(F)
        self._site_mean_u = np.zeros((S, F))
        self._site_m2_u = np.zeros((S, F))
        self._site_first_u = np.zeros((S, F))  # first value and a flag: half the memory of a min and a max
        self._site_varies_u = np.zeros((S, F), bool)

    def _batch(self, start: int, Y: np.ndarray, features: slice) -> tuple[slice, np.ndarray]:
        Y = np.asarray(Y, dtype=np.float64)
        rows = slice(int(start), int(start) + Y.shape[0])
        width = len(range(self.n_features)[features])
        if Y.ndim != 2 or rows.stop > self.design.matrix.shape[0] or Y.shape[1] != width:
            raise ValueError(f"batch of shape {Y.shape} at subject {start} does not fit the design "
                             f"({self.design.matrix.shape[0]} subjects) and features {features}")
        return rows, Y

    def add_regression(self, start: int, Y: np.ndarray, features: slice = slice(None)) -> None:
        """Pass 1 on subjects ``start .. start + len(Y)`` (Y: batch x features)."""
        rows, Y = self._batch(start, Y, features)
        _check_finite(Y, "the data", self.feature_offset + (features.start or 0), row_offset=rows.start)
        self._DtY[:, features] += self.design.matrix[rows].T @ Y
        basis = Y[self._rows[rows]]
        if basis.shape[0]:
            if not self._rows[:rows.start].any():  # the first deciding row is in this batch
                self._basis_first[features] = basis[0]
            self._basis_varies[features] |= (basis != self._basis_first[features]).any(axis=0)

    def solve(self) -> None:
        """End of pass 1: B_hat = (D'D)^-1 D'Y and the stand_mean (D'Y is freed)."""
        D = self.design.matrix
        self.B_hat = np.linalg.solve(D.T @ D, self._DtY)
        self.grand_mean = _stand_mean(self.B_hat, self.design)
        del self._DtY

    def add_residuals(self, start: int, Y: np.ndarray, features: slice = slice(None)) -> None:
        """Pass 2 on subjects ``start .. start + len(Y)`` (after :meth:`solve`)."""
        if self.B_hat is None:
            raise RuntimeError("add_residuals needs the regression: call add_regression on every batch, then solve")
        rows, Y = self._batch(start, Y, features)
        S = self.design.n_sites
        D, B = self.design.matrix[rows], self.B_hat[:, features]
        resid = Y - D @ B
        self._resid_ss[features] += (resid[self._rows[rows]] ** 2).sum(axis=0)
        del resid
        u = Y - self.grand_mean[features] - D[:, S:] @ B[S:]
        codes = self.design.site_codes[rows]
        before = np.bincount(self.design.site_codes[:rows.start], minlength=S)  # subjects already merged
        for j in np.unique(codes):
            uj = u[codes == j]
            nb, na = uj.shape[0], int(before[j])
            mean_b = uj.mean(axis=0)
            m2_b = ((uj - mean_b) ** 2).sum(axis=0)
            mean, m2, first = (a[j, features] for a in (self._site_mean_u, self._site_m2_u, self._site_first_u))
            if na == 0:
                mean[...], m2[...], first[...] = mean_b, m2_b, uj[0]
            else:  # Chan, Golub & LeVeque: merge (na, mean, m2) with the batch's (nb, mean_b, m2_b)
                n = na + nb
                delta = mean_b - mean
                mean += delta * (nb / n)
                m2 += m2_b + delta ** 2 * (na * nb / n)
            self._site_varies_u[j, features] |= (uj != first).any(axis=0)

    def result(self) -> ChunkStatistics:
        """The chunk's statistics, as :func:`chunk_statistics` on all subjects at once (to rounding). Once: the
        accumulators are handed over (finished in place), not copied."""
        if self.B_hat is None or not hasattr(self, "_site_first_u"):
            raise RuntimeError("result needs both passes over the subjects, and can be taken once")
        del self._site_first_u
        var_pooled = self._resid_ss / float(self._rows.sum())
        return _finish_statistics(self.design, self.B_hat, self.grand_mean, var_pooled, ~self._basis_varies,
                                  self._site_mean_u, self._site_m2_u, ~self._site_varies_u,
                                  mean_only=self.mean_only, feature_offset=self.feature_offset)


def concatenate_statistics(parts: Sequence[ChunkStatistics]) -> ChunkStatistics:
    """Adjacent chunks (in feature order) as one chunk: per-feature arrays joined, moments merged."""
    if not parts:
        raise ValueError("concatenate_statistics needs at least one chunk")
    first = parts[0]
    if len(parts) == 1:
        return first
    per_feature = ("B_hat", "grand_mean", "var_pooled", "passthrough", "site_mean", "site_ss", "gamma_hat",
                   "delta_hat")
    joined = {k: np.concatenate([getattr(p, k) for p in parts], axis=-1) for k in per_feature}
    return ChunkStatistics(feature_offset=first.feature_offset, counts=first.counts, summary=merge_statistics(parts),
                           reference=first.reference, mean_only=first.mean_only, **joined)


def merge_statistics(parts: Sequence[HyperStatistics | ChunkStatistics]) -> HyperStatistics:
    """Merge per-chunk moments (Chan, Golub & LeVeque's pairwise update): any chunking of the features
    gives the moments of the whole to rounding error."""
    items = [p.summary if isinstance(p, ChunkStatistics) else p for p in parts]
    if not items:
        raise ValueError("merge_statistics needs at least one chunk")
    acc = HyperStatistics(*(np.array(getattr(items[0], f.name), dtype=np.float64) for f in fields(HyperStatistics)))
    for b in items[1:]:
        na, nb = acc.count, b.count
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            wb = np.where(n > 0, nb / n, 0.0)
            cross = np.where(n > 0, na * nb / n, 0.0)
        dg, dd = b.gamma_mean - acc.gamma_mean, b.delta_mean - acc.delta_mean
        acc = HyperStatistics(count=n, gamma_mean=acc.gamma_mean + dg * wb,
                              gamma_m2=acc.gamma_m2 + b.gamma_m2 + dg ** 2 * cross,
                              delta_mean=acc.delta_mean + dd * wb,
                              delta_m2=acc.delta_m2 + b.delta_m2 + dd ** 2 * cross)
    return acc


@dataclass
class HyperPriors:
    """Per-site priors: gamma ~ N(gamma_bar, t2), delta ~ InvGamma(a_prior, b_prior) (method of moments).
    a_prior/b_prior are None with mean_only (no scale is estimated)."""

    gamma_bar: np.ndarray
    t2: np.ndarray
    a_prior: np.ndarray | None
    b_prior: np.ndarray | None

    def to_json(self) -> dict:
        def lst(a):
            return None if a is None else [None if not math.isfinite(v) else float(v) for v in a]
        return {"gamma_bar": lst(self.gamma_bar), "t2": lst(self.t2), "a_prior": lst(self.a_prior),
                "b_prior": lst(self.b_prior)}

    @classmethod
    def from_json(cls, data: dict | None) -> HyperPriors | None:
        if data is None:
            return None

        def arr(a):
            return None if a is None else np.array([np.nan if v is None else v for v in a], dtype=np.float64)
        return cls(arr(data["gamma_bar"]), arr(data["t2"]), arr(data["a_prior"]), arr(data["b_prior"]))


def hyperpriors(merged: HyperStatistics, *, mean_only: bool = False) -> HyperPriors:
    """gamma_bar = mean, t2 = var(ddof=1) of gamma_hat over features; a/b by moments of delta_hat."""
    if (merged.count < 2).any():
        raise ValueError(f"empirical Bayes needs at least 2 non-constant features per site to estimate its "
                         f"priors (got {int(merged.count.min())}); use eb=False")
    t2 = merged.gamma_m2 / (merged.count - 1.0)
    if mean_only:
        return HyperPriors(merged.gamma_mean.copy(), t2, None, None)
    m, s2 = merged.delta_mean, merged.delta_m2 / (merged.count - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a_prior = (2 * s2 + m ** 2) / s2
        b_prior = (m * s2 + m ** 3) / s2
    return HyperPriors(merged.gamma_mean.copy(), t2, a_prior, b_prior)


# ---------------------------------------------------------------------------------------------------------
# empirical Bayes per chunk
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EBResult:
    gamma_star: np.ndarray  # (S, F)
    delta_star: np.ndarray  # (S, F)
    iterations: np.ndarray  # (S,) parametric iterations run (0 where none)
    converged: np.ndarray  # (S,) bool: the chunk's last relative change is <= the convergence threshold


@dataclass
class NonParametricPrior:
    """All features' gamma_hat/delta_hat (S, F_total): the empirical prior of the non-parametric EB."""

    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    valid: np.ndarray  # (F_total,) bool: not pass-through


def nonparametric_prior(chunks: Sequence[ChunkStatistics]) -> NonParametricPrior:
    """Concatenate the chunks' gamma_hat/delta_hat (in feature order) for :func:`eb_chunk` non-parametric."""
    ordered = sorted(chunks, key=lambda c: c.feature_offset)
    return NonParametricPrior(np.concatenate([c.gamma_hat for c in ordered], axis=1),
                              np.concatenate([c.delta_hat for c in ordered], axis=1),
                              np.concatenate([~c.passthrough for c in ordered]))


def _postmean(g_hat, g_bar, n, d_star, t2):
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2, n, a, b):
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def _change(new: np.ndarray, old: np.ndarray) -> float:
    """max over features of |new - old| / old, SIGNED denominator as in (R and Python) ComBat, so a
    negative old value never holds the iteration back. NaN (0/0) is ignored."""
    if new.size == 0:
        return -np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(new - old) / old
    r = r[~np.isnan(r)]
    return float(r.max()) if r.size else -np.inf


def _parametric_site(n, mean, ss, g_hat, d_hat, g_bar, t2, a, b, n_iter, conv, max_iter):
    g_old, d_old = g_hat, d_hat
    g_new, d_new = g_hat, d_hat
    count, change = 0, np.inf
    while (change > conv) if n_iter is None else (count < n_iter):
        g_new = _postmean(g_hat, g_bar, n, d_old, t2)
        sum2 = ss + n * (mean - g_new) ** 2
        d_new = _postvar(sum2, n, a, b)
        change = max(_change(g_new, g_old), _change(d_new, d_old))
        g_old, d_old = g_new, d_new
        count += 1
        if n_iter is None and count >= max_iter:
            warnings.warn(f"parametric ComBat did not converge in {max_iter} iterations (relative change "
                          f"{change:.3g}); using the last estimates", RuntimeWarning, stacklevel=3)
            break
    return g_new, d_new, count, not (change > conv)


def _nonparametric_site(n, mean, ss, own_index, g_all, d_all, valid):
    """Likelihood-weighted average of the other features' (gamma_hat, delta_hat), in the log domain (the
    reference's direct product underflows to 0/0 for large sites). own_index: global index of each row."""
    F = mean.size
    g, d = g_all[valid], d_all[valid]
    prior_index = np.flatnonzero(valid)
    log_norm = -(n / 2.0) * np.log(2 * np.pi * d)
    g_star, d_star = np.zeros(F), np.ones(F)
    block = max(1, _NONPARAMETRIC_BLOCK // max(1, g.size))
    for start in range(0, F, block):
        stop = min(F, start + block)
        sum2 = ss[start:stop, None] + n * (mean[start:stop, None] - g[None, :]) ** 2
        log_lh = log_norm[None, :] - sum2 / (2 * d[None, :])
        own = own_index[start:stop]  # a feature is not its own prior
        hit = np.searchsorted(prior_index, own)
        hit_ok = (hit < prior_index.size) & (prior_index[np.minimum(hit, prior_index.size - 1)] == own)
        log_lh[np.flatnonzero(hit_ok), hit[hit_ok]] = -np.inf
        w = np.exp(log_lh - log_lh.max(axis=1, keepdims=True))
        total = w.sum(axis=1)
        g_star[start:stop] = (w @ g) / total
        d_star[start:stop] = (w @ d) / total
    return g_star, d_star


def eb_chunk(stats: ChunkStatistics, priors: HyperPriors, *, parametric: bool = True, mean_only: bool = False,
             n_iter: np.ndarray | int | None = None, prior: NonParametricPrior | None = None,
             conv: float = CONVERGENCE, max_iter: int = MAX_ITER) -> EBResult:
    """Empirical-Bayes site effects (gamma_star, delta_star) for one chunk of features.

    Parametric: the posterior updates of Johnson et al. iterated from (gamma_hat, delta_hat). With
    ``n_iter=None`` a site iterates until the chunk's largest relative change is <= ``conv``; that is the
    unchunked ComBat only when the chunk holds all features. For a chunked fit, run once with None, take
    :func:`parametric_iterations` of all results, and rerun with that ``n_iter`` (per site); all
    ``converged`` flags must then be True (else raise ``n_iter`` by one and repeat), see :func:`fit_parameters`.

    Non-parametric: each feature's estimates are averages of all OTHER features' (gamma_hat, delta_hat)
    weighted by their likelihood for this feature's data, so ``prior`` (:func:`nonparametric_prior`, all
    features' gamma_hat/delta_hat: 2 x sites x features floats) must be in memory; the work is
    O(features^2) per site, which is practical for thousands of features (regions), not for voxels.

    The reference site (if any) gets gamma_star = 0, delta_star = 1. Pass-through features get 0 and 1.
    """
    S, F = stats.gamma_hat.shape
    gamma_star, delta_star = np.zeros((S, F)), np.ones((S, F))
    iterations, converged = np.zeros(S, dtype=np.int64), np.ones(S, dtype=bool)
    keep = ~stats.passthrough
    if n_iter is not None:
        n_iter = np.broadcast_to(np.asarray(n_iter, dtype=np.int64), (S,))
    if not parametric and prior is None:
        raise ValueError("non-parametric EB needs all features' gamma_hat/delta_hat: pass "
                         "prior=nonparametric_prior(all_chunk_statistics)")
    for j in range(S):
        if j == stats.reference:
            continue
        n = float(stats.counts[j])
        g_hat, d_hat = stats.gamma_hat[j, keep], stats.delta_hat[j, keep]
        mean, ss = stats.site_mean[j, keep], stats.site_ss[j, keep]
        if parametric:
            if mean_only:
                gamma_star[j, keep] = _postmean(g_hat, priors.gamma_bar[j], 1, 1, priors.t2[j])
                continue
            g, d, count, ok = _parametric_site(n, mean, ss, g_hat, d_hat, priors.gamma_bar[j], priors.t2[j],
                                               priors.a_prior[j], priors.b_prior[j],
                                               None if n_iter is None else int(n_iter[j]), conv, max_iter)
            gamma_star[j, keep], delta_star[j, keep] = g, d
            iterations[j], converged[j] = count, ok
        else:
            d_all = np.ones_like(prior.delta_hat[j]) if mean_only else prior.delta_hat[j]
            own = np.flatnonzero(keep) + stats.feature_offset
            gamma_star[j, keep], delta_star[j, keep] = _nonparametric_site(n, mean, ss, own, prior.gamma_hat[j],
                                                                           d_all, prior.valid)
    return EBResult(gamma_star, delta_star, iterations, converged)


def parametric_iterations(results: Sequence[EBResult]) -> np.ndarray:
    """Per-site iteration count of the whole fit: the max of the chunks' own counts (no site can stop before
    its slowest chunk has converged)."""
    return np.max(np.stack([r.iterations for r in results]), axis=0)


# ---------------------------------------------------------------------------------------------------------
# parameters and adjustment
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ComBatParameters:
    """The fitted per-feature state (features on the last axis); all a transform needs besides the design
    encoding. var_pooled == 0 marks a pass-through (constant) feature."""

    grand_mean: np.ndarray  # (F,)
    beta: np.ndarray  # (P, F)
    var_pooled: np.ndarray  # (F,)
    gamma_star: np.ndarray  # (S, F)
    delta_star: np.ndarray  # (S, F)
    reference: int | None = None

    ARRAYS = ("grand_mean", "beta", "var_pooled", "gamma_star", "delta_star")

    @property
    def n_features(self) -> int:
        return self.grand_mean.size

    def slice(self, start: int, stop: int) -> ComBatParameters:
        """The parameters of features [start, stop) (for :func:`adjust_chunk` on a chunk)."""
        return ComBatParameters(self.grand_mean[start:stop], self.beta[:, start:stop], self.var_pooled[start:stop],
                                self.gamma_star[:, start:stop], self.delta_star[:, start:stop], self.reference)

    @classmethod
    def concatenate(cls, parts: Sequence[ComBatParameters]) -> ComBatParameters:
        return cls(*(np.concatenate([getattr(p, k) for p in parts], axis=-1) for k in cls.ARRAYS),
                   reference=parts[0].reference)


def parameters_chunk(stats: ChunkStatistics, effects: EBResult | None = None) -> ComBatParameters:
    """Per-feature parameters of a chunk; ``effects=None`` means no empirical Bayes (gamma_hat, delta_hat)."""
    if effects is None:
        gamma, delta = stats.gamma_hat.copy(), stats.delta_hat.copy()
        if stats.reference is not None:
            gamma[stats.reference], delta[stats.reference] = 0.0, 1.0
    else:
        gamma, delta = effects.gamma_star.copy(), effects.delta_star.copy()
    gamma[:, stats.passthrough], delta[:, stats.passthrough] = 0.0, 1.0
    return ComBatParameters(stats.grand_mean.copy(), stats.beta.copy(), stats.var_pooled.copy(), gamma, delta,
                            stats.reference)


def adjust_chunk(Y_chunk: np.ndarray, sites: np.ndarray, covariates_design_part: np.ndarray,
                 params_chunk: ComBatParameters) -> np.ndarray:
    """Harmonize a chunk (n_subjects x F) given each subject's site code (position in the training site
    order) and its covariate design columns (:attr:`Design.covariates`). The covariate effects are those of
    THESE subjects, so new subjects keep their own age/sex effects. Reference-site subjects and pass-through
    features are returned unchanged."""
    Y = np.asarray(Y_chunk, dtype=np.float64)
    sites = np.asarray(sites, dtype=np.int64)
    p = params_chunk
    if Y.ndim != 2 or Y.shape[1] != p.n_features or sites.shape != (Y.shape[0],):
        raise ValueError(f"Y_chunk {Y.shape} and sites {sites.shape} do not match {p.n_features} features")
    _check_finite(Y, "the data")
    passthrough = p.var_pooled == 0
    sd = np.sqrt(np.where(passthrough, 1.0, p.var_pooled))
    mod = np.asarray(covariates_design_part, dtype=np.float64) @ p.beta
    z = (Y - p.grand_mean - mod) / sd
    out = np.empty_like(z)
    for j in np.unique(sites):
        rows = sites == j
        out[rows] = (z[rows] - p.gamma_star[j]) / np.sqrt(p.delta_star[j])
    out = out * sd + p.grand_mean + mod
    if p.reference is not None:
        out[sites == p.reference] = Y[sites == p.reference]
    out[:, passthrough] = Y[:, passthrough]
    return out


# ---------------------------------------------------------------------------------------------------------
# in-memory driver of the chunked fit
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    parameters: ComBatParameters
    priors: HyperPriors | None
    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    iterations: np.ndarray
    counts: np.ndarray


def _bounds(n_features: int, chunks: Sequence[int] | int | None) -> list[tuple[int, int]]:
    if chunks is None:
        sizes = [n_features]
    elif isinstance(chunks, numbers.Integral):
        if chunks < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunks}")
        sizes = [min(int(chunks), n_features - s) for s in range(0, n_features, int(chunks))]
    else:
        sizes = [int(c) for c in chunks]
    if sum(sizes) != n_features or any(s < 1 for s in sizes):
        raise ValueError(f"chunk sizes {sizes} do not partition {n_features} features")
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def fit_parameters(Y: np.ndarray, design: Design, *, eb: bool = True, parametric: bool = True,
                   mean_only: bool = False, chunks: Sequence[int] | int | None = None) -> FitResult:
    """The whole fit, run chunk by chunk through the pure functions exactly as a distributed scheduler
    would (``chunks``: sizes along the feature axis as in dask, or one size; None = one chunk)."""
    Y = np.asarray(Y, dtype=np.float64)
    bounds = _bounds(Y.shape[1], chunks)
    stats = [chunk_statistics(Y[:, a:b], design, mean_only=mean_only, feature_offset=a) for a, b in bounds]
    return fit_from_statistics(stats, design, eb=eb, parametric=parametric, mean_only=mean_only)


def fit_from_statistics(stats: Sequence[ChunkStatistics], design: Design, *, eb: bool = True,
                        parametric: bool = True, mean_only: bool = False) -> FitResult:
    """Steps 2-3 of the fit from the chunks' statistics (no data needed): hyper-priors, EB, parameters.
    The chunks may have been computed anywhere (e.g. as Dask tasks over a store)."""
    merged = merge_statistics(stats)
    priors = hyperpriors(merged, mean_only=mean_only) if eb else (
        hyperpriors(merged, mean_only=mean_only) if (merged.count >= 2).all() else None)
    S = design.n_sites
    iterations = np.zeros(S, dtype=np.int64)
    if eb:
        prior = None if parametric else nonparametric_prior(stats)
        effects = [eb_chunk(s, priors, parametric=parametric, mean_only=mean_only, prior=prior) for s in stats]
        if parametric and not mean_only:
            iterations = parametric_iterations(effects)
            if len(stats) > 1:
                while True:
                    effects = [eb_chunk(s, priors, n_iter=iterations) for s in stats]
                    done = np.logical_and.reduce([e.converged for e in effects])
                    if done.all() or iterations.max() >= MAX_ITER:
                        break
                    iterations = iterations + ~done
        params = [parameters_chunk(s, e) for s, e in zip(stats, effects, strict=True)]
    else:
        params = [parameters_chunk(s) for s in stats]
    return FitResult(ComBatParameters.concatenate(params), priors,
                     np.concatenate([s.gamma_hat for s in stats], axis=1),
                     np.concatenate([s.delta_hat for s in stats], axis=1), iterations, design.counts)


# ---------------------------------------------------------------------------------------------------------
# estimator
# ---------------------------------------------------------------------------------------------------------
FEATURE_CHUNK = 4096  # features per chunk when chunk_size is not set: temporaries of a few MiB per 100 subjects


class ComBatHarmonizer(HarmonizerBase):
    """ComBat with scikit-learn's face, on in-memory arrays X (n_subjects x n_features, float64).

    Parameters
    ----------
    covariates : covariate columns whose effects are preserved (biological variables: age, sex, diagnosis).
    categorical : the subset of ``covariates`` that are categories (one-hot, first level dropped), whether
        stored as strings or numeric codes; the others are continuous.
    eb, parametric, mean_only : as in ComBat (empirical Bayes; parametric priors or the non-parametric,
        O(features^2) one; location only).
    reference_site : harmonize to this site's location/scale; its subjects are returned unchanged.
    continuous_dtype : "float32" reproduces neuroCombat/neuroHarmonize, which round continuous covariates
        to float32 (a ~1e-7 relative difference); the default keeps float64.
    chunk_size : features per chunk for the fit and the transform (bounds the working memory; the result
        does not depend on it; default 4096).
    copy : if False, :meth:`transform` harmonizes a float64 X in place and returns it (the peak memory is
        then X alone); as in scikit-learn, other inputs are copied anyway.

    Unlike neuroCombat's ``neuroCombatFromTraining``, :meth:`transform` gives new subjects THEIR OWN covariate
    effects, and re-applying to the training subjects reproduces :meth:`fit_transform` exactly.
    """

    kind = MODEL_KIND
    WEIGHTS = "parameters.safetensors"

    def __init__(self, covariates: Sequence[str] | None = None, categorical: Sequence[str] | None = None,
                 eb: bool = True, parametric: bool = True, mean_only: bool = False, reference_site=None,
                 continuous_dtype: str = "float64", chunk_size: int | None = None, copy: bool = True):
        self.covariates = covariates
        self.categorical = categorical
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.reference_site = reference_site
        self.continuous_dtype = continuous_dtype
        self.chunk_size = chunk_size
        self.copy = copy

    # ---- input checks -----------------------------------------------------------------------------------
    def _columns(self) -> tuple[list[str], list[str]]:
        covariates = list(self.covariates or [])
        categorical = list(self.categorical or [])
        stray = [c for c in categorical if c not in covariates]
        if stray:
            raise ValueError(f"categorical column(s) {stray} are not in covariates {covariates}; list every "
                             "modelled column in covariates")
        return categorical, [c for c in covariates if c not in categorical]

    @staticmethod
    def _matrix(X, sites) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must be (n_subjects, n_features), got shape {X.shape}")
        if len(sites) != X.shape[0]:
            raise ValueError(f"{len(sites)} site labels for {X.shape[0]} subjects (rows of X)")
        _check_finite(X, "X")
        return X

    def _require_fitted(self) -> None:
        if not hasattr(self, "parameters_"):
            raise RuntimeError("this ComBatHarmonizer is not fitted: call fit() or load() first")

    # ---- fit / transform --------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, sites: Sequence, covariates_df: pd.DataFrame | None = None) -> ComBatHarmonizer:
        """Estimate the per-feature parameters and the per-site priors."""
        sites = list(sites)
        X = self._matrix(X, sites)
        categorical, continuous = self._columns()
        spec = make_design_spec(sites, covariates_df, categorical=categorical, continuous=continuous,
                                reference_site=self.reference_site, continuous_dtype=self.continuous_dtype)
        design = spec.build(sites, covariates_df)
        result = fit_parameters(X, design, eb=self.eb, parametric=self.parametric, mean_only=self.mean_only,
                                chunks=self.chunk_size or FEATURE_CHUNK)
        self.design_spec_ = spec
        self.sites_ = list(spec.sites)
        self.reference_site_ = spec.reference_site
        self.site_counts_ = {s: int(c) for s, c in zip(spec.sites, result.counts, strict=True)}
        self.n_features_ = X.shape[1]
        self.parameters_ = result.parameters
        self.gamma_hat_, self.delta_hat_ = result.gamma_hat, result.delta_hat
        self.hyperpriors_ = result.priors
        self.iterations_ = [int(i) for i in result.iterations]
        self.checksum_ = self._checksum()
        return self

    def transform(self, X: np.ndarray, sites: Sequence, covariates_df: pd.DataFrame | None = None) -> np.ndarray:
        """Harmonize subjects from any subset of the training sites, with their own covariates."""
        self._require_fitted()
        sites = list(sites)
        X_in = X
        X = self._matrix(X, sites)
        if X.shape[1] != self.n_features_:
            raise ValueError(f"X has {X.shape[1]} features; the model was fitted on {self.n_features_}")
        design = self.design_spec_.build(sites, covariates_df)
        # feature chunks: the temporaries stay cache-sized and the peak is X + the output (X alone in place),
        # not ~5x X (benchmarks/results/combat.md, 200 x 200k: ~15x faster than neuroHarmonize, 1/4 of its peak)
        out = np.empty_like(X) if self.copy or X is not X_in else X
        for start, stop in _bounds(X.shape[1], self.chunk_size or FEATURE_CHUNK):
            out[:, start:stop] = adjust_chunk(X[:, start:stop], design.site_codes, design.covariates,
                                              self.parameters_.slice(start, stop))
        return out

    def fit_transform(self, X: np.ndarray, sites: Sequence, covariates_df: pd.DataFrame | None = None) -> np.ndarray:
        return self.fit(X, sites, covariates_df).transform(X, sites, covariates_df)

    # ---- fitted estimates under ComBat's names ---------------------------------------------------------
    @property
    def gamma_star_(self) -> np.ndarray:
        return self.parameters_.gamma_star

    @property
    def delta_star_(self) -> np.ndarray:
        return self.parameters_.delta_star

    @property
    def var_pooled_(self) -> np.ndarray:
        return self.parameters_.var_pooled

    @property
    def stand_mean_(self) -> np.ndarray:
        return self.parameters_.grand_mean

    # ---- persistence (safetensors + JSON, no pickle) ---------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        p = self.parameters_
        arrays = {k: getattr(p, k) for k in ComBatParameters.ARRAYS}
        arrays.update(gamma_hat=self.gamma_hat_, delta_hat=self.delta_hat_)
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}

    def _learned_json(self) -> dict:
        return {"design": self.design_spec_.to_json(), "site_counts": self.site_counts_,
                "n_features": self.n_features_, "reference_site": self.reference_site_,
                "hyperpriors": None if self.hyperpriors_ is None else self.hyperpriors_.to_json(),
                "iterations": self.iterations_}

    def _checksum(self) -> str:
        digest = hashlib.sha256()
        for k, v in sorted(self._arrays().items()):
            digest.update(f"{k}{v.shape}".encode())
            digest.update(v.tobytes())
        digest.update(json.dumps(self._learned_json(), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``parameters.safetensors`` (per-feature float64 arrays) and ``config.json`` into ``path``."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self._arrays(), str(path / self.WEIGHTS))
        config = {"kind": self.kind, "format": 1, "params": self.get_params(), "learned": self._learned_json(),
                  "checksum": self.checksum_}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> ComBatHarmonizer:
        """Read a folder written by :meth:`save` (``device`` is accepted for the common model loader and
        ignored: ComBat runs on the CPU)."""
        from harmonize.models.files import load_weights, read_config

        path = Path(path)
        config = read_config(path, MODEL_KIND)
        model = cls(**config["params"])
        learned = config["learned"]
        arrays = load_weights(path / cls.WEIGHTS, load_file)
        model.design_spec_ = DesignSpec.from_json(learned["design"])
        model.sites_ = list(model.design_spec_.sites)
        model.reference_site_ = learned["reference_site"]
        model.site_counts_ = {str(k): int(v) for k, v in learned["site_counts"].items()}
        model.n_features_ = int(learned["n_features"])
        model.parameters_ = ComBatParameters(*(arrays[k] for k in ComBatParameters.ARRAYS),
                                             reference=model.design_spec_.reference)
        model.gamma_hat_, model.delta_hat_ = arrays["gamma_hat"], arrays["delta_hat"]
        model.hyperpriors_ = HyperPriors.from_json(learned["hyperpriors"])
        model.iterations_ = [int(i) for i in learned["iterations"]]
        model.checksum_ = config["checksum"]
        if model._checksum() != model.checksum_:
            raise ValueError(f"{path}: parameters do not match the checksum in config.json "
                             "(the model files are corrupt or were mixed up)")
        return model
