"""ComBat speed and memory: harmonize's ComBat against neuroHarmonize 2.5.2, and out of core over a Zarr store.

    .venv/bin/python benchmarks/bench_combat.py            # full: 200 x 200,000 table; 400 x 1,000,000 store (~30 min)
    .venv/bin/python benchmarks/bench_combat.py --quick    # small sizes, a few-minute smoke run

Part 1, ``table`` - 200 subjects x 200,000 features (float64), 4 unequal sites (40/50/50/60), covariates age
(continuous) + sex (0/1), synthetic data with per-feature site location/scale effects, written once to X.npy +
covars.csv.  Each side runs fit + apply in its OWN fresh subprocess with ONE BLAS thread (OMP/MKL/OPENBLAS=1):
  ref    neuroHarmonize 2.5.2 (numpy 1.26, pandas 2) in a separate venv (default: .venv-ref in the repository,
         git-ignored; made with pip on first use, because neuroHarmonize pins numpy<2):
         harmonizationLearn(X, covars[SITE, age, sex]) then
         harmonizationApply(X, covars, model); the learn step alone is timed too (it already returns harmonized data).
  ours   ComBatHarmonizer(covariates=["age", "sex"], continuous_dtype="float32") .fit(X, SITE, covars) then
         .transform(...): neuroHarmonize's model (sex numeric; float32 ages, as neuroCombat rounds them).
         Variants: ``ours_chunked`` = ``chunk_size=16384`` (the library's option: bounded fit memory); the PROPOSED
         library changes, implemented here from the library's own pure functions (adjust_chunk,
         ComBatParameters.slice) since harmonize/ is not edited by this benchmark: ``proposed`` = chunk_size=16384 +
         a transform that adjusts 16,384-feature chunks into one preallocated output; ``proposed_inplace`` = the
         same writing back into X (``transform(..., copy=False)``, scikit-learn's convention); ``..._4k`` = the same
         with chunk_size=4096 (fit and transform); ``..._lean`` = with
         ``harmonize.models.combat`` imported without running ``harmonize/models/__init__.py`` (which imports
         torch through the invariant model): what a lazy import there gives a table-only user.
Memory per process: peak RSS = getrusage(RUSAGE_SELF).ru_maxrss (whole process: interpreter, imports, data, work);
the RSS after imports (before the data is read) and after X is loaded are recorded, giving "peak - import baseline"
(data + work) and "peak - RSS with data loaded" (the work alone).  Outputs: max |ours - ref| of the apply outputs.

Part 2, ``ooc`` - voxel-wise ComBat on a cohort store (harmonize.io.store: grid all inside the mask, float32
subjects with site location/scale + age/sex effects), ``pipeline.fit(store, client, "combat")`` then
``pipeline.apply(store, client, kind="combat", output="harmonized_combat")`` on a LocalCluster of 2 workers x 1
thread, memory_limit 3GiB (harmonize.cluster.make_client).  Writing the store is NOT measured.  A size runs in a
fresh subprocess (fresh cluster); this driver samples the RSS of that process tree every 50 ms (psutil): the
coordinator (client + scheduler + nannies, one process) and each worker; reported per phase as each process's peak
and as the peak of their SUM (simultaneous use of the machine); workers' ru_maxrss is read too.  Sizes: subjects
50/100/200/400 at 1,000,000 voxels (one 400-subject store; the first n subjects marked ingested, the others pending,
so fit and apply read exactly n subjects) and voxels 250k/500k/750k/1M at 400 subjects (grids 50x50x100,
50x100x100, 50x150x100, 100x100x100; store chunks 50^3, so 2/4/6/8 equal blocks).  A line time = a + b * size is
fitted per series (slope, R^2, time per unit).  One sanity check (n = smallest): the store's output vs the
in-memory ComBatHarmonizer on the same data.  The references' memory at 400 x 1M is an ESTIMATE from their measured
peak per element at 200 x 200k (they are not run into an OOM).  The earlier "PROPOSED block_statistics" run is gone:
the sub-chunk gathering and subject batching it proposed are now the library's block_statistics, used by every run.

Load averages (os.getloadavg) are recorded with every measurement: the machine is shared.
Results: <out>/combat.json and <out>/combat.md (default out: benchmarks/results).
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
REF_VENV = ROOT / ".venv-ref"  # git-ignored; neuroHarmonize pins numpy<2, so it cannot share .venv
REF_PACKAGES = ["neuroHarmonize==2.5.2", "numpy<2", "pandas", "psutil"]
SITE_PATTERN = [0] * 4 + [1] * 5 + [2] * 5 + [3] * 6  # 20/25/25/30 %: any multiple of 20 subjects is balanced
SUBCHUNK = 16384
TARGETS = {"speedup": 3.0, "memory_ratio": 0.25, "max_abs_diff": 1e-8, "ooc_peak_gib": 3.0, "r2": 0.99}
FULL = {"table": (200, 200_000), "reps": 3, "ooc_reps": 2, "chunks": (50, 50, 50), "grid": (100, 100, 100),
        "subjects": [50, 100, 200, 400], "voxel_grids": [(50, 50, 100), (50, 100, 100), (50, 150, 100)]}
QUICK = {"table": (100, 20_000), "reps": 1, "ooc_reps": 1, "chunks": (20, 20, 20), "grid": (40, 40, 40),
         "subjects": [20, 40, 60, 80], "voxel_grids": [(20, 20, 40), (20, 40, 40), (20, 60, 40)]}


# ====================================================================================================
# helpers usable in every process (the reference venv has numpy, pandas, psutil and neuroHarmonize only)
# ====================================================================================================
def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _site_codes(n: int):
    import numpy as np

    return np.array([SITE_PATTERN[i % len(SITE_PATTERN)] for i in range(n)])


# ====================================================================================================
# part 1: the table (one fit + apply per subprocess)
# ====================================================================================================
def make_table(folder: Path, n: int, p: int, seed: int = 0) -> None:
    """X.npy (n x p float64) and covars.csv (SITE, age, sex): per-feature baseline, age and sex effects, per-site
    per-feature location and scale effects, unit noise."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    codes = rng.permutation(_site_codes(n))
    age = np.round(rng.uniform(8, 80, n), 2)
    sex = rng.integers(0, 2, n)
    x = np.lib.format.open_memmap(folder / "X.npy", mode="w+", dtype=np.float64, shape=(n, p))
    for a in range(0, p, 20_000):
        b = min(p, a + 20_000)
        f = b - a
        base = rng.normal(100, 15, f)
        b_age, b_sex = rng.normal(-0.1, 0.05, f), rng.normal(2, 1, f)
        loc = rng.normal(0, 1, (4, f)) + np.array([0, 3, -2, 1.5])[:, None]
        scale = np.exp(rng.normal(0, 0.2, (4, f))) * np.array([1.0, 1.4, 0.8, 1.2])[:, None]
        x[:, a:b] = (base + age[:, None] * b_age + sex[:, None] * b_sex + loc[codes]
                     + scale[codes] * rng.standard_normal((n, f)) * 3.0)
    x.flush()
    del x
    pd.DataFrame({"SITE": [f"site{c}" for c in codes], "age": age, "sex": sex}).to_csv(folder / "covars.csv",
                                                                                     index=False)


