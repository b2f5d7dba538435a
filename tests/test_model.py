"""The invariant harmonizer in memory: persistence without pickle, determinism, seam-free blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harmonize.io import schema as S
from harmonize.io.store import CohortStore
from harmonize.models import load_model
from harmonize.models.invariant import InvariantHarmonizer


def _covariates(dataset, i: int) -> dict:
    return {S.AGE: float(dataset[S.AGE].values[i]), S.SEX: str(dataset[S.SEX].values[i])}


@pytest.fixture(scope="module")
def dataset(small_store):
    return CohortStore(small_store).dataset().load()


def test_save_load_roundtrip_gives_identical_output(fitted_model, dataset):
    model = load_model(fitted_model)
    again = InvariantHarmonizer.load(fitted_model)
    vol = dataset[S.IMAGES].isel(subject=4).values
    mask = dataset[S.MASK].values.astype(bool)
    covariates = _covariates(dataset, 4)
    a = model.harmonize_volume(vol, str(dataset[S.SITE].values[4]), mask, covariates=covariates)
    b = again.harmonize_volume(vol, str(dataset[S.SITE].values[4]), mask, covariates=covariates)
    np.testing.assert_array_equal(a, b)
    config = json.loads((fitted_model / "config.json").read_text())
    assert config["kind"] == "invariant" and config["learned"]["sites"] == ["NYU", "UM", "USM"]
    assert sorted(p.name for p in fitted_model.iterdir()) == ["calibration", "config.json", "history.json",
                                                              "weights.safetensors"]
    assert sorted(p.name for p in (fitted_model / "calibration").iterdir()) == ["config.json",
                                                                                "parameters.safetensors"]


def test_tampered_weights_are_refused(fitted_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "m"
    shutil.copytree(fitted_model, bad)
    weights = load_file(str(bad / "weights.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, str(bad / "weights.safetensors"))
    with pytest.raises(ValueError, match="checksum"):
        load_model(bad)


def test_same_seed_same_model_and_global_rng_untouched(dataset):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    kw = dict(steps=6, eval_every=3, crop=10, seed=11, torch_threads=1)
    a = InvariantHarmonizer(**kw).fit(dataset)
    b = InvariantHarmonizer(**kw).fit(dataset)
    assert a.checksum_ == b.checksum_
    assert torch.equal(torch.random.get_rng_state(), state)


def test_prefetching_loader_trains_the_same_model_as_inline_batches(dataset):
    """The background loader draws the same batches in the same order: weights equal bit for bit."""
    kw = dict(steps=8, eval_every=4, crop=10, seed=3, torch_threads=1, calibrate="none")
    inline = InvariantHarmonizer(prefetch=0, **kw).fit(dataset)
    ahead = InvariantHarmonizer(prefetch=3, **kw).fit(dataset)
    assert inline.checksum_ == ahead.checksum_
    assert inline.history_.loss == ahead.history_.loss


def test_batch_prefetcher_order_errors_and_early_close():
    import threading

    from harmonize.models.invariant import BatchPrefetcher

    counter = iter(range(1000))
    loader = BatchPrefetcher(lambda: (np.array([next(counter)]),), depth=2)
    assert [int(loader.next()[0][0]) for _ in range(5)] == [0, 1, 2, 3, 4]
    loader.close()  # closed while the producer waits on a full queue: must not hang
    assert not any(t.name == "harmonize-batches" and t.is_alive() for t in threading.enumerate())

    def broken():
        raise OSError("disk gone")

    failing = BatchPrefetcher(broken, depth=2)
    with pytest.raises(RuntimeError, match="training batch") as info:
        failing.next()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="training batch"):  # asked again: raises again, does not hang
        failing.next()
    failing.close()
    with pytest.raises(RuntimeError, match="closed"):
        loader.next()
    with pytest.raises(ValueError, match="prefetch"):
        InvariantHarmonizer(prefetch=-1).fit(None)


def test_early_stopping_keeps_the_best_validation_step(dataset):
    model = InvariantHarmonizer(steps=12, eval_every=3, patience=100, crop=10, seed=5,
                                torch_threads=1).fit(dataset)
    h = model.history_
    assert h.val_step == [3, 6, 9, 12] and all(np.isfinite(h.val_loss))
    assert h.best_step == h.val_step[int(np.argmin(h.val_loss))]
    assert model.val_subjects_ and not set(model.val_subjects_) & set(model.train_subjects_)


def test_early_stopping_stops_after_patience_evaluations_without_gain(dataset):
    """A learning rate too small to move the validation loss by the required 1e-4 (relative): the first
    evaluation is the best, and training stops `patience` evaluations later, long before `steps`."""
    model = InvariantHarmonizer(steps=60, eval_every=3, patience=2, crop=10, seed=5, lr=1e-12,
                                torch_threads=1).fit(dataset)
    h = model.history_
    assert h.val_step == [3, 6, 9] and h.stopped_at == 9 and h.best_step == 3
    assert max(h.val_loss) - min(h.val_loss) <= 1e-4 * abs(h.val_loss[0])


def test_blocks_with_halo_equal_whole_volume(fitted_model, dataset):
    """Chunk + halo in, chunk out: stitched chunks equal the unchunked result (no seams)."""
    model = load_model(fitted_model)
    vol = dataset[S.IMAGES].isel(subject=7).values
    site = str(dataset[S.SITE].values[7])
    mask = dataset[S.MASK].values.astype(bool)
    whole = model.harmonize_volume(vol, site, mask, covariates=_covariates(dataset, 7))
    context = model.subject_context(site, _covariates(dataset, 7), volume=vol, mask=mask)
    h = model.halo
    padded = np.pad(vol, h)
    stitched = np.zeros_like(vol)
    step = 11  # deliberately not a divisor of the grid
    for x in range(0, vol.shape[0], step):
        for y in range(0, vol.shape[1], step):
            for z in range(0, vol.shape[2], step):
                loc = (slice(x, min(x + step, vol.shape[0])), slice(y, min(y + step, vol.shape[1])),
                       slice(z, min(z + step, vol.shape[2])))
                block = padded[tuple(slice(s.start, s.stop + 2 * h) for s in loc)]
                stitched[loc] = model.harmonize_block(block, context, loc)
    np.testing.assert_allclose(stitched * mask, whole, rtol=1e-5, atol=1e-3)


def test_unknown_site_and_bad_params_are_clear(fitted_model):
    model = load_model(fitted_model)
    with pytest.raises(ValueError, match="not seen in training"):
        model.site_code("NOWHERE")
    with pytest.raises(ValueError, match="decode must be"):
        InvariantHarmonizer(decode="sideways")._check_params()


def test_single_site_cohort_is_refused(dataset):
    one_site = dataset.isel(subject=np.flatnonzero(dataset[S.SITE].values == "NYU"))
    with pytest.raises(ValueError, match="at least 2 sites"):
        InvariantHarmonizer(steps=2).fit(one_site)


def test_calibration_is_combat_on_the_network_output(fitted_model, dataset):
    """The default model = the network, then voxel-wise ComBat (to the reference site, the subject's own
    age/sex kept) fitted on the network's outputs for its training subjects."""
    model = load_model(fitted_model)
    assert model.calibration_ is not None and model.calibration_.reference_site_ == model.reference_site_ == "NYU"
    mask = dataset[S.MASK].values.astype(bool)
    sites = dataset[S.SITE].values.astype(str)
    ref, other = int(np.flatnonzero(sites == "NYU")[0]), int(np.flatnonzero(sites == "UM")[0])
    vol = dataset[S.IMAGES].values[ref]
    np.testing.assert_array_equal(model.harmonize_volume(vol, "NYU", mask, covariates=_covariates(dataset, ref)),
                                  model._harmonize_uncalibrated(vol, "NYU", mask))  # reference: ComBat leaves it
    vol = dataset[S.IMAGES].values[other]
    base = model._harmonize_uncalibrated(vol, "UM", mask)
    expected = model.calibration_.harmonize_volume(base, "UM", mask, _covariates(dataset, other))
    got = model.harmonize_volume(vol, "UM", mask, covariates=_covariates(dataset, other))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-3)
    assert not np.allclose(got, base)
    with pytest.raises(ValueError, match="calibrated to site 'NYU'"):
        model.check_reference("UM")
    with pytest.raises(ValueError, match="age"):
        model.subject_context("UM", {S.AGE: None, S.SEX: "F"}, volume=vol, mask=mask)
