"""The stages of a harmonization run as library functions; the CLI and notebooks call these.

    simulate -> ingest -> fit -> apply -> export -> corex -> report

Every stage takes a store path and (where it computes) a distributed Client, and can run alone
on an existing store. `harmonize.runner` runs them as the steps of a pipeline spec (`harmonize run`,
`harmonize demo`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import dask
import numpy as np
from distributed import Client

from harmonize.apply import ApplyResult, apply_model
from harmonize.cluster import PROGRESS_TOPIC, gpu_resources, total_threads
from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.nifti import write_volume
from harmonize.io.store import CohortStore, dump_json, missing_covariates, read_volume
from harmonize.models import MODELS, load_model

__all__ = ["ingest", "fit", "apply", "export", "corex", "current_model", "load_fitted"]  # ingest: re-exported

CURRENT_MODEL = "current.json"


# ---- fit ---------------------------------------------------------------------------------------
def _train_task(store_path: str, kind: str, params: dict, threads: int) -> str:
    """Runs on a worker (a GPU worker when the cluster has one): fit, save next to the store."""
    try:
        from distributed import get_worker

        worker = get_worker()
        report = lambda msg: worker.log_event(PROGRESS_TOPIC, msg)  # noqa: E731
    except ValueError:  # not on a worker
        report = None
    store = CohortStore(store_path)
    model = MODELS[kind](**{"torch_threads": threads, **params})
    # read the cohort inside this task's process (the GPU worker when there is one): otherwise each
    # volume read becomes tasks spread over the cluster (CPU workers) and is shipped back here
    with dask.config.set(scheduler="threads"):
        model.fit(store.dataset(only_ingested=True), progress=report)
    path = store.path / S.MODELS_DIR / f"{kind}-{model.checksum_}"
    model.save(path)
    return str(path)


def fit(store_path: str | os.PathLike, client: Client, kind: str = "invariant", params: dict | None = None,
        progress: bool = True) -> Path:
    """Train a harmonizer on the store's ingested subjects; returns the model folder.

    The invariant model trains as one Dask task (on a GPU worker when the cluster has one); ComBat runs
    as a graph of per-block statistics over the store's chunks. The folder is recorded as the store's
    current model (and current model of its kind), which `apply` uses by default.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {sorted(MODELS)}")
    store = CohortStore(store_path)
    n = int((store.status(S.INGEST_STATUS) == S.DONE).sum())
    if n < 4:
        raise ValueError(f"{store.path} has {n} ingested subject(s); fitting needs at least 2 per site. "
                         "Run `harmonize ingest` first.")
    params = dict(params or {})
    _check_before_fit(store, MODELS[kind](**{k: v for k, v in params.items() if k != "torch_threads"}))
    if kind == "combat":
        from harmonize.fit_graph import fit_combat

        params.pop("torch_threads", None)
        model = fit_combat(store.path, client, params, progress=progress)
        path = model.save(store.path / S.MODELS_DIR / f"{kind}-{model.checksum_}")
        _set_current(store, kind, path)
        return path
    resources = gpu_resources(client)
    # training is the only task running: let it use the cluster's threads when they share a machine
    threads = params.pop("torch_threads", None) or (1 if resources else min(total_threads(client),
                                                                           os.cpu_count() or 1))
    bar = _ProgressBar(desc=f"fit {kind}", enabled=progress)
    client.subscribe_topic(PROGRESS_TOPIC, bar.handle)
    try:
        future = client.submit(_train_task, str(store.path), kind, params, threads, pure=False,
                               resources=resources, key=f"fit-{kind}-{time.time_ns()}")
        path = Path(future.result())
    finally:
        client.unsubscribe_topic(PROGRESS_TOPIC)
        bar.close()
    _set_current(store, kind, path)
    return path


