"""Pipeline throughput and memory: apply, ingest, memory vs cohort size, and the training step.

    .venv/bin/python benchmarks/bench_pipeline.py            # full: 2 mm MNI152 grid, 30-45 min on 2 shared cores
    .venv/bin/python benchmarks/bench_pipeline.py --quick    # 3 mm, small cohorts: a 3-4 min smoke run
    .venv/bin/python benchmarks/bench_pipeline.py --no-variants --no-combat   # the library only, no fixes
    .venv/bin/python benchmarks/bench_pipeline.py --render-only --work DIR    # rewrite the reports from the JSON

(Most of a full run is the memory part's library apply at 320 subjects: 6-16 min depending on the machine's load.)

Every measurement runs in its own subprocess (fresh interpreter, fresh LocalCluster, fresh high-water marks),
one after the other, with OMP/MKL/OPENBLAS_NUM_THREADS=1 and torch.set_num_threads(1) everywhere: the plain
loops use one torch thread; a Dask worker has threads_per_worker=1 (harmonize's TorchThreads plugin then sets
torch to 1 thread; the benchmark checks torch.get_num_threads() inside a task and records it).

Data: simulate_cohort (real MNI152 anatomy, ABIDE scanner metrics) makes 4 sites x 5 subjects; larger cohorts are
*copies* of those 20 NIfTI files under new subject labels with intensities scaled by 1 + 0.004 k (k = copy number,
rounded to int16) and ages shifted by 0.1 k years, so every file is distinct but the anatomy repeats.  A tiny
invariant model (30 steps, as tests/conftest.py trains it, ComBat calibration on) is fitted once and applied
everywhere.

Parts (ratios are measured in the same run, interleaved, best-of-repeats; load averages are recorded per run):
  apply    the fitted model over the base store (20 subjects), written back: harmonize.apply.apply_model on a
           LocalCluster of 1 and 2 workers x 1 thread vs a plain single-process loop (read each volume from the
           same store, subject context, whole-volume harmonize, x mask, write to a numpy array).  Warm-up
           (model load, first convolution) is done and excluded on both sides.  Also measured: the same runs
           with the workers' malloc left at glibc's defaults (the proposed fix; Dask's nanny sets
           MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's mmap threshold at 128 KiB) and a proposed
           one-task-per-subject apply (each task reads its volume, harmonizes it 64^3 chunk by chunk in
           memory, writes whole chunks).
  ingest   harmonize.ingest.ingest (1 and 2 workers) vs a plain loop: nibabel.load(f).get_fdata(float32) ->
           zarr array with the store's chunks and codecs.  Default and glibc-default malloc.
  memory   cohorts of 20, 40, 80, 160, 320 subjects: ingest, apply and the ComBat fit, each in a fresh 2-worker
           cluster; peak RSS per worker (psutil sampled every 20 ms, and getrusage ru_maxrss), the coordinator's
           (scheduler + client) peak, wall time; a line time = a + b n is fitted per stage.
  train    InvariantHarmonizer.fit's training loop (library defaults: crop 16, 5 subjects per site, 1 group):
           per step, the time building the batch (the data loader) vs loss + backward + optimizer; and the same
           loop with the loss stubbed out (what the loader alone sustains).
  profile  pyinstrument of the plain apply and ingest loops, Dask's worker/scheduler profiles of the library
           runs, and a kernel micro-benchmark (whole volume vs 64^3 chunks, per malloc setting) ->
           pipeline.profile.txt.

Results: <out>/pipeline.json, <out>/pipeline.md, <out>/pipeline.profile.txt (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
MALLOC_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
SITES = ("NYU", "UM", "USM", "UCLA")
FULL = {"resolution": 2.0, "per_site": 5, "ingest_n": 80, "sizes": [20, 40, 80, 160, 320], "reps": 2,
        "train_steps": 60, "profile_subjects": 2, "kernel_subjects": 4, "variants": True}
QUICK = {"resolution": 3.0, "per_site": 2, "ingest_n": 16, "sizes": [8, 16, 32], "reps": 1,
         "train_steps": 15, "profile_subjects": 1, "kernel_subjects": 2, "variants": False}
TARGETS = {"apply_1w_vs_plain": 0.9, "apply_2w_vs_1w": 1.7, "ingest_1w_vs_plain": 0.8, "ingest_2w_vs_1w": 1.6,
           "peak_rss_growth": 1.2, "machine_2_processes_vs_1": 1.7}


# ====================================================================================================
# helpers usable in every process
# ====================================================================================================
def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _rusage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "sys": r.ru_stime, "maxrss_mib": r.ru_maxrss / 1024, "minflt": r.ru_minflt}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _delta(a: dict, b: dict) -> dict:
    return {"user_s": b["user"] - a["user"], "sys_s": b["sys"] - a["sys"], "minflt": b["minflt"] - a["minflt"]}


def _grid_voxels(store_path: str) -> int:
    import numpy as np

    from harmonize.io.store import CohortStore

    return int(np.prod(CohortStore(store_path).grid.shape))


def _set_malloc(mode: str) -> dict:
    """Environment the nanny gives worker processes: 'dask' = distributed's default (MALLOC_TRIM_THRESHOLD_=65536),
    'glibc' = glibc's defaults (dynamic mmap threshold).  The nanny copies its pre-spawn environ into *this*
    process's os.environ before spawning, and an OS variable wins over the config, so both are set here."""
    import dask

    for k in MALLOC_VARS:
        os.environ.pop(k, None)
    if mode == "glibc":
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    elif mode != "dask":
        raise ValueError(mode)
    return {"malloc": mode}


def _client(n_workers: int, memory_limit: str = "8GiB"):
    from harmonize.cluster import make_client

    return make_client({"type": "local", "n_workers": n_workers, "threads_per_worker": 1,
                        "memory_limit": memory_limit}, quiet=True)


# ---- worker-side functions (sent by value with cloudpickle) ----------------------------------------
def _w_start_sampler(dask_worker, interval: float = 0.02) -> float:
    import threading
    import time as _t

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "managed": 0, "in_memory": 0}

    def loop():
        while True:
            rss = proc.memory_info().rss
            if rss > state["peak"]:
                state["peak"] = rss
            try:  # Dask-managed results held by the worker, and how many tasks they are
                ws = dask_worker.state
                state["managed"] = max(state["managed"], ws.nbytes)
                state["in_memory"] = max(state["in_memory"],
                                         sum(1 for ts in list(ws.tasks.values()) if ts.state == "memory"))
            except Exception:  # noqa: BLE001, S110 - the task table changes while we read it
                pass
            _t.sleep(interval)

    threading.Thread(target=loop, daemon=True, name="bench-rss").start()
    dask_worker._bench_rss = state  # noqa: SLF001
    return state["peak"] / 2**20


def _w_reset_peak(dask_worker) -> float:
    import psutil

    dask_worker._bench_rss.update(managed=0, in_memory=0)  # noqa: SLF001
    dask_worker._bench_rss["peak"] = psutil.Process().memory_info().rss  # noqa: SLF001
    return dask_worker._bench_rss["peak"] / 2**20  # noqa: SLF001


def _w_read(dask_worker) -> dict:
    import resource as _r

    import psutil

    r = _r.getrusage(_r.RUSAGE_SELF)
    return {"user": r.ru_utime, "sys": r.ru_stime, "maxrss_mib": r.ru_maxrss / 1024, "minflt": r.ru_minflt,
            "sampled_peak_mib": dask_worker._bench_rss["peak"] / 2**20,  # noqa: SLF001
            "managed_peak_mib": dask_worker._bench_rss["managed"] / 2**20,  # noqa: SLF001
            "results_held_peak": dask_worker._bench_rss["in_memory"],  # noqa: SLF001
            "rss_mib": psutil.Process().memory_info().rss / 2**20}


def _w_env() -> dict:
    import os as _os
    import threading

    import torch

    return {"torch_threads": torch.get_num_threads(), "thread": threading.current_thread().name,
            **{k: _os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
                                              "MALLOC_MMAP_THRESHOLD_")}}


def _w_warm_apply(store_path: str, model_dir: str, checksum: str) -> float:
    """Warm-up of one worker: load the model (cached per process), harmonize one chunk of subject 0."""
    import time as _t

    from harmonize.apply import cached_model

    t = _t.perf_counter()
    _warm_model_chunk(cached_model(model_dir, checksum), store_path)
    return _t.perf_counter() - t


def _warm_model_chunk(model, store_path: str) -> None:
    import numpy as np

    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore, read_volume

    store = CohortStore(store_path)
    table = store.table()
    mask = store.mask()
    vol = read_volume(store.array_path(S.IMAGES), 0)
    ctx = model.subject_context(str(table[S.SITE].iat[0]), _covariates(table)[0], vol, mask)
    r = model.halo
    c = store.chunks
    padded = np.pad(vol, r)
    loc = tuple(slice(0, min(n, k)) for n, k in zip(c, vol.shape, strict=True))
    model.harmonize_block(padded[tuple(slice(s.start, s.stop + 2 * r) for s in loc)], ctx, loc)


def _covariates(table) -> list[dict]:
    from harmonize.io import schema as S
    from harmonize.models.voxel_combat import covariate_frame

    return covariate_frame(table, [S.AGE, S.SEX]).to_dict("records")


