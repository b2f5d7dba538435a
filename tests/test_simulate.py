"""The simulated cohort: real anatomy, deterministic, with the effects it claims (age, site)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harmonize.simulate import (
    CohortSpec,
    _deform,
    groundtruth_path,
    load_abide_iqms,
    load_template,
    simulate_cohort,
)


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


@pytest.fixture()
def cohort(small_cohort):
    return {k: Path(small_cohort[k]) for k in ("bids_dir", "groundtruth_dir")}


def test_layout_and_participants(cohort):
    table = pd.read_csv(cohort["bids_dir"] / "participants.tsv", sep="\t")
    assert list(table.columns) == ["participant_id", "site", "age", "sex"]
    assert table.site.value_counts().to_dict() == {"NYU": 4, "UM": 4, "USM": 4}
    for pid in table.participant_id:
        assert (cohort["bids_dir"] / pid / "anat" / f"{pid}_T1w.nii.gz").exists()
        assert groundtruth_path(cohort["groundtruth_dir"], pid.removeprefix("sub-")).exists()
    # the ground truth is never inside the folder the pipeline reads
    assert not str(cohort["groundtruth_dir"]).startswith(str(cohort["bids_dir"]))


def test_same_seed_same_voxels_other_seed_differs(tmp_path):
    spec = CohortSpec(sites=("NYU", "UM"), subjects_per_site=1, resolution_mm=8.0, seed=3)
    a = simulate_cohort(tmp_path / "a", spec)
    b = simulate_cohort(tmp_path / "b", spec)
    c = simulate_cohort(tmp_path / "c", CohortSpec(sites=("NYU", "UM"), subjects_per_site=1,
                                                   resolution_mm=8.0, seed=4))
    name = "sub-002/anat/sub-002_T1w.nii.gz"
    first, again, other = (_load(Path(out["bids_dir"]) / name) for out in (a, b, c))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_ageing_moves_grey_matter_to_csf_by_the_stated_rate():
    """Same deformation, ages 30 and 70: GM shrinks by 0.4 %/year around 45, CSF takes exactly what GM loses."""
    template = load_template(8.0)
    spec = CohortSpec(resolution_mm=8.0)
    young = _deform(template, np.random.default_rng(5), spec, 30.0, "F")
    old = _deform(template, np.random.default_rng(5), spec, 70.0, "F")
    gm_young, gm_old = young[0].sum(), old[0].sum()
    assert gm_old / gm_young == pytest.approx((1 - 0.004 * 25) / (1 + 0.004 * 15), rel=1e-6)
    assert old[2].sum() - young[2].sum() == pytest.approx(gm_young - gm_old, rel=1e-5)
    np.testing.assert_array_equal(old[1], young[1])  # white matter untouched


def test_scans_show_their_site(cohort):
    """Each site has its own scanner: gain differs between sites far more than within one."""
    table = pd.read_csv(cohort["bids_dir"] / "participants.tsv", sep="\t")
    labels = [p.removeprefix("sub-") for p in table.participant_id]
    scans = [_load(cohort["bids_dir"] / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz") for s in labels]
    level = np.array([np.percentile(v[v > 0], 95) for v in scans])
    within = np.mean([level[table.site == s].std() for s in table.site.unique()])
    between = np.std([level[table.site == s].mean() for s in table.site.unique()])
    assert between > 2 * within  # scanner gain differs by site far more than within a site


def test_unknown_site_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown ABIDE site"):
        simulate_cohort(tmp_path, CohortSpec(sites=("NYU", "NOWHERE"), subjects_per_site=1, resolution_mm=8.0))


def test_abide_metrics_are_real_multi_site():
    iqms = load_abide_iqms()
    assert len(iqms) > 1000 and iqms.site.nunique() >= 17