def _check_before_fit(store: CohortStore, model) -> None:
    """What would otherwise fail after minutes of work on a worker: an unknown reference site, subjects
    without the covariates the model keeps. Both name what to change."""
    table = store.table()
    ingested = table[table[S.INGEST_STATUS] == S.DONE]
    sites = sorted(set(ingested[S.SITE].astype(str)))
    reference = getattr(model, "reference_site", None)
    if reference is not None and reference not in sites:
        raise ValueError(f"reference site {reference!r} is not among the store's sites {sites}")
    gaps = missing_covariates(ingested, model.covariates_needed())
    if gaps:
        raise ValueError("; ".join(f"no {name} for {', '.join(f'sub-{s}' for s in subjects[:10])}"
                                   f"{' and more' if len(subjects) > 10 else ''}" for name, subjects in gaps.items())
                         + ". This model keeps age and sex effects: fill them in participants.tsv and rerun "
                           "`harmonize ingest BIDS_DIR STORE` (it updates covariates), or fit the invariant "
                           "model without its calibration (from Python: InvariantHarmonizer(calibrate='none'); the "
                           "CLI has no option for it)")


def _set_current(store: CohortStore, kind: str, path: Path) -> None:
    for name in (CURRENT_MODEL, f"current-{kind}.json"):
        dump_json(store.path / S.MODELS_DIR / name, {"path": os.path.relpath(path, store.path), "kind": kind})


