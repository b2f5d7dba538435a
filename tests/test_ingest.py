"""Ingest: the store's schema, rejections with reasons, reruns that add nothing twice, orientation."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, open_cohort


def _t1(bids, sub):
    return bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"


def test_store_schema_opens_with_xarray(small_store, small_cohort):
    ds = open_cohort(small_store)
    participants = pd.read_csv(f"{small_cohort['bids_dir']}/participants.tsv", sep="\t")
    assert ds.sizes[S.SUBJECT] == len(participants) == 12
    assert ds[S.IMAGES].dtype == np.float32 and ds[S.IMAGES].dims == S.VOLUME_DIMS
    assert list(ds[S.SUBJECT].values) == [p.removeprefix("sub-") for p in participants.participant_id]
    assert list(ds[S.SITE].values) == list(participants.site)
    np.testing.assert_allclose(ds[S.AGE].values, participants.age)
    store = CohortStore(small_store)
    assert store.group[S.SITE].metadata.data_type.__class__.__name__ == "VariableLengthUTF8"
    assert store.group.attrs["schema_version"] == S.SCHEMA_VERSION
    assert all(len(h) == 64 for h in ds[S.SOURCE_SHA256].values)
    assert all(not p.startswith("/") for p in ds[S.SOURCE_PATH].values)  # relative provenance only
    # the data is the file's data, with scaling applied, on the reference grid
    first = nib.load(_t1(Path(small_cohort["bids_dir"]), "001"))
    np.testing.assert_allclose(ds[S.IMAGES].isel(subject=0).values, first.get_fdata(), rtol=1e-6)
    mask = ds[S.MASK].values.astype(bool)
    assert 0.1 < mask.mean() < 0.6  # a brain mask, not all or nothing


def test_mask_counted_during_ingest_equals_a_pass_over_the_store(small_store, small_cohort, tmp_path, client):
    from harmonize.ingest import _write_mask

    counted = CohortStore(small_store).mask()  # made from the voxel counts the ingest tasks returned
    store = CohortStore(small_store)
    assert store.group.attrs[S.MASK_FROM] == {"threshold": 0.5, "n_subjects": 12}
    images = np.stack([store.group[S.IMAGES][i] for i in range(12)])
    np.testing.assert_array_equal(counted, (images > 0).mean(axis=0) >= 0.5)
    # a run killed after writing subjects but before the mask: the next run makes it from the store
    store_path = tmp_path / "s.zarr"
    bids = Path(small_cohort["bids_dir"])
    ingest(bids, store_path, client, progress=False)
    again = CohortStore(store_path)
    del again.group.attrs[S.MASK_FROM]
    again.group[S.MASK][...] = 0
    ingest(bids, store_path, client, progress=False)
    np.testing.assert_array_equal(CohortStore(store_path).mask(), counted)
    _write_mask(again, 0.5)
    np.testing.assert_array_equal(CohortStore(store_path).mask(), counted)


def _break_inputs(bids):
    subs = sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*"))
    reasons = {}
    # truncated gzip
    data = _t1(bids, subs[0]).read_bytes()
    _t1(bids, subs[0]).write_bytes(data[: len(data) // 2])
    reasons[subs[0]] = "truncated"
    # not NIfTI at all, but valid gzip
    _t1(bids, subs[1]).write_bytes(gzip.compress(b"this is not a nifti file" * 100))
    reasons[subs[1]] = "not a readable NIfTI"
    # NaN voxels
    img = nib.load(_t1(bids, subs[2]))
    vol = img.get_fdata(dtype=np.float32)
    vol[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(vol, img.affine), _t1(bids, subs[2]))
    reasons[subs[2]] = "NaN or Inf"
    # wrong grid (one slice cropped)
    nib.save(nib.Nifti1Image(vol[:-1], img.affine), _t1(bids, subs[3]))
    reasons[subs[3]] = "does not match the reference grid"
    # 4-D with two volumes
    nib.save(nib.Nifti1Image(np.stack([vol, vol], -1), img.affine), _t1(bids, subs[4]))
    reasons[subs[4]] = "4-D"
    # a subject folder without a participants.tsv row
    extra = bids / "sub-999" / "anat"
    extra.mkdir(parents=True)
    (extra / "sub-999_T1w.nii.gz").write_bytes(_t1(bids, subs[5]).read_bytes())
    reasons["999"] = "not listed in participants.tsv"
    return reasons


def test_bad_inputs_are_set_aside_with_reasons(cohort_copy, tmp_path, client):
    reasons = _break_inputs(cohort_copy)
    before = {p: p.read_bytes() for p in cohort_copy.rglob("*.nii.gz")}
    result = ingest(cohort_copy, tmp_path / "s.zarr", client, chunks=(16, 16, 16), progress=False)
    got = {r["subject"]: r["reason"] for r in result.rejected}
    assert set(got) == set(reasons)
    for sub, fragment in reasons.items():
        assert fragment in got[sub], (sub, got[sub])
    assert len(result.ingested) == 12 - 5
    ds = open_cohort(tmp_path / "s.zarr")
    assert ds.sizes[S.SUBJECT] == 7 and not np.isnan(ds[S.IMAGES].values).any()
    assert {p: p.read_bytes() for p in cohort_copy.rglob("*.nii.gz")} == before  # inputs never modified


def test_rerun_adds_nothing_twice_and_appends_new(small_cohort, tmp_path, client):
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(small_cohort["bids_dir"], bids)
    held_out = sorted(bids.glob("sub-*"))[-2:]
    for p in held_out:
        shutil.move(p, tmp_path / p.name)
    store = tmp_path / "s.zarr"
    first = ingest(bids, store, client, chunks=(16, 16, 16), progress=False)
    assert len(first.ingested) == 10 and len(first.rejected) == 0 and len(first.waiting) == 2
    again = ingest(bids, store, client, chunks=(16, 16, 16), progress=False)
    assert again.ingested == [] and len(again.skipped) == 10
    for p in held_out:
        shutil.move(tmp_path / p.name, p)
    third = ingest(bids, store, client, chunks=(16, 16, 16), progress=False)
    assert sorted(third.ingested) == [p.name.removeprefix("sub-") for p in held_out]
    ds = open_cohort(store)
    assert ds.sizes[S.SUBJECT] == 12 and len(set(ds[S.SUBJECT].values)) == 12


def test_other_orientation_and_big_endian_are_conformed(cohort_copy, tmp_path):
    """An LAS, big-endian, int16-with-scaling copy of a subject reads back as the same volume."""
    sub = sorted(p.name.removeprefix("sub-") for p in cohort_copy.glob("sub-*"))[0]
    img = nib.load(_t1(cohort_copy, sub))
    ras = img.get_fdata(dtype=np.float32)
    flipped = ras[::-1].copy()
    affine = img.affine.copy()
    affine[:, 0] *= -1
    affine[:3, 3] = img.affine[:3, :3] @ [ras.shape[0] - 1, 0, 0] + img.affine[:3, 3]
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(">i2")
    las = nib.Nifti1Image(np.round(flipped * 2).astype(">i2"), affine, hdr)
    las.header.set_slope_inter(0.5, 0.0)
    nib.save(las, _t1(cohort_copy, sub))
    result = ingest(cohort_copy, tmp_path / "s.zarr", None, chunks=(16, 16, 16), progress=False)
    assert not result.rejected, result.rejected
    ds = open_cohort(tmp_path / "s.zarr")
    np.testing.assert_allclose(ds[S.IMAGES].sel(subject=sub).values, np.round(ras * 2) / 2, atol=1e-4)
    np.testing.assert_allclose(ds[S.AFFINE].sel(subject=sub).values, affine)


def test_missing_participants_file_is_a_clear_error(tmp_path):
    from harmonize.io.bids import CohortError

    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(CohortError, match="participants.tsv is missing"):
        ingest(tmp_path, tmp_path / "s.zarr", None, progress=False)


def test_comma_separated_participants_file_says_it_must_be_tab_separated(tmp_path):
    from harmonize.io.bids import CohortError

    (tmp_path / "participants.tsv").write_text("participant_id,site,age,sex\nsub-01,NYU,30,F\n")
    with pytest.raises(CohortError, match="missing column.*must be tab-separated"):
        ingest(tmp_path, tmp_path / "s.zarr", None, progress=False)
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\n")  # truly missing: no hint
    with pytest.raises(CohortError, match=r"missing column\(s\) \['site'\]") as info:
        ingest(tmp_path, tmp_path / "s.zarr", None, progress=False)
    assert "tab-separated" not in str(info.value)


def test_uncompressed_volume_is_read_into_memory_not_mapped(tmp_path):
    """A .nii's voxels are read, not memory-mapped: a file truncated while its volume is in use must not be able
    to kill the worker (SIGBUS) after the checks passed."""
    from harmonize.io.nifti import native_grid, read_volume

    path = tmp_path / "sub-01_T1w.nii"
    data = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32) + 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    volume, _ = read_volume(path, native_grid(path))
    assert type(volume) is np.ndarray and not isinstance(volume, np.memmap)
    path.write_bytes(b"")  # the source goes away; the volume read before is intact
    np.testing.assert_array_equal(volume, data)
