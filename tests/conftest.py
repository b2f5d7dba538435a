"""Shared fixtures: a small real-anatomy cohort (MNI152 at 6 mm) and a loopback LocalCluster."""

from __future__ import annotations

import shutil

import pytest

from harmonize.simulate import CohortSpec, simulate_cohort

SMALL = CohortSpec(sites=("NYU", "UM", "USM"), subjects_per_site=4, resolution_mm=6.0, seed=7)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """3 sites x 4 subjects on the MNI152 grid at 6 mm; never modified by tests (copy it first)."""
    out = tmp_path_factory.mktemp("cohort")
    info = simulate_cohort(out, SMALL)
    return info


@pytest.fixture()
def cohort_copy(small_cohort, tmp_path):
    """A private copy of the small cohort's BIDS folder that a test may break."""
    dst = tmp_path / "bids"
    shutil.copytree(small_cohort["bids_dir"], dst)
    return dst


@pytest.fixture(scope="session")
def client():
    """A 2-worker LocalCluster on 127.0.0.1, started by the tests themselves."""
    from harmonize.cluster import make_client

    c = make_client({"type": "local", "n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"},
                    quiet=True)
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


@pytest.fixture(scope="session")
def small_store(small_cohort, tmp_path_factory, client):
    """The small cohort ingested into a store (session-wide; tests that modify a store make their own)."""
    from harmonize.ingest import ingest

    path = tmp_path_factory.mktemp("store") / "cohort.zarr"
    result = ingest(small_cohort["bids_dir"], path, client, chunks=(16, 16, 16), progress=False)
    assert not result.rejected, result.rejected
    return path


@pytest.fixture(scope="session")
def fitted_model(small_store, tmp_path_factory):
    """A quickly trained invariant model on the small store (few steps: for mechanics, not quality)."""
    from harmonize.io.store import CohortStore
    from harmonize.models.invariant import InvariantHarmonizer

    ds = CohortStore(small_store).dataset().load()
    model = InvariantHarmonizer(steps=30, eval_every=10, crop=12, seed=3, torch_threads=1)
    model.fit(ds)
    path = tmp_path_factory.mktemp("model") / "invariant"
    model.save(path)
    return path
