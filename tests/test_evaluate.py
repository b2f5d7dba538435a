"""`harmonize evaluate`: held-out scoring of raw, ComBat, invariant (lam = 0 and chosen) and ground truth.

Mechanics on a tiny cohort (3 sites x 4 subjects at 6 mm, a few training steps): the numbers are not
meaningful here, only that every one is computed, on the right subjects, the right way.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from harmonize import evaluate as ev
from harmonize.cli import EXIT_USAGE, main
from harmonize.io import schema as S
from harmonize.io.store import CohortStore
from harmonize.models import load_model

SITES = ("NYU", "UM", "USM")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    numbers = ev.evaluate(out, seed=7, resolution_mm=6.0, subjects_per_site=4, sites=SITES, steps=8,
                          model_params={"crop": 10, "eval_every": 4}, z_per_site=240, torch_threads=1)
    return out, numbers


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_pipeline_runs_end_to_end_with_a_finite_number_in_every_row(evaluated):
    out, numbers = evaluated
    chosen, baseline = ev.invariant_name(ev.DEFAULT_LAM), ev.invariant_name(0.0)
    assert list(numbers["rows"]) == [ev.RAW, ev.COMBAT, baseline, chosen, ev.TRUTH]
    for name, row in numbers["rows"].items():
        assert _finite(row["site_predictability"]["accuracy"]) and _finite(row["age_r2"]), name
        assert _finite(row["sex_effect"]["coef"]) and _finite(row["sex_effect"]["ratio_to_truth"]), name
        if name == ev.TRUTH:  # against itself fidelity says nothing: no number, not inf
            assert row["psnr"] is None and row["corr"] is None
            assert row["sex_effect"]["ratio_to_truth"] == 1.0
        else:
            assert _finite(row["psnr"]) and _finite(row["corr"]), name
        if name in (baseline, chosen):
            assert _finite(row["z_site"]["linear"]) and _finite(row["z_site"]["mlp"]) and _finite(row["seam"])
            assert row["z_site"]["chance"] == pytest.approx(1 / len(SITES))
        else:
            assert row["z_site"] is None and row["seam"] is None
    assert set(numbers["targets"]) == {"z_invariance_linear", "z_invariance_mlp", "site_predictability", "age_r2",
                                       "sex_effect", "psnr_vs_raw", "psnr_vs_combat", "seams", "no_leakage"}
    assert all(isinstance(t["pass"], bool) for t in numbers["targets"].values())
    # the files: strict JSON (no NaN/Infinity), a table with a dash for the truth's PSNR, the figures
    saved = json.loads((out / "evaluate.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["rows"][ev.TRUTH]["psnr"] is None
    table = (out / "evaluate.md").read_text()
    truth_line = next(line for line in table.splitlines() if line.startswith(f"| {ev.TRUTH} |"))
    assert "—" in truth_line and "inf" not in truth_line
    assert (out / "slices.png").stat().st_size > 0 and (out / "intensities.png").stat().st_size > 0
    for name, row in numbers["rows"].items():  # the error split: every image but the truth itself
        if name == ev.TRUTH:
            assert row["errors"] is None
        else:
            e = row["errors"]
            assert set(e["systematic_rms"]) == set(SITES) and _finite(e["individual_rms"])
            assert _finite(e["without_site_error"]["site_accuracy"]) and _finite(e["without_site_error"]["age_r2"])
    assert "systematic rms per site" in table


def test_train_and_test_subjects_are_disjoint_and_every_site_is_in_both(evaluated):
    out, numbers = evaluated
    leakage = numbers["leakage"]
    train, test = set(leakage["train_subjects"]), set(leakage["test_subjects"])
    assert train and test and not train & test and leakage["ok"]
    table = CohortStore(out / "work" / "cohort.zarr").table()
    site_of = dict(zip(table[S.SUBJECT], table[S.SITE], strict=True))
    assert train | test == set(site_of)
    assert {site_of[s] for s in train} == {site_of[s] for s in test} == set(SITES)
    # the fitted models saw train subjects only
    for name in ("invariant-lam0", f"invariant-lam{ev.DEFAULT_LAM:g}"):
        model = load_model(out / "work" / "models" / name)
        assert set(model.train_subjects_) | set(model.val_subjects_) <= train
    assert sum(load_model(out / "work" / "models" / "combat").site_counts_.values()) == len(train)


def test_split_is_stratified_seeded_and_whole_subjects():
    sites = np.array(["A"] * 5 + ["B"] * 4 + ["C"] * 2)
    train, test = ev.split_subjects(sites, 0.5, seed=1)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(len(sites)))
    for site in "ABC":
        assert (sites[train] == site).any() and (sites[test] == site).any()
    again = ev.split_subjects(sites, 0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, test), again, strict=True))
    assert not np.array_equal(test, ev.split_subjects(sites, 0.5, seed=2)[1])
    with pytest.raises(ValueError, match="2 or more"):
        ev.split_subjects(np.array(["A", "A", "B"]))


def _z_layout(n_sites=3, subjects_per_site=4, rows_per_subject=60):
    sites = np.repeat([f"s{k}" for k in range(n_sites)], subjects_per_site * rows_per_subject)
    groups = np.repeat(np.arange(n_sites * subjects_per_site), rows_per_subject)
    return sites, groups


def test_site_from_z_sees_site_in_z_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    sites, groups = _z_layout()
    codes = np.unique(sites, return_inverse=True)[1]
    onehot = np.eye(3)[codes] + 0.1 * rng.standard_normal((len(sites), 3))
    seen = ev.site_from_z(np.hstack([onehot, rng.standard_normal((len(sites), 5))]), sites, groups)
    assert seen["linear"] > 0.95 and seen["mlp"] > 0.95
    noise = ev.site_from_z(rng.standard_normal((len(sites), 8)), sites, groups)
    assert noise["chance"] == pytest.approx(1 / 3)
    assert abs(noise["linear"] - noise["chance"]) < 0.12 and abs(noise["mlp"] - noise["chance"]) < 0.12


def test_site_from_z_folds_are_grouped_by_subject():
    """z that identifies the subject but holds no site information: folds that split a subject's voxels
    would score far above chance by recognizing subjects; grouped folds stay near chance."""
    rng = np.random.default_rng(1)
    sites, groups = _z_layout(subjects_per_site=5)
    per_subject = rng.standard_normal((groups.max() + 1, 8)) * 3.0
    z = per_subject[groups] + 0.2 * rng.standard_normal((len(groups), 8))
    ungrouped = cross_val_predict(LogisticRegression(max_iter=2000), z, sites,
                                  cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert np.mean(ungrouped == sites) > 0.5  # the leak that grouping prevents
    grouped = ev.site_from_z(z, sites, groups)
    assert grouped["folds"] >= 2
    assert grouped["linear"] < grouped["chance"] + 0.2 and grouped["mlp"] < grouped["chance"] + 0.2


def test_same_volume_in_two_chunkings_is_equal(evaluated):
    """No seams at chunk borders: a held-out volume harmonized chunk by chunk (with the halo) in two tilings
    that share no borders equals itself, and the unchunked result, to 1e-5."""
    out, numbers = evaluated
    ds = CohortStore(out / "work" / "cohort.zarr").dataset().load()
    position = int(np.flatnonzero(ds[S.SUBJECT].values == numbers["leakage"]["test_subjects"][-1])[0])
    volume = ds[S.IMAGES].values[position]
    site = str(ds[S.SITE].values[position])
    mask = ds[S.MASK].values.astype(bool)
    covariates = {S.AGE: float(ds[S.AGE].values[position]), S.SEX: str(ds[S.SEX].values[position])}
    model = load_model(out / "work" / "models" / f"invariant-lam{ev.DEFAULT_LAM:g}")
    a, b = (ev.harmonize_tiled(model, volume, site, mask, covariates, t) for t in ((16, 16, 16), (12, 20, 16)))
    scale = float(np.abs(a).max())
    assert scale > 0 and np.abs(a - b).max() <= 1e-5 * scale
    whole = model.harmonize_volume(volume, site, mask, covariates=covariates)
    assert np.abs(a - whole).max() <= 1e-5 * scale
    assert ev.seam_difference(model, volume, site, mask, covariates) <= ev.SEAM_TOLERANCE
    assert numbers["targets"]["seams"]["pass"]


def test_encode_gives_the_posterior_mean_of_each_voxel(evaluated):
    out, _ = evaluated
    ds = CohortStore(out / "work" / "cohort.zarr").dataset().load()
    model = load_model(out / "work" / "models" / f"invariant-lam{ev.DEFAULT_LAM:g}")
    volume, site = ds[S.IMAGES].values[0], str(ds[S.SITE].values[0])
    mask = ds[S.MASK].values.astype(bool)
    z = model.encode(volume, site, mask)
    assert z.shape == (int(mask.sum()), model.latent_dim) and np.isfinite(z).all()
    some = np.zeros_like(mask)
    some.ravel()[np.flatnonzero(mask.ravel())[::7]] = True
    np.testing.assert_allclose(model.encode(volume, site, mask, some), z[::7], rtol=1e-5, atol=1e-6)
    other = next(s for s in SITES if s != site)  # the encoder is conditioned on the site
    assert not np.allclose(model.encode(volume, other, mask, some), z[::7])


def test_sex_effect_recovers_a_planted_coefficient():
    rng = np.random.default_rng(3)
    age = rng.uniform(20, 70, 200)
    sex = np.where(rng.random(200) < 0.5, "M", "F")
    values = 2.0 - 0.01 * age + 0.3 * (sex == "M") + 0.05 * rng.standard_normal(200)
    effect = ev.sex_effect(values, age, sex)
    assert effect["coef"] == pytest.approx(0.3, abs=3 * effect["se"]) and effect["t"] > 10


def test_error_decomposition_separates_a_planted_site_pattern_from_individual_noise():
    """Images = truth + a fixed pattern per site + per-image noise: the split finds the pattern's size as the
    systematic part, the noise as the individual part, and truth + individual error loses the site again."""
    rng = np.random.default_rng(0)
    shape, n_per_site, site_names = (12, 12, 10), 10, ("A", "B", "C")
    mask = np.zeros(shape, bool)
    mask[2:10, 2:10, 2:8] = True
    sites = np.repeat(site_names, n_per_site)
    age = rng.uniform(20, 70, sites.size)
    anatomy = rng.uniform(0.5, 1.0, shape)
    truth = np.stack([(anatomy + 0.05 * rng.standard_normal(shape)) * mask for _ in sites])
    patterns = {s: 0.08 * rng.standard_normal(shape) for s in site_names}
    noise = 0.01 * rng.standard_normal(truth.shape)
    vols = np.stack([(t + patterns[s] + e) * mask for t, s, e in zip(truth, sites, noise, strict=True)])
    # scale both to the 99th percentile as the function does, to know the planted sizes in its units
    p99 = np.array([np.percentile(v[mask], 99) for v in vols])
    t99 = np.array([np.percentile(t[mask], 99) for t in truth])
    expected = {s: float(np.sqrt(np.mean(np.mean([(vols[i] / p99[i] - truth[i] / t99[i])
                                                   for i in np.flatnonzero(sites == s)], axis=0)[mask] ** 2)))
                for s in site_names}
    out = ev.error_decomposition(vols, truth, mask, sites, age, seed=0)
    for s in site_names:
        assert out["systematic_rms"][s] == pytest.approx(expected[s], rel=1e-9)
        assert out["systematic_rms"][s] > 0.06
    assert 0.006 < out["individual_rms"] < 0.02  # the noise, not the pattern
    from harmonize import metrics
    planted = metrics.site_predictability(metrics.brain_matrix(vols, mask), sites)["accuracy"]
    assert planted > 0.9  # the pattern gives the site away ...
    assert out["without_site_error"]["site_accuracy"] < 0.6  # ... and without it the site is near chance (1/3)


def test_cli_evaluate_help_and_bad_seeds(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    assert "usage: harmonize evaluate" in capsys.readouterr().out
    assert main(["evaluate", "--seeds", "one,two", "--quiet"]) == EXIT_USAGE
    assert "--seeds" in capsys.readouterr().err


def test_a_used_work_folder_is_refused_before_anything_is_overwritten(evaluated):
    out, _ = evaluated
    before = (out / "work" / "cohort" / "bids" / "participants.tsv").stat().st_mtime_ns
    with pytest.raises(ValueError, match="not empty"):
        ev.evaluate(out, seed=8, resolution_mm=6.0, subjects_per_site=4, sites=SITES, steps=2)
    assert (out / "work" / "cohort" / "bids" / "participants.tsv").stat().st_mtime_ns == before
