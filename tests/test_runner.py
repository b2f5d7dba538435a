"""`harmonize run SPEC`: spec checks, incremental/idempotent nights, and the faults a night brings.

Every run here uses the session's loopback LocalCluster (in-process, or by its address from a
subprocess) and reuses one saved model (`model_dir`), so that outputs compare bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from harmonize import runner
from harmonize.io import schema as S
from harmonize.io.store import CohortStore
from harmonize.spec import PipelineSpecError, load_pipeline

REPO = Path(__file__).resolve().parents[1]


# ---- specs -------------------------------------------------------------------------------------------
def _write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _spec_data(bids: Path, store: Path, model_dir: Path | None, cluster="local", **extra) -> dict:
    model = {"kind": "invariant", "reference_site": "NYU"}
    if model_dir is not None:
        model["model_dir"] = str(model_dir)
    return {"input": str(bids), "store": str(store), "cluster": cluster, "chunks": [16, 16, 16],
            "models": [model], "report": False, **extra}


@pytest.mark.parametrize(("text", "expected"), [
    ("input: {bids}\nstore: s.zarr\nmodles: []\n", "line 3, key 'modles': unknown key 'modles'; allowed here:"),
    ("input: {bids}/nowhere\nstore: s.zarr\n", "line 1, key 'input':"),
    ("store: s.zarr\n", "'input' is required"),
    ("input: {bids}\nstore: s.zarr\nmodels:\n  - kind: invariant\n    fit: sometimes\n",
     "line 5, key 'models.0.fit': 'sometimes'; allowed: if-needed, always, never"),
    ("input: {bids}\nstore: s.zarr\nmodels:\n  - kind: vae\n", "key 'models.0.kind': 'vae' is not a model kind"),
    ("input: {bids}\nstore: s.zarr\nmodels:\n  - kind: invariant\n    params: {{stepz: 3}}\n",
     "key 'models.0.params.stepz': unknown invariant parameter 'stepz'; allowed: latent_dim"),
    ("input: {bids}\nstore: s.zarr\nmodels:\n  - kind: combat\n  - kind: combat\n    output: harmonized\n",
     "'harmonized' is written by an earlier model too"),
    ("input: {bids}\nstore: s.zarr\nexport: {{dir: out, outputs: [harmonized_x]}}\n",
     "'harmonized_x' is not written by any model of this spec"),
    ("input: {bids}\nstore: s.zarr\nchunks: [4, 4]\n", "expected three integers >= 8"),
    ("input: {bids}\nstore: s.zarr\ncluster: nope.yaml\n", "key 'cluster':"),
    ("input: {bids}\nstore: [\n", "is not valid YAML"),
    ("- just\n- a list\n", "a pipeline spec is a mapping of keys"),
    ("input: {bids}\nstore: s.zarr\nmodels:\n  - kind: invariant\n    model_dir: {bids}\n    fit: always\n",
     "'always' contradicts model_dir"),
])
def test_spec_errors_name_the_line_key_and_what_is_allowed(tmp_path, small_cohort, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text.format(bids=small_cohort["bids_dir"]))
    with pytest.raises(PipelineSpecError) as err:
        load_pipeline(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_shipped_specs_are_valid_and_demo_is_packaged(small_cohort, tmp_path):
    assert runner.demo_spec_path().resolve() == (REPO / "pipelines" / "demo.yaml").resolve()
    work = tmp_path / "work"
    shutil.copytree(Path(small_cohort["bids_dir"]).parent, work / "cohort")
    demo = load_pipeline(REPO / "pipelines" / "demo.yaml", base=work)
    assert [m.kind for m in demo.models] == ["combat", "invariant"]
    assert [m.output for m in demo.models] == ["harmonized_combat", "harmonized"]
    assert demo.store == work / "cohort.zarr" and demo.groundtruth == work / "cohort" / "groundtruth"
    nightly = load_pipeline(REPO / "pipelines" / "nightly.yaml", overrides={"input": small_cohort["bids_dir"]})
    assert nightly.models[0].fit == "if-needed" and nightly.models[0].params == {"steps": 800, "seed": 0}
    assert Path(nightly.cluster).resolve() == (REPO / "cluster" / "local.yaml").resolve()
    for example in ("crontab.example", "harmonize-nightly.service", "scrontab.example"):
        assert "harmonize run pipelines/nightly.yaml" in (REPO / "pipelines" / example).read_text()


# ---- a clean night, the reference every fault is compared with ----------------------------------
@pytest.fixture(scope="module")
def clean_run(small_cohort, fitted_model, client, tmp_path_factory):
    """One uninterrupted run over the whole small cohort: (store path, harmonized array)."""
    work = tmp_path_factory.mktemp("clean")
    spec = load_pipeline(_spec_data(Path(small_cohort["bids_dir"]), work / "c.zarr", fitted_model,
                                    export={"dir": str(work / "nifti")}))
    record = runner.run(spec, client=client, progress=False)
    assert record.status == "ok" and record.exit_code == 0, record.summary()
    return work / "c.zarr", zarr.open_array(str(work / "c.zarr" / S.HARMONIZED))[...]


def _harmonized(store: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return group[S.HARMONIZED][...], group[S.HARMONIZED_STATUS][...]


def _subset_bids(src: str, dst: Path, keep) -> Path:
    """A copy of the BIDS folder with only the subjects `keep` (labels) so far arrived."""
    shutil.copytree(src, dst)
    table = pd.read_csv(dst / "participants.tsv", sep="\t")
    for label in table.participant_id.str.removeprefix("sub-"):
        if label not in keep:
            shutil.rmtree(dst / f"sub-{label}")
    return dst


def test_nights_are_incremental_and_idempotent(small_cohort, fitted_model, client, tmp_path, clean_run):
    """Night 1: 9 subjects (3 per site); night 2: 3 more arrive (only those are done, nothing refit,
    finished data untouched); night 3: nothing new; night 4: the spec's model settings changed: refit."""
    labels = [f"{i:03d}" for i in range(1, 13)]
    first, later = [s for s in labels if int(s) % 4], [s for s in labels if not int(s) % 4]
    bids = _subset_bids(small_cohort["bids_dir"], tmp_path / "bids", first)
    store = tmp_path / "c.zarr"
    spec = load_pipeline(_spec_data(bids, store, None, export={"dir": str(tmp_path / "nifti")}))
    spec.models[0].params = {"steps": 20, "eval_every": 10, "crop": 12, "torch_threads": 1}
    night1 = runner.run(spec, client=client, progress=False)
    assert night1.status == "ok" and night1.new == first and night1.models["harmonized"]["action"] == "fitted"
    assert night1.done["apply harmonized"] == first
    before, _ = _harmonized(store)
    chunk_files = {p: p.stat().st_mtime_ns for p in (store / S.HARMONIZED / "c").rglob("*") if p.is_file()}
    exported = {p: p.stat().st_mtime_ns for p in (tmp_path / "nifti").rglob("*.nii.gz")}
    assert len(exported) == 9

    for label in later:  # three scans arrive, one per site
        shutil.copytree(Path(small_cohort["bids_dir"]) / f"sub-{label}", bids / f"sub-{label}")
    night2 = runner.run(spec, client=client, progress=False)
    assert night2.status == "ok" and night2.new == later, night2.summary()
    assert night2.models["harmonized"]["action"] == "reused"  # no refit
    assert night2.done["apply harmonized"] == later and night2.skipped["apply harmonized"] == 9
    assert night2.done["export harmonized"] == later
    after, status = _harmonized(store)
    np.testing.assert_array_equal(after[:9], before[:9])  # finished subjects untouched ...
    assert all(p.stat().st_mtime_ns == t for p, t in chunk_files.items())  # ... not even rewritten
    assert all(p.stat().st_mtime_ns == t for p, t in exported.items())
    assert (status == S.DONE).all() and np.isfinite(after[9:]).all()

    night3 = runner.run(spec, client=client, progress=False)
    assert night3.status == "nothing new" and night3.exit_code == 0 and not night3.changed
    assert "nothing new" in night3.summary()
    np.testing.assert_array_equal(_harmonized(store)[0], after)
    records = sorted((store / S.RUNS_DIR).glob("*/run.json"))
    assert [json.loads(r.read_text())["status"] for r in records] == ["ok", "ok", "nothing new"]

    spec.models[0].params["steps"] = 21  # the spec's settings for the model changed: refit
    night4 = runner.run(spec, client=client, progress=False)
    assert night4.models["harmonized"] == {"kind": "invariant", "action": "fitted", "why":
                                           "the spec's settings for it changed", "model": night4.models[
                                               "harmonized"]["model"]}
    assert len(night4.done["apply harmonized"]) == 12  # a new model: every subject harmonized again