# ---- the Dask profiler's tree -> top frames ----------------------------------------------------------
def _profile_top(state: dict, n: int = 25) -> dict:
    """Self time and inclusive time per function from distributed's profile tree (fractions of samples)."""
    import collections

    own, incl = collections.Counter(), collections.Counter()

    def walk(node, stack):
        children = node.get("children", {})
        d = node.get("description") or {}
        name = f"{Path(d.get('filename', '?')).name}:{d.get('name', '?')}" if d else None
        if name:
            own[name] += node["count"] - sum(c["count"] for c in children.values())
            if name not in stack:
                incl[name] += node["count"]
        for c in children.values():
            walk(c, stack | ({name} if name else set()))

    walk(state, frozenset())
    total = max(state.get("count", 0), 1)
    return {"samples": state.get("count", 0),
            "self": [(k, round(v / total, 4)) for k, v in own.most_common(n)],
            "inclusive": [(k, round(v / total, 4)) for k, v in incl.most_common(n)]}


def _task_counts(task_stream: list) -> dict:
    import collections

    from dask.utils import key_split

    counts, seconds = collections.Counter(), collections.Counter()
    for event in task_stream:
        prefix = key_split(event["key"])
        for ss in event["startstops"]:
            if ss["action"] == "compute":
                counts[prefix] += 1
                seconds[prefix] += ss["stop"] - ss["start"]
    return {"tasks": int(sum(counts.values())), "by_prefix": {k: [counts[k], round(seconds[k], 3)]
                                                              for k in sorted(counts, key=lambda k: -seconds[k])}}


# ====================================================================================================
# jobs (each runs in its own subprocess: `--job NAME --args JSON`)
# ====================================================================================================
def job_prepare(a: dict) -> dict:
    """Simulate the base cohort, replicate it up to the largest size, ingest the base store, fit a tiny model."""
    import nibabel as nib
    import numpy as np
    import pandas as pd
    import torch

    from harmonize.ingest import ingest
    from harmonize.io.store import CohortStore
    from harmonize.models.invariant import InvariantHarmonizer
    from harmonize.simulate import CohortSpec, simulate_cohort

    torch.set_num_threads(1)
    work = Path(a["work"])
    out = {}
    t = time.perf_counter()
    info = simulate_cohort(work / "sim", CohortSpec(sites=SITES, subjects_per_site=a["per_site"],
                                                    resolution_mm=a["resolution"], seed=0))
    out["simulate_s"] = time.perf_counter() - t
    base_dir = Path(info["bids_dir"])
    base = pd.read_csv(base_dir / "participants.tsv", sep="\t")
    n_base, n_max = len(base), max(a["sizes"] + [a["ingest_n"], len(base)])
    t = time.perf_counter()
    everything = work / "subjects"  # one folder per subject label; cohort folders link to them
    rows = []
    for k in range(n_max):
        src = base.iloc[k % n_base]
        copy = k // n_base
        label = f"{k + 1:04d}"
        src_file = base_dir / src.participant_id / "anat" / f"{src.participant_id}_T1w.nii.gz"
        dst = everything / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if copy == 0:
            shutil.copyfile(src_file, dst)
        else:
            img = nib.load(str(src_file))
            data = np.round(np.asarray(img.dataobj, dtype=np.float32) * (1 + 0.004 * copy)).astype(np.int16)
            new = nib.Nifti1Image(data, img.affine, img.header)
            nib.save(new, str(dst))
        rows.append({"participant_id": f"sub-{label}", "site": src.site, "age": round(src.age + 0.1 * copy, 1),
                     "sex": src.sex})
    table = pd.DataFrame(rows)
    out["replicate_s"] = time.perf_counter() - t
    for n in sorted(set(a["sizes"] + [a["ingest_n"], n_base])):
        folder = work / f"bids{n}"
        folder.mkdir()
        for label in table.participant_id[:n]:
            (folder / label).symlink_to(everything / label, target_is_directory=True)
        table[:n].to_csv(folder / "participants.tsv", sep="\t", index=False)
        (folder / "dataset_description.json").write_text('{"Name": "bench", "BIDSVersion": "1.9.0"}\n')
    t = time.perf_counter()
    store = work / "base.zarr"
    result = ingest(work / f"bids{n_base}", store, None, progress=False)
    assert not result.rejected, result.rejected
    out["base_ingest_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ds = CohortStore(store).dataset().load()
    model = InvariantHarmonizer(steps=30, eval_every=10, crop=12, seed=3, torch_threads=1)
    model.fit(ds)
    model.save(work / "model")
    out["model_fit_s"] = time.perf_counter() - t
    st = CohortStore(store)
    import zarr

    images = zarr.open_array(st.array_path("images"), mode="r")
    nbytes_stored = sum(f.stat().st_size for f in Path(st.array_path("images")).rglob("*") if f.is_file())
    nii = sum(f.stat().st_size for f in everything.rglob("*.nii.gz")) / n_max * n_base
    mask = st.mask()
    out.update({"grid": list(st.grid.shape), "voxels_per_subject": int(np.prod(st.grid.shape)),
                "mask_voxels": int(mask.sum()), "store_chunks": list(st.chunks), "n_base": n_base,
                "codecs": str(images.compressors), "images_bytes_stored_per_subject": nbytes_stored / n_base,
                "nifti_gz_bytes_per_subject": nii / n_base, "max_subjects": n_max})
    return out


def job_apply_plain(a: dict) -> dict:
    import numpy as np
    import torch
    import zarr

    from harmonize.apply import harmonize_chunked
    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore
    from harmonize.models import load_model

    torch.set_num_threads(1)
    store = CohortStore(a["store"])
    table = store.table()
    mask = store.mask()
    model = load_model(a["model"])
    _warm_model_chunk(model, a["store"])  # warm-up, excluded (the Dask side does the same per worker)
    images = zarr.open_array(store.array_path(S.IMAGES), mode="r")
    n = len(table)
    covs = _covariates(table)
    out = np.empty((n, *store.grid.shape), np.float32)
    profiler = None
    if a.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.002)
        n = a["profile"]
        profiler.start()
    r0, l0 = _rusage(), _load()
    parts = {"read_s": 0.0, "context_s": 0.0, "harmonize_s": 0.0, "write_s": 0.0}
    t = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        vol = images[i]
        t1 = time.perf_counter()
        ctx = model.subject_context(str(table[S.SITE].iat[i]), covs[i], vol, mask)
        t2 = time.perf_counter()
        if a.get("chunked"):  # the same loop, 64^3 chunks + halo in memory (what the proposed apply task does)
            harmonized = harmonize_chunked(model, vol, ctx, mask, tuple(store.chunks), None)
        else:
            harmonized = model._whole_volume(vol, ctx, mask)  # noqa: SLF001 - = harmonize_volume given the context
        t3 = time.perf_counter()
        out[i] = harmonized
        t4 = time.perf_counter()
        parts["read_s"] += t1 - t0
        parts["context_s"] += t2 - t1
        parts["harmonize_s"] += t3 - t2
        parts["write_s"] += t4 - t3
    wall = time.perf_counter() - t
    r1, l1 = _rusage(), _load()
    result = {"wall_s": wall, "subjects": n, "voxels": n * int(np.prod(store.grid.shape)),
              "cpu": _delta(r0, r1), "parts": parts, "load_before": l0, "load_after": l1,
              "maxrss_mib": r1["maxrss_mib"], "torch_threads": torch.get_num_threads()}
    result["voxels_per_s"] = result["voxels"] / wall
    if profiler is not None:
        profiler.stop()
        Path(a["profile_out"]).write_text(profiler.output_text(unicode=False, color=False))
    elif a.get("save"):
        np.save(a["save"], out)
    return result


def _worker_setup(client) -> dict:
    info = {"env_in_task": client.gather([client.submit(_w_env, pure=False, workers=[w])
                                          for w in client.scheduler_info(n_workers=-1)["workers"]])}
    client.run(_w_start_sampler)
    return info


def _worker_reads(client) -> dict:
    return client.run(_w_read)


def _sum_worker_cpu(before: dict, after: dict) -> dict:
    keys = sorted(after)
    return {"per_worker": {k: _delta(before[k], after[k]) for k in keys},
            "user_s": sum(after[k]["user"] - before[k]["user"] for k in keys),
            "sys_s": sum(after[k]["sys"] - before[k]["sys"] for k in keys),
            "minflt": sum(after[k]["minflt"] - before[k]["minflt"] for k in keys)}


