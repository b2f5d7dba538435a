"""Apply with Dask on a LocalCluster: equals the in-memory model, idempotent, model loaded once per worker."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from harmonize import apply as apply_mod
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, open_cohort
from harmonize.models import load_model
from harmonize.pipeline import export


def _store_copy(small_store, tmp_path):
    dst = tmp_path / "s.zarr"
    shutil.copytree(small_store, dst)
    return dst


def test_apply_matches_in_memory_and_is_idempotent(small_store, fitted_model, tmp_path, client):
    store_path = _store_copy(small_store, tmp_path)
    loads_before = client.run(apply_mod.load_count)  # the client is shared with other tests
    first = apply_mod.apply_model(store_path, fitted_model, client, progress=False)
    assert len(first.harmonized) == 12
    ds = open_cohort(store_path).load()
    model = load_model(fitted_model)
    mask = ds[S.MASK].values.astype(bool)
    for i in (0, 5, 11):  # chunked over 16^3 chunks of a 34x40x33 grid: seams would show here
        covariates = {S.AGE: float(ds[S.AGE].values[i]), S.SEX: str(ds[S.SEX].values[i])}
        expected = model.harmonize_volume(ds[S.IMAGES].values[i], str(ds[S.SITE].values[i]), mask,
                                          covariates=covariates)
        np.testing.assert_allclose(ds[S.HARMONIZED].values[i], expected, rtol=1e-5, atol=1e-3)
    assert (ds[S.HARMONIZED_STATUS].values == S.DONE).all()
    before = zarr.open_array(str(store_path / S.HARMONIZED))[...]
    again = apply_mod.apply_model(store_path, fitted_model, client, progress=False)
    assert again.harmonized == [] and len(again.skipped) == 12
    forced = apply_mod.apply_model(store_path, fitted_model, client, overwrite=True, progress=False)
    assert len(forced.harmonized) == 12
    np.testing.assert_array_equal(zarr.open_array(str(store_path / S.HARMONIZED))[...], before)
    # the model is read at most once per worker process, however many chunks each ran
    loads = client.run(apply_mod.load_count)
    assert all(loads[w] - loads_before.get(w, 0) <= 1 for w in loads), (loads_before, loads)


def test_reference_site_change_marks_everything_stale(small_store, fitted_model, tmp_path, client):
    from harmonize.models.invariant import InvariantHarmonizer

    store_path = _store_copy(small_store, tmp_path)
    apply_mod.apply_model(store_path, fitted_model, client, reference_site="NYU", progress=False)
    # the calibrated model was fitted for NYU: another target needs a refit, and says so before writing
    with pytest.raises(ValueError, match="calibrated to site 'NYU'"):
        apply_mod.apply_model(store_path, fitted_model, client, reference_site="UM", progress=False)
    assert (zarr.open_group(str(store_path))[S.HARMONIZED_STATUS][...] == S.DONE).all()
    # an uncalibrated network can decode to any training site: a new target re-harmonizes everyone
    ds = CohortStore(store_path).dataset().load()
    free = InvariantHarmonizer(steps=4, eval_every=2, crop=10, seed=1, torch_threads=1, calibrate="none").fit(ds)
    folder = free.save(tmp_path / "free")
    apply_mod.apply_model(store_path, folder, client, reference_site="NYU", progress=False)
    out = apply_mod.apply_model(store_path, folder, client, reference_site="UM", progress=False)
    assert len(out.harmonized) == 12
    assert zarr.open_group(str(store_path))[S.HARMONIZED].attrs["reference_site"] == "UM"


def test_export_round_trip_keeps_original_affine(small_store, fitted_model, tmp_path, client):
    import nibabel as nib

    from harmonize.io.nifti import read_volume

    store_path = _store_copy(small_store, tmp_path)
    apply_mod.apply_model(store_path, fitted_model, client, progress=False)
    paths = export(store_path, tmp_path / "derivatives", client, progress=False)
    assert len(paths) == 12
    store = CohortStore(store_path)
    ds = store.dataset().load()
    for i, path in enumerate(sorted(paths)):
        sub = str(ds[S.SUBJECT].values[i])
        assert path.name == f"sub-{sub}_desc-harmonized_T1w.nii.gz"
        img = nib.load(path)
        np.testing.assert_allclose(img.affine, ds[S.AFFINE].values[i])
        back, _ = read_volume(path, store.grid)
        np.testing.assert_array_equal(back, ds[S.HARMONIZED].values[i])
        assert img.header["descrip"].tobytes().strip(b"\x00") == b""  # nothing copied from any source header
    assert (tmp_path / "derivatives" / "dataset_description.json").exists()


def test_worker_loads_the_model_on_its_own_device(fitted_model, monkeypatch):
    """Apply tasks load the model with device='auto', so a GPU worker runs it on its GPU (select_device, inside
    the worker); a fixed 'cpu' would leave the GPU idle while the task sits on the GPU worker."""
    from harmonize.models import model_checksum

    asked: list[str] = []

    def recording(path, device="cpu"):
        asked.append(device)
        return load_model(path, device=device)

    monkeypatch.setattr(apply_mod, "load_model", recording)
    monkeypatch.setattr(apply_mod, "_CACHE", {})
    model = apply_mod.cached_model(str(fitted_model), model_checksum(str(fitted_model)))
    assert asked == ["auto"]
    from harmonize.models.invariant import select_device

    assert next(model.model_.parameters()).device.type == select_device("auto").type  # cuda:0 != cuda