def test_run_record_and_performance_report(clean_run):
    store, _ = clean_run
    (folder,) = (store / S.RUNS_DIR).glob("*")
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "ok" and record["exit_code"] == 0 and len(record["new"]) == 12
    assert record["models"]["harmonized"]["action"] == "reused"
    assert {"ingest", "apply harmonized", "export", "total"} <= set(record["timings"])
    assert record["rejected"] == [] and record["failed"] == []
    html = (folder / "performance.html").read_text()
    assert "Dask Performance Report" in html and "Task Stream" in html
    assert not any(str(store.parent) in str(v) for v in record.values())  # no absolute paths in the record


# ---- faults ----------------------------------------------------------------------------------------
def _slow_tasks():
    """A worker plugin that makes every subject's apply task 0.7 s slower, so that a kill lands in the middle of apply.

    Defined inside a function so that it travels to the workers by value (they cannot import tests/)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class SlowTasks(WorkerPlugin):
        name = "slow-tasks"

        def transition(self, key, start, finish, **kwargs):
            from dask.utils import key_split

            if finish == "memory" and key_split(key) == "harmonize_subject":  # one per subject, after its write
                time.sleep(0.7)

    return SlowTasks()


def _run_cli(spec: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "harmonize.cli", "run", str(spec), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()}")
        time.sleep(0.05)
    if proc is not None:
        proc.kill()
        raise AssertionError(f"timed out waiting for {what}: {proc.communicate()}")
    raise AssertionError(f"timed out waiting for {what}")


def _done_count(store: Path) -> int:
    try:
        return int((zarr.open_group(str(store), mode="r")[S.HARMONIZED_STATUS][...] == S.DONE).sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def test_sigkill_of_the_run_mid_apply_then_rerun_equals_a_clean_run(small_cohort, fitted_model, client, tmp_path,
                                                                   clean_run):
    store = tmp_path / "k.zarr"
    spec = _write_spec(tmp_path / "spec.yaml", _spec_data(Path(small_cohort["bids_dir"]), store, fitted_model,
                                                          cluster=client.scheduler.address))
    plugin = _slow_tasks()
    client.register_plugin(plugin)
    try:
        proc = _run_cli(spec)
        _wait_for(lambda: _done_count(store) >= 2, 180, "two subjects were harmonized", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        client.unregister_worker_plugin(plugin.name)
    data, status = _harmonized(store)
    reference, _ = clean_run
    expected = zarr.open_array(str(reference / S.HARMONIZED))[...]
    done = status == S.DONE
    assert 2 <= done.sum() < 12, f"the kill was meant to land mid-apply ({done.sum()} done)"
    # no subject is marked done without its data
    np.testing.assert_array_equal(data[done], expected[done])
    lock = json.loads(runner.lock_path(store).read_text())
    assert "released" not in lock  # the killed run never released it ...
    record = runner.run(load_pipeline(spec), client=client, progress=False)  # ... and the next run is not blocked
    assert record.status == "ok", record.summary()
    assert sorted(record.done["apply harmonized"]) == sorted(
        str(s) for s in CohortStore(store).table()[S.SUBJECT][~done])
    np.testing.assert_array_equal(_harmonized(store)[0], expected)
    assert (_harmonized(store)[1] == S.DONE).all()


def test_sigkill_of_a_worker_during_apply_completes_with_correct_output(small_cohort, fitted_model, client,
                                                                         tmp_path, clean_run):
    store = tmp_path / "w.zarr"
    spec = load_pipeline(_spec_data(Path(small_cohort["bids_dir"]), store, fitted_model))
    pids = client.run(os.getpid)
    killed = {}

    def kill_one_worker():
        _wait_for(lambda: _done_count(store) >= 1, 180, "one subject was harmonized")
        address, pid = sorted(pids.items())[0]
        os.kill(pid, signal.SIGKILL)
        killed[address] = pid

    plugin = _slow_tasks()
    client.register_plugin(plugin)
    try:
        thread = threading.Thread(target=kill_one_worker, daemon=True)
        thread.start()
        record = runner.run(spec, client=client, progress=False)
        thread.join(timeout=5)
    finally:
        client.unregister_worker_plugin(plugin.name)
    assert killed, "no worker was killed"
    assert record.status == "ok" and record.exit_code == 0, record.summary()
    data, status = _harmonized(store)
    reference, _ = clean_run
    assert (status == S.DONE).all()
    np.testing.assert_array_equal(data, zarr.open_array(str(reference / S.HARMONIZED))[...])
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the tests after this one
    assert set(client.run(os.getpid).values()) != set(pids.values())


def test_two_runs_at_once_one_refuses_with_its_own_exit_code(small_cohort, fitted_model, client, tmp_path):
    store = tmp_path / "l.zarr"
    spec = _write_spec(tmp_path / "spec.yaml", _spec_data(Path(small_cohort["bids_dir"]), store, fitted_model,
                                                          cluster=client.scheduler.address))
    with runner.run_lock(store, "the-other-run"):  # a live run holds the store
        second = _run_cli(spec)
        out, err = second.communicate(timeout=120)
    assert second.returncode == runner.EXIT_LOCKED == 75
    assert "another harmonize run is working on" in err and "the-other-run" in err and "did nothing" in err
    assert not store.exists()  # it did nothing
    # and the real thing: two CLI runs started together, exactly one works
    first, second = _run_cli(spec), _run_cli(spec)
    codes = sorted([first.wait(timeout=300), second.wait(timeout=300)])
    assert codes == [0, 75], (codes, first.communicate(), second.communicate())


def test_a_dead_runs_leftover_lock_is_broken_and_reported(small_cohort, fitted_model, client, tmp_path, clean_run):
    store = tmp_path / "d.zarr"
    shutil.copytree(clean_run[0], store)  # a finished store: this night has nothing new
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runner.lock_path(store).write_text(json.dumps({"run_id": "old-night", "pid": dead.pid,
                                                   "host": __import__("socket").gethostname()}))
    messages = []
    spec = load_pipeline(_spec_data(Path(small_cohort["bids_dir"]), store, fitted_model))
    record = runner.run(spec, client=client, progress=False, log=messages.append)
    assert record.status == "nothing new", record.summary()
    assert any("old-night" in m and "ended without releasing the lock" in m for m in messages)


def test_a_subject_whose_processing_raises_is_recorded_and_the_rest_finish(small_cohort, fitted_model, client,
                                                                            tmp_path, clean_run):
    store = tmp_path / "f.zarr"
    spec = load_pipeline(_spec_data(Path(small_cohort["bids_dir"]), store, fitted_model))
    spec.models[0].fit = "never"
    # night 1 ingests only (the model step fails before apply: fit 'never' without a model is an error)
    spec.models[0].model_dir, saved = None, spec.models[0].model_dir
    broken = runner.run(spec, client=client, progress=False)
    assert broken.status == "failed" and broken.exit_code == 1 and "fit is 'never'" in broken.error
    assert len(broken.new) == 12
    # a chunk of sub-005's stored image is corrupt (a disk error, a bad copy)
    position = 4
    chunk = next(p for p in (store / S.IMAGES / "c" / str(position)).rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage" * 50)
    spec.models[0].model_dir = saved
    record = runner.run(spec, client=client, progress=False)
    assert record.status == "rejected" and record.exit_code == 3
    assert [f["subject"] for f in record.failed] == ["005"] and record.failed[0]["step"] == "apply harmonized"
    assert record.failed[0]["reason"]  # the error text, e.g. the codec's
    assert len(record.done["apply harmonized"]) == 11
    data, status = _harmonized(store)
    expected = zarr.open_array(str(clean_run[0] / S.HARMONIZED))[...]
    others = np.arange(12) != position
    np.testing.assert_array_equal(data[others], expected[others])
    assert status[position] == S.REJECTED
    run_json = json.loads(next((store / S.RUNS_DIR).glob(f"{record.run_id}/run.json")).read_text())
    assert run_json["failed"][0]["subject"] == "005"


def test_bad_input_and_an_unseen_site_are_set_aside_listed_never_deleted(small_cohort, fitted_model, client,
                                                                          tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(small_cohort["bids_dir"], bids)
    table = pd.read_csv(bids / "participants.tsv", sep="\t")
    table.loc[table.participant_id == "sub-012", "site"] = "Caltech"  # a scanner added after the fit
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    bad = bids / "sub-003" / "anat" / "sub-003_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:2000])  # a truncated copy
    before = {p: p.read_bytes() for p in bids.rglob("*") if p.is_file()}
    record = runner.run(load_pipeline(_spec_data(bids, tmp_path / "b.zarr", fitted_model)), client=client,
                        progress=False)
    assert record.exit_code == 3 and record.status == "rejected" and len(record.done["apply harmonized"]) == 10
    truncated, unseen = record.rejected
    assert truncated["subject"] == "003" and truncated["step"] == "ingest" and "truncated" in truncated["reason"]
    assert unseen["subject"] == "012" and unseen["step"] == "apply harmonized"
    assert "site 'Caltech' is not one the model was trained on (NYU, UM, USM)" in unseen["reason"]
    assert "--refit" in unseen["reason"]
    assert {p: p.read_bytes() for p in bids.rglob("*") if p.is_file()} == before  # nothing modified or deleted
