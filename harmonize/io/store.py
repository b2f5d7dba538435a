"""The cohort store: a Zarr v3 group opened with xarray.

Writing follows one rule, because concurrent Zarr writers lose data otherwise: the *coordinating*
process (the CLI, a notebook) is the only one that changes metadata (creates arrays, appends
subjects, writes per-subject status); workers write only whole chunks of volume arrays
(:func:`write_volume`), one subject at a time, so every write covers whole chunks and a rerun
rewrites the same bytes. A status flag is set only after its data is written, so a killed run
leaves subjects marked pending, never marked done with missing data.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from harmonize.io import schema as S

DEFAULT_CHUNKS = (64, 64, 64)
# models/ and reports/ live inside the store folder on purpose (they travel with it); zarr warns about
# every folder it does not know whenever it lists the group
warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component", category=UserWarning)
_STRING_CHUNK = 4096


class StoreError(RuntimeError):
    """A cohort store is missing, of another schema, or inconsistent."""


@dataclass(frozen=True)
class Grid:
    """The reference grid every volume of a cohort shares."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    def to_attrs(self) -> dict:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).tolist(),
                "voxel_size": list(self.voxel_size)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> Grid:
        return cls(tuple(int(v) for v in attrs["shape"]), np.asarray(attrs["affine"], dtype=float))


def _create(group: zarr.Group, name: str, shape, chunks, dtype, dims, fill_value=None, attrs=None):
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                             dimension_names=list(dims))
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _subject_attrs() -> dict:
    # CF-style "coordinates" makes xarray attach site/age/sex to every subject-indexed variable
    return {"coordinates": " ".join(S.SUBJECT_COORDS)}


