"""A participants.tsv with a gap: reported at ingest, refused by fit before any training (naming the
subject), fixed by editing the table and rerunning ingest; at apply, only that subject is set aside."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from harmonize import pipeline
from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.store import CohortStore


def _set_age(bids, subject: str, value) -> None:
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    table.loc[table.participant_id == f"sub-{subject}", "age"] = value
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)


def test_blank_age_is_reported_refused_early_and_fixed_by_reingest(cohort_copy, tmp_path, client):
    _set_age(cohort_copy, "005", "n/a")
    store = tmp_path / "s.zarr"
    first = ingest(cohort_copy, store, client, chunks=(16, 16, 16), progress=False)
    assert len(first.ingested) == 12 and first.incomplete == {S.AGE: ["005"]}
    assert "no age for sub-005" in first.summary()
    for kind in ("combat", "invariant"):  # both keep age effects by default
        with pytest.raises(ValueError, match=r"no age for sub-005.*rerun `harmonize ingest"):
            pipeline.fit(store, client, kind, {"steps": 2} if kind == "invariant" else {}, progress=False)
    assert not (store / S.MODELS_DIR).exists()  # refused before any work
    # the bare network does not need covariates
    pipeline.fit(store, client, "invariant", {"steps": 2, "crop": 10, "calibrate": "none"}, progress=False)
    _set_age(cohort_copy, "005", "41.5")
    again = ingest(cohort_copy, store, client, chunks=(16, 16, 16), progress=False)
    assert again.ingested == [] and again.updated == ["005"] and again.incomplete == {}
    table = CohortStore(store).table()
    assert table.loc[table[S.SUBJECT] == "005", S.AGE].item() == 41.5


def test_apply_sets_aside_a_subject_without_covariates_and_harmonizes_the_rest(small_store, tmp_path, client):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    model_dir = pipeline.fit(store, client, "combat", {"reference_site": "NYU"}, progress=False)
    handle = CohortStore(store)
    position = int(np.flatnonzero(handle.table()[S.SUBJECT] == "007")[0])
    handle.set_field(S.AGE, [position], [np.nan])  # a subject whose age went missing after the fit
    result = pipeline.apply(store, client, model_dir, output=S.output_for("combat"), progress=False)
    assert [r["subject"] for r in result.rejected] == ["007"] and "no age" in result.rejected[0]["reason"]
    assert len(result.harmonized) == 11
    status = CohortStore(store).status(S.status_of(S.output_for("combat")))
    assert status[position] == S.PENDING and (np.delete(status, position) == S.DONE).all()


def test_unknown_reference_site_fails_before_training(small_store, client):
    with pytest.raises(ValueError, match=r"reference site 'MGH' is not among the store's sites \['NYU', 'UM', 'USM'\]"):
        pipeline.fit(small_store, client, "invariant", {"reference_site": "MGH"}, progress=False)


def test_two_exports_into_one_folder_keep_both_provenance_entries(small_store, tmp_path, client):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    out = tmp_path / "derivatives"
    for kind, output in (("combat", S.output_for("combat")), ("invariant", S.HARMONIZED)):
        params = {"steps": 2, "crop": 10, "calibrate": "none"} if kind == "invariant" else {}
        pipeline.fit(store, client, kind, params, progress=False)
        pipeline.apply(store, client, kind=kind, output=output, progress=False)
        pipeline.export(store, out, client, output=output, progress=False)
    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"]
    described = sorted(g["Description"].split(":")[0] for g in generated)
    assert described == ["desc-harmonized", "desc-harmonizedCombat"]
    assert any("harmonized to the pooled sites" in g["Description"] for g in generated)