def job_apply_dask(a: dict) -> dict:
    import numpy as np
    import zarr
    from distributed import get_task_stream

    import harmonize.apply as A
    from harmonize.io.store import CohortStore
    from harmonize.models import model_checksum

    env = _set_malloc(a["malloc"])
    client = _client(a["workers"])
    try:
        info = _worker_setup(client)
        checksum = model_checksum(a["model"])
        info["warm_s"] = client.gather([client.submit(_w_warm_apply, a["store"], str(Path(a["model"]).resolve()),
                                                      checksum, pure=False, workers=[w])
                                        for w in client.scheduler_info(n_workers=-1)["workers"]])
        store = CohortStore(a["store"])
        output = a["output"]
        client.run(_w_reset_peak)
        w0, c0, l0 = _worker_reads(client), _rusage(), _load()
        t_start = time.time()
        with get_task_stream(client) as ts:
            t = time.perf_counter()
            if a["mode"] == "library":
                res = A.apply_model(a["store"], a["model"], client, progress=False, overwrite=True, output=output)
                n = len(res.harmonized)
            else:  # proposed: one task per subject
                n = _apply_subject_tasks(client, a["store"], a["model"], output)
            wall = time.perf_counter() - t
        w1, c1, l1 = _worker_reads(client), _rusage(), _load()
        prof = client.profile(start=t_start)
        sched_prof = client.profile(start=t_start, scheduler=True)
        result = {"wall_s": wall, "subjects": n, "voxels": n * _grid_voxels(a["store"]), **env, **info,
                  "workers": a["workers"], "mode": a["mode"], "load_before": l0, "load_after": l1,
                  "worker_cpu": _sum_worker_cpu(w0, w1), "coordinator_cpu": _delta(c0, c1),
                  "worker_peak_rss_mib": {k: v["sampled_peak_mib"] for k, v in w1.items()},
                  "tasks": _task_counts(ts.data), "worker_profile": _profile_top(prof),
                  "scheduler_profile": _profile_top(sched_prof, 12)}
        result["voxels_per_s"] = result["voxels"] / wall
        if a.get("reference") and Path(a["reference"]).exists():
            ref = np.load(a["reference"], mmap_mode="r")
            got = zarr.open_array(store.array_path(output), mode="r")[:n]
            result["max_abs_diff_vs_plain"] = float(np.nanmax(np.abs(got - ref[:n])))
            result["max_abs_plain"] = float(np.abs(ref[:n]).max())
        return result
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def _apply_subject_tasks(client, store_path: str, model_dir: str, output: str) -> int:
    """The prototype of today's apply (one task per subject, at most 4 x worker threads in flight), kept so
    that the earlier run's "subject" rows can be reproduced; it calls the library's task."""
    from distributed import as_completed

    from harmonize.apply import harmonize_subject
    from harmonize.cluster import total_threads
    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore
    from harmonize.models import model_checksum

    store = CohortStore(store_path)
    store.ensure_volume_array(output)
    table = store.table()
    todo = [i for i in range(len(table)) if table[S.INGEST_STATUS].iat[i] == S.DONE]
    covs = _covariates(table)
    mask_f = client.scatter(store.mask(), broadcast=True, hash=False)
    model_dir = str(Path(model_dir).resolve())
    checksum = model_checksum(model_dir)

    def submit(i):
        return client.submit(harmonize_subject, store.array_path(S.IMAGES), store.array_path(output), i, model_dir,
                             checksum, mask_f, str(table[S.SITE].iat[i]), covs[i], None, tuple(store.chunks), None,
                             pure=False)

    window = 4 * total_threads(client)
    pending = iter(todo)
    running = as_completed([submit(i) for _, i in zip(range(window), pending, strict=False)])
    for future in running:
        future.result()
        nxt = next(pending, None)
        if nxt is not None:
            running.add(submit(nxt))
    store.set_field(S.status_of(output), todo, [S.DONE] * len(todo))
    return len(todo)


def job_ingest_plain(a: dict) -> dict:
    import nibabel as nib
    import numpy as np
    import pandas as pd
    import zarr

    bids = Path(a["bids"])
    labels = pd.read_csv(bids / "participants.tsv", sep="\t").participant_id.tolist()
    files = [bids / s / "anat" / f"{s}_T1w.nii.gz" for s in labels]
    shape = tuple(int(s) for s in nib.load(str(files[0])).shape[:3])
    chunks = tuple(min(c, s) for c, s in zip(a["chunks"], shape, strict=True))
    warm = zarr.create_array(store=a["out"] + ".warm", shape=(1, *shape), chunks=(1, *chunks), dtype="float32",
                             fill_value=np.nan, zarr_format=3)
    warm[0] = nib.load(str(files[0])).get_fdata(dtype=np.float32)  # warm-up, excluded
    profiler = None
    if a.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001)
        profiler.start()
    r0, l0 = _rusage(), _load()
    t = time.perf_counter()
    arr = zarr.create_array(store=a["out"], shape=(len(files), *shape), chunks=(1, *chunks), dtype="float32",
                            fill_value=np.nan, zarr_format=3)
    parts = {"nibabel_read_s": 0.0, "zarr_write_s": 0.0}
    for i, f in enumerate(files):
        t0 = time.perf_counter()
        vol = nib.load(str(f)).get_fdata(dtype=np.float32)
        t1 = time.perf_counter()
        arr[i] = vol
        parts["nibabel_read_s"] += t1 - t0
        parts["zarr_write_s"] += time.perf_counter() - t1
    wall = time.perf_counter() - t
    r1, l1 = _rusage(), _load()
    if profiler is not None:
        profiler.stop()
        Path(a["profile_out"]).write_text(profiler.output_text(unicode=False, color=False))
    n = len(files)
    return {"wall_s": wall, "subjects": n, "voxels": n * int(np.prod(shape)),
            "voxels_per_s": n * int(np.prod(shape)) / wall, "cpu": _delta(r0, r1), "load_before": l0,
            "load_after": l1, "codecs": str(arr.compressors), "chunks": list(arr.chunks), "parts": parts}


def job_ingest_dask(a: dict) -> dict:
    from distributed import get_task_stream

    import harmonize.ingest as ing

    env = _set_malloc(a["malloc"])
    client = _client(a["workers"])
    try:
        info = _worker_setup(client)
        # warm-up, excluded: a 2-subject ingest into a scratch store (imports nibabel/zarr on every worker)
        ing.ingest(a["warm_bids"], a["out"] + ".warm", client, chunks=tuple(a["chunks"]), progress=False)
        timing = {"mask_s": 0.0}
        original = ing._write_mask  # noqa: SLF001

        def timed_mask(store, threshold):
            t0 = time.perf_counter()
            original(store, threshold)
            timing["mask_s"] += time.perf_counter() - t0

        ing._write_mask = timed_mask  # noqa: SLF001 - timing only, same behaviour
        if a.get("fold_mask"):
            _fold_mask(ing, timing)
        client.run(_w_reset_peak)
        w0, c0, l0 = _worker_reads(client), _rusage(), _load()
        t_start = time.time()
        with get_task_stream(client) as ts:
            t = time.perf_counter()
            res = ing.ingest(a["bids"], a["out"], client, chunks=tuple(a["chunks"]), progress=False)
            wall = time.perf_counter() - t
        w1, c1, l1 = _worker_reads(client), _rusage(), _load()
        assert not res.rejected, res.rejected
        n = len(res.ingested)
        prof = client.profile(start=t_start)
        vox = _grid_voxels(a["out"])
        same_mask = None
        if a.get("compare_mask") and Path(a["compare_mask"]).exists():
            import numpy as np
            import zarr

            mine = zarr.open_array(str(Path(a["out"]) / "mask"), mode="r")[...]
            theirs = zarr.open_array(str(Path(a["compare_mask"]) / "mask"), mode="r")[...]
            same_mask = bool(np.array_equal(mine, theirs))
        return {"wall_s": wall, "subjects": n, "voxels": n * vox, "voxels_per_s": n * vox / wall, **env, **info,
                "fold_mask": bool(a.get("fold_mask")), "mask_equal_to_library": same_mask,
                "workers": a["workers"], "mask_pass_s": timing["mask_s"], "load_before": l0, "load_after": l1,
                "worker_cpu": _sum_worker_cpu(w0, w1), "coordinator_cpu": _delta(c0, c1),
                "worker_peak_rss_mib": {k: v["sampled_peak_mib"] for k, v in w1.items()},
                "tasks": _task_counts(ts.data), "worker_profile": _profile_top(prof)}
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def _w_ingest_one_counting(path: str, grid_attrs: dict, array_path: str, position: int,
                           shown: str | None = None) -> dict:
    """harmonize.ingest._ingest_one (the same steps, copied) that also returns the subject's non-zero voxels,
    bit-packed (1/32 of the float32 volume): the coordinator counts them instead of re-reading the cohort."""
    import numpy as np

    from harmonize.io.nifti import InputRejected, read_volume, sha256_file
    from harmonize.io.store import Grid, write_volume

    shown = shown or path
    try:
        volume, _ = read_volume(path, Grid.from_attrs(grid_attrs), shown=shown)
        write_volume(array_path, position, volume)
        return {"ok": True, "sha256": sha256_file(path), "nonzero": np.packbits(volume > 0)}
    except InputRejected as exc:
        return {"ok": False, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "reason": f"{shown}: unexpected {type(exc).__name__}: {exc}"}


def _fold_mask(ing, timing: dict) -> None:
    """Patch harmonize.ingest (in this process) to the proposed fix: counts gathered with the ingest results."""
    import numpy as np

    from harmonize.io import schema as S

    counts: dict = {"sum": None, "n": 0}
    record = ing._record  # noqa: SLF001

    def counting_record(store, todo, batch, result):
        for _, outcome in batch:
            bits = outcome.pop("nonzero", None)
            if bits is not None:
                ones = np.unpackbits(bits).astype(np.uint32)
                counts["sum"] = ones if counts["sum"] is None else counts["sum"] + ones
                counts["n"] += 1
        record(store, todo, batch, result)

    def folded_mask(store, threshold):
        t0 = time.perf_counter()
        n_vox = int(np.prod(store.grid.shape))
        fraction = counts["sum"][:n_vox].reshape(store.grid.shape) / max(counts["n"], 1)
        store.group[S.MASK][...] = (fraction >= threshold).astype(np.uint8)
        store.group.attrs[S.MASK_FROM] = {"threshold": threshold, "n_subjects": counts["n"]}
        timing["mask_s"] += time.perf_counter() - t0

    ing._ingest_one = _w_ingest_one_counting  # noqa: SLF001
    ing._record = counting_record  # noqa: SLF001
    ing._write_mask = folded_mask  # noqa: SLF001