class CohortStore:
    """Handle on one cohort store folder. Cheap to create; holds no data in memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path} is not a cohort store (no zarr.json). "
                             f"Create one with `harmonize ingest BIDS_DIR {self.path}`.")
        self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        version = self.group.attrs.get("schema_version")
        if version != S.SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version!r}; this harmonize reads "
                             f"version {S.SCHEMA_VERSION}. Re-ingest the cohort into a new store.")
        self.grid = Grid.from_attrs(self.group.attrs["grid"])
        self.chunks = tuple(int(c) for c in self.group.attrs["chunks"])

    # ---- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, grid: Grid, mask: np.ndarray,
               chunks: Sequence[int] = DEFAULT_CHUNKS) -> CohortStore:
        path = Path(path)
        if (path / "zarr.json").exists():
            raise StoreError(f"{path} already exists; open it with CohortStore({str(path)!r}).")
        if tuple(mask.shape) != tuple(grid.shape):
            raise ValueError(f"mask shape {mask.shape} does not match the grid {grid.shape}")
        chunks = tuple(min(int(c), int(n)) for c, n in zip(chunks, grid.shape, strict=True))
        # built beside its final name and renamed into place: a process killed while creating leaves no
        # half-made store that the next run would take for a real one
        building = path.with_name(f".{path.name}.creating-{os.getpid()}")
        if building.exists():
            shutil.rmtree(building)
        group = zarr.open_group(str(building), mode="w", zarr_format=3)
        group.attrs.update({"schema_version": S.SCHEMA_VERSION, "grid": grid.to_attrs(),
                            "chunks": list(chunks), "created_by": "harmonize"})
        _create(group, S.MASK, grid.shape, grid.shape, "uint8", S.SPATIAL_DIMS, 0)[...] = (
            np.asarray(mask) > 0).astype(np.uint8)
        _create(group, S.IMAGES, (0, *grid.shape), (1, *chunks), "float32", S.VOLUME_DIMS, np.nan,
                _subject_attrs())
        _create(group, S.AFFINE, (0, 4, 4), (_STRING_CHUNK, 4, 4), "float64",
                (S.SUBJECT, "affine_row", "affine_col"), np.nan)
        for name in S.STRING_FIELDS:
            _create(group, name, (0,), (_STRING_CHUNK,), str, (S.SUBJECT,), "")
        for name in S.FLOAT_FIELDS:
            _create(group, name, (0,), (_STRING_CHUNK,), "float64", (S.SUBJECT,), np.nan)
        for name in S.STATUS_FIELDS:
            _create(group, name, (0,), (_STRING_CHUNK,), "int8", (S.SUBJECT,), S.PENDING,
                    _subject_attrs())
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(building, path)  # atomic; replaces an empty folder of that name
        except OSError as exc:
            shutil.rmtree(building, ignore_errors=True)
            raise StoreError(f"cannot create the store at {path}: {exc}. The folder exists and is not a cohort "
                             "store; choose another path or move that folder away.") from exc
        return cls(path)

    # ---- per-subject metadata (coordinator only) --------------------------------------------
    @property
    def n_subjects(self) -> int:
        return int(self.group[S.SUBJECT].shape[0])

    def table(self) -> pd.DataFrame:
        """One row per subject: covariates, provenance and status, indexed by store position."""
        n = self.n_subjects
        cols = {}
        for name in (*S.STRING_FIELDS, *S.FLOAT_FIELDS, *self._status_fields()):
            cols[name] = self.group[name][:] if n else np.array([], dtype=object)
        df = pd.DataFrame(cols)
        for name in S.STRING_FIELDS:
            df[name] = df[name].astype(object)
        return df

    def append_subjects(self, rows: pd.DataFrame) -> np.ndarray:
        """Append subjects (columns: subject, site, age, sex, source_path, affine) as pending.

        Returns their positions in the store. Subjects already present are refused: the caller
        decides what a rerun means (skip or rewrite in place), never this function.
        """
        existing = set(self.group[S.SUBJECT][:].tolist()) if self.n_subjects else set()
        dup = sorted(set(rows[S.SUBJECT]) & existing)
        if dup:
            raise StoreError(f"subjects already in {self.path}: {dup[:5]}")
        n0, k = self.n_subjects, len(rows)
        if k == 0:
            return np.arange(0)
        n1 = n0 + k
        shape = self.grid.shape
        outputs = self.outputs()
        for name in (S.IMAGES, *outputs):
            self.group[name].resize((n1, *shape))
        self.group[S.AFFINE].resize((n1, 4, 4))
        self.group[S.AFFINE][n0:n1] = np.stack([np.asarray(a, float) for a in rows[S.AFFINE]])
        statuses = self._status_fields()
        for name in (*S.STRING_FIELDS, *S.FLOAT_FIELDS, *statuses):
            self.group[name].resize((n1,))
        for name in S.STRING_FIELDS:
            values = rows[name] if name in rows else pd.Series([""] * k)
            self.group[name][n0:n1] = np.array([str(v) for v in values], dtype=object)
        ages = rows[S.AGE] if S.AGE in rows else pd.Series([np.nan] * k)
        self.group[S.AGE][n0:n1] = np.asarray(ages, dtype="float64")
        for name in statuses:
            self.group[name][n0:n1] = np.full(k, S.PENDING, dtype="int8")
        return np.arange(n0, n1)

    def outputs(self) -> list[str]:
        """The harmonized volume arrays in this store (`harmonized`, `harmonized_<kind>`)."""
        return sorted(name for name in self.group.array_keys() if S.is_output(name))

    def _status_fields(self) -> tuple[str, ...]:
        """Every per-subject status array: the ones every store has, then one per extra output."""
        extra = (S.status_of(o) for o in self.outputs())
        return (*S.STATUS_FIELDS, *(name for name in extra if name not in S.STATUS_FIELDS))

    def set_field(self, name: str, positions: Sequence[int], values: Sequence) -> None:
        positions = np.asarray(positions, dtype=int)
        if positions.size == 0:
            return
        arr = self.group[name]
        current = arr[:]
        current[positions] = np.asarray(values, dtype=current.dtype)
        arr[:] = current

    def status(self, name: str) -> np.ndarray:
        if name not in self.group:  # an output never written: every subject pending
            return np.full(self.n_subjects, S.PENDING, dtype="int8")
        return self.group[name][:] if self.n_subjects else np.zeros(0, dtype="int8")

    # ---- volume arrays --------------------------------------------------------------------
    def mask(self) -> np.ndarray:
        return self.group[S.MASK][...].astype(bool)

    def ensure_volume_array(self, name: str, attrs: dict | None = None) -> zarr.Array:
        """Create a (subject, x, y, z) float32 array shaped like `images` if it does not exist."""
        if name not in self.group:
            _create(self.group, name, (self.n_subjects, *self.grid.shape), (1, *self.chunks),
                    "float32", S.VOLUME_DIMS, np.nan, _subject_attrs())
        status = S.status_of(name)
        if status not in self.group:
            _create(self.group, status, (self.n_subjects,), (_STRING_CHUNK,), "int8", (S.SUBJECT,), S.PENDING,
                    _subject_attrs())
            if self.n_subjects:
                self.group[status][:] = np.full(self.n_subjects, S.PENDING, dtype="int8")
        arr = self.group[name]
        if attrs:
            arr.attrs.update(attrs)
        return arr

    def array_path(self, name: str) -> str:
        return str(self.path / name)

    def write_small(self, name: str, values: np.ndarray, dims: Sequence[str], attrs: dict | None = None,
                    ) -> None:
        """(Re)write a small derived array in one piece (parcellation, CorEx results)."""
        values = np.asarray(values)
        if name in self.group:
            del self.group[name]
        _create(self.group, name, values.shape, values.shape or (1,), values.dtype, dims,
                None if values.dtype.kind in "iub" else np.nan, attrs)
        self.group[name][...] = values

    # ---- xarray view ------------------------------------------------------------------------
    def dataset(self, only_ingested: bool = True) -> xr.Dataset:
        """The cohort as an xarray Dataset backed by dask (chunks = the store's chunks).

        With `only_ingested`, subjects whose ingest is pending or rejected are left out, so NaN
        templates of unfinished subjects never reach a statistic.
        """
        # chunks={} keeps each array's stored chunks (images: one subject x the store's spatial chunks)
        ds = xr.open_zarr(str(self.path), consolidated=False, chunks={})  # warning filtered at module level
        for name in (S.SUBJECT, S.SITE, S.SEX, S.AGE, *self._status_fields()):
            if name in ds.variables:
                values = ds[name].values
                if values.dtype.kind == "T":  # numpy StringDType: object arrays work everywhere downstream
                    values = values.astype(object)
                ds = ds.assign_coords({name: (S.SUBJECT, values)})
        if only_ingested:
            ds = ds.isel({S.SUBJECT: ds[S.INGEST_STATUS].values == S.DONE})
        ds.attrs["store_path"] = str(self.path)
        return ds


def missing_covariates(table: pd.DataFrame, names) -> dict[str, list[str]]:
    """covariate -> subjects of `table` (rows of the store's table) without it (NaN age, empty sex)."""
    gaps = {}
    for name in names:
        values = table[name]
        gap = values.isna() if values.dtype.kind == "f" else values.astype(str).isin(["", "None", "nan"])
        if gap.any():
            gaps[name] = table[S.SUBJECT][gap].astype(str).tolist()
    return gaps


def write_volume(array_path: str, position: int, volume: np.ndarray) -> None:
    """Write one subject's whole volume (whole chunks only: safe beside other writers, idempotent)."""
    arr = zarr.open_array(array_path, mode="r+", zarr_format=3)
    arr[position] = np.asarray(volume, dtype=arr.dtype)


def read_volume(array_path: str, position: int) -> np.ndarray:
    return zarr.open_array(array_path, mode="r", zarr_format=3)[position]


def open_cohort(path: str | os.PathLike, only_ingested: bool = True) -> xr.Dataset:
    """Open a cohort store as an xarray Dataset (the notebook entry point)."""
    return CohortStore(path).dataset(only_ingested=only_ingested)


def dump_json(path: Path, obj) -> None:
    """Write JSON atomically (temp + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
