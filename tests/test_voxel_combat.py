"""Voxel-wise ComBat on a cohort store: the same numbers as the table-level ComBat, fitted with Dask over
the store's chunks, applied chunk by chunk with each subject's own covariates."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from harmonize import apply as apply_mod
from harmonize.fit_graph import fit_combat
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, open_cohort
from harmonize.models import load_model
from harmonize.models.combat import ComBatHarmonizer
from harmonize.models.voxel_combat import VoxelComBat


@pytest.fixture(scope="module")
def dataset(small_store):
    return CohortStore(small_store).dataset().load()


def _table_combat(ds, reference_site="NYU"):
    mask = ds[S.MASK].values.astype(bool)
    x = ds[S.IMAGES].values[:, mask].astype(np.float64)
    covariates = pd.DataFrame({"age": ds[S.AGE].values.astype(float), "sex": ds[S.SEX].values.astype(str)})
    table = ComBatHarmonizer(covariates=["age", "sex"], categorical=["sex"], reference_site=reference_site)
    return mask, table.fit_transform(x, ds[S.SITE].values.astype(str), covariates)


def test_voxel_combat_equals_table_combat_on_mask_voxels(dataset):
    mask, expected = _table_combat(dataset)
    model = VoxelComBat(reference_site="NYU", block=(11, 13, 7)).fit(dataset)  # blocks that cut the grid oddly
    out = model.transform(dataset)[S.HARMONIZED].values
    np.testing.assert_allclose(out[:, mask], expected, rtol=1e-6, atol=1e-3)
    assert (out[:, ~mask] == 0).all()
    nyu = dataset[S.SITE].values == "NYU"
    np.testing.assert_array_equal(out[nyu][:, mask], dataset[S.IMAGES].values[nyu][:, mask])  # the reference
    # site effect size per voxel (site mean vs the reference's, in within-site SDs) shrinks a lot
    sites = dataset[S.SITE].values
    for name, volumes in (("raw", dataset[S.IMAGES].values[:, mask]), ("harmonized", out[:, mask])):
        size = np.mean([np.median(np.abs(volumes[sites == s].mean(0) - volumes[nyu].mean(0))
                                  / (volumes[sites == s].std(0) + volumes[nyu].std(0) + 1e-6))
                        for s in ("UM", "USM")])
        if name == "raw":
            raw_size = size
    assert size < 0.5 * raw_size, (raw_size, size)


def test_distributed_fit_equals_in_memory_and_apply_writes_its_own_array(small_store, dataset, tmp_path, client):
    store_path = tmp_path / "s.zarr"
    shutil.copytree(small_store, store_path)
    in_memory = VoxelComBat(reference_site="NYU").fit(dataset)
    model = fit_combat(store_path, client, {"reference_site": "NYU"}, progress=False)
    for name, grid in in_memory.grid_params_.items():
        np.testing.assert_allclose(model.grid_params_[name], grid, rtol=1e-12, atol=1e-12, err_msg=name)
    folder = model.save(tmp_path / "combat")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "parameters.safetensors"]
    loaded = load_model(folder)
    assert loaded.checksum_ == model.checksum_
    result = apply_mod.apply_model(store_path, folder, client, progress=False, output=S.output_for("combat"))
    assert len(result.harmonized) == 12
    ds = open_cohort(store_path).load()
    expected = in_memory.transform(dataset)[S.HARMONIZED].values
    np.testing.assert_allclose(ds[S.output_for("combat")].values, expected, rtol=1e-6, atol=1e-3)
    assert (ds[S.status_of(S.output_for("combat"))].values == S.DONE).all()
    assert S.HARMONIZED not in zarr.open_group(str(store_path))  # the main output is untouched
    again = apply_mod.apply_model(store_path, folder, client, progress=False, output=S.output_for("combat"))
    assert again.harmonized == [] and len(again.skipped) == 12


def test_new_subjects_keep_their_own_covariates(dataset):
    model = VoxelComBat(reference_site="NYU").fit(dataset)
    mask = dataset[S.MASK].values.astype(bool)
    i = int(np.flatnonzero(dataset[S.SITE].values == "UM")[0])
    volume = dataset[S.IMAGES].values[i]
    older = model.harmonize_volume(volume, "UM", mask, {"age": 80.0, "sex": str(dataset[S.SEX].values[i])})
    younger = model.harmonize_volume(volume, "UM", mask, {"age": 20.0, "sex": str(dataset[S.SEX].values[i])})
    assert not np.allclose(older, younger)  # delta != 1: the covariate term changes the mapping


def test_clear_errors(dataset):
    model = VoxelComBat(reference_site="NYU").fit(dataset)
    mask = dataset[S.MASK].values.astype(bool)
    volume = dataset[S.IMAGES].values[0]
    with pytest.raises(ValueError, match="not seen in training"):
        model.harmonize_volume(volume, "Mars", mask, {"age": 30.0, "sex": "F"})
    with pytest.raises(ValueError, match="age"):
        model.subject_context("UM", {"age": None, "sex": "F"})
    with pytest.raises(ValueError, match="refit"):
        model.check_reference("UM")
    with pytest.raises(ValueError, match="non-parametric"):
        VoxelComBat(parametric=False).check_size(10**6)
    with pytest.raises(ValueError, match="covariate"):
        VoxelComBat(covariates=("age", "handedness")).fit(dataset)


def test_an_empty_covariate_in_the_store_is_missing_not_a_category(dataset):
    """The store writes an unknown sex as ""; ComBat must see a missing value (and say which subject),
    not fit a third sex category called ""."""
    from harmonize.models.voxel_combat import covariate_frame

    broken = dataset.assign_coords({S.SEX: (S.SUBJECT, np.where(np.arange(dataset.sizes[S.SUBJECT]) == 2, "",
                                                                 dataset[S.SEX].values.astype(str)).astype(object))})
    frame = covariate_frame(broken, [S.AGE, S.SEX])
    assert frame[S.SEX].isna().tolist() == [i == 2 for i in range(len(frame))]
    with pytest.raises(ValueError, match=r"'sex' at subject rows 2"):
        VoxelComBat(reference_site="NYU").fit(broken)