def job_scale(a: dict) -> dict:
    """One stage at one cohort size in a fresh 2-worker cluster: time and peak memory."""
    from harmonize.apply import apply_model
    from harmonize.ingest import ingest
    from harmonize.pipeline import fit

    env = _set_malloc(a.get("malloc", "dask"))
    rss_start = _rss_mib()
    client = _client(a["workers"])
    try:
        info = _worker_setup(client)
        client.run(_w_reset_peak)
        w0, c0, l0 = _worker_reads(client), _rusage(), _load()
        t = time.perf_counter()
        if a["stage"] == "ingest":
            res = ingest(a["bids"], a["store"], client, progress=False)
            n = len(res.ingested)
        elif a["stage"] == "apply":
            res = apply_model(a["store"], a["model"], client, progress=False)
            n = len(res.harmonized)
        elif a["stage"] == "apply_subject_tasks":
            n = _apply_subject_tasks(client, a["store"], a["model"], "harmonized_proposed")
        else:
            params = dict(a.get("params") or {})
            if params.get("block"):
                params["block"] = tuple(params["block"])
            fit(a["store"], client, "combat", params, progress=False)
            n = a["n"]
        wall = time.perf_counter() - t
        w1, c1, l1 = _worker_reads(client), _rusage(), _load()
        return {"stage": a["stage"], "n": a["n"], "subjects_done": n, "wall_s": wall, **env,
                "params": a.get("params"), "torch_threads_in_task": [e["torch_threads"] for e in info["env_in_task"]],
                "worker_peak_rss_mib": {k: v["sampled_peak_mib"] for k, v in w1.items()},
                "worker_maxrss_mib": {k: v["maxrss_mib"] for k, v in w1.items()},
                "worker_managed_peak_mib": {k: v["managed_peak_mib"] for k, v in w1.items()},
                "worker_results_held_peak": {k: v["results_held_peak"] for k, v in w1.items()},
                "worker_rss_before_mib": {k: v["rss_mib"] for k, v in w0.items()},
                "coordinator_maxrss_mib": c1["maxrss_mib"], "coordinator_rss_start_mib": rss_start,
                "worker_cpu": _sum_worker_cpu(w0, w1), "coordinator_cpu": _delta(c0, c1),
                "load_before": l0, "load_after": l1}
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def job_train(a: dict) -> dict:
    """The library's training loop, instrumented: batch building (loader) vs loss/backward/optimizer."""
    import numpy as np
    import torch

    from harmonize.io.store import CohortStore
    from harmonize.models.invariant import InvariantHarmonizer

    torch.set_num_threads(a["threads"])
    ds = CohortStore(a["store"]).dataset().load()
    model = InvariantHarmonizer(steps=a["steps"], eval_every=10**6, calibrate="none", seed=0,
                                torch_threads=a["threads"])
    marks: list[tuple] = []
    original = model._loss  # noqa: SLF001

    def timed_loss(*args, **kwargs):
        t0 = time.perf_counter()
        out = stub(*args) if a["stub"] else original(*args, **kwargs)
        marks.append(("loss", t0, time.perf_counter()))
        return out

    def stub(module, x, *rest):
        zero = sum(p.sum() for p in module.parameters()) * 0 + x.float().mean() * 0
        return {k: zero for k in ("loss", "recon", "kl", "penalty", "site")}

    model._loss = timed_loss  # noqa: SLF001 - instance attribute: timing only
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(lambda *_: marks.append(("opt", time.perf_counter())))
    t = time.perf_counter()
    r0, l0 = _rusage(), _load()
    model.fit(ds)
    wall = time.perf_counter() - t
    r1, l1 = _rusage(), _load()
    hook.remove()
    steps = []
    last_opt = None
    pending = None
    for m in marks:
        if m[0] == "loss":
            pending = m
        elif pending is not None:
            if last_opt is not None:
                steps.append({"loader": pending[1] - last_opt, "loss": pending[2] - pending[1],
                              "backward_opt": m[1] - pending[2], "step": m[1] - last_opt})
            last_opt, pending = m[1], None
    steps = steps[:-1]  # the last step also runs the validation pass
    med = {k: float(np.median([s[k] for s in steps])) for k in ("loader", "loss", "backward_opt", "step")}
    tot = {k: float(np.sum([s[k] for s in steps])) for k in ("loader", "loss", "backward_opt", "step")}
    n_sites = len(model.sites_)
    batch = model.groups * n_sites * model.subjects_per_site
    try:
        torch.empty(1).pin_memory()
        pinned = "available"
    except Exception as exc:  # noqa: BLE001
        pinned = f"not available here: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return {"stub_loss": a["stub"], "threads": a["threads"], "steps_timed": len(steps), "crops_per_step": batch,
            "crop": model.crop, "median_s": med, "total_s": tot, "fit_wall_s": wall,
            "samples_per_s": batch * len(steps) / tot["step"], "loader_fraction": tot["loader"] / tot["step"],
            "loader_samples_per_s": batch * len(steps) / tot["loader"], "cpu": _delta(r0, r1),
            "load_before": l0, "load_after": l1, "pin_memory": pinned}


def job_kernel(a: dict) -> dict:
    """Compute only: harmonize_block over whole volumes vs 64^3 chunks (+ halo), per malloc environment."""
    import itertools

    import numpy as np
    import torch
    import zarr

    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore
    from harmonize.models import load_model

    torch.set_num_threads(1)
    store = CohortStore(a["store"])
    mask, table, model = store.mask(), store.table(), load_model(a["model"])
    images = zarr.open_array(store.array_path(S.IMAGES), mode="r")
    covs = _covariates(table)
    k = a["subjects"]
    vols = [images[i] for i in range(k)]
    ctxs = [model.subject_context(str(table[S.SITE].iat[i]), covs[i], vols[i], mask) for i in range(k)]
    r, cs = int(model.halo), tuple(store.chunks)

    def whole():
        for v, c in zip(vols, ctxs, strict=True):
            model._whole_volume(v, c, mask)  # noqa: SLF001

    def chunked():
        for v, c in zip(vols, ctxs, strict=True):
            p = np.pad(v, r)
            for corner in itertools.product(*[range(0, n, s) for n, s in zip(v.shape, cs, strict=True)]):
                loc = tuple(slice(x, min(x + s, n)) for x, s, n in zip(corner, cs, v.shape, strict=True))
                model.harmonize_block(p[tuple(slice(s.start, s.stop + 2 * r) for s in loc)], c, loc)

    whole()
    chunked()
    out = {"env": {k: os.environ.get(k) for k in MALLOC_VARS if os.environ.get(k)}, "subjects": k}
    for name, fn in (("whole", whole), ("chunk64", chunked)):
        r0, t = _rusage(), time.perf_counter()
        fn()
        wall, d = time.perf_counter() - t, _delta(r0, _rusage())
        out[name] = {"wall_s_per_subject": wall / k, "user_s_per_subject": d["user_s"] / k,
                     "sys_s_per_subject": d["sys_s"] / k, "minflt_per_subject": d["minflt"] / k}
    out["load"] = _load()
    return out


JOBS = {"prepare": job_prepare, "apply_plain": job_apply_plain, "apply_dask": job_apply_dask,
        "ingest_plain": job_ingest_plain, "ingest_dask": job_ingest_dask, "scale": job_scale,
        "train": job_train, "kernel": job_kernel}


