"""ComBat over the voxels of a brain mask: the image-level ComBat harmonizer that the graph layer maps
over a store's chunks.

Every voxel inside the mask is one ComBat feature; voxels outside it pass through unchanged. The fit is
the chunked fit of :mod:`harmonize.models.combat`: :func:`block_statistics` on each spatial block of
the grid (all subjects, read in batches of subjects, the block's mask voxels; a pure function that a Dask
worker runs next to the data), then :meth:`VoxelComBat.fit_from_blocks` (hyper-priors pooled over all
voxels, empirical Bayes, parameters). No step holds a subjects x voxels matrix, nor all subjects of a block:
a block's statistics are O(sites x voxels).

The fitted per-voxel parameters are kept on the template grid (``grand_mean (x, y, z)``, ``beta
(covariate, x, y, z)``, ``var_pooled``, ``gamma_star``/``delta_star (site, x, y, z)``), so the parameters
of a chunk are a slice of them and a worker harmonizes any chunk of any subject with its site and its
own covariates. Saved as safetensors + JSON (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from safetensors.numpy import load_file, save_file

from harmonize.io import schema as S
from harmonize.models.base import HarmonizerBase
from harmonize.models.combat import (
    BatchedStatistics,
    ChunkStatistics,
    ComBatParameters,
    Design,
    DesignSpec,
    HyperPriors,
    adjust_chunk,
    check_design,
    chunk_statistics,
    concatenate_statistics,
    fit_from_statistics,
    make_design_spec,
)

MODEL_KIND = "combat"
# voxels per statistics sub-chunk: ComBat's working set is ~6 copies of subjects x this many float64 values
SUBCHUNK_VOXELS = 16384
# subjects per read of a block in the fit: a batch of a block is at most this many bytes as float64 (64 MiB: 32
# subjects of a 64^3 block), so a worker's peak memory stays flat in the cohort size; larger cohorts cost a
# second pass of reads (see block_statistics)
SUBJECT_BATCH_BYTES = 64 << 20
# non-parametric EB compares every voxel with every other: O(voxels^2) per site
MAX_NONPARAMETRIC_VOXELS = 50_000
DEFAULT_BLOCK = (64, 64, 64)

Location = tuple[slice, slice, slice]
BlockReader = Callable[[int, int], np.ndarray]  # read(a, b) -> one block of subjects a..b-1 (b - a, bx, by, bz)


def covariate_frame(table: pd.DataFrame | xr.Dataset, columns: Sequence[str]) -> pd.DataFrame:
    """The declared covariate columns of a cohort (an xarray cohort's coordinates or the store's table).

    The one place where the store's way of writing "unknown" (an empty string; NaN for numbers) becomes a
    missing value, so that every caller sees a missing covariate as missing, never as a category "".
    """
    columns = list(columns)
    if isinstance(table, xr.Dataset):
        missing = [c for c in columns if c not in table.coords]
        if missing:
            raise ValueError(f"covariate(s) {missing} are not coordinates of the cohort "
                             f"(it has {sorted(map(str, table.coords))}); declare the covariates it has")
        data = {c: np.asarray(table[c].values) for c in columns}
        frame = pd.DataFrame({c: (v.astype(object) if v.dtype.kind in "OUT" else v) for c, v in data.items()})
    else:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"covariate(s) {missing} are not columns of the table {list(table.columns)}")
        frame = table[columns].reset_index(drop=True)
    for c in frame.columns:
        if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c]):
            frame[c] = frame[c].astype(object).map(lambda v: None if isinstance(v, str) and v == "" else v)
    return frame


def block_locations(grid_shape: Sequence[int], block: Sequence[int], mask: np.ndarray) -> list[Location]:
    """Spatial blocks tiling the grid (C order) that hold at least one mask voxel."""
    out = []
    starts = [range(0, int(n), int(b)) for n, b in zip(grid_shape, block, strict=True)]
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                loc = tuple(slice(a, min(a + int(b), int(n))) for a, b, n in
                            zip((x, y, z), block, grid_shape, strict=True))
                if mask[loc].any():
                    out.append(loc)
    return out


def subject_batch(block_voxels: int) -> int:
    """Subjects per read of a block in the fit: a fixed budget (:data:`SUBJECT_BATCH_BYTES`), not a fraction
    of the cohort, so that a worker's memory does not grow with the number of subjects."""
    return max(1, SUBJECT_BATCH_BYTES // (8 * max(int(block_voxels), 1)))


def _read_batch(read: BlockReader, a: int, b: int) -> np.ndarray:
    images = np.asarray(read(a, b))
    if images.shape[0] != b - a:
        raise ValueError(f"the block reader returned {images.shape[0]} subjects for subjects {a}..{b - 1}")
    return images


def _mask_subchunks(images: np.ndarray, inside: np.ndarray, start: int) -> Iterator[tuple[slice, np.ndarray]]:
    """The mask voxels of one read (subjects ``start ..``), sub-chunk by sub-chunk of :data:`SUBCHUNK_VOXELS`:
    (feature slice, float64 subjects x voxels). Each sub-chunk is gathered on its own, so there is never a
    (subjects x block) float64 copy; NaN/Inf inside the mask raises, naming the subjects' positions in the fit."""
    k = images.shape[0]
    flat = images.reshape(k, -1)
    whole = inside.size == flat.shape[1]
    for a in range(0, max(inside.size, 1), SUBCHUNK_VOXELS):
        cols = slice(a, min(a + SUBCHUNK_VOXELS, inside.size))
        values = flat[:, cols if whole else inside[cols]].astype(np.float64)
        if not np.isfinite(values).all():  # the whole read, to name every bad subject in it
            raise NonFiniteSubjects(_non_finite(images, inside) + start)
        yield cols, values


def _non_finite(images: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Positions (in this read) of the subjects with a NaN/Inf voxel inside the mask."""
    flat = images.reshape(images.shape[0], -1)
    return np.flatnonzero(~np.isfinite(flat[:, inside]).all(axis=1))


class NonFiniteSubjects(ValueError):
    """Subjects with NaN/Inf voxels inside the brain mask, by their positions in the fit."""

    def __init__(self, positions: np.ndarray):
        self.positions = np.asarray(positions, dtype=int)
        super().__init__(f"{self.positions.size} subject(s) (positions {self.positions[:10].tolist()} of this "
                         "fit) have NaN/Inf voxels inside the brain mask; re-ingest or exclude them")

    def __reduce__(self):  # raised in a Dask worker, it travels pickled to the client
        return (NonFiniteSubjects, (self.positions,))


def block_statistics(images: np.ndarray | BlockReader, mask_block: np.ndarray, design: Design, *,
                     mean_only: bool = False, feature_offset: int = 0, batch: int | None = None) -> ChunkStatistics:
    """ComBat statistics of one spatial block, its mask voxels as features. ``images``: the block of all
    subjects (subjects, bx, by, bz), or a reader ``read(a, b)`` -> the block of subjects a..b-1.

    The subjects are read ``batch`` at a time (default :func:`subject_batch`). When they all fit in one batch,
    one read and :func:`chunk_statistics` on it (no more I/O than needed); otherwise two passes of reads feed
    :class:`~harmonize.models.combat.BatchedStatistics` (the same statistics to rounding). Either way the mask
    voxels go in sub-chunks of :data:`SUBCHUNK_VOXELS`, so the working set is O(batch x sub-chunk) values plus
    the block's O((sites + covariates) x voxels) statistics, whatever the number of subjects.
    """
    mask_block = np.asarray(mask_block, bool)
    inside = np.flatnonzero(mask_block.ravel())
    n = design.matrix.shape[0]
    read: BlockReader = images if callable(images) else (lambda a, b: images[a:b])
    batch = subject_batch(mask_block.size) if batch is None else int(batch)
    if batch < 1:
        raise ValueError(f"the subject batch must be >= 1, got {batch}")
    if batch >= n:
        parts = [chunk_statistics(values, design, mean_only=mean_only, feature_offset=feature_offset + cols.start)
                 for cols, values in _mask_subchunks(_read_batch(read, 0, n), inside, 0)]
        return concatenate_statistics(parts)

    def each_subchunk() -> Iterator[tuple[int, slice, np.ndarray]]:  # one pass of reads over the subjects
        for a in range(0, n, batch):
            for cols, values in _mask_subchunks(_read_batch(read, a, min(a + batch, n)), inside, a):
                yield a, cols, values

    statistics = BatchedStatistics(design, inside.size, mean_only=mean_only, feature_offset=feature_offset)
    try:
        for a, cols, values in each_subchunk():
            statistics.add_regression(a, values, cols)
    except NonFiniteSubjects as found:  # name the bad subjects of the later batches too, not just this one's
        end = int(found.positions.max()) // batch * batch + batch
        later = [_non_finite(_read_batch(read, a, min(a + batch, n)), inside) + a for a in range(end, n, batch)]
        raise NonFiniteSubjects(np.concatenate([found.positions, *later])) from None
    statistics.solve()
    for a, cols, values in each_subchunk():
        statistics.add_residuals(a, values, cols)
    return statistics.result()


def _block_reader(images, location: Location) -> BlockReader:
    """read(a, b): the block at ``location`` of subjects a..b-1 as numpy (a dask-backed cohort is read then)."""
    def read(a: int, b: int) -> np.ndarray:
        return np.asarray(images[(slice(a, b), *location)])
    return read


def _grid_blocks(dataset: xr.Dataset, block: Sequence[int] | None) -> tuple[int, int, int]:
    if block is not None:
        return tuple(int(b) for b in block)
    chunks = dataset[S.IMAGES].chunks
    if chunks:  # dask-backed (a store): its own chunks, so a block is whole Zarr chunks
        return tuple(int(c[0]) for c in chunks[1:])
    return DEFAULT_BLOCK


class VoxelComBat(HarmonizerBase):
    """ComBat on the voxels of T1w volumes, with the face every harmonizer shares.

    Parameters are those of :class:`harmonize.models.combat.ComBatHarmonizer` (covariates whose effects
    are kept, which of them are categorical, eb, parametric, mean_only, reference_site), plus ``block``:
    the spatial block of the fit (default: the store's chunks). Learned state ends in ``_``.
    """

    kind = MODEL_KIND
    halo = 0
    needs_volume_context = False
    uses_gpu = False
    WEIGHTS = "parameters.safetensors"

    def __init__(self, covariates: Sequence[str] = ("age", "sex"), categorical: Sequence[str] = ("sex",),
                 eb: bool = True, parametric: bool = True, mean_only: bool = False, reference_site: str | None = None,
                 continuous_dtype: str = "float64", block: Sequence[int] | None = None):
        self.covariates = covariates
        self.categorical = categorical
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.reference_site = reference_site
        self.continuous_dtype = continuous_dtype
        self.block = block

    # ---- fitting ------------------------------------------------------------------------------------
    def design(self, sites: Sequence[str], covariates: pd.DataFrame) -> Design:
        """Set the design encoding from the training cohort (site order, covariate levels) and return it."""
        covariates_list = list(self.covariates or [])
        categorical = list(self.categorical or [])
        stray = [c for c in categorical if c not in covariates_list]
        if stray:
            raise ValueError(f"categorical column(s) {stray} are not among the covariates {covariates_list}")
        spec = make_design_spec(list(sites), covariates, categorical=categorical,
                                continuous=[c for c in covariates_list if c not in categorical],
                                reference_site=self.reference_site, continuous_dtype=self.continuous_dtype)
        design = spec.build(list(sites), covariates)
        check_design(design, mean_only=self.mean_only)
        self.design_spec_ = spec
        return design

    def fit(self, dataset: xr.Dataset, progress: Callable[[dict], None] | None = None) -> VoxelComBat:
        """Fit on a cohort (`images`, `mask`, coordinates `site` and the covariates), block by block.

        Reads one block of a batch of subjects at a time (see :func:`block_statistics`), so a dask-backed
        (store) cohort is never loaded whole.
        """
        mask = np.asarray(dataset[S.MASK].values).astype(bool)
        sites = np.asarray(dataset[S.SITE].values).astype(str)
        design = self.design(sites, covariate_frame(dataset, self.covariates or []))
        blocks = block_locations(mask.shape, _grid_blocks(dataset, self.block), mask)
        self.check_size(int(mask.sum()))
        images = dataset[S.IMAGES].data
        stats, offset = [], 0
        for k, loc in enumerate(blocks):
            stats.append(block_statistics(_block_reader(images, loc), mask[loc], design, mean_only=self.mean_only,
                                          feature_offset=offset))
            offset += int(mask[loc].sum())
            if progress:
                progress({"step": k + 1, "steps": len(blocks)})
        return self.fit_from_blocks(stats, blocks, mask, design)

    def covariates_needed(self) -> tuple[str, ...]:
        return tuple(self.covariates or ())

    def check_size(self, n_voxels: int) -> None:
        """Refuse a non-parametric fit over more voxels than it can compare pairwise."""
        if self.eb and not self.parametric and n_voxels > MAX_NONPARAMETRIC_VOXELS:
            raise ValueError(f"non-parametric ComBat compares every voxel with every other ({n_voxels} voxels: "
                             f"~{n_voxels**2:.1e} operations per site); use parametric=True at voxel level, or "
                             "the table-level ComBatHarmonizer on regional features")

    def fit_from_blocks(self, stats: Sequence[ChunkStatistics], blocks: Sequence[Location], mask: np.ndarray,
                        design: Design) -> VoxelComBat:
        """Finish a fit from per-block statistics (computed here or by Dask workers, in `blocks` order)."""
        self.check_size(int(mask.sum()))
        result = fit_from_statistics(stats, design, eb=self.eb, parametric=self.parametric, mean_only=self.mean_only)
        p = result.parameters
        grid = tuple(int(n) for n in mask.shape)
        n_sites, n_cov = p.gamma_star.shape[0], p.beta.shape[0]
        arrays = {"grand_mean": np.zeros(grid), "var_pooled": np.zeros(grid),  # var 0: pass-through
                  "beta": np.zeros((n_cov, *grid)), "gamma_star": np.zeros((n_sites, *grid)),
                  "delta_star": np.ones((n_sites, *grid))}
        offset = 0
        for loc in blocks:
            inside = mask[loc]
            k = int(inside.sum())
            values = p.slice(offset, offset + k)
            arrays["grand_mean"][loc][inside] = values.grand_mean
            arrays["var_pooled"][loc][inside] = values.var_pooled
            for name in ("beta", "gamma_star", "delta_star"):
                arrays[name][(slice(None), *loc)][:, inside] = getattr(values, name)
            offset += k
        self.grid_params_ = arrays
        spec = self.design_spec_
        self.sites_ = list(spec.sites)
        self.reference_site_ = spec.reference_site
        self.site_counts_ = {s: int(c) for s, c in zip(spec.sites, result.counts, strict=True)}
        self.n_voxels_ = int(mask.sum())
        self.hyperpriors_ = result.priors
        self.iterations_ = [int(i) for i in result.iterations]
        self.checksum_ = self._checksum()
        return self

    # ---- applying -----------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not hasattr(self, "grid_params_"):
            raise RuntimeError("this ComBat model is not fitted: call fit() or load() first")

    def check_reference(self, reference_site: str | None) -> None:
        """ComBat harmonizes to what it was fitted for: a reference site's scanner, or the pooled sites."""
        if reference_site is not None and reference_site != self.reference_site_:
            target = f"site {self.reference_site_!r}" if self.reference_site_ else "the pooled sites (no reference)"
            raise ValueError(f"this ComBat model harmonizes to {target}, not {reference_site!r}: refit with "
                             f"`harmonize fit STORE --model combat --reference-site {reference_site}`")

    def subject_context(self, site: str, covariates: dict | None = None, volume: np.ndarray | None = None,
                        mask: np.ndarray | None = None) -> dict:
        """One subject's site code and covariate design row (its own age/sex effects are kept)."""
        code = self.site_code(site)
        names = list(self.covariates or [])
        row = pd.DataFrame([{c: (covariates or {}).get(c) for c in names}]) if names else None
        design = self.design_spec_.build([site], row)
        return {"site": str(site), "site_code": code, "covariates": design.covariates[0].tolist()}

    def _parameters_at(self, location: Location) -> ComBatParameters:
        g = self.grid_params_
        everything = slice(None)
        n_cov, n_sites = g["beta"].shape[0], g["gamma_star"].shape[0]
        return ComBatParameters(g["grand_mean"][location].ravel(),
                                g["beta"][(everything, *location)].reshape(n_cov, -1),
                                g["var_pooled"][location].ravel(),
                                g["gamma_star"][(everything, *location)].reshape(n_sites, -1),
                                g["delta_star"][(everything, *location)].reshape(n_sites, -1),
                                self.design_spec_.reference)

    def harmonize_block(self, block: np.ndarray, context: dict, location: Location,
                        reference_site: str | None = None) -> np.ndarray:
        """Harmonize one chunk of one subject (no halo: ComBat is voxel-wise)."""
        self._require_fitted()
        self.check_reference(reference_site)
        values = np.nan_to_num(np.asarray(block, dtype=np.float64).reshape(1, -1), nan=0.0)
        out = adjust_chunk(values, np.array([context["site_code"]]), np.asarray([context["covariates"]], float),
                           self._parameters_at(location))
        return out.reshape(np.shape(block)).astype(np.float32)

    def harmonize_volume(self, volume: np.ndarray, site: str, mask: np.ndarray, covariates: dict | None = None,
                         reference_site: str | None = None) -> np.ndarray:
        context = self.subject_context(site, covariates)
        everything = tuple(slice(0, n) for n in np.shape(volume))
        return self.harmonize_block(volume, context, everything, reference_site) * mask

    def transform(self, dataset: xr.Dataset, reference_site: str | None = None) -> xr.Dataset:
        """Return the dataset with a `harmonized` variable (eager; use harmonize.apply for stores)."""
        self._require_fitted()
        mask = np.asarray(dataset[S.MASK].values).astype(bool)
        sites = np.asarray(dataset[S.SITE].values).astype(str)
        covariates = covariate_frame(dataset, self.covariates or []).to_dict("records")
        out = np.stack([
            self.harmonize_volume(np.asarray(dataset[S.IMAGES].isel({S.SUBJECT: i}).values), sites[i], mask,
                                  covariates[i], reference_site)
            for i in range(dataset.sizes[S.SUBJECT])])
        return dataset.assign({S.HARMONIZED: (S.VOLUME_DIMS, out)})

    # ---- persistence (safetensors + JSON, no pickle) --------------------------------------------------
    def _learned_json(self) -> dict:
        return {"design": self.design_spec_.to_json(), "site_counts": self.site_counts_,
                "n_voxels": self.n_voxels_, "reference_site": self.reference_site_,
                "hyperpriors": None if self.hyperpriors_ is None else self.hyperpriors_.to_json(),
                "iterations": self.iterations_}

    def _checksum(self) -> str:
        digest = hashlib.sha256()
        for k, v in sorted(self.grid_params_.items()):
            digest.update(f"{k}{v.shape}".encode())
            digest.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
        digest.update(json.dumps(self._learned_json(), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write `parameters.safetensors` (per-voxel float64 grids) and `config.json` into the folder `path`."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in self.grid_params_.items()},
                  str(path / self.WEIGHTS))
        config = {"kind": self.kind, "format": 1, "params": self.get_params(), "learned": self._learned_json(),
                  "checksum": self.checksum_}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> VoxelComBat:
        """Read a folder written by :meth:`save` (`device` is accepted for the common loader; ComBat runs on CPU)."""
        from harmonize.models.files import load_weights, read_config

        path = Path(path)
        config = read_config(path, MODEL_KIND)
        model = cls(**config["params"])
        learned = config["learned"]
        model.design_spec_ = DesignSpec.from_json(learned["design"])
        model.grid_params_ = load_weights(path / cls.WEIGHTS, load_file)
        model.sites_ = list(model.design_spec_.sites)
        model.reference_site_ = learned["reference_site"]
        model.site_counts_ = {str(k): int(v) for k, v in learned["site_counts"].items()}
        model.n_voxels_ = int(learned["n_voxels"])
        model.hyperpriors_ = HyperPriors.from_json(learned["hyperpriors"])
        model.iterations_ = [int(i) for i in learned["iterations"]]
        model.checksum_ = config["checksum"]
        if model._checksum() != model.checksum_:
            raise ValueError(f"{path}: parameters do not match the checksum in config.json "
                             "(the model files are corrupt or were mixed up)")
        return model
