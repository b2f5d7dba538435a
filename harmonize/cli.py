"""`harmonize` command line: parse arguments, call the library (harmonize.pipeline), print results.

Exit codes: 0 ok; 1 the run failed (message on stderr); 2 bad usage (or a bad pipeline spec); 3 done,
but some inputs were rejected or some subjects failed (each listed with its reason in the summary);
75 (`run`) another run is working on the store, nothing was done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_LOCKED = 0, 1, 2, 3, 75

_CLUSTER_HELP = ("cluster spec: a YAML file from cluster/, 'local', or a scheduler address "
                 "(default: $HARMONIZE_SCHEDULER, else a LocalCluster on 127.0.0.1)")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None, metavar="SPEC", help=_CLUSTER_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmonize",
        description="Remove scanner (site) effects from multi-site T1w MRI. Stages, each runnable alone: "
                    "simulate -> ingest -> fit -> apply -> export -> corex -> report; `demo` runs them all.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline spec (pipelines/*.yaml): new subjects only; resumable",
                       description="Run the steps of a pipeline spec on whatever is new in its input folder: "
                                   "ingest new subjects, fit a model only when needed, harmonize and export the "
                                   "subjects without results, report. A run with nothing new does nothing; a "
                                   "killed run is finished by the next. Writes STORE/runs/<id>/run.json. Exit "
                                   "codes: 0 ok or nothing new, 3 some inputs set aside or subjects failed, "
                                   "1 the run failed, 2 the spec is invalid, 75 another run holds the store.")
    p.add_argument("spec", help="a pipeline spec YAML file (start from pipelines/nightly.yaml)")
    p.add_argument("--refit", action="store_true", help="fit every model of the spec again (e.g. after a new site)")
    _add_cluster(p)

    p = sub.add_parser("demo", help="run the whole job on a simulated multi-site cohort from real anatomy",
                       description="Simulate a cohort (MNI152 anatomy, ABIDE scanner metrics), then run "
                                   "pipelines/demo.yaml on it: ingest into a Zarr store, fit ComBat and the "
                                   "site-invariant model, apply them with Dask, export NIfTI, run CorEx and "
                                   "write a report. Prints where the report is.")
    p.add_argument("--workdir", default="harmonize-demo", help="folder for the cohort, store and report")
    p.add_argument("--subjects-per-site", type=int, default=10)
    p.add_argument("--resolution", type=float, default=2.0, help="mm (2 is the default; 1 is slow)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    _add_cluster(p)

    p = sub.add_parser("simulate", help="write a simulated BIDS cohort + traveling-subject ground truth")
    p.add_argument("out_dir")
    p.add_argument("--sites", default="NYU,UM,USM,UCLA", help="ABIDE sites whose scanner metrics to use")
    p.add_argument("--subjects-per-site", type=int, default=10)
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("ingest", help="validate NIfTI files of a BIDS folder and write them into a store",
                       description="Reads BIDS_DIR/participants.tsv (participant_id, site, age, sex) and "
                                   "sub-*/anat/sub-*_T1w.nii[.gz]. Bad files are reported and set aside; "
                                   "rerunning adds only new subjects.")
    p.add_argument("bids_dir")
    p.add_argument("store")
    _add_cluster(p)

    p = sub.add_parser("fit", help="train a harmonizer on the store (invariant: a Dask task, on a GPU worker if "
                                   "any; combat: a Dask graph over the store's chunks)",
                       description="Train a harmonizer on the store's ingested subjects and record it as the "
                                   "store's current model. --model invariant (default): the site-invariant "
                                   "conditional VAE. --model combat: voxel-wise ComBat (empirical Bayes, age and "
                                   "sex effects kept), harmonizing to --reference-site or, without one, to the "
                                   "pooled sites.")
    p.add_argument("store")
    p.add_argument("--model", default="invariant", choices=["invariant", "combat"])
    p.add_argument("--reference-site", default=None,
                   help="site to harmonize to (invariant default: first by name; combat default: pooled sites)")
    p.add_argument("--steps", type=int, default=None, help="invariant: training steps")
    p.add_argument("--lam", type=float, default=None, help="invariant: weight of the information penalty")
    p.add_argument("--seed", type=int, default=None, help="invariant: random seed")
    _add_cluster(p)

    p = sub.add_parser("apply", help="harmonize every ingested subject with the fitted model (Dask graph)")
    p.add_argument("store")
    p.add_argument("--reference-site", default=None)
    p.add_argument("--model", default=None, choices=["invariant", "combat"],
                   help="use the latest fit of this kind (default: the store's latest fit of any kind)")
    p.add_argument("--model-dir", default=None, help="a saved model folder (overrides --model)")
    p.add_argument("--output", default="harmonized",
                   help="volume array to write: 'harmonized' (default) or 'harmonized_<name>' to keep "
                        "a second model's output beside it")
    p.add_argument("--overwrite", action="store_true", help="recompute subjects already harmonized")
    _add_cluster(p)

    p = sub.add_parser("export", help="write harmonized volumes as BIDS-derivative NIfTI files")
    p.add_argument("store")
    p.add_argument("out_dir")
    p.add_argument("--output", default="harmonized", help="which harmonized array to export")
    _add_cluster(p)

    p = sub.add_parser("corex", help="Linear CorEx factors + site-leakage audit, written into the store",
                       description="Linear CorEx factors of regional or downsampled voxel features of the "
                                   "harmonized (or raw) images, restarts as parallel Dask tasks; the factors "
                                   "are applied to the raw images too and each is tested for site information "
                                   "(cross-validated accuracy + permutation test). Results go into the store "
                                   "(corex_* arrays) and into the next `harmonize report`.")
    p.add_argument("store")
    p.add_argument("--factors", type=int, default=4, help="number of latent factors (default 4)")
    p.add_argument("--features", choices=["regions", "voxels"], default="regions",
                   help="regions: mean intensity per parcellation region; voxels: brain intensity "
                        "block-averaged on a coarser grid (default regions)")
    p.add_argument("--downsample", type=int, default=3, metavar="FACTOR",
                   help="voxels per block side for --features voxels (3: 2 mm -> 6 mm)")
    p.add_argument("--regions", type=int, default=48, help="regions of a new parcellation (default 48)")
    p.add_argument("--source", default="harmonized",
                   help="array to fit on: harmonized (default), images (raw), or another output such as "
                        "harmonized_combat")
    p.add_argument("--restarts", type=int, default=3, help="random restarts, run as parallel Dask tasks")
    p.add_argument("--device", default="cpu", help="torch device for the fit: cpu (default) or cuda")
    p.add_argument("--permutations", type=int, default=999, help="site-label permutations of the audit")
    p.add_argument("--max-iter", type=int, default=2000,
                   help="L-BFGS iterations per annealing stage (raise it if CorEx warns that it did not converge)")
    p.add_argument("--seed", type=int, default=0)
    _add_cluster(p)

    p = sub.add_parser("evaluate", help="held-out evaluation on simulated traveling-subject cohorts: raw, ComBat, "
                                        "invariant (lam = 0 and chosen), ground truth",
                       description="For each seed: simulate a cohort, split its subjects into train and test "
                                   "(stratified by site), fit ComBat and the invariant model with lam = 0 and with "
                                   "--lam on the train subjects only, and score the test subjects: site "
                                   "predictability, age R², sex effect, PSNR against the ground truth, seams, and "
                                   "site classifiers on the model's latent z. Writes OUT/seed-<s>/evaluate.{json,md} "
                                   "and figures; prints the tables and the targets.")
    p.add_argument("--out", default="harmonize-evaluate", help="folder for the results (and the work files)")
    p.add_argument("--seeds", default="0", help="comma-separated cohort/model seeds (default 0)")
    p.add_argument("--resolution", type=float, default=4.0, help="mm (default 4)")
    p.add_argument("--subjects-per-site", type=int, default=20, help="half train, half test (default 20)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's)")
    p.add_argument("--lam", type=float, default=None, help="information-penalty weight of the chosen model "
                                                           "(default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")

    p = sub.add_parser("report", help="report.json + report.html: site leakage, age R², fidelity, CorEx")
    p.add_argument("store")
    p.add_argument("--groundtruth", default=None, help="folder of ground-truth images (simulated cohorts)")
    p.add_argument("--out", default=None, help="report folder (default: STORE/reports/<time>)")
    return parser


def _run(args) -> int:
    from harmonize import pipeline
    from harmonize.cluster import use_client

    show = not getattr(args, "quiet", False)
    if args.command == "run":
        return _run_spec(args, show)
    if args.command == "demo":
        from harmonize import runner
        from harmonize.report import fidelity_text
        from harmonize.simulate import CohortSpec

        cohort = CohortSpec(subjects_per_site=args.subjects_per_site, resolution_mm=args.resolution, seed=args.seed)
        params = {"steps": args.steps} if args.steps else {}
        record = runner.demo(args.workdir, cohort, cluster_spec=args.cluster, fit_params=params, progress=show)
        if record.exit_code not in (EXIT_OK, EXIT_REJECTED):
            print(record.summary(), file=sys.stderr)
            return record.exit_code
        report = runner.latest_report(Path(args.workdir) / "cohort.zarr")
        if record.status == "nothing new":
            print(f"demo: nothing new in {args.workdir} (already harmonized); the report of the run that made it:")
        if report is None:
            print(record.summary())
            return record.exit_code

        numbers = json.loads((report / "report.json").read_text())
        for name, entry in numbers["images"].items():
            sp, fid = entry["site_predictability"], entry.get("fidelity", {})
            print(f"  {name:>22}: site accuracy {sp['accuracy']:.2f} (chance {sp['chance']:.2f}), "
                  f"age R² {entry['age_r2']['r2']:.2f}, "
                  f"PSNR vs ground truth {fidelity_text(fid, 'psnr_mean', '.1f')} dB")
        print(f"report: {report / 'report.html'}")
        return EXIT_OK
    if args.command == "simulate":
        from harmonize.simulate import CohortSpec, simulate_cohort

        spec = CohortSpec(sites=tuple(args.sites.split(",")), subjects_per_site=args.subjects_per_site,
                          resolution_mm=args.resolution, seed=args.seed)
        out = simulate_cohort(args.out_dir, spec, progress=show)
        print(f"cohort: {out['bids_dir']}\nground truth (not for the pipeline): {out['groundtruth_dir']}")
        return EXIT_OK
    if args.command == "evaluate":
        return _evaluate(args, show)
    if args.command == "report":
        from harmonize.report import make_report

        out = make_report(args.store, groundtruth_dir=args.groundtruth, out_dir=args.out)
        print(f"report: {Path(out) / 'report.html'}")
        return EXIT_OK
    with use_client(spec=args.cluster, quiet=not show) as client:
        if args.command == "ingest":
            from harmonize.ingest import ingest

            result = ingest(args.bids_dir, args.store, client, progress=show)
            print(result.summary())
            return EXIT_REJECTED if result.rejected else EXIT_OK
        if args.command == "fit":
            given = (("reference_site", args.reference_site), ("steps", args.steps), ("lam", args.lam),
                     ("seed", args.seed))
            if args.model == "combat":
                ignored = ["--" + k.replace("_", "-") for k, v in given[1:] if v is not None]
                if ignored:
                    print(f"harmonize fit: error: {', '.join(ignored)} only apply to --model invariant; "
                          "ComBat takes --reference-site only", file=sys.stderr)
                    return EXIT_USAGE
            params = {k: v for k, v in given if v is not None}
            path = pipeline.fit(args.store, client, args.model, params, progress=show)
            print(f"model: {path}")
            return EXIT_OK
        if args.command == "apply":
            result = pipeline.apply(args.store, client, args.model_dir, args.reference_site, args.overwrite,
                                    progress=show, kind=args.model, output=args.output)
            print(result.summary())
            return EXIT_REJECTED if result.rejected or result.failed else EXIT_OK
        if args.command == "export":
            paths = pipeline.export(args.store, args.out_dir, client, progress=show, output=args.output)
            print(f"export: {len(paths)} file(s) in {args.out_dir}")
            return EXIT_OK
        if args.command == "corex":
            out = pipeline.corex(args.store, client, n_factors=args.factors, n_regions=args.regions,
                                 restarts=args.restarts, source=args.source, progress=show, features=args.features,
                                 downsample=args.downsample, device=args.device,
                                 n_permutations=args.permutations, seed=args.seed, max_iter=args.max_iter)
            spread = out["restarts"]
            print(f"corex: TC {out['tc']:.3f} over {out['n_features']} features ({out['features']}), "
                  f"{out['n_subjects']} subjects; per factor {[round(t, 3) for t in out['tcs']]}; "
                  f"{len(spread['tcs'])} restart(s), TC range {spread['tc_range']:.3g}")
            for name, audit in out["audit"].items():
                joint = audit["all"]
                if joint["site_accuracy"] is not None:
                    print(f"  {name:>12}: site accuracy from all factors {joint['site_accuracy']:.2f} "
                          f"(chance {audit['chance']:.2f}, p={joint['p_value']:.3g}); factors tracking site: "
                          f"{audit['flagged_factors'] or 'none'}")
            if out["flagged"]:
                print(f"corex: factor(s) {out['flagged']} still track site after harmonization (see the report)")
            return EXIT_OK
    raise AssertionError(args.command)


def _evaluate(args, show: bool) -> int:
    from harmonize import evaluate
    from harmonize.io.store import dump_json

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise ValueError
    except ValueError:
        print(f"harmonize evaluate: error: --seeds takes comma-separated integers, got {args.seeds!r}",
              file=sys.stderr)
        return EXIT_USAGE
    log = (lambda m: print(f"harmonize evaluate: {m}", file=sys.stderr)) if show else None
    results = []
    for seed in seeds:
        out = Path(args.out) / f"seed-{seed}"
        results.append(evaluate.evaluate(out, seed=seed, resolution_mm=args.resolution,
                                         subjects_per_site=args.subjects_per_site, steps=args.steps, lam=args.lam,
                                         log=log))
        print(evaluate.markdown(results[-1]))
        print(f"results: {out / 'evaluate.md'}\n")
    if len(results) > 1:
        summary = evaluate.summarize(results)
        dump_json(Path(args.out) / "summary.json", summary)
        (Path(args.out) / "summary.md").write_text(evaluate.summary_markdown(summary) + "\n")
        print(f"over {len(results)} seeds (mean ± sd):\n")
        print(evaluate.summary_markdown(summary))
    return EXIT_OK


def _run_spec(args, show: bool) -> int:
    from harmonize import runner
    from harmonize.spec import PipelineSpecError, load_pipeline

    try:
        spec = load_pipeline(args.spec, overrides={"cluster": args.cluster} if args.cluster else None)
    except PipelineSpecError as exc:
        print(f"harmonize run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        record = runner.run(spec, refit=args.refit, progress=show)
    except runner.RunLocked as exc:
        print(f"harmonize run: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    print(record.summary())
    return record.exit_code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("harmonize: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"harmonize {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
