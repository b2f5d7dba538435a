"""The graph layer for fits that run over the store's chunks (ComBat).

ComBat's fit is per-block statistics (all subjects x one spatial block of the grid, read in batches of
subjects), which run as Dask tasks next to the data, each reading whole Zarr chunks; the client then pools
the per-site hyper-priors over all voxels and finishes the empirical-Bayes step from the statistics alone
(no data). The statistics are O(sites x voxels) and a task holds one batch of subjects of its block at a
time, so no process holds a subjects x voxels matrix and a worker's memory does not grow with the cohort.
"""

from __future__ import annotations

import numpy as np
import zarr
from distributed import Client

from harmonize.cluster import gather_with_progress
from harmonize.io import schema as S
from harmonize.io.store import CohortStore
from harmonize.models.combat import ChunkStatistics, Design
from harmonize.models.voxel_combat import VoxelComBat, block_locations, block_statistics, covariate_frame


def _block_task(images_path: str, positions: np.ndarray, location: tuple[slice, slice, slice],
                mask_block: np.ndarray, design: Design, mean_only: bool, feature_offset: int,
                batch: int | None = None) -> ChunkStatistics:
    images = zarr.open_array(images_path, mode="r")
    positions = np.asarray(positions)

    def read(a: int, b: int) -> np.ndarray:
        # orthogonal selection: subjects a..b-1 of the fit, this block; the store's chunks are one subject x a
        # spatial block, so each chunk is decompressed once per pass (passes: 1 if all subjects fit one batch)
        return images.get_orthogonal_selection((positions[a:b], *location))

    return block_statistics(read, mask_block, design, mean_only=mean_only, feature_offset=feature_offset,
                            batch=batch)


def fit_combat(store_path, client: Client, params: dict | None = None, progress: bool = True,
               subject_batch: int | None = None) -> VoxelComBat:
    """Fit voxel-wise ComBat on the store's ingested subjects with Dask; returns the fitted model.

    ``subject_batch``: subjects per read of a block (default: a fixed memory budget, see
    :func:`harmonize.models.voxel_combat.subject_batch`)."""
    store = CohortStore(store_path)
    model = VoxelComBat(**(params or {}))
    table = store.table()
    positions = np.flatnonzero(table[S.INGEST_STATUS].to_numpy() == S.DONE)
    rows = table.iloc[positions].reset_index(drop=True)
    covariates = covariate_frame(rows, list(model.covariates or []))
    design = model.design(rows[S.SITE].astype(str).tolist(), covariates)
    mask = store.mask()
    block = tuple(model.block) if model.block else store.chunks
    blocks = block_locations(mask.shape, block, mask)
    model.check_size(int(mask.sum()))  # fail before any work is sent
    offsets = np.concatenate([[0], np.cumsum([int(mask[loc].sum()) for loc in blocks])])
    design_future = client.scatter(design, broadcast=True, hash=False)
    futures = [client.submit(_block_task, store.array_path(S.IMAGES), positions, loc, mask[loc], design_future,
                             model.mean_only, int(offsets[k]), subject_batch, pure=False)
               for k, loc in enumerate(blocks)]
    stats = gather_with_progress(client, futures, "combat statistics", show=progress)
    return model.fit_from_blocks(stats, blocks, mask, design)
