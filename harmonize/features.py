"""Features for the downstream CorEx analysis, computed from the cohort store with Dask.

Two kinds, both one row per subject:

* **regions**: mean intensity per region of the parcellation carried with the store.  No atlas may be
  downloaded at run time, so the parcellation is made from the grid itself: k-means on the coordinates of
  brain voxels, mirrored across the midline, gives compact, roughly equal-sized, left/right-paired regions
  (deterministic for a seed).  One task per subject.
* **voxels**: the image block-averaged on a coarser grid (``factor`` voxels per side, e.g. 3: 2 mm -> 6 mm),
  over brain voxels only; a coarse voxel is kept when at least half of its block is brain.  A Dask array graph
  over the store's volumes (one block per subject).

Each kind comes with a *feature map*: an int32 volume on the store's grid giving, for every voxel, the feature
(1-based) it contributes to (0 = none), so loadings can be drawn back on the brain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from distributed import Client
from sklearn.cluster import KMeans

from harmonize.cluster import gather_with_progress
from harmonize.io.store import read_volume

FEATURE_KINDS = ("regions", "voxels")


@dataclass
class FeatureSet:
    """A subjects x features matrix and where each feature lives on the grid.

    Attributes:
        values: (n_subjects, n_features) float64.
        feature_map: int32 volume on the store's grid: feature index + 1 for each voxel, 0 outside.
        kind: "regions" or "voxels".  info: JSON-ready description (e.g. the downsampling factor).
    """

    values: np.ndarray
    feature_map: np.ndarray
    kind: str
    info: dict


def make_parcellation(mask: np.ndarray, affine: np.ndarray, n_regions: int = 48, seed: int = 0) -> np.ndarray:
    """int16 labels 1..n_regions inside the mask (0 outside); regions 2k-1 / 2k are left/right pairs."""
    mask = np.asarray(mask, bool)
    vox = np.argwhere(mask)
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    left = world[:, 0] < 0
    half = max(n_regions // 2, 1)
    mirrored = np.abs(world[:, 0])
    points = np.column_stack([mirrored, world[:, 1], world[:, 2]])
    km = KMeans(n_clusters=half, n_init=4, random_state=seed).fit(points[left] if left.any() else points)
    # order clusters front-to-back, bottom-to-top so labels read the same across runs and machines
    order = np.lexsort((km.cluster_centers_[:, 2], km.cluster_centers_[:, 1]))
    rank = np.empty(half, int)
    rank[order] = np.arange(half)
    cluster = rank[km.predict(points)]
    labels = np.zeros(mask.shape, np.int16)
    labels[tuple(vox.T)] = (2 * cluster + np.where(left, 1, 2)).astype(np.int16)
    return labels


def _regional_means(array_path: str, position: int, labels: np.ndarray, n_regions: int) -> np.ndarray:
    volume = read_volume(array_path, position)
    flat = labels.ravel()
    inside = flat > 0
    sums = np.bincount(flat[inside], weights=volume.ravel()[inside].astype(np.float64), minlength=n_regions + 1)
    counts = np.bincount(flat[inside], minlength=n_regions + 1)
    return (sums / np.maximum(counts, 1))[1:]


def regional_features(array_path: str, positions: np.ndarray, labels: np.ndarray, client: Client,
                      progress: bool = True) -> np.ndarray:
    """subjects x regions mean intensity, one task per subject (reads one volume at a time)."""
    n_regions = int(labels.max())
    # hash=False: a fresh key each call, so releasing an earlier identical scatter cannot race with this one
    labels_future = client.scatter(labels, broadcast=True, hash=False)
    futures = [client.submit(_regional_means, array_path, int(p), labels_future, n_regions, pure=False)
               for p in positions]
    return np.stack(gather_with_progress(client, futures, "regional features", show=progress))


# ---- voxels on a coarser grid --------------------------------------------------------------------
def _block_sums(volume: np.ndarray, factor: int) -> np.ndarray:
    """Sums over factor^3 blocks (the volume is zero-padded up to a multiple of factor on each axis)."""
    pad = [(0, (-s) % factor) for s in volume.shape]
    v = np.pad(volume, pad)
    x, y, z = (s // factor for s in v.shape)
    return v.reshape(x, factor, y, factor, z, factor).sum(axis=(1, 3, 5))


def voxel_grid(mask: np.ndarray, factor: int, min_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Which coarse voxels are features, and the full-resolution feature map.

    Args:
        mask: brain mask on the store's grid.  factor: voxels per side of a block (>= 1).
        min_fraction: a block is kept when at least this fraction of it is brain.

    Returns:
        keep: bool array on the coarse grid; feature_map: int32 on the store's grid, the 1-based feature index
        of each brain voxel whose block is kept (0 elsewhere).  Features are numbered in C order of the grid.
    """
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"the downsampling factor must be an integer >= 1; got {factor!r}")
    mask = np.asarray(mask, bool)
    fraction = _block_sums(mask.astype(np.float64), factor) / factor**3
    keep = fraction >= min_fraction
    if not keep.any():
        raise ValueError(f"no block of {factor}^3 voxels is at least {min_fraction:.0%} brain; use a smaller factor")
    index = np.zeros(keep.shape, np.int32)
    index[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    full = np.repeat(np.repeat(np.repeat(index, factor, 0), factor, 1), factor, 2)
    full = full[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    return keep, np.where(mask, full, 0).astype(np.int32)


def block_means(volume: np.ndarray, mask: np.ndarray, factor: int, keep: np.ndarray) -> np.ndarray:
    """Mean intensity of the brain voxels of each kept block, in C order of the coarse grid (float64)."""
    mask = np.asarray(mask, bool)
    sums = _block_sums(np.where(mask, np.asarray(volume, np.float64), 0.0), factor)
    counts = _block_sums(mask.astype(np.float64), factor)
    return sums[keep] / counts[keep]


def _subject_block_means(block: np.ndarray, mask: np.ndarray, factor: int, keep: np.ndarray) -> np.ndarray:
    """map_blocks body: one subject's volume (1, x, y, z) -> its features (1, n_features)."""
    return block_means(block[0], mask, factor, keep)[None, :]


def voxel_features(array_path: str, positions: np.ndarray, mask: np.ndarray, factor: int, client: Client,
                   progress: bool = True) -> np.ndarray:
    """subjects x coarse voxels: block means of brain voxels, computed by a Dask array graph over the store.

    The store's (subject, x, y, z) array is read with ``dask.array.from_zarr``, rechunked to one volume per
    block and reduced block by block on the workers; only the features come back.
    """
    import dask.array as da

    keep, _ = voxel_grid(mask, factor)
    n_features = int(keep.sum())
    positions = np.asarray(positions, dtype=int)
    volumes = da.from_zarr(array_path)[positions].rechunk((1, -1, -1, -1))
    features = volumes.map_blocks(_subject_block_means, np.asarray(mask, bool), int(factor), keep,
                                  dtype=np.float64, drop_axis=[2, 3], chunks=(volumes.chunks[0], (n_features,)))
    futures = client.compute(list(features.to_delayed().ravel()))
    return np.concatenate(gather_with_progress(client, futures, "voxel features", show=progress), axis=0)


def feature_set(kind: str, array_path: str, positions: np.ndarray, client: Client, *, labels: np.ndarray | None = None,
                mask: np.ndarray | None = None, factor: int = 3, progress: bool = True) -> FeatureSet:
    """Features of one kind for the subjects at ``positions`` of a store volume array.

    ``regions`` needs the parcellation ``labels``; ``voxels`` needs the brain ``mask`` and the ``factor``.
    """
    if kind == "regions":
        if labels is None:
            raise ValueError("regional features need the parcellation labels")
        values = regional_features(array_path, positions, labels, client, progress)
        return FeatureSet(values, np.asarray(labels, np.int32), kind, {"n_regions": int(labels.max())})
    if kind == "voxels":
        if mask is None:
            raise ValueError("voxel features need the brain mask")
        _, feature_map = voxel_grid(mask, factor)
        values = voxel_features(array_path, positions, mask, factor, client, progress)
        return FeatureSet(values, feature_map, kind, {"downsample": int(factor), "n_voxels": int(values.shape[1])})
    raise ValueError(f"unknown feature kind {kind!r}; choose from {list(FEATURE_KINDS)}")