class _ProgressBar:
    def __init__(self, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, desc=desc, unit="step", disable=not enabled, file=sys.stderr)

    def handle(self, event) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        if self.bar.total is None:
            self.bar.total = msg["steps"]
        self.bar.n = msg["step"]
        self.bar.set_postfix({k: f"{msg[k]:.3g}" for k in ("loss", "recon", "kl", "penalty", "site", "val_loss")
                              if k in msg}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def current_model(store_path: str | os.PathLike, kind: str | None = None) -> Path:
    """The store's latest fitted model folder (of `kind`, when given)."""
    store = CohortStore(store_path)
    pointer = store.path / S.MODELS_DIR / (f"current-{kind}.json" if kind else CURRENT_MODEL)
    if not pointer.exists():
        option = f" --model {kind}" if kind else ""
        raise FileNotFoundError(f"{store.path} has no fitted {kind or ''} model yet: run "
                                f"`harmonize fit {store.path}{option}`")
    return (store.path / json.loads(pointer.read_text())["path"]).resolve()


# ---- apply / export ------------------------------------------------------------------------------
def apply(store_path: str | os.PathLike, client: Client, model_dir: str | os.PathLike | None = None,
          reference_site: str | None = None, overwrite: bool = False, progress: bool = True,
          kind: str | None = None, output: str = S.HARMONIZED) -> ApplyResult:
    """Harmonize the store's subjects with `model_dir` (default: the latest fit, of `kind` if given) into
    the volume array `output`."""
    model_dir = model_dir or current_model(store_path, kind)
    return apply_model(store_path, model_dir, client, reference_site, overwrite, progress, output=output)


def _export_one(array_path: str, position: int, grid_attrs: dict, affine: np.ndarray, path: str) -> str:
    from harmonize.io.store import Grid

    write_volume(read_volume(array_path, position), Grid.from_attrs(grid_attrs), affine, path)
    return path


def _desc(output: str) -> str:
    """The BIDS desc label of an output (labels are alphanumeric): harmonized_combat -> harmonizedCombat."""
    return "".join(part.capitalize() if k else part for k, part in enumerate(output.split("_")))


def export_path(out_dir: str | os.PathLike, subject: str, output: str = S.HARMONIZED) -> Path:
    """Where `export` writes a subject's volume of `output`."""
    return Path(out_dir) / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-{_desc(output)}_T1w.nii.gz"


def export(store_path: str | os.PathLike, out_dir: str | os.PathLike, client: Client,
           progress: bool = True, output: str = S.HARMONIZED, subjects: list[str] | None = None) -> list[Path]:
    """Harmonized volumes -> BIDS derivative NIfTI files, each in its subject's original affine.

    `output` picks the store's volume array (`harmonized`, `harmonized_combat`, ...); file names come from
    `export_path`. `subjects`: only these (of those harmonized); default all.
    """
    from harmonize.cluster import gather_with_progress

    store = CohortStore(store_path)
    out = Path(out_dir)
    table = store.table()
    done = np.flatnonzero(store.status(S.status_of(output)) == S.DONE)
    if len(done) == 0:
        raise ValueError(f"{store.path} has no subjects in {output!r} yet: run `harmonize apply` first")
    if subjects is not None:
        wanted = set(subjects)
        done = np.array([i for i in done if table[S.SUBJECT].iat[i] in wanted], dtype=int)
    affines = store.group[S.AFFINE][:]
    grid_attrs = store.grid.to_attrs()
    array_path = store.array_path(output)
    desc = _desc(output)
    futures = []
    for i in done:
        path = export_path(out, table[S.SUBJECT].iat[i], output)
        futures.append(client.submit(_export_one, array_path, int(i), grid_attrs, affines[i], str(path),
                                     pure=False))
    paths = [Path(p) for p in gather_with_progress(client, futures, "export", show=progress)]
    attrs = store.group[output].attrs
    target = f"site {attrs.get('reference_site')}" if attrs.get("reference_site") else "the pooled sites"
    entry = {"Name": "harmonize", "Description": f"desc-{desc}: {attrs.get('model_kind')} model "
             f"{attrs.get('model_checksum')}, harmonized to {target}"}
    # several outputs may be exported into one folder: keep one entry per desc label, not the last one only
    description = out / "dataset_description.json"
    previous = json.loads(description.read_text()).get("GeneratedBy", []) if description.exists() else []
    generated = [g for g in previous if not str(g.get("Description", "")).startswith(f"desc-{desc}:")] + [entry]
    dump_json(description, {"Name": "harmonize output", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                            "GeneratedBy": generated})
    return paths


# ---- corex ------------------------------------------------------------------------------------
def corex(store_path: str | os.PathLike, client: Client, n_factors: int = 4, n_regions: int = 48,
          restarts: int = 3, source: str = S.HARMONIZED, progress: bool = True, *, features: str = "regions",
          downsample: int = 3, device: str = "cpu", n_permutations: int = 999, seed: int = 0,
          max_iter: int = 2000) -> dict:
    """Linear CorEx factors of `source` (harmonized by default) + a site-leakage audit; results in the store.

    Features (see harmonize.features): ``"regions"`` (mean intensity per region of the store's parcellation,
    made and stored on first use) or ``"voxels"`` (brain intensity block-averaged by ``downsample`` per side).
    ``restarts`` seeds (``seed``, ``seed + 1``, ...) run as parallel Dask tasks; the highest TC bound is kept
    and the spread reported.  The fitted factors are then applied to the raw images too, and for both inputs
    each factor score (and all together) is tested for site information (``harmonize.corex.
    site_leakage_audit``); a factor that tracks site after harmonization is flagged.
    """
    from harmonize.cluster import gpu_resources
    from harmonize.corex import fit_restarts, site_leakage_audit
    from harmonize.features import FEATURE_KINDS, feature_set, make_parcellation

    if features not in FEATURE_KINDS:
        raise ValueError(f"unknown features {features!r}; choose from {list(FEATURE_KINDS)}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1; got {restarts}")
    store = CohortStore(store_path)
    if source != S.IMAGES and source not in store.group:
        raise ValueError(f"{store.path} has no {source!r} array yet: run `harmonize apply {store.path}` first, "
                         "or run CorEx on the raw images with --source images")
    positions = np.flatnonzero(store.status(S.status_of(source)) == S.DONE)
    if len(positions) < 5:
        raise ValueError(f"{store.path}: {len(positions)} subject(s) have {source}; CorEx needs at least 5")
    labels = None
    if features == "regions":
        if S.PARCELLATION in store.group:
            labels = store.group[S.PARCELLATION][...]
        else:
            labels = make_parcellation(store.mask(), store.grid.affine, n_regions)
            store.write_small(S.PARCELLATION, labels, S.SPATIAL_DIMS, {"method": "kmeans-mirrored",
                                                                        "n_regions": int(labels.max())})
    options = {"labels": labels, "mask": store.mask(), "factor": downsample, "progress": progress}
    # the audit's inputs: "raw" (images) before harmonization, the fitted source after it
    names = {S.IMAGES: "raw"} if source == S.IMAGES else {S.IMAGES: "raw", source: source}
    inputs = {name: feature_set(features, store.array_path(array), positions, client, **options)
              for array, name in names.items()}
    subjects = store.table()[S.SUBJECT].to_numpy()[positions]
    for array, name in names.items():
        bad = ~np.isfinite(inputs[name].values).all(axis=1)
        if bad.any():
            raise ValueError(f"{array}: non-finite {features} features for subject(s) {list(subjects[bad][:10])}; "
                             f"check those volumes (re-run `harmonize {'ingest' if array == S.IMAGES else 'apply'}`)")
    fitted = inputs[names[source]]
    resources = gpu_resources(client) if str(device).startswith("cuda") else None
    result = fit_restarts(fitted.values, n_factors, seeds=range(seed, seed + restarts), client=client,
                          resources=resources, device=device, max_iter=max_iter)
    model = result.best
    table = store.table()
    covariates = {k: table[k].to_numpy()[positions] for k in (S.SITE, S.AGE, S.SEX)}
    audit, scores = {}, {}
    for name, feats in inputs.items():
        if name == names[source]:
            scores[name] = model.transform(feats.values)
        else:  # the same weights on the raw features standardized over all subjects: units drop out, sites stay
            mean, std = feats.values.mean(axis=0), feats.values.std(axis=0)
            scores[name] = ((feats.values - mean) / np.where(std > 0, std, 1.0)) @ model.weights_.T
        audit[name] = site_leakage_audit(scores[name], covariates[S.SITE], covariates[S.AGE], covariates[S.SEX],
                                         n_permutations=n_permutations, seed=seed)

    def full(values: np.ndarray) -> np.ndarray:
        out = np.full((store.n_subjects, values.shape[1]), np.nan)
        out[positions] = values
        return out

    subject_attrs = {"coordinates": " ".join(S.SUBJECT_COORDS)}
    store.write_small(S.COREX_SCORES, full(scores[names[source]]), (S.SUBJECT, S.FACTOR),
                      {**subject_attrs, "source": source})
    if source != S.IMAGES:
        store.write_small(S.COREX_RAW_SCORES, full(scores["raw"]), (S.SUBJECT, S.FACTOR),
                          {**subject_attrs, "source": S.IMAGES})
    elif S.COREX_RAW_SCORES in store.group:
        del store.group[S.COREX_RAW_SCORES]  # a stale audit baseline from an earlier run
    store.write_small(S.COREX_WEIGHTS, model.weights_, (S.FACTOR, S.FEATURE))
    store.write_small(S.COREX_LOADINGS, model.loadings_, (S.FACTOR, S.FEATURE))
    store.write_small(S.COREX_FEATURE_MAP, fitted.feature_map, S.SPATIAL_DIMS, {"features": features})
    summary = {"source": source, "features": features, "feature_info": fitted.info, "tc": float(model.tc_),
               "n_subjects": int(len(positions)), "n_features": int(fitted.values.shape[1]),
               "n_iter": int(model.n_iter_), "converged": bool(model.converged_), "restarts": result.summary(),
               "audit": audit, "flagged": audit[names[source]]["flagged_factors"] if source != S.IMAGES else []}
    store.write_small(S.COREX_TCS, np.asarray(model.tcs_), (S.FACTOR,), summary)
    return {**summary, "tcs": list(map(float, model.tcs_))}


def load_fitted(store_path: str | os.PathLike):
    return load_model(current_model(store_path))