def _import_combat_without_package_init():
    """harmonize.models.combat without running harmonize/models/__init__.py (which imports the invariant model and
    torch): what a lazy import in that __init__ would give a table-only user (a proposed change)."""
    import importlib.util
    import types

    import harmonize

    pkg = types.ModuleType("harmonize.models")
    pkg.__path__ = [str(Path(harmonize.__file__).parent / "models")]
    sys.modules["harmonize.models"] = pkg
    spec = importlib.util.spec_from_file_location("harmonize.models.combat", Path(pkg.__path__[0]) / "combat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["harmonize.models.combat"] = module
    spec.loader.exec_module(module)
    return module


def _chunked_transform(model, X, sites, covars, chunk: int = SUBCHUNK, copy: bool = True):
    """Proposed ComBatHarmonizer.transform(X, sites, covariates, copy=True): adjust_chunk over feature chunks into one
    preallocated output (copy=True) or back into X itself (copy=False, as scikit-learn's ``copy`` parameter), so the
    temporaries are (n x chunk) instead of several (n x features) arrays.  The finite check is per chunk (inside
    adjust_chunk) instead of an (n x features) boolean temporary."""
    import numpy as np

    from harmonize.models.combat import adjust_chunk

    design = model.design_spec_.build(list(sites), covars)
    out = np.empty(X.shape, dtype=np.float64) if copy else X
    for a in range(0, X.shape[1], chunk):
        b = min(X.shape[1], a + chunk)
        out[:, a:b] = adjust_chunk(X[:, a:b], design.site_codes, design.covariates, model.parameters_.slice(a, b))
    return out


def table_worker(impl: str, data: str, out: str) -> None:
    t_imp = time.perf_counter()
    rss_start = _rss_mib()
    import numpy as np
    import pandas as pd

    if impl == "ref":
        import neuroHarmonize
        from neuroHarmonize import harmonizationApply, harmonizationLearn

        version = neuroHarmonize.__version__ if hasattr(neuroHarmonize, "__version__") else "2.5.2"
    elif impl.endswith("_lean"):
        combat = _import_combat_without_package_init()
        version = "harmonize (combat.py alone)"
    else:
        from harmonize.models import combat

        version = "harmonize"
    import_s = time.perf_counter() - t_imp
    rss_imports = _rss_mib()
    X = np.load(Path(data) / "X.npy")
    covars = pd.read_csv(Path(data) / "covars.csv")
    rss_data, maxrss_data = _rss_mib(), _maxrss_mib()
    load0 = _load()
    t0, c0 = time.perf_counter(), time.process_time()
    learned = None
    if impl == "ref":
        cov = covars[["SITE", "age", "sex"]]
        model, learned = harmonizationLearn(X, cov)
        t1 = time.perf_counter()
        maxrss_fit = _maxrss_mib()
        result = harmonizationApply(X, cov, model)
        iterations = None
    else:
        cov = covars[["age", "sex"]]
        chunk = None if impl in ("ours", "ours_inplace") else (4096 if impl.endswith("_4k") else SUBCHUNK)
        model = combat.ComBatHarmonizer(covariates=["age", "sex"], continuous_dtype="float32", chunk_size=chunk,
                                        copy=impl != "ours_inplace")
        model.fit(X, covars["SITE"], cov)
        t1 = time.perf_counter()
        maxrss_fit = _maxrss_mib()
        if impl.startswith("proposed"):
            result = _chunked_transform(model, X, covars["SITE"], cov, chunk=chunk, copy="inplace" not in impl)
        else:
            result = model.transform(X, covars["SITE"], cov)
        iterations = model.iterations_
    t2, c2 = time.perf_counter(), time.process_time()
    maxrss = _maxrss_mib()
    np.save(out + ".apply.npy", np.asarray(result, dtype=np.float64))
    if learned is not None:
        np.save(out + ".learn.npy", np.asarray(learned, dtype=np.float64))
    Path(out + ".json").write_text(json.dumps({
        "impl": impl, "version": version, "n": int(X.shape[0]), "p": int(X.shape[1]), "numpy": np.__version__,
        "import_s": import_s, "fit_s": t1 - t0, "apply_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0,
        "rss_start_mib": rss_start, "rss_after_imports_mib": rss_imports, "rss_with_data_mib": rss_data,
        "maxrss_before_fit_mib": maxrss_data, "maxrss_after_fit_mib": maxrss_fit, "peak_rss_mib": maxrss,
        "peak_minus_imports_mib": maxrss - rss_imports,
        "peak_minus_data_mib": maxrss - rss_data, "data_mib": X.nbytes / 2**20, "iterations": iterations,
        "load_before": load0, "load_after": _load()}))


# ====================================================================================================
# part 2: out of core (store writing, one fit + apply per subprocess)
# ====================================================================================================
def _volume(shape, k: int, site: int, age: float, sex: int, maps: dict):
    import numpy as np

    rng = np.random.default_rng(1000 + k)
    noise = rng.standard_normal(maps["base"].shape, dtype=np.float32)
    vol = maps["base"] + np.float32(age) * maps["b_age"] + np.float32(sex) * maps["b_sex"] + maps["loc"][site]
    vol += maps["scale"][site] * noise
    return vol.reshape(shape)


def job_make_store(a: dict) -> dict:
    """A cohort store with a.n subjects on grid a.grid (all inside the mask), all marked ingested."""
    import numpy as np
    import pandas as pd

    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore, Grid, write_volume

    t = time.perf_counter()
    shape, n = tuple(a["grid"]), a["n"]
    path = Path(a["store"])
    if path.exists():
        shutil.rmtree(path)
    v = int(np.prod(shape))
    rng = np.random.default_rng(7)
    maps = {"base": rng.normal(100, 15, v).astype(np.float32), "b_age": rng.normal(-0.1, 0.05, v).astype(np.float32),
            "b_sex": rng.normal(2, 1, v).astype(np.float32),
            "loc": (rng.normal(0, 1, (4, v)) + np.array([0, 3, -2, 1.5])[:, None]).astype(np.float32),
            "scale": (3 * np.exp(rng.normal(0, 0.2, (4, v)))
                      * np.array([1, 1.4, 0.8, 1.2])[:, None]).astype(np.float32)}
    mask = np.ones(shape, dtype=np.uint8)
    store = CohortStore.create(path, Grid(shape, np.eye(4)), mask, tuple(a["chunks"]))
    codes = _site_codes(n)
    ages = np.round(np.random.default_rng(8).uniform(8, 80, n), 2)
    sexes = np.random.default_rng(9).integers(0, 2, n)
    rows = pd.DataFrame({S.SUBJECT: [f"s{k:04d}" for k in range(n)], S.SITE: [f"site{c}" for c in codes],
                         S.AGE: ages, S.SEX: ["F" if s == 0 else "M" for s in sexes],
                         S.SOURCE_PATH: [f"synthetic/s{k:04d}" for k in range(n)],
                         S.AFFINE: [np.eye(4)] * n})
    positions = store.append_subjects(rows)
    images = store.array_path(S.IMAGES)
    for k in positions:
        write_volume(images, int(k), _volume(shape, int(k), int(codes[k]), ages[k], int(sexes[k]), maps))
    store.set_field(S.INGEST_STATUS, positions, [S.DONE] * n)
    store.group.attrs[S.MASK_FROM] = {"synthetic": True, "n_subjects": n}
    return {"store": str(path), "grid": list(shape), "n": n, "voxels": v, "write_s": time.perf_counter() - t,
            "bytes_on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}


def _w_rusage(dask_worker=None) -> dict:
    import resource as _r

    import psutil

    r = _r.getrusage(_r.RUSAGE_SELF)
    return {"maxrss_mib": r.ru_maxrss / 1024, "cpu_s": r.ru_utime + r.ru_stime,
            "rss_mib": psutil.Process().memory_info().rss / 2**20, "pid": os.getpid()}


def _w_warm() -> int:
    import harmonize.apply  # noqa: F401 - the modules a ComBat task unpickles into
    import harmonize.fit_graph  # noqa: F401

    return os.getpid()


def job_ooc(a: dict) -> dict:
    """fit + apply of voxel-wise ComBat on the first a.n subjects of a store, with a fresh 2-worker cluster, a.reps
    times in that cluster (pass k > 0 refits and re-applies with overwrite=True).  Per pass: wall time, and CPU time
    (user + sys) of the coordinator process and of each worker, per phase."""
    import numpy as np

    from harmonize.cluster import close_client, make_client
    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore
    from harmonize.pipeline import apply, fit

    marks = a["marks"]

    def mark(name):
        with open(marks, "a") as fh:
            fh.write(json.dumps({"phase": name, "t": time.time(), "load": _load()}) + "\n")

    def cpu(client) -> dict:
        r = resource.getrusage(resource.RUSAGE_SELF)
        workers = {str(v["pid"]): v["cpu_s"] for v in client.run(_w_rusage).values()}
        return {"coordinator": r.ru_utime + r.ru_stime, **workers}

    def spent(c0: dict, c1: dict) -> dict:
        return {k: c1[k] - c0[k] for k in c1}

    store = CohortStore(a["store"])
    total = store.n_subjects
    status = np.full(total, S.PENDING, dtype=np.int8)
    status[: a["n"]] = S.DONE
    store.set_field(S.INGEST_STATUS, np.arange(total), status)
    client = make_client({"type": "local", "n_workers": 2, "threads_per_worker": 1, "memory_limit": "3GiB"},
                         quiet=True)
    passes = []
    try:
        pids = sorted(client.run(_w_warm).values())
        for rep in range(a.get("reps", 1)):
            c0 = cpu(client)
            mark(f"fit{rep}")
            t0 = time.perf_counter()
            model_dir = fit(a["store"], client, "combat", dict(a.get("params") or {}), progress=False)
            t1 = time.perf_counter()
            c1 = cpu(client)
            mark(f"apply{rep}")
            t1b = time.perf_counter()
            result = apply(a["store"], client, kind="combat", output="harmonized_combat", progress=False,
                           overwrite=rep > 0)
            t2 = time.perf_counter()
            mark(f"end{rep}")
            c2 = cpu(client)
            fit_cpu, apply_cpu = spent(c0, c1), spent(c1, c2)
            passes.append({"fit_s": t1 - t0, "apply_s": t2 - t1b, "total_s": (t1 - t0) + (t2 - t1b),
                           "fit_cpu_s": sum(fit_cpu.values()), "apply_cpu_s": sum(apply_cpu.values()),
                           "total_cpu_s": sum(fit_cpu.values()) + sum(apply_cpu.values()),
                           "fit_cpu_by_process": fit_cpu, "apply_cpu_by_process": apply_cpu,
                           "harmonized": len(result.harmonized), "failed": len(result.failed)})
        workers = client.run(_w_rusage)
    finally:
        close_client(client)
    store.set_field(S.INGEST_STATUS, np.arange(total), [S.DONE] * total)
    best = {k: min(p[k] for p in passes) for k in ("fit_s", "apply_s", "total_s", "fit_cpu_s", "apply_cpu_s",
                                                   "total_cpu_s")}
    return {"n": a["n"], "voxels": int(store.mask().sum()),
            "grid": list(store.grid.shape), "store_chunks":
            list(store.chunks), **best, "passes": passes, "harmonized": passes[-1]["harmonized"],
            "failed": passes[-1]["failed"], "model_dir": str(model_dir),
            "worker_pids": pids, "worker_rusage": {str(v["pid"]): v for v in workers.values()},
            "coordinator_pid": os.getpid(), "coordinator_maxrss_mib": _maxrss_mib()}


def job_check(a: dict) -> dict:
    """The store's harmonized_combat (first n subjects) vs the in-memory ComBatHarmonizer on the same voxels."""
    import numpy as np
    import zarr

    from harmonize.io import schema as S
    from harmonize.io.store import CohortStore
    from harmonize.models.combat import ComBatHarmonizer

    store = CohortStore(a["store"])
    n = a["n"]
    table = store.table().iloc[:n]
    x = zarr.open_array(store.array_path(S.IMAGES), mode="r")[:n].reshape(n, -1).astype(np.float64)
    out = zarr.open_array(store.array_path("harmonized_combat"), mode="r")[:n].reshape(n, -1)
    cov = table[[S.AGE, S.SEX]].reset_index(drop=True)
    ref = ComBatHarmonizer(covariates=["age", "sex"], categorical=["sex"], chunk_size=SUBCHUNK).fit(
        x, table[S.SITE].tolist(), cov)
    expected = ref.transform(x, table[S.SITE].tolist(), cov)
    diff = np.abs(out.astype(np.float64) - expected)
    return {"n": n, "voxels": int(x.shape[1]), "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.maximum(np.abs(expected), 1e-12)).max()),
            "data_range": [float(x.min()), float(x.max())],
            "note": "store output is float32: differences are float32 rounding of values ~1e2"}


# ====================================================================================================
# the driver
# ====================================================================================================
def _env() -> dict:
    return {**os.environ, **dict.fromkeys(THREAD_VARS, "1"), "PYTHONPATH": str(ROOT)}


class TreeSampler:
    """RSS of a process and all its descendants every `interval` s (psutil), from outside the process tree."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            row = {}
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    row[p.pid] = p.memory_info().rss / 2**20
                    if p.pid not in self.names:
                        self.names[p.pid] = " ".join(p.cmdline())[:160]
                except psutil.Error:
                    pass
            self.samples.append((time.time(), row))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float, end: float, roles: dict[int, str]) -> dict:
        rows = [r for t, r in self.samples if start <= t <= end]
        per: dict[str, float] = {}
        peak_sum, at = 0.0, {}
        for r in rows:
            total = sum(r.values())
            if total > peak_sum:
                peak_sum, at = total, r
            for pid, rss in r.items():
                role = roles.get(pid, "other")
                key = role if role != "other" else f"other {pid}"
                per[key] = max(per.get(key, 0.0), rss)
        return {"samples": len(rows), "peak_sum_mib": peak_sum,
                "at_peak_sum_mib": {roles.get(p, f"other {p}"): v for p, v in at.items()},
                "per_process_peak_mib": per}


def run_job(name: str, a: dict, work: Path, label: str, timeout: float = 3600, sample: bool = False) -> dict:
    spec = work / f"job-{name}-{time.time_ns()}.json"
    spec.write_text(json.dumps(a))
    out = spec.with_suffix(".out.json")
    cmd = [sys.executable, __file__, "--job", name, "--spec", str(spec), "--result", str(out)]
    print(f"bench_combat: {label} ...", end="", flush=True, file=sys.stderr)
    started, load0 = time.perf_counter(), _load()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid) if sample else None
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        err = f"timed out after {timeout} s"
    if sampler:
        sampler.stop()
    if proc.returncode != 0 or not out.exists():
        print(" failed", file=sys.stderr)
        return {"error": (err or "").strip().splitlines()[-8:], "label": label}
    result = json.loads(out.read_text())
    result["job_wall_s"] = time.perf_counter() - started
    result["load_job_start"], result["load_job_end"] = load0, _load()
    if sampler:
        result["_sampler"] = sampler
    print(f" {result['job_wall_s']:.0f} s", file=sys.stderr)
    return result


def run_table(impl: str, data: Path, work: Path, ref_python: str, rep: int) -> dict:
    out = str(work / f"table-{impl}-{rep}")
    python = ref_python if impl == "ref" else sys.executable
    cmd = [python, __file__, "--table-worker", impl, "--data", str(data), "--out", out]
    print(f"bench_combat: table {impl} (rep {rep}) ...", end="", flush=True, file=sys.stderr)
    env = _env()
    if impl == "ref":
        env.pop("PYTHONPATH")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(" failed", file=sys.stderr)
        return {"impl": impl, "error": proc.stderr.strip().splitlines()[-8:]}
    r = json.loads(Path(out + ".json").read_text())
    r["rep"], r["out"] = rep, out
    print(f" fit {r['fit_s']:.1f} s + apply {r['apply_s']:.1f} s, peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return r


def ensure_ref_venv(venv: Path) -> str:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"bench_combat: creating the reference venv {venv} ({' '.join(REF_PACKAGES)})", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REF_PACKAGES], check=True)
    return str(python)


def _linear(xs, ys) -> dict:
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2),
            "per_unit": [float(b / a) for a, b in zip(x, y, strict=True)]}


def job_make_table(a: dict) -> dict:
    t = time.perf_counter()
    make_table(Path(a["folder"]), a["n"], a["p"])
    return {"write_s": time.perf_counter() - t}


def job_compare(a: dict) -> dict:
    """max |ours - ref| of every variant's output (run in a subprocess so that the driver stays small: a child
    process's ru_maxrss starts at its parent's high-water mark on Linux, exec included)."""
    import numpy as np

    ref_apply = np.load(a["ref"] + ".apply.npy", mmap_mode="r")
    ref_learn = np.load(a["ref"] + ".learn.npy", mmap_mode="r")
    out = {"ref_learn_vs_apply": float(np.abs(ref_apply - ref_learn).max()),
           "data_max_abs": float(np.abs(ref_apply).max()), "variants": {}}
    for impl, path in a["ours"].items():
        ours = np.load(path + ".apply.npy", mmap_mode="r")
        out["variants"][impl] = {"vs_apply": float(np.abs(ours - ref_apply).max()),
                                 "vs_learn": float(np.abs(ours - ref_learn).max())}
    return out


def part_table(cfg: dict, work: Path, ref_python: str, variants: list[str]) -> dict:
    n, p = cfg["table"]
    data = work / "table"
    data.mkdir(exist_ok=True)
    made = run_job("make_table", {"folder": str(data), "n": n, "p": p}, work, f"table data {n} x {p}")
    runs = []
    for rep in range(cfg["reps"]):  # interleaved, so that both sides see the same machine load
        for impl in ["ref", *variants]:
            runs.append(run_table(impl, data, work, ref_python, rep))
    ok = [r for r in runs if "error" not in r]
    best = {}
    for r in ok:
        if r["impl"] not in best or r["total_s"] < best[r["impl"]]["total_s"]:
            best[r["impl"]] = r
    ref = best.get("ref")
    comparisons, diffs = [], {}
    if ref:
        diffs = run_job("compare", {"ref": ref["out"], "ours": {k: v["out"] for k, v in best.items() if k != "ref"}},
                        work, "compare outputs")
        for impl, r in best.items():
            if impl == "ref" or impl not in diffs.get("variants", {}):
                continue
            diff = diffs["variants"][impl]["vs_apply"]
            c = {"impl": impl, "max_abs_diff_vs_ref_apply": diff,
                 "max_abs_diff_vs_ref_learn": diffs["variants"][impl]["vs_learn"],
                 "data_max_abs": diffs["data_max_abs"],
                 "speedup_fit_apply": ref["total_s"] / r["total_s"],
                 "speedup_vs_ref_learn_only": ref["fit_s"] / r["total_s"],
                 "speedup_cpu": ref["cpu_s"] / r["cpu_s"],
                 "memory_ratio_whole_process": r["peak_rss_mib"] / ref["peak_rss_mib"],
                 "memory_ratio_minus_imports": r["peak_minus_imports_mib"] / ref["peak_minus_imports_mib"],
                 "memory_ratio_work_only": r["peak_minus_data_mib"] / ref["peak_minus_data_mib"]}
            c["pass"] = {"diff": diff <= TARGETS["max_abs_diff"], "speed": c["speedup_fit_apply"] >= TARGETS["speedup"],
                         "speed_cpu": c["speedup_cpu"] >= TARGETS["speedup"],
                         "memory_whole_process": c["memory_ratio_whole_process"] <= TARGETS["memory_ratio"],
                         "memory_minus_imports": c["memory_ratio_minus_imports"] <= TARGETS["memory_ratio"]}
            comparisons.append(c)
    # the references' peak per element at this size -> an estimate at 400 x 1M (they are not run)
    estimate = None
    if ref:
        per_elem = ref["peak_minus_imports_mib"] / (n * p)
        estimate = {"ref_peak_minus_imports_mib_per_element": per_elem,
                    "ref_bytes_per_element": per_elem * 2**20,
                    "estimated_peak_400x1M_gib": (ref["rss_after_imports_mib"] + per_elem * 400 * 1_000_000) / 1024,
                    "machine_gib": _mem_total_gib(),
                    "note": "ESTIMATE: neuroHarmonize's measured (peak - import baseline) per element at "
                            f"{n} x {p}, scaled to 400 x 1,000,000 (its memory is linear in the data: dense float64 "
                            "features x subjects arrays); not run"}
    for r in runs:
        r.pop("out", None)
    return {"n": n, "p": p, "data": made, "runs": runs,
            "best": {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in best.items()},
            "comparisons": comparisons, "ref_learn_vs_apply_max_abs_diff": diffs.get("ref_learn_vs_apply"),
            "ref_estimate": estimate}


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _ooc_run(store: str, n: int, work: Path, label: str, reps: int, params: dict | None = None) -> dict:
    marks = work / f"marks-{time.time_ns()}.jsonl"
    r = run_job("ooc", {"store": store, "n": n, "marks": str(marks), "reps": reps, "params": params or {}},
                work, label, sample=True)
    sampler = r.pop("_sampler", None)
    if "error" in r or sampler is None:
        return r
    marks_list = list(map(json.loads, marks.read_text().splitlines()))
    t = {m["phase"]: m["t"] for m in marks_list}
    roles = {r["coordinator_pid"]: "coordinator"}
    roles.update({pid: f"worker {k}" for k, pid in enumerate(r["worker_pids"])})
    memory = {}
    for phase, end in (("fit", "apply"), ("apply", "end")):
        windows = [sampler.summary(t[f"{phase}{k}"], t[f"{end}{k}"], roles) for k in range(reps)]
        worst = max(windows, key=lambda w: w["peak_sum_mib"])
        per = {}
        for w in windows:
            for key, v in w["per_process_peak_mib"].items():
                per[key] = max(per.get(key, 0.0), v)
        memory[phase] = {**worst, "per_process_peak_mib": per, "per_pass_peak_sum_mib": [w["peak_sum_mib"]
                                                                                        for w in windows]}
    memory["whole_job"] = sampler.summary(0, float("inf"), roles)
    r["memory"] = memory
    r["load"] = {m["phase"]: m["load"] for m in marks_list}
    r["process_names"] = {roles.get(pid, f"other {pid}"): name for pid, name in sampler.names.items()}
    worker_max = {roles.get(int(pid), pid): v["maxrss_mib"] for pid, v in r["worker_rusage"].items()}
    r["ru_maxrss_mib"] = {"coordinator": r["coordinator_maxrss_mib"], **worker_max}
    peak_sum = max(memory["fit"]["peak_sum_mib"], memory["apply"]["peak_sum_mib"])
    r["peak_sum_gib"] = peak_sum / 1024
    r["sum_of_ru_maxrss_gib"] = sum(r["ru_maxrss_mib"].values()) / 1024
    r["max_process_gib"] = max(r["ru_maxrss_mib"].values()) / 1024
    return r


def part_ooc(cfg: dict, work: Path, skip_voxels: bool = False) -> dict:
    chunks = cfg["chunks"]
    big_n = cfg["subjects"][-1]
    stores, runs = [], []
    main = str(work / "ooc-main.zarr")
    stores.append(run_job("make_store", {"store": main, "grid": cfg["grid"], "n": big_n, "chunks": chunks}, work,
                          f"write store {big_n} x {cfg['grid']}"))
    for n in reversed(cfg["subjects"]):  # the headline size first
        r = _ooc_run(main, n, work, f"ooc fit+apply n={n} grid={cfg['grid']}", cfg["ooc_reps"])
        r["series"] = "subjects"
        runs.append(r)
    check = {}
    if "error" not in runs[-1]:
        check = run_job("check", {"store": main, "n": cfg["subjects"][0]}, work,
                        f"check store output vs in-memory ComBat, n={cfg['subjects'][0]}")
    shutil.rmtree(main, ignore_errors=True)
    if not skip_voxels:
        for grid in cfg["voxel_grids"]:
            path = str(work / f"ooc-{'x'.join(map(str, grid))}.zarr")
            stores.append(run_job("make_store", {"store": path, "grid": grid, "n": big_n, "chunks": chunks}, work,
                                  f"write store {big_n} x {grid}"))
            r = _ooc_run(path, big_n, work, f"ooc fit+apply n={big_n} grid={grid}", cfg["ooc_reps"])
            r["series"] = "voxels"
            runs.append(r)
            shutil.rmtree(path, ignore_errors=True)
    ok = [r for r in runs if "error" not in r]
    fits = {}
    subj = sorted([r for r in ok if r["series"] == "subjects"], key=lambda r: r["n"])
    vox = sorted([r for r in ok if r["series"] == "voxels"] + [r for r in subj if r["n"] == big_n],
                 key=lambda r: r["voxels"])
    for name, rows, key in (("subjects", subj, "n"), ("voxels", vox, "voxels")):
        if len(rows) >= 3:
            fits[name] = {t: _linear([r[key] for r in rows], [r[t] for r in rows])
                          for t in ("fit_s", "apply_s", "total_s", "fit_cpu_s", "apply_cpu_s", "total_cpu_s")}
            fits[name]["sizes"] = [r[key] for r in rows]
            fits[name]["peak_sum_gib"] = [r["peak_sum_gib"] for r in rows]
    return {"stores": stores, "runs": runs, "fits": fits, "check": check}


# ---- markdown -----------------------------------------------------------------------------------------
def _f(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


NAMES = {"ref": "neuroHarmonize 2.5.2 (learn + apply)", "ours": "harmonize ComBatHarmonizer (defaults)",
         "ours_inplace": "harmonize ComBatHarmonizer(copy=False): in place",
         "ours_chunked": "harmonize, chunk_size=16384", "proposed": "proposed: chunk_size=16384 + chunked transform",
         "proposed_inplace": "proposed: chunk_size=16384 + chunked transform, copy=False (in place)",
         "proposed_inplace_4k": "proposed: chunk_size=4096 + chunked transform, in place",
         "proposed_inplace_lean": "proposed: in place + combat imported without torch"}
# the library now chunks the transform (4096 features; fit and transform) and has copy=False: "ours" and
# "ours_inplace" are what it does; the "proposed*" variants are the earlier run's prototypes of that change
VARIANTS = ["ours", "ours_inplace", "ours_chunked", "proposed", "proposed_inplace", "proposed_inplace_4k",
            "proposed_inplace_lean"]
DEFAULT_VARIANTS = ["ours", "ours_inplace"]


def render(res: dict) -> str:
    meta = res["meta"]
    lines = ["# ComBat benchmark", "",
             f"{meta['started']} to {meta['finished']}; {meta['cores']} cores, {meta['mem_gib']:.0f} GiB, one BLAS "
             f"thread per process; load average {meta['load_start']} at the start and {meta['load_end']} at the end "
             "(a shared machine: wall times move with it, every row has its own load).  Run: "
             f"`{meta['command']}`.", ""]
    t = res.get("table")
    if t:
        lines += [f"## Against neuroHarmonize: {t['n']} subjects x {t['p']:,} features, 4 sites, age + sex", "",
                  "Each row: a fresh process, best of the repeats by fit + apply time.  Peak = ru_maxrss of the "
                  "whole process; 'minus imports' = peak - RSS after imports (data + work); 'work' = peak - RSS with "
                  "X loaded.", "",
                  "| implementation | fit (s) | apply (s) | fit + apply (s) | CPU (s) | RSS after imports (MiB) | "
                  "peak RSS after fit (MiB) | peak RSS (MiB) | peak - imports (MiB) | work (MiB) | load before |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for impl, r in t["best"].items():
            lines.append(f"| {NAMES.get(impl, impl)} | {r['fit_s']:.2f} | {r['apply_s']:.2f} | {r['total_s']:.2f} | "
                         f"{r['cpu_s']:.2f} | {r['rss_after_imports_mib']:.0f} | {r['maxrss_after_fit_mib']:.0f} | "
                         f"{r['peak_rss_mib']:.0f} | "
                         f"{r['peak_minus_imports_mib']:.0f} | {r['peak_minus_data_mib']:.0f} | {r['load_before']} |")
        lines += ["", f"neuroHarmonize's learn output vs its apply output: max |diff| = "
                      f"{_f(t['ref_learn_vs_apply_max_abs_diff'], '.1e')}.", "",
                  "| vs neuroHarmonize | max abs diff (target <= 1e-8) | speed-up, wall, fit + apply (target >= 3) | "
                  "speed-up, CPU | speed-up vs its learn alone (wall) | peak ratio, whole process (target <= 0.25) | "
                  "peak ratio, minus imports | work ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in t["comparisons"]:
            pf = c["pass"]
            lines.append(f"| {NAMES.get(c['impl'], c['impl'])} | {c['max_abs_diff_vs_ref_apply']:.1e} "
                         f"{_ok(pf['diff'])} | {c['speedup_fit_apply']:.2f}x {_ok(pf['speed'])} | "
                         f"{c['speedup_cpu']:.2f}x {_ok(pf['speed_cpu'])} | "
                         f"{c['speedup_vs_ref_learn_only']:.2f}x | {c['memory_ratio_whole_process']:.3f} "
                         f"{_ok(pf['memory_whole_process'])} | {c['memory_ratio_minus_imports']:.3f} "
                         f"{_ok(pf['memory_minus_imports'])} | {c['memory_ratio_work_only']:.3f} |")
        e = t.get("ref_estimate")
        if e:
            lines += ["", f"neuroHarmonize at 400 x 1,000,000 (ESTIMATE, not run): {e['ref_bytes_per_element']:.1f} "
                          f"bytes per element above its import baseline at {t['n']} x {t['p']:,} -> "
                          f"~{e['estimated_peak_400x1M_gib']:.0f} GiB peak, on a {e['machine_gib']:.0f} GiB machine."]
        lines.append("")
    o = res.get("ooc")
    if o:
        lines += ["## Out of core: voxel-wise ComBat on a Zarr store, 2 workers x 1 thread, memory_limit 3GiB", "",
                  "pipeline.fit(store, client, 'combat') + pipeline.apply(..., output='harmonized_combat'); grid all "
                  "inside the mask, store chunks " + "x".join(map(str, res["config"]["chunks"])) + "; "
                  + str(res["config"]["ooc_reps"]) + " pass(es) per size in one cluster: times are the best pass, "
                  "memory the worst.  CPU = "
                  "user + sys of the coordinator and both workers.  Memory: RSS sampled every 50 ms per process; "
                  "'peak sum' = the highest coordinator + workers total at one instant (the target's measure); "
                  "'sum of ru_maxrss' adds each process's own peak, taken at different times (an upper bound).", "",
                  "| subjects | voxels | fit (s) | apply (s) | fit + apply (s) | CPU fit + apply (s) | CPU s per "
                  "subject-Mvoxel | peak sum, fit (MiB) | peak sum, apply (MiB) | coordinator peak (MiB) | worker "
                  "peaks (MiB) | sum of ru_maxrss (MiB) | peak sum <= 3 GiB | load (fit start) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in o["runs"]:
            if "error" in r:
                lines.append(f"| | | failed: {r['error'][-1:]} | | | | | | | | | | | |")
                continue
            m = r["memory"]
            coord = max(m["fit"]["per_process_peak_mib"].get("coordinator", 0),
                        m["apply"]["per_process_peak_mib"].get("coordinator", 0))
            workers = sorted({k for k in m["whole_job"]["per_process_peak_mib"] if k.startswith("worker")})
            wp = " / ".join(f"{max(m[ph]['per_process_peak_mib'].get(w, 0) for ph in ('fit', 'apply')):.0f}"
                            for w in workers)
            peak = max(m["fit"]["peak_sum_mib"], m["apply"]["peak_sum_mib"])
            lines.append(f"| {r['n']} | {r['voxels']:,} | {r['fit_s']:.1f} | {r['apply_s']:.1f} | {r['total_s']:.1f} | "
                         f"{r['total_cpu_s']:.1f} | {r['total_cpu_s'] / (r['n'] * r['voxels'] / 1e6):.3f} | "
                         f"{m['fit']['peak_sum_mib']:.0f} | {m['apply']['peak_sum_mib']:.0f} | {coord:.0f} | {wp} | "
                         f"{sum(r['ru_maxrss_mib'].values()):.0f} | {_ok(peak / 1024 <= TARGETS['ooc_peak_gib'])} | "
                         f"{r['load'].get('fit0')} |")
        per_pass = "; ".join(
            f"{r['n']} x {r['voxels']:,}: "
            + " / ".join(f"{v:.0f}" for v in r["memory"]["fit"]["per_pass_peak_sum_mib"])
            for r in o["runs"] if "memory" in r)
        lines += ["", f"Peak sum in the fit, pass by pass (MiB; pass 2 runs after an apply in the same cluster, whose "
                      f"workers keep the applied model cached): {per_pass}."]
        lines += ["", "Linear fits, time = intercept + slope x size (wall: best pass; CPU: coordinator + workers):", "",
                  "| series | sizes | measure | slope | intercept (s) | R^2 | time / size |",
                  "|---|---|---|---:|---:|---:|---|"]
        for name, f in o["fits"].items():
            unit = "subject" if name == "subjects" else "Mvoxel"
            scale = 1.0 if name == "subjects" else 1e6
            for key in ("fit_s", "apply_s", "total_s", "fit_cpu_s", "apply_cpu_s", "total_cpu_s"):
                g = f[key]
                per = ", ".join(f"{v * scale:.3g}" for v in g["per_unit"])
                label = key[:-2].replace("_cpu", " CPU").replace("total", "fit + apply") + ("" if "cpu" in key
                                                                                          else " wall")
                lines.append(f"| {name} | {', '.join(f'{s:,}' for s in f['sizes'])} | {label} | "
                             f"{g['slope'] * scale:.3g} s per {unit} | {g['intercept']:.1f} | {g['r2']:.4f} | {per} |")
        c = o.get("check") or {}
        if "max_abs_diff" in c:
            lines += ["", f"Sanity check, n = {c['n']} x {c['voxels']:,}: store output vs in-memory ComBatHarmonizer "
                          f"(float64): max abs diff {c['max_abs_diff']:.2e}, max relative {c['max_rel_diff']:.1e} "
                          "(the store holds float32)."]
        for s in o["stores"]:
            if "write_s" in s:
                lines.append(f"- store {s['n']} x {s['grid']}: written in {s['write_s']:.0f} s (not measured), "
                             f"{s['bytes_on_disk'] / 2**30:.2f} GiB on disk")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--parts", nargs="+", default=["table", "ooc"], choices=["table", "ooc"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    parser.add_argument("--ref-venv", default=str(REF_VENV), help="venv with neuroHarmonize (made if missing)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results (--quick: <temp>/bench-combat-quick)")
    parser.add_argument("--skip-voxels", action="store_true", help="out of core: the subject series only")
    # internal
    parser.add_argument("--table-worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.table_worker:
        table_worker(args.table_worker, args.data, args.out)
        return 0
    if args.job:
        jobs = {"make_store": job_make_store, "ooc": job_ooc, "check": job_check, "make_table": job_make_table,
                "compare": job_compare}
        result = jobs[args.job](
            json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0

    cfg = QUICK if args.quick else FULL
    out = Path(args.out or (Path(tempfile.gettempdir()) / "bench-combat-quick" if args.quick
                            else ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-combat-")
        work = Path(tmp)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": _load(), "cores": os.cpu_count(),
            "mem_gib": _mem_total_gib(), "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "blas_threads": 1, "quick": args.quick,
            "command": "python benchmarks/bench_combat.py" + (" --quick" if args.quick else "")}
    res = {"meta": meta, "config": cfg, "targets": TARGETS}
    try:
        if "table" in args.parts:
            res["table"] = part_table(cfg, work, ensure_ref_venv(Path(args.ref_venv)), args.variants)
        if "ooc" in args.parts:
            res["ooc"] = part_ooc(cfg, work, args.skip_voxels)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["finished"], meta["load_end"] = time.strftime("%Y-%m-%d %H:%M:%S"), _load()
    meta["driver_maxrss_mib"] = _maxrss_mib()  # children's ru_maxrss start at this process's high-water mark
    name = "combat"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    md = render(res)
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
