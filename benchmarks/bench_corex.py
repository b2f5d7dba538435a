"""Linear CorEx fit time and peak memory: harmonize.corex.LinearCorex against the reference linearcorex 0.53.

    .venv/bin/python benchmarks/bench_corex.py                  # n=500, m=20, p=10,000 and 50,000 + p=200,000 (ours)
    .venv/bin/python benchmarks/bench_corex.py --sizes 2000 --big 0 --out /tmp/bench   # a quick smoke run

Every fit runs in its own subprocess with ONE BLAS/OpenMP thread (OMP/MKL/OPENBLAS_NUM_THREADS=1,
torch.set_num_threads(1), threadpoolctl), on the same data: n samples of m latent factors, variable i loading
on factor i % m (loading 0.5..1, float32, seeded), generated inside the subprocess column block by column block so
that no temporary copy inflates the memory high-water mark.  Both implementations and one p run back to back.

Reported per fit: wall and CPU time of ``fit``; peak memory as the process's maximum resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, which includes the interpreter, the imported libraries and the data) and as
the *fit increment* (that maximum minus the resident set size just before ``fit``, i.e. what the fit itself
needed); the objective as each package reports it (the reference in float32) and both solutions re-scored with
the same float64 objective (``harmonize.corex.corex_objective``) after the measurements; the adjusted Rand index
of the clusters against the planted groups and between the two packages.  The reference gets a time cap
(--ref-cap seconds); a capped run is reported as such.

Results: ``<out>/corex.json`` and ``<out>/corex.md`` (default out: benchmarks/results); ``--profile P`` also writes
a pyinstrument profile of our fit at p = P to ``<out>/corex.profile.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
ROOT = Path(__file__).resolve().parents[1]


# ---- inside a worker subprocess -------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _make_data(n: int, p: int, m: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = np.arange(p) % m
    loads = rng.uniform(0.5, 1.0, p).astype(np.float32)
    z = rng.standard_normal((n, m), dtype=np.float32)
    x = np.empty((n, p), dtype=np.float32)
    for c0 in range(0, p, 4096):
        sl = slice(c0, min(p, c0 + 4096))
        x[:, sl] = z[:, groups[sl]] * loads[sl] + rng.standard_normal((n, sl.stop - sl.start), dtype=np.float32)
    return x, groups


def _rescore(x, w) -> float:
    """Our float64 objective at weights w, on the data standardized in float64 (after the measurements)."""
    import numpy as np
    import torch

    from harmonize.corex import corex_objective

    xs = x.astype(np.float64)
    xs -= xs.mean(axis=0)
    xs /= np.sqrt((xs * xs).mean(axis=0))
    return float(corex_objective(torch.from_numpy(xs), torch.as_tensor(w, dtype=torch.float64)))


def worker(impl: str, n: int, p: int, m: int, seed: int, out: str, profile: str | None) -> None:
    import numpy as np
    from threadpoolctl import threadpool_limits

    if impl == "ours":
        import torch

        from harmonize.corex import LinearCorex

        torch.set_num_threads(1)
    else:
        import linearcorex
    with threadpool_limits(limits=1):
        x, groups = _make_data(n, p, m, seed)
        rss_before, maxrss_before = _rss_mib(), _maxrss_mib()
        wall, cpu = time.perf_counter(), time.process_time()
        if impl == "ours":
            model = LinearCorex(n_hidden=m, seed=seed, n_threads=1)
            if profile:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.005)
                profiler.start()
            model.fit(x)
            if profile:
                profiler.stop()
                Path(profile).write_text(profiler.output_text(unicode=False, color=False))
            weights, clusters, tc = model.weights_, model.clusters_, float(model.tc_)
            steps = {"iterations": int(model.n_iter_), "evaluations": int(model.n_evals_)}
        else:
            state = np.random.get_state()  # noqa: NPY002 - the reference reseeds the global RNG; restore it
            model = linearcorex.Corex(n_hidden=m, seed=seed).fit(x)
            np.random.set_state(state)  # noqa: NPY002
            weights, clusters, tc = model.ws, model.clusters(), float(model.tc)
            steps = {"iterations": len(model.history.get("TC", []))}
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        maxrss_after = _maxrss_mib()
    from sklearn.metrics import adjusted_rand_score

    np.save(out + ".clusters.npy", np.asarray(clusters))
    result = {
        "impl": impl, "n": n, "p": p, "m": m, "seed": seed, "fit_wall_s": wall, "fit_cpu_s": cpu,
        "peak_rss_mib": maxrss_after, "rss_before_fit_mib": rss_before, "maxrss_before_fit_mib": maxrss_before,
        "fit_peak_increment_mib": maxrss_after - rss_before, "data_mib": x.nbytes / 2**20,
        "tc_reported": tc, "ari_vs_planted": float(adjusted_rand_score(groups, clusters)), **steps,
    }
    result["tc_float64"] = _rescore(x, weights)
    Path(out + ".json").write_text(json.dumps(result))


# ---- the driver -------------------------------------------------------------------------------------
def _run(impl: str, n: int, p: int, m: int, seed: int, cap: float | None, tmp: str,
         profile: str | None = None) -> dict:
    out = os.path.join(tmp, f"{impl}-{p}")
    env = {**os.environ, **dict.fromkeys(THREAD_VARS, "1"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--p", str(p), "--m", str(m),
           "--seed", str(seed), "--out", out]
    if profile:
        cmd += ["--profile-to", profile]
    print(f"bench_corex: {impl:>4} p={p:>7} ...", end="", flush=True, file=sys.stderr)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        print(f" capped after {cap:.0f} s", file=sys.stderr)
        return {"impl": impl, "n": n, "p": p, "m": m, "capped_after_s": cap}
    if proc.returncode != 0:
        print(" failed", file=sys.stderr)
        return {"impl": impl, "n": n, "p": p, "m": m, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(Path(out + ".json").read_text())
    print(f" {result['fit_wall_s']:.1f} s fit, {result['peak_rss_mib']:.0f} MiB peak "
          f"({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return result


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _table(rows: list[dict], pairs: list[dict]) -> str:
    lines = ["| p | implementation | fit wall (s) | fit CPU (s) | peak RSS (MiB) | fit increment (MiB) | "
             "TC reported | TC float64 | ARI vs planted | iterations (evaluations) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "fit_wall_s" not in r:
            why = f"capped after {r['capped_after_s']:.0f} s" if "capped_after_s" in r else f"failed: {r.get('error')}"
            lines.append(f"| {r['p']:,} | {r['impl']} | {why} | | | | | | | |")
            continue
        evals = f" ({r['evaluations']})" if "evaluations" in r else ""
        name = (
            "harmonize.corex (torch; float32 data products, float64 objective)" if r["impl"] == "ours"
            else "linearcorex 0.53 (numpy, float32)")
        lines.append(f"| {r['p']:,} | {name} | {r['fit_wall_s']:.1f} | {r['fit_cpu_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['fit_peak_increment_mib']:.0f} | {r['tc_reported']:.4f} | "
                     f"{r['tc_float64']:.4f} | {r['ari_vs_planted']:.4f} | {r['iterations']}{evals} |")
    lines += ["", "| p | speed-up, wall (ref / ours) | speed-up, CPU | peak RSS ours / ref | fit increment ours / ref |"
              " TC float64, (ours - ref) / ref | ARI ours vs ref |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in pairs:
        lines.append(f"| {c['p']:,} | {c['speedup_wall']:.2f}x | {c['speedup_cpu']:.2f}x | "
                     f"{c['peak_rss_ratio']:.2f} | {c['increment_ratio']:.2f} | {c['tc_relative_difference']:+.2e} | "
                     f"{c['ari_ours_vs_ref']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="p, both implementations")
    parser.add_argument("--big", type=int, nargs="*", default=[200_000], help="p, ours only (0 or nothing: skip)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--m", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-cap", type=float, default=1800.0, help="time cap (s) of one reference fit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--profile", type=int, default=None, metavar="P", help="profile our fit at this p")
    # internal: one fit in this process
    parser.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    parser.add_argument("--p", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.n, args.p, args.m, args.seed, args.out, args.profile_to)
        return 0

    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": _load(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": sys.version.split()[0], "blas_threads": 1, "n": args.n, "m": args.m, "ref_cap_s": args.ref_cap}
    rows, pairs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            _run("ours", args.n, args.profile, args.m, args.seed, None, tmp, profile=str(out / "corex.profile.txt"))
        for p in args.sizes:
            ours = _run("ours", args.n, p, args.m, args.seed, None, tmp)
            ref = _run("ref", args.n, p, args.m, args.seed, args.ref_cap, tmp)
            rows += [ours, ref]
            if "fit_wall_s" in ours and "fit_wall_s" in ref:
                a = np.load(os.path.join(tmp, f"ours-{p}.clusters.npy"))
                b = np.load(os.path.join(tmp, f"ref-{p}.clusters.npy"))
                pairs.append({
                    "p": p, "speedup_wall": ref["fit_wall_s"] / ours["fit_wall_s"],
                    "speedup_cpu": ref["fit_cpu_s"] / ours["fit_cpu_s"],
                    "peak_rss_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
                    "increment_ratio": ours["fit_peak_increment_mib"] / ref["fit_peak_increment_mib"],
                    "tc_relative_difference": (ours["tc_float64"] - ref["tc_float64"]) / abs(ref["tc_float64"]),
                    "ari_ours_vs_ref": float(adjusted_rand_score(a, b)),
                })
        for p in [b for b in (args.big or []) if b > 0]:
            rows.append(_run("ours", args.n, p, args.m, args.seed, None, tmp))
    meta["load_average_end"] = _load()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "corex.json").write_text(json.dumps({"meta": meta, "fits": rows, "comparisons": pairs}, indent=2))
    table = _table(rows, pairs)
    header = (f"# Linear CorEx benchmark\n\nn = {args.n}, m = {args.m}, one BLAS thread, each fit in its own "
              f"subprocess; {meta['cores']} cores, load average {meta['load_average_start']} at the start and "
              f"{meta['load_average_end']} at the end (a shared machine: wall times move with it).  Run: "
              f"`{Path(sys.executable).name} benchmarks/bench_corex.py`.\n\n")
    (out / "corex.md").write_text(header + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
