"""Features for CorEx: block-averaged voxels (a Dask array graph) and regional means, against direct numpy."""

from __future__ import annotations

import numpy as np
import pytest

from harmonize.features import block_means, feature_set, regional_features, voxel_features, voxel_grid
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, read_volume


def test_voxel_grid_and_block_means_by_hand() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((7, 8, 9), bool)
    mask[1:6, 1:7, 2:9] = True
    volume = rng.uniform(1, 2, mask.shape)
    keep, feature_map = voxel_grid(mask, 3)
    assert keep.shape == (3, 3, 3)
    expected_keep = np.zeros_like(keep)
    means = []
    for i, j, k in np.ndindex(keep.shape):
        block = np.s_[3 * i : 3 * i + 3, 3 * j : 3 * j + 3, 3 * k : 3 * k + 3]
        inside = mask[block]
        frac = inside.sum() / 27  # padding outside the grid counts as non-brain
        if frac >= 0.5:
            expected_keep[i, j, k] = True
            means.append(volume[block][inside].mean())
    assert np.array_equal(keep, expected_keep)
    np.testing.assert_allclose(block_means(volume, mask, 3, keep), means, rtol=1e-12)
    # the map sends each brain voxel of a kept block to its feature (1-based, C order), nothing else
    assert feature_map.max() == keep.sum() and not feature_map[~mask].any()
    first = np.argwhere(keep)[0]
    assert (feature_map[tuple(3 * first)] == 1) or not mask[tuple(3 * first)]
    with pytest.raises(ValueError, match="factor"):
        voxel_grid(mask, 0)
    with pytest.raises(ValueError, match="smaller factor"):
        voxel_grid(mask, 30)


def test_voxel_and_regional_features_match_direct_computation(small_store, client) -> None:
    from harmonize.features import make_parcellation

    store = CohortStore(small_store)
    mask = store.mask()
    positions = np.flatnonzero(store.status(S.INGEST_STATUS) == S.DONE)[[0, 3, 7]]
    path = store.array_path(S.IMAGES)
    got = voxel_features(path, positions, mask, 2, client, progress=False)
    keep, _ = voxel_grid(mask, 2)
    expected = np.stack([block_means(read_volume(path, int(i)), mask, 2, keep) for i in positions])
    np.testing.assert_allclose(got, expected, rtol=1e-12)

    labels = make_parcellation(mask, store.grid.affine, n_regions=6)
    regional = regional_features(path, positions, labels, client, progress=False)
    for row, i in zip(regional, positions, strict=True):
        volume = read_volume(path, int(i))
        np.testing.assert_allclose(row, [volume[labels == r].mean() for r in range(1, 7)], rtol=1e-6)

    fs = feature_set("voxels", path, positions, client, mask=mask, factor=2, progress=False)
    assert fs.values.shape == got.shape and fs.feature_map.max() == got.shape[1] and fs.info["downsample"] == 2
    fs = feature_set("regions", path, positions, client, labels=labels, progress=False)
    assert fs.values.shape == (3, 6) and np.array_equal(fs.feature_map, labels)
    with pytest.raises(ValueError, match="unknown feature kind"):
        feature_set("vertices", path, positions, client)
