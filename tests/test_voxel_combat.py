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


# ---- subject-batched block statistics (memory flat in the number of subjects) -------------------------------
def _batched_case(reference_site):
    """3 sites of different sizes, age + sex, a partial mask; constant voxels: everywhere, within site B only,
    within site A only (a pass-through voxel when that site is the reference)."""
    rng = np.random.default_rng(11)
    sizes = (9, 14, 6)
    sites = np.repeat(["A", "B", "C"], sizes)
    n = sites.size
    covariates = pd.DataFrame({"age": rng.uniform(20, 80, n), "sex": rng.choice(["F", "M"], n)})
    shape = (10, 6, 5)
    effect = np.repeat([0.0, 5.0, -3.0], sizes)[:, None] * rng.uniform(0.5, 2.0, np.prod(shape))
    scale = np.repeat([1.0, 1.5, 0.7], sizes)[:, None]
    images = 100 + 0.3 * covariates["age"].to_numpy()[:, None] + effect + 10 * scale * rng.normal(size=(n, 300))
    mask = rng.random(shape) < 0.8
    flat_mask = np.flatnonzero(mask.ravel())
    images[:, flat_mask[3]] = 7.0
    images[sites == "B", flat_mask[10]] = 3.0
    images[sites == "A", flat_mask[20]] = 2.0
    design = VoxelComBat(reference_site=reference_site).design(sites.tolist(), covariates)
    return images.reshape(n, *shape).astype(np.float32), mask, design


def _assert_statistics_close(got, expected):
    from dataclasses import fields

    from harmonize.models.combat import HyperStatistics

    assert got.feature_offset == expected.feature_offset and got.reference == expected.reference
    np.testing.assert_array_equal(got.passthrough, expected.passthrough)
    np.testing.assert_array_equal(got.counts, expected.counts)
    pairs = [(f.name, getattr(got, f.name), getattr(expected, f.name)) for f in fields(expected)]
    pairs += [(f"summary.{f.name}", getattr(got.summary, f.name), getattr(expected.summary, f.name))
              for f in fields(HyperStatistics)]
    for name, a, b in pairs:
        if isinstance(b, np.ndarray) and b.dtype != bool:
            # atol only for values that are rounding noise around 0 (e.g. the reference site's own gamma_hat)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("reference_site", [None, "A", "B"])
@pytest.mark.parametrize("mean_only", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 28, 29, 40])  # 28: one subject left for a last batch of one
def test_batched_block_statistics_equal_chunk_statistics(reference_site, mean_only, batch, monkeypatch):
    from harmonize.models import voxel_combat
    from harmonize.models.combat import chunk_statistics

    monkeypatch.setattr(voxel_combat, "SUBCHUNK_VOXELS", 64)  # several sub-chunks x several batches
    images, mask, design = _batched_case(reference_site)
    voxels = images.reshape(images.shape[0], -1)[:, mask.ravel()].astype(np.float64)
    expected = chunk_statistics(voxels, design, mean_only=mean_only, feature_offset=17)
    assert expected.passthrough.sum() == (1 if reference_site is None else 2)  # + constant at the reference
    got = voxel_combat.block_statistics(images, mask, design, mean_only=mean_only, feature_offset=17, batch=batch)
    _assert_statistics_close(got, expected)


@pytest.mark.parametrize("reference_site", [None, "A"])
def test_batched_statistics_in_one_batch_equal_chunk_statistics(reference_site):
    """The two-pass accumulator itself (block_statistics reads a cohort that fits one batch only once)."""
    from harmonize.models.combat import BatchedStatistics, chunk_statistics

    images, mask, design = _batched_case(reference_site)
    voxels = images.reshape(images.shape[0], -1)[:, mask.ravel()].astype(np.float64)
    statistics = BatchedStatistics(design, voxels.shape[1])
    statistics.add_regression(0, voxels)
    statistics.solve()
    statistics.add_residuals(0, voxels)
    _assert_statistics_close(statistics.result(), chunk_statistics(voxels, design))


@pytest.mark.parametrize("batch", [4, 29, None])
def test_block_reads_are_bounded_by_the_batch(batch):
    from harmonize.models.voxel_combat import block_statistics

    images, mask, design = _batched_case("A")
    n = images.shape[0]
    requests = []

    def read(a, b):
        requests.append((a, b))
        return images[a:b]

    block_statistics(read, mask, design, batch=batch)
    if batch is None or batch >= n:  # a small cohort: one read, no more I/O than before batching
        assert requests == [(0, n)]
    else:  # two passes, each over every subject once, never more than `batch` subjects at a time
        one_pass = [(a, min(a + batch, n)) for a in range(0, n, batch)]
        assert requests == one_pass + one_pass
        assert max(b - a for a, b in requests) <= batch


def test_batched_read_names_the_subjects_with_nan():
    from harmonize.models.voxel_combat import block_statistics

    images, mask, design = _batched_case(None)
    images[[9, 11]] = np.where(mask, np.nan, images[[9, 11]])
    with pytest.raises(ValueError, match=r"2 subject\(s\) \(positions \[9, 11\] of this fit\)"):
        block_statistics(images, mask, design, batch=7)
    with pytest.raises(ValueError, match=r"positions \[9, 11\]"):
        block_statistics(images, mask, design)
    # in different batches (8-9, 10-11): the later batch's subject is named too
    with pytest.raises(ValueError, match=r"2 subject\(s\) \(positions \[9, 11\] of this fit\)") as info:
        block_statistics(images, mask, design, batch=2)
    import pickle  # raised in a Dask worker, the error travels pickled

    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.positions.tolist() == [9, 11]


def test_distributed_fit_in_small_subject_batches_equals_in_memory(small_store, dataset, client):
    in_memory = VoxelComBat(reference_site="NYU").fit(dataset)  # 12 subjects: one read per block
    batched = fit_combat(small_store, client, {"reference_site": "NYU"}, progress=False, subject_batch=5)
    for name, grid in in_memory.grid_params_.items():
        np.testing.assert_allclose(batched.grid_params_[name], grid, rtol=1e-9, atol=1e-12, err_msg=name)
    assert batched.iterations_ == in_memory.iterations_
    others = [k for k, s in enumerate(in_memory.sites_) if s != "NYU"]  # the reference's priors are of rounding noise
    for name in ("gamma_bar", "t2", "a_prior", "b_prior"):
        np.testing.assert_allclose(getattr(batched.hyperpriors_, name)[others],
                                   getattr(in_memory.hyperpriors_, name)[others], rtol=1e-9, err_msg=name)
