"""Held-out evaluation of the invariant model over seeds and resolutions (harmonize.evaluate).

    .venv/bin/python benchmarks/bench_invariant.py                          # seeds 0,1,2 x 4 and 3 mm
    .venv/bin/python benchmarks/bench_invariant.py --seeds 0 --resolutions 4 --steps 50 --out /tmp/b   # smoke run

Per configuration (seed, resolution): a simulated traveling-subject cohort (4 ABIDE sites x 20 subjects), a
site-stratified half/half train/test split, ComBat and the invariant model (lam = 0 and the default lam, the
model's default steps) fitted on the train half, every number on the test half: see harmonize/evaluate.py.
Configurations run one after another in this process, with one torch thread and one BLAS thread (on a shared
2-core machine two threads that wait for each other's core ran 15x slower than one).

Why not 2 mm or 1 mm: training costs the same at every resolution (fixed 16³ crops), but simulating,
ingesting, harmonizing and encoding scale with the voxels (2 mm: 8x the 4 mm grid, 1 mm: 64x), and the
whole benchmark is kept under ~30 minutes on the 2-core machine; the README's demo numbers are at 2 mm.

Results: <out>/invariant.json (every configuration's numbers, the mean ± sd over configurations, and how many
configurations pass each target) and <out>/invariant.md (the tables). Default out: benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--resolutions", default="4,3", help="mm, comma-separated")
    parser.add_argument("--subjects-per-site", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the model's)")
    parser.add_argument("--lam", type=float, default=None, help="the chosen lam (default: the model's)")
    parser.add_argument("--params", default="{}", help="extra InvariantHarmonizer parameters, JSON (both fits)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="invariant", help="result file stem")
    parser.add_argument("--keep", default=None, help="keep each configuration's folder (figures, models) here")
    args = parser.parse_args(argv)

    from harmonize import evaluate as ev

    seeds = [int(s) for s in args.seeds.split(",")]
    resolutions = [float(r) for r in args.resolutions.split(",")]
    params = json.loads(args.params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-invariant-"))
    started, load_start = time.perf_counter(), _load()
    configs = []
    try:
        for res in resolutions:
            for seed in seeds:
                t = time.perf_counter()
                folder = scratch / f"res{res:g}-seed{seed}"
                numbers = ev.evaluate(folder, seed=seed, resolution_mm=res, subjects_per_site=args.subjects_per_site,
                                      steps=args.steps, lam=args.lam, torch_threads=args.threads,
                                      model_params=params, log=lambda m: print(m, file=sys.stderr, flush=True))
                numbers["wall_s"] = time.perf_counter() - t
                configs.append(numbers)
                passed = sum(v["pass"] for v in numbers["targets"].values())
                print(f"{res:g} mm seed {seed}: {numbers['wall_s']:.0f} s, {passed}/{len(numbers['targets'])} "
                      "targets pass", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    total = time.perf_counter() - started
    by_res = {f"{r:g} mm": ev.summarize([c for c in configs if c["config"]["resolution_mm"] == r])
              for r in resolutions}
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_start": load_start, "load_end": _load()},
              "command": _command(argv if argv is not None else sys.argv[1:]),
              "total_s": total, "summary": ev.summarize(configs), "by_resolution": by_res,
              "configs": [{k: v for k, v in c.items() if k != "figures"} for c in configs]}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=float))
    (out / f"{args.name}.md").write_text(_markdown(result, ev))
    print(_markdown(result, ev))
    return 0


def _command(argv: list[str]) -> str:
    """The command line, without --keep/--out folders (no paths of this machine in the results)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--keep", "--out"):
            skip = True
            continue
        if not arg.startswith(("--keep=", "--out=")):
            shown.append(arg)
    return " ".join(["python benchmarks/bench_invariant.py", *shown])


def _markdown(result: dict, ev) -> str:
    first = result["configs"][0]["config"]
    extra = {k: v for k, v in first["model_params"].items() if k not in ("reference_site", "seed")}
    lines = [
        "# Invariant model: held-out evaluation on simulated traveling-subject cohorts", "",
        f"`{result['command']}` — {len(result['configs'])} configurations in {result['total_s'] / 60:.1f} min on "
        f"{result['machine']['cpus']} cores (load average {result['machine']['load_start']} at the start, "
        f"{result['machine']['load_end']} at the end; a shared machine, so wall times move with it).", "",
        f"Each configuration: sites {', '.join(first['sites'])} (reference {first['reference_site']}), "
        f"{first['subjects_per_site']} subjects per site, half train / half test (stratified by site, seeded); "
        f"ComBat and the invariant model with lam = 0 and lam = {first['lam']:g} ({first['steps']} steps, "
        f"otherwise the model's defaults{', ' + str(extra) if extra else ''}; the model's seed = the cohort's) "
        "fitted on the train half; every number on the test half. Sex coef.: male − female coefficient of the "
        "GM/WM contrast on age + sex, × the ground truth's on the same subjects. z→site: cross-validated "
        "accuracy (folds grouped by subject) of predicting site from the model's posterior means at "
        f"{first['z_per_site']} voxels per site; chance {1 / len(first['sites']):.2f}.", "",
        "## Mean ± sd over all configurations", "", ev.summary_markdown(result["summary"]), ""]
    for name, summary in result["by_resolution"].items():
        lines += [f"## {name}: mean ± sd over seeds", "", ev.summary_markdown(summary), ""]
    lines += ["## Every configuration", ""]
    for c in result["configs"]:
        cfg = c["config"]
        lines += [f"### {cfg['resolution_mm']:g} mm, seed {cfg['seed']}: {c['wall_s']:.0f} s "
                  f"(fits: {', '.join(f'{k} {v:.0f} s' for k, v in c['timings_s'].items() if k.startswith('fit'))}; "
                  f"stopped at {cfg['stopped_at']})", "",
                  ev.TABLE_HEAD, *ev.table_rows(c), "", *ev.targets_lines(c["targets"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