# ====================================================================================================
# the driver
# ====================================================================================================
def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
    env.update(dict.fromkeys(THREAD_VARS, "1"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra or {})
    return env


def run_job(name: str, args: dict, tmp: Path, label: str, env: dict | None = None, timeout: float = 3600) -> dict:
    out = tmp / f"job-{label}.json"
    cmd = [sys.executable, __file__, "--job", name, "--args", json.dumps(args), "--job-out", str(out)]
    print(f"bench_pipeline: {label:<34}", end="", flush=True, file=sys.stderr)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        print(" FAILED\n" + "\n".join(tail), file=sys.stderr)
        return {"error": tail, "label": label}
    res = json.loads(out.read_text())
    res["job_s"] = time.perf_counter() - t
    shown = f" {res['wall_s']:.1f} s" if "wall_s" in res else ""
    shown += f", {res['voxels_per_s'] / 1e6:.2f} Mvox/s" if "voxels_per_s" in res else ""
    print(f"{shown} (job {res['job_s']:.0f} s, load {_load()[:1]})", file=sys.stderr)
    res["label"] = label
    return res


def run_jobs_together(name: str, args: dict, copies: int, tmp: Path, label: str, timeout: float = 3600) -> dict:
    """`copies` identical jobs started at once, one process each: the machine's own parallel ceiling for
    that work (no Dask involved). Throughput = all their voxels / the slowest one's wall time."""
    print(f"bench_pipeline: {label:<34}", end="", flush=True, file=sys.stderr)
    outs = [tmp / f"job-{label}-{k}.json" for k in range(copies)]
    procs = [subprocess.Popen([sys.executable, __file__, "--job", name, "--args", json.dumps(args), "--job-out",
                               str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            print(" FAILED\n" + err[-2000:], file=sys.stderr)
            return {"error": err.splitlines()[-15:], "label": label}
    parts = [json.loads(out.read_text()) for out in outs]
    wall = max(r["wall_s"] for r in parts)
    res = {"label": label, "copies": copies, "wall_s": wall, "voxels": sum(r["voxels"] for r in parts),
           "cpu": {k: sum(r["cpu"].get(k, 0) for r in parts) for k in ("user_s", "sys_s") if k in parts[0]["cpu"]},
           "load_before": parts[0]["load_before"], "load_after": parts[-1]["load_after"], "parts": parts}
    res["voxels_per_s"] = res["voxels"] / wall
    print(f" {wall:.1f} s, {res['voxels_per_s'] / 1e6:.2f} Mvox/s ({copies} processes, load {_load()[:1]})",
          file=sys.stderr)
    return res


def _best(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "voxels_per_s" in r]
    return max(ok, key=lambda r: r["voxels_per_s"]) if ok else None


def _ratio(num: list[dict], den: list[dict]) -> dict:
    a, b = _best(num), _best(den)
    if a is None or b is None:
        return {"best": None, "per_rep": []}
    per = [x["voxels_per_s"] / y["voxels_per_s"] for x, y in zip(num, den, strict=False)
           if "voxels_per_s" in x and "voxels_per_s" in y]
    return {"best": a["voxels_per_s"] / b["voxels_per_s"], "per_rep": per}


def _add_fits(results: dict) -> None:
    """Per stage, a line through worker CPU-seconds vs n too: the work itself, which other jobs on a shared
    machine move far less than wall time."""
    mem = results.get("memory")
    if not mem:
        return
    mem["cpu_fits"] = {}
    for stage in {r.get("stage") for r in mem["rows"] if "worker_cpu" in r}:
        ok = [r for r in mem["rows"] if r.get("stage") == stage and "worker_cpu" in r]
        if len(ok) >= 3:
            mem["cpu_fits"][stage] = _linear([r["n"] for r in ok],
                                             [r["worker_cpu"]["user_s"] + r["worker_cpu"]["sys_s"] for r in ok])


def _no_mask(runs: list[dict]) -> list[dict]:
    """Ingest runs as if the mask pass were folded into the ingest tasks (upper bound: its time left out)."""
    out = []
    for r in runs:
        if "voxels_per_s" in r:
            r = {**r, "wall_s": r["wall_s"] - r["mask_pass_s"]}
            r["voxels_per_s"] = r["voxels"] / r["wall_s"]
        out.append(r)
    return out


def _cpu_ratio(num: list[dict], den: list[dict]) -> float | None:
    """Throughput per CPU-second of the processes that compute (workers, or the plain loop): load-independent."""
    def per_cpu(r):
        c = r.get("worker_cpu") or r.get("cpu")
        return r["voxels"] / (c["user_s"] + c["sys_s"])
    a, b = _best(num), _best(den)
    return None if a is None or b is None else per_cpu(a) / per_cpu(b)


def _linear(xs, ys) -> dict:
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2:
        return {}
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    return {"intercept_s": float(a), "slope_s_per_subject": float(b),
            "r2": float(1 - ((y - pred) ** 2).sum() / ss) if ss else 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 mm, small cohorts, one repeat (~4 min)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--parts", nargs="+", default=["apply", "ingest", "memory", "train", "profile"],
                        choices=["apply", "ingest", "memory", "train", "profile"])
    parser.add_argument("--no-combat", action="store_true", help="skip the ComBat fit in the memory part")
    parser.add_argument("--memory-stages", nargs="+", choices=["ingest", "apply", "combat"],
                        default=["ingest", "apply", "combat"],
                        help="stages of the memory part (ingest always runs: the others read its store)")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the proposed fixes (default: on, off with --quick)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown/profile reports from <out>/pipeline.json (no measurement)")
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    parser.add_argument("--job-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        import warnings

        warnings.filterwarnings("ignore")
        result = JOBS[args.job](json.loads(args.args))
        Path(args.job_out).write_text(json.dumps(result, default=str))
        return 0

    if args.render_only:
        suffix = ".quick" if args.quick else ""
        results = json.loads((Path(args.out) / f"pipeline{suffix}.json").read_text())
        _add_fits(results)
        (Path(args.out) / f"pipeline{suffix}.json").write_text(json.dumps(results, indent=1, default=str))
        (Path(args.out) / f"pipeline{suffix}.md").write_text(render_markdown(results))
        if args.work:  # the pyinstrument texts live in the work folder of the run
            (Path(args.out) / f"pipeline{suffix}.profile.txt").write_text(render_profile(results, Path(args.work)))
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    if args.variants is not None:
        cfg["variants"] = args.variants
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    jobs_dir = work / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": _load(), "quick": args.quick,
            "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "config": cfg, "command": "benchmarks/bench_pipeline.py"
            + (" --quick" if args.quick else "")}
    try:
        import dask
        import distributed
        import numcodecs
        import torch
        import zarr

        meta["versions"] = {"torch": torch.__version__, "dask": dask.__version__,
                            "distributed": distributed.__version__, "zarr": zarr.__version__,
                            "numcodecs": numcodecs.__version__}
    except ImportError:
        pass
    results: dict = {"meta": meta}
    prep_file = work / "prepare.json"
    if prep_file.exists():
        prep = json.loads(prep_file.read_text())
    else:
        prep = run_job("prepare", {"work": str(work), **cfg}, jobs_dir, "prepare (simulate, replicate, fit)")
        if "error" in prep:
            print("\n".join(prep["error"]), file=sys.stderr)
            return 1
        prep_file.write_text(json.dumps(prep))
    results["prepare"] = prep
    store, model, n_base = str(work / "base.zarr"), str(work / "model"), prep["n_base"]
    chunks = prep["store_chunks"]
    reps = cfg["reps"]

    # ---- apply -------------------------------------------------------------------------------------
    if "apply" in args.parts:
        ref = str(work / "plain_apply.npy")
        runs: dict[str, list] = {k: [] for k in ("plain", "plain_chunked", "lib1", "lib2", "lib1_glibc",
                                                 "lib2_glibc", "subj1_glibc", "subj2_glibc", "plain_chunked_x2")}
        for rep in range(reps):
            runs["plain"].append(run_job("apply_plain", {"store": store, "model": model,
                                                         "save": ref if rep == 0 else None}, jobs_dir,
                                         f"apply plain loop r{rep}"))
            for w in (1, 2):
                runs[f"lib{w}"].append(run_job("apply_dask", {
                    "store": store, "model": model, "workers": w, "malloc": "dask", "mode": "library",
                    "output": f"harmonized_lib{w}", "reference": ref}, jobs_dir, f"apply library {w}w r{rep}"))
            if rep == 0:  # the machine's ceiling for two processes of the same arithmetic as the apply tasks
                runs["plain_chunked"].append(run_job("apply_plain", {"store": store, "model": model, "chunked": True},
                                                     jobs_dir, "apply plain loop, 64^3 chunks"))
                runs["plain_chunked_x2"].append(run_jobs_together(
                    "apply_plain", {"store": store, "model": model, "chunked": True}, 2, jobs_dir,
                    "apply 2 plain loops at once, 64^3 chunks"))
            if rep == 0 and cfg["variants"]:
                for w in (1, 2):
                    runs[f"lib{w}_glibc"].append(run_job("apply_dask", {
                        "store": store, "model": model, "workers": w, "malloc": "glibc", "mode": "library",
                        "output": f"harmonized_glibc{w}", "reference": ref}, jobs_dir,
                        f"apply library {w}w glibc-malloc"))
                for w in (1, 2):
                    runs[f"subj{w}_glibc"].append(run_job("apply_dask", {
                        "store": store, "model": model, "workers": w, "malloc": "glibc", "mode": "subject",
                        "output": f"harmonized_subj{w}", "reference": ref}, jobs_dir,
                        f"apply subject-task {w}w glibc-malloc"))
        results["apply"] = {"runs": runs, "ratios": {
            "apply_1w_vs_plain": _ratio(runs["lib1"], runs["plain"]),
            "apply_2w_vs_1w": _ratio(runs["lib2"], runs["lib1"]),
            "apply_1w_vs_plain_glibc_malloc": _ratio(runs["lib1_glibc"], runs["plain"]),
            "apply_2w_vs_1w_glibc_malloc": _ratio(runs["lib2_glibc"], runs["lib1_glibc"]),
            "apply_1w_vs_plain_subject_tasks": _ratio(runs["subj1_glibc"], runs["plain"]),
            "apply_2w_vs_1w_subject_tasks": _ratio(runs["subj2_glibc"], runs["subj1_glibc"]),
            "apply_1w_vs_chunked_plain_subject_tasks": _ratio(runs["subj1_glibc"], runs["plain_chunked"]),
            "apply_1w_vs_chunked_plain": _ratio(runs["lib1"], runs["plain_chunked"]),
            "machine_2_processes_vs_1": _ratio(runs["plain_chunked_x2"], runs["plain_chunked"]),
        }, "cpu_ratios": {
            "apply_1w_vs_plain": _cpu_ratio(runs["lib1"], runs["plain"]),
            "apply_1w_vs_plain_glibc_malloc": _cpu_ratio(runs["lib1_glibc"], runs["plain"]),
            "apply_1w_vs_plain_subject_tasks": _cpu_ratio(runs["subj1_glibc"], runs["plain"])}}
        Path(ref).unlink(missing_ok=True)

    # ---- ingest ------------------------------------------------------------------------------------
    if "ingest" in args.parts:
        n = cfg["ingest_n"]
        bids, warm = str(work / f"bids{n}"), str(work / f"bids{n_base}")
        # the warm-up ingest takes 2 subjects: a folder of its own
        warm2 = work / "bids_warm"
        if not warm2.exists():
            import pandas as pd

            warm2.mkdir()
            table = pd.read_csv(Path(warm) / "participants.tsv", sep="\t")[:2]
            for label in table.participant_id:
                (warm2 / label).symlink_to((Path(warm) / label).resolve(), target_is_directory=True)
            table.to_csv(warm2 / "participants.tsv", sep="\t", index=False)
        runs = {k: [] for k in ("plain", "lib1", "lib2", "lib1_glibc", "lib2_glibc", "fold1_glibc", "fold2_glibc")}
        k = 0
        for rep in range(reps):
            runs["plain"].append(run_job("ingest_plain", {"bids": bids, "chunks": chunks,
                                                          "out": str(work / f"plain_ingest{k}.zarr")},
                                         jobs_dir, f"ingest plain loop r{rep}"))
            k += 1
            variants = [(1, "dask", False), (2, "dask", False)]
            if rep == 0 and cfg["variants"]:
                variants += [(1, "glibc", False), (2, "glibc", False), (1, "glibc", True), (2, "glibc", True)]
            for w, malloc, fold in variants:
                key = ("fold" if fold else "lib") + f"{w}" + ("_glibc" if malloc == "glibc" else "")
                label = (f"ingest folded mask {w}w {malloc}-malloc" if fold
                         else f"ingest library {w}w {malloc}-malloc r{rep}")
                runs[key].append(run_job("ingest_dask", {
                    "bids": bids, "warm_bids": str(warm2), "chunks": chunks, "workers": w, "malloc": malloc,
                    "out": str(work / f"ingest{k}.zarr"), "fold_mask": fold,
                    "compare_mask": str(work / "ingest1.zarr") if fold else None}, jobs_dir, label))
                k += 1
        for p in work.glob("*ingest*.zarr*"):
            shutil.rmtree(p, ignore_errors=True)
        results["ingest"] = {"subjects": n, "runs": runs, "ratios": {
            "ingest_1w_vs_plain": _ratio(runs["lib1"], runs["plain"]),
            "ingest_2w_vs_1w": _ratio(runs["lib2"], runs["lib1"]),
            "ingest_1w_vs_plain_glibc_malloc": _ratio(runs["lib1_glibc"], runs["plain"]),
            "ingest_2w_vs_1w_glibc_malloc": _ratio(runs["lib2_glibc"], runs["lib1_glibc"]),
            "ingest_1w_vs_plain_without_mask_pass": _ratio(_no_mask(runs["lib1"]), runs["plain"]),
            "ingest_2w_vs_1w_without_mask_pass": _ratio(_no_mask(runs["lib2"]), _no_mask(runs["lib1"])),
            "ingest_1w_vs_plain_folded_mask": _ratio(runs["fold1_glibc"], runs["plain"]),
            "ingest_2w_vs_1w_folded_mask": _ratio(runs["fold2_glibc"], runs["fold1_glibc"])},
            "cpu_ratios": {"ingest_1w_vs_plain": _cpu_ratio(runs["lib1"], runs["plain"])}}

    # ---- memory vs cohort size ---------------------------------------------------------------------------
    if "memory" in args.parts:
        rows = []
        stages = [st for st in ("ingest", "apply", "combat") if st in args.memory_stages]
        if args.no_combat and "combat" in stages:
            stages.remove("combat")
        if "ingest" not in stages:  # the other stages read the store that ingest writes
            stages.insert(0, "ingest")
        for n in cfg["sizes"]:
            st = str(work / f"scale{n}.zarr")
            for stage in stages:
                rows.append(run_job("scale", {"stage": stage, "n": n, "workers": 2, "bids": str(work / f"bids{n}"),
                                              "store": st, "model": model}, jobs_dir, f"memory {stage} n={n}"))
            if n in (cfg["sizes"][0], cfg["sizes"][-1]) and cfg["variants"]:  # fixes 1 + 2: memory and time
                r = run_job("scale", {"stage": "apply_subject_tasks", "n": n, "workers": 2, "store": st,
                                      "model": model, "malloc": "glibc"}, jobs_dir,
                            f"memory apply, one task per subject + glibc malloc, n={n}")
                rows.append(r)
            if n == cfg["sizes"][-1] and "combat" in stages and cfg["variants"]:  # fix 4 (before subject batching)
                side = max(8, int(round((cfg["sizes"][0] / n) ** (1 / 3) * 64 / 8)) * 8)
                block = [side, side, max(8, (64**3 * cfg["sizes"][0] // n) // side // side)]
                r = run_job("scale", {"stage": "combat", "n": n, "workers": 2, "store": st, "model": model,
                                      "params": {"block": block}}, jobs_dir, f"memory combat n={n} block={block}")
                r["stage"] = "combat_small_block"
                rows.append(r)
            shutil.rmtree(st, ignore_errors=True)
        fits, growth = {}, {}
        for stage in [*stages, "apply_subject_tasks"]:
            ok = [r for r in rows if r.get("stage") == stage and "wall_s" in r]
            small_block = [r for r in rows if r.get("stage") == "combat_small_block" and "wall_s" in r]
            if stage == "combat" and small_block and ok:
                growth["combat_small_block_at_largest_n"] = {
                    "n_small": ok[0]["n"], "n_large": small_block[0]["n"], "block": small_block[0]["params"]["block"],
                    "max_worker_peak_small_mib": max(ok[0]["worker_peak_rss_mib"].values()),
                    "max_worker_peak_large_mib": max(small_block[0]["worker_peak_rss_mib"].values()),
                    "coordinator_maxrss_small_mib": ok[0]["coordinator_maxrss_mib"],
                    "coordinator_maxrss_large_mib": small_block[0]["coordinator_maxrss_mib"],
                    "wall_s": small_block[0]["wall_s"]}
                g = growth["combat_small_block_at_largest_n"]
                g["worker_growth"] = g["max_worker_peak_large_mib"] / g["max_worker_peak_small_mib"]
                g["coordinator_growth"] = g["coordinator_maxrss_large_mib"] / g["coordinator_maxrss_small_mib"]
            if len(ok) >= 2:
                if len(ok) >= 3:
                    fits[stage] = _linear([r["n"] for r in ok], [r["wall_s"] for r in ok])
                lo, hi = ok[0], ok[-1]
                growth[stage] = {"n_small": lo["n"], "n_large": hi["n"],
                                 "max_worker_peak_small_mib": max(lo["worker_peak_rss_mib"].values()),
                                 "max_worker_peak_large_mib": max(hi["worker_peak_rss_mib"].values()),
                                 "coordinator_maxrss_small_mib": lo["coordinator_maxrss_mib"],
                                 "coordinator_maxrss_large_mib": hi["coordinator_maxrss_mib"]}
                growth[stage]["worker_growth"] = (growth[stage]["max_worker_peak_large_mib"]
                                                  / growth[stage]["max_worker_peak_small_mib"])
                growth[stage]["coordinator_growth"] = (growth[stage]["coordinator_maxrss_large_mib"]
                                                       / growth[stage]["coordinator_maxrss_small_mib"])
        results["memory"] = {"rows": rows, "time_fits": fits, "peak_growth": growth,
                             "replication": "cohorts above the simulated base are intensity-scaled copies"}

    # ---- training step -------------------------------------------------------------------------------
    if "train" in args.parts:
        results["train"] = {
            "real": run_job("train", {"store": store, "steps": cfg["train_steps"], "threads": 1, "stub": False},
                            jobs_dir, "train real loss"),
            "loader_only": run_job("train", {"store": store, "steps": cfg["train_steps"], "threads": 1,
                                             "stub": True}, jobs_dir, "train stubbed loss (loader only)")}

    # ---- profiles -------------------------------------------------------------------------------------
    if "profile" in args.parts:
        prof: dict = {"kernel": []}
        pa = run_job("apply_plain", {"store": store, "model": model, "profile": cfg["profile_subjects"],
                                     "profile_out": str(work / "apply.pyi.txt")}, jobs_dir, "profile plain apply")
        pi = run_job("ingest_plain", {"bids": str(work / f"bids{n_base}"), "chunks": chunks, "profile": True,
                                      "out": str(work / "prof_ingest.zarr"),
                                      "profile_out": str(work / "ingest.pyi.txt")}, jobs_dir, "profile plain ingest")
        prof["plain_apply"], prof["plain_ingest"] = pa, pi
        envs = (("glibc default", {}), ("dask nanny: TRIM=64KiB", {"MALLOC_TRIM_THRESHOLD_": "65536"}),
                ("TRIM=64KiB MMAP=32MiB", {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "33554432"}),
                ("TRIM=256MiB MMAP=32MiB", {"MALLOC_TRIM_THRESHOLD_": "268435456",
                                            "MALLOC_MMAP_THRESHOLD_": "33554432"}))
        for tag, env in envs[: 4 if cfg["variants"] else 2]:
            r = run_job("kernel", {"store": store, "model": model, "subjects": cfg["kernel_subjects"]}, jobs_dir,
                        f"kernel {tag}", env=env)
            r["tag"] = tag
            prof["kernel"].append(r)
        results["profile"] = prof

    _add_fits(results)
    meta["load_average_end"] = _load()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["total_s"] = time.perf_counter() - started
    suffix = ".quick" if args.quick else ""
    (out_dir / f"pipeline{suffix}.json").write_text(json.dumps(results, indent=1, default=str))
    md = render_markdown(results)
    (out_dir / f"pipeline{suffix}.md").write_text(md)
    (out_dir / f"pipeline{suffix}.profile.txt").write_text(render_profile(results, work))
    print(md)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ====================================================================================================
# reports
# ====================================================================================================
def _fmt(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def _verdict(value, target, higher=True):
    if value is None:
        return "n/a"
    return "pass" if (value >= target if higher else value <= target) else "FAIL"


def _run_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['label']} | failed: {' / '.join(r['error'][-2:])} | | | | | | | |"
    cpu = r.get("worker_cpu") or r.get("cpu")
    load = f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}" if r.get("load_before") else ""
    peak = max(r["worker_peak_rss_mib"].values()) if r.get("worker_peak_rss_mib") else r.get("maxrss_mib")
    tasks = r.get("tasks", {}).get("tasks", "")
    coord = r.get("coordinator_cpu")
    coord_s = f"{coord['user_s'] + coord['sys_s']:.1f}" if coord else ""
    used = (cpu["user_s"] + cpu["sys_s"]) / r["wall_s"]
    return (f"| {r['label']} | {r['wall_s']:.1f} | {r['voxels_per_s'] / 1e6:.2f} | {cpu['user_s']:.1f} / "
            f"{cpu['sys_s']:.1f} | {used:.2f} of {r.get('workers', 1)} | {coord_s} | {tasks} | {_fmt(peak, '.0f')} | "
            f"{load} |")


def render_markdown(res: dict) -> str:
    meta, prep = res["meta"], res["prepare"]
    L = [f"# Pipeline benchmark{' (quick)' if meta['quick'] else ''}", "",
         f"Run: `.venv/bin/python {meta['command']}` ({meta['total_s'] / 60:.1f} min).  {meta['cores']} cores; "
         f"load average {meta['load_average_start']} at the start and {meta['load_average_end']} at the end "
         "(a shared machine: other jobs ran beside this one; every run's own load is in the tables).  "
         f"Grid {tuple(prep['grid'])} at {meta['config']['resolution']} mm "
         f"({prep['voxels_per_subject']:,} voxels, {prep['mask_voxels']:,} in the mask), store chunks "
         f"{tuple(prep['store_chunks'])}, {prep['codecs']}; a stored subject "
         f"{prep['images_bytes_stored_per_subject'] / 2**20:.2f} "
         f"MiB (float32 {prep['voxels_per_subject'] * 4 / 2**20:.2f} MiB raw), its .nii.gz "
         f"{prep['nifti_gz_bytes_per_subject'] / 2**20:.2f} MiB.  Base cohort: {prep['n_base']} simulated subjects "
         f"(4 sites); larger cohorts are intensity-scaled copies of them.  One torch thread per process/worker."
         + ("  **Quick run: 3 mm volumes take ~0.2 s each, so fixed per-run costs dominate and the ratios below "
            "say little; the full run's are the ones that count.**" if meta["quick"] else ""),
         "", "## Targets", "",
         "| ratio (throughput in voxels/s, best of repeats) | measured | per repeat | target | verdict | "
         "CPU-normalized |", "|---|---:|---|---:|---|---:|"]
    names = {"apply_1w_vs_plain": "apply: Dask 1 worker / plain loop",
             "apply_2w_vs_1w": "apply: Dask 2 workers / 1 worker",
             "apply_1w_vs_plain_glibc_malloc": "apply: 1 worker / plain, workers with glibc malloc (fix 1)",
             "apply_2w_vs_1w_glibc_malloc": "apply: 2 / 1 workers, glibc malloc (fix 1)",
             "apply_1w_vs_plain_subject_tasks": "apply: 1 worker / plain, one task per subject + fix 1 (fix 2)",
             "apply_2w_vs_1w_subject_tasks": "apply: 2 / 1 workers, one task per subject + fix 1 (fix 2)",
             "ingest_1w_vs_plain": "ingest: Dask 1 worker / plain loop",
             "ingest_2w_vs_1w": "ingest: Dask 2 workers / 1 worker",
             "ingest_1w_vs_plain_glibc_malloc": "ingest: 1 worker / plain, glibc malloc",
             "ingest_2w_vs_1w_glibc_malloc": "ingest: 2 / 1 workers, glibc malloc",
             "apply_1w_vs_chunked_plain_subject_tasks": "apply: 1 worker, one task per subject + fix 1 / plain loop "
                                                        "over the same 64³ chunks",
             "apply_1w_vs_chunked_plain": "apply: Dask 1 worker / plain loop over the same 64³ chunks",
             "machine_2_processes_vs_1": "control, no Dask: 2 plain loops at once / 1 (this machine's ceiling for "
                                         "the 2-worker ratio)",
             "ingest_1w_vs_plain_without_mask_pass": "ingest: 1 worker / plain, mask pass left out (fix 3 bound)",
             "ingest_2w_vs_1w_without_mask_pass": "ingest: 2 / 1 workers, mask pass left out (fix 3 bound)",
             "ingest_1w_vs_plain_folded_mask": "ingest: 1 worker / plain, mask counted in the ingest tasks + glibc "
                                               "malloc (fix 3)",
             "ingest_2w_vs_1w_folded_mask": "ingest: 2 / 1 workers, mask counted in the ingest tasks + glibc malloc "
                                            "(fix 3)"}
    for part in ("apply", "ingest"):
        if part not in res:
            continue
        for key, r in res[part]["ratios"].items():
            if r["best"] is None:  # a variant this run did not measure
                continue
            base = (key.replace("_glibc_malloc", "").replace("_subject_tasks", "").replace("_without_mask_pass", "")
                    .replace("_chunked_plain", "_plain").replace("_folded_mask", ""))
            target = TARGETS[base]
            cpu = res[part]["cpu_ratios"].get(key)
            L.append(f"| {names[key]} | {_fmt(r['best'])}x | {', '.join(f'{v:.2f}' for v in r['per_rep'])} | "
                     f">= {target} | {_verdict(r['best'], target)} | {_fmt(cpu)} |")
    if "memory" in res:
        for stage, g in res["memory"]["peak_growth"].items():
            what = stage if "block" not in g else f"combat with block {tuple(g['block'])} at n={g['n_large']} (fix 4)"
            L.append(f"| memory, {what}: max worker peak RSS n={g['n_large']} / n={g['n_small']} | "
                     f"{g['worker_growth']:.2f} | {g['max_worker_peak_small_mib']:.0f} → "
                     f"{g['max_worker_peak_large_mib']:.0f} MiB | <= {TARGETS['peak_rss_growth']} | "
                     f"{_verdict(g['worker_growth'], TARGETS['peak_rss_growth'], higher=False)} | |")
        for stage, f in res["memory"]["time_fits"].items():
            c = res["memory"].get("cpu_fits", {}).get(stage)
            cpu = (f"worker CPU: b = {c['slope_s_per_subject']:.3f} s/subject, R² = {c['r2']:.4f}" if c else "")
            L.append(f"| time, {stage}: wall = a + b n | b = {f['slope_s_per_subject']:.3f} s/subject, a = "
                     f"{f['intercept_s']:.1f} s | R² = {f['r2']:.4f} | linear | "
                     f"{'pass' if f['r2'] >= 0.98 else 'check'} (R² >= 0.98) | {cpu} |")
    L += ["", "CPU-normalized: the same ratio of voxels per CPU-second of the computing processes (workers, or the "
          "plain loop's process), which the other jobs on this machine do not move much; it is not a target.  "
          "A 2-worker ratio only means something when its workers got close to 2 cores: see *cores used* in the "
          "run tables (CPU seconds of the workers / wall); on a shared 2-core machine other jobs take them.", ""]
    for part in ("apply", "ingest"):
        if part not in res:
            continue
        L += [f"## {part} runs", "", "| run | wall (s) | Mvoxels/s | CPU user / sys (s) | cores used (CPU / wall) | "
              "coordinator CPU (s) | tasks | peak RSS/worker (MiB) | load 1-min before → after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for runs in res[part]["runs"].values():
            L += [_run_row(r) for r in runs]
        extra = []
        for runs in res[part]["runs"].values():
            for r in runs:
                if "max_abs_diff_vs_plain" in r:
                    extra.append(f"{r['label']}: max |Δ| vs plain {r['max_abs_diff_vs_plain']:.2g} "
                                 f"(of max {r['max_abs_plain']:.0f})")
                if "mask_pass_s" in r:
                    extra.append(f"{r['label']}: mask pass {r['mask_pass_s']:.1f} s of {r['wall_s']:.1f} s"
                                 + (f" (mask identical to the library's: {r['mask_equal_to_library']})"
                                    if r.get("fold_mask") else ""))
        tt = sorted({(e.get("torch_threads"), e.get("MALLOC_TRIM_THRESHOLD_")) for runs in res[part]["runs"].values()
                     for r in runs for e in r.get("env_in_task", [])}, key=str)
        L += ["", f"torch threads / MALLOC_TRIM_THRESHOLD_ seen inside worker tasks: {tt}.  "
              + "; ".join(extra), ""]
    if "memory" in res:
        L += ["## Memory and time vs cohort size (2 workers x 1 thread, fresh cluster per stage)", "",
              "| stage | subjects | wall (s) | peak RSS per worker (MiB, sampled) | ru_maxrss per worker (MiB) | "
              "Dask-managed peak per worker (MiB; results held) | coordinator maxrss (MiB) | worker CPU (s) | "
              "load before → after |", "|---|---:|---:|---|---|---|---:|---:|---|"]
        for r in res["memory"]["rows"]:
            if "error" in r:
                L.append(f"| {r['label']} | failed | | | | | | | |")
                continue
            peaks = ", ".join(f"{v:.0f}" for v in r["worker_peak_rss_mib"].values())
            maxrss = ", ".join(f"{v:.0f}" for v in r["worker_maxrss_mib"].values())
            managed = ", ".join(f"{m:.0f} ({h})" for m, h in zip(r.get("worker_managed_peak_mib", {}).values(),
                                                                 r.get("worker_results_held_peak", {}).values(),
                                                                 strict=True)) or "not recorded"
            c = r["worker_cpu"]
            L.append(f"| {r['stage']} | {r['n']} | {r['wall_s']:.1f} | {peaks} | {maxrss} | {managed} | "
                     f"{r['coordinator_maxrss_mib']:.0f} | {c['user_s'] + c['sys_s']:.0f} | "
                     f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
        L.append("")
    if "train" in res:
        L += ["## Training step (InvariantHarmonizer._train, library defaults, 1 torch thread)", "",
              "| loop | crops/step | median step (ms) | loader (ms) | loss fwd (ms) | backward+optim (ms) | "
              "samples/s | loader share | loader alone (samples/s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in res["train"].items():
            if "error" in r:
                L.append(f"| {key} | failed | | | | | | | |")
                continue
            m = r["median_s"]
            L.append(f"| {key} | {r['crops_per_step']} x {r['crop']}³ | {1e3 * m['step']:.1f} | "
                     f"{1e3 * m['loader']:.1f} | {1e3 * m['loss']:.1f} | {1e3 * m['backward_opt']:.1f} | "
                     f"{r['samples_per_s']:.0f} | {100 * r['loader_fraction']:.1f} % | "
                     f"{r['loader_samples_per_s']:.0f} |")
        r = res["train"].get("real", {})
        L += ["", f"Pinned memory: {r.get('pin_memory', 'n/a')}.", ""]
    if "profile" in res:
        L += ["## Kernel: harmonize_block compute only, per subject (1 thread)", "",
              "| worker malloc environment | whole volume: wall / user / sys (s) | page faults | "
              "64³ chunks + halo: wall / user / sys (s) | page faults |", "|---|---|---:|---|---:|"]
        for r in res["profile"]["kernel"]:
            if "error" in r:
                continue
            w, c = r["whole"], r["chunk64"]
            L.append(f"| {r['tag']} | {w['wall_s_per_subject']:.2f} / {w['user_s_per_subject']:.2f} / "
                     f"{w['sys_s_per_subject']:.2f} | {w['minflt_per_subject']:,.0f} | "
                     f"{c['wall_s_per_subject']:.2f} / {c['user_s_per_subject']:.2f} / {c['sys_s_per_subject']:.2f} | "
                     f"{c['minflt_per_subject']:,.0f} |")
        L += ["", "Profiles: [pipeline.profile.txt](pipeline.profile.txt).", ""]
    return "\n".join(L) + "\n"


def _findings(res: dict) -> list[str]:
    """What the profiles and counters say, in numbers from this run."""
    out = ["Findings (numbers from this run)", "-" * 60]
    best = {k: _best(v) for k, v in res.get("apply", {}).get("runs", {}).items()}
    p, lib = best.get("plain"), best.get("lib1")
    if p and lib:
        n = p["subjects"]
        pc, lc = p["cpu"], lib["worker_cpu"]
        out += [f"* apply, plain loop: {pc['user_s'] / n:.2f} s user + {pc['sys_s'] / n:.2f} s system CPU per "
                "subject; "
                f"reading {p['parts']['read_s'] / n * 1e3:.0f} ms, context {p['parts']['context_s'] / n * 1e3:.0f} ms, "
                f"the model {p['parts']['harmonize_s'] / n:.2f} s (torch conv3d + the per-voxel MLPs dominate).",
                f"* apply, Dask 1 worker (library): {lc['user_s'] / n:.2f} s user + {lc['sys_s'] / n:.2f} s system "
                "per "
                f"subject, {lc['minflt'] / n:,.0f} page faults per subject.  The system time is page zero-filling: "
                "distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536 for every worker, which also freezes glibc's "
                "mmap threshold at 128 KiB, so every ~20 MiB torch activation buffer of a chunk is a fresh mmap "
                "(see the kernel table in pipeline.md).  The worker profile (below) is 90 % harmonize_block "
                "(conv3d, MLPs): Dask's own tasks (overlap slicing, concatenation) are a few per cent of CPU.",
                f"* apply task graph: {lib['tasks']['tasks'] / n:.0f} tasks per subject at 64^3 chunks "
                f"(8 compute tasks, the rest overlap slicing/concatenation), coordinator CPU "
                f"{1e3 * sum(lib['coordinator_cpu'][k] for k in ('user_s', 'sys_s')) / lib['tasks']['tasks']:.2f}"
                " ms per task."]
        g = best.get("lib1_glibc")
        if g:
            gc = g["worker_cpu"]
            out.append(f"* with glibc's malloc defaults in the workers: {gc['user_s'] / n:.2f} s user + "
                       f"{gc['sys_s'] / n:.2f} s system per subject; the extra user time over the chunked plain "
                       "loop is Dask's per-task work.")
    ing = res.get("ingest", {}).get("runs", {})
    if ing.get("lib1") and _best(ing["lib1"]):
        r = _best(ing["lib1"])
        out.append(f"* ingest, Dask 1 worker (library): the brain-mask pass (a second, complete read of the "
                   f"cohort through xarray + dask, images > 0 averaged over subjects) takes "
                   f"{r['mask_pass_s']:.1f} s of {r['wall_s']:.1f} s; {r['tasks']['tasks']} tasks for "
                   f"{r['subjects']} subjects.  In the ingest tasks, half the samples wait on zarr's own I/O "
                   "thread (zstd encoding + writes), gzip decoding is next.")
    if ing.get("plain") and _best(ing["plain"]):
        r = _best(ing["plain"])
        out.append(f"* ingest, plain loop: nibabel read {1e3 * r['parts']['nibabel_read_s'] / r['subjects']:.1f} ms, "
                   f"zarr write (zstd) {1e3 * r['parts']['zarr_write_s'] / r['subjects']:.1f} ms per subject.")
    tr = res.get("train", {}).get("real", {})
    if "median_s" in tr:
        out.append(f"* training: the loader builds a batch in {1e3 * tr['median_s']['loader']:.1f} ms of a "
                   f"{1e3 * tr['median_s']['step']:.0f} ms step ({100 * tr['loader_fraction']:.1f} %); it is not the "
                   "bottleneck on CPU.")
    return out


def render_profile(res: dict, work: Path) -> str:
    L: list[str] = ["Pipeline profiles (benchmarks/bench_pipeline.py)", "=" * 60, ""]
    L += _findings(res) + [""]

    def top(title, p, n=18):
        if not p:
            return
        L.append(f"{title}: {p['samples']} samples")
        L.append("  self time:")
        L.extend(f"    {100 * f:5.1f}%  {name}" for name, f in p["self"][:n])
        L.append("  inclusive:")
        L.extend(f"    {100 * f:5.1f}%  {name}" for name, f in p["inclusive"][:n])
        L.append("")

    for part in ("apply", "ingest"):
        for key, runs in res.get(part, {}).get("runs", {}).items():
            if key == "plain" or not runs or "error" in runs[0]:
                continue
            r = runs[0]
            L.append(f"--- {r['label']}: task counts (tasks, compute seconds) by key prefix: "
                     f"{json.dumps(r.get('tasks', {}).get('by_prefix', {}))}")
            top(f"Dask worker profile, {r['label']}", r.get("worker_profile"))
            if r.get("scheduler_profile"):
                top(f"Dask scheduler profile, {r['label']}", r["scheduler_profile"], 10)
    for name in ("apply", "ingest"):
        f = work / f"{name}.pyi.txt"
        if f.exists():
            L += [f"pyinstrument, plain {name} loop (one process, one torch thread)", "-" * 60, f.read_text(), ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
