"""Regional features: a parcellation of the store's brain mask and per-subject regional means.

No atlas may be downloaded at run time, so the parcellation is made from the grid itself: k-means
on the coordinates of brain voxels, mirrored across the midline, gives compact, roughly equal-sized,
left/right-paired regions. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
from distributed import Client
from sklearn.cluster import KMeans

from harmonize.cluster import gather_with_progress
from harmonize.io.store import read_volume


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
    labels_future = client.scatter(labels, broadcast=True)
    futures = [client.submit(_regional_means, array_path, int(p), labels_future, n_regions, pure=False)
               for p in positions]
    return np.stack(gather_with_progress(client, futures, "regional features", show=progress))
