"""The graph layer: map a fitted harmonizer over a store's chunks with Dask and write the result back.

Per subject: `images[i]` (chunks of the store) -> overlap by the model's halo (zeros beyond the grid)
-> one task per chunk runs the model on chunk + halo and returns the chunk -> written to the same
chunk of `harmonized[i]`. Every write covers exactly one Zarr chunk, so concurrent writers never
share a chunk and a rerun (or a task the scheduler re-runs after a worker died) rewrites the same
bytes. The model is loaded once per worker process (cached by its checksum), never shipped inside
the graph. `harmonized_status` is set only after a subject's writes have all finished.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from distributed import Client

from harmonize.cluster import gpu_resources
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, missing_covariates, read_volume
from harmonize.models import load_model, model_checksum
from harmonize.models.voxel_combat import covariate_frame

_CACHE: dict[str, object] = {}
_CACHE_LOCK = threading.Lock()
LOADS = {"count": 0}  # per process: how many times a model file was read (tests check "once per worker")


def cached_model(model_dir: str, checksum: str):
    """The model at `model_dir`, loaded at most once per process for a given checksum."""
    with _CACHE_LOCK:
        model = _CACHE.get(checksum)
        if model is None:
            model = load_model(model_dir)
            if model.checksum_ != checksum:
                raise RuntimeError(f"model at {model_dir} changed while applying (checksum "
                                   f"{model.checksum_}, expected {checksum}); rerun apply")
            _CACHE.clear()  # one model per worker at a time keeps memory flat
            _CACHE[checksum] = model
            LOADS["count"] += 1
        return model


def load_count() -> int:
    return LOADS["count"]


def _subject_context(model_dir: str, checksum: str, images_path: str, position: int, mask: np.ndarray,
                     site: str, covariates: dict) -> dict:
    """Worker task for models whose per-subject context reads the whole volume (an intensity reference)."""
    model = cached_model(model_dir, checksum)
    return model.subject_context(site, covariates, read_volume(images_path, position), mask)


def _harmonize_chunk(block: np.ndarray, model_dir: str, checksum: str, context: dict,
                     reference_site: str | None, halo: int, block_info=None) -> np.ndarray:
    model = cached_model(model_dir, checksum)
    location = block_info[None]["array-location"][1:]
    spatial = tuple(slice(a, b) for a, b in location)
    out = model.harmonize_block(block[0], context, spatial, reference_site)
    return out[None]


def harmonized_graph(images: da.Array, mask: da.Array, model_dir: str, checksum: str, halo: int,
                     context: dict, reference_site: str | None) -> da.Array:
    """Lazy harmonized volume (1, x, y, z) for one subject's `images[i:i+1]` (chunked like the store)."""
    images = images.rechunk(_merge_small_chunks(images.chunks, halo))
    depth = {0: 0, 1: halo, 2: halo, 3: halo}
    boundary = {0: "none", 1: 0.0, 2: 0.0, 3: 0.0}
    padded = da.overlap.overlap(images, depth=depth, boundary=boundary) if halo else images
    out = padded.map_blocks(_harmonize_chunk, model_dir, checksum, context, reference_site, halo,
                            chunks=images.chunks, dtype=np.float32, meta=np.empty((0, 0, 0, 0), np.float32))
    return out * mask.rechunk(images.chunks[1:])[None].astype(np.float32)


def _merge_small_chunks(chunks: tuple[tuple[int, ...], ...], halo: int) -> tuple[tuple[int, ...], ...]:
    """Merge a trailing chunk thinner than the halo into its neighbour.

    dask's overlap would otherwise rechunk on its own and the output blocks would no longer line
    up with the store's chunks; merging whole chunks keeps every write aligned to Zarr chunks.
    """
    out = []
    for axis in chunks:
        axis = list(axis)
        while len(axis) > 1 and axis[-1] < halo:
            axis[-2:] = [axis[-2] + axis[-1]]
        out.append(tuple(axis))
    return tuple(out)


@dataclass
class ApplyResult:
    model_dir: str
    reference_site: str
    harmonized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # set aside before any work, with the reason
    failed: list[dict] = field(default_factory=list)  # processing raised; the rest went on

    def summary(self) -> str:
        lines = [f"apply: {len(self.harmonized)} subject(s) harmonized to {self.reference_site}, "
                 f"{len(self.skipped)} already done with this model, {len(self.rejected)} set aside"
                 + (f", {len(self.failed)} failed" if self.failed else "")]
        lines += [f"  set aside sub-{r['subject']}: {r['reason']}" for r in self.rejected]
        lines += [f"  failed sub-{r['subject']}: {r['reason']}" for r in self.failed]
        return "\n".join(lines)


def apply_model(store_path: str | os.PathLike, model_dir: str | os.PathLike, client: Client,
                reference_site: str | None = None, overwrite: bool = False,
                progress: bool = True, output: str = S.HARMONIZED) -> ApplyResult:
    """Harmonize every ingested subject of the store not yet harmonized with this model/reference.

    Results go to the volume array `output` (`harmonized`, or e.g. `harmonized_combat` for a second model
    kept beside the first), each subject's status to `<output>_status` after its chunks are written.
    """
    if not S.is_output(output):
        raise ValueError(f"output {output!r} must be 'harmonized' or start with 'harmonized_'")
    store = CohortStore(store_path)
    model_dir = str(Path(model_dir).resolve())
    checksum = model_checksum(model_dir)
    model = load_model(model_dir)
    reference = reference_site or model.reference_site_
    model.check_reference(reference)  # fails early, with what is allowed, if the reference is not
    identity = {"model_checksum": checksum, "model_kind": model.kind, "reference_site": reference,
                "model_dir": os.path.relpath(model_dir, store.path)}
    status = S.status_of(output)
    target = store.ensure_volume_array(output)
    previous = {k: target.attrs.get(k, "unset") for k in ("model_checksum", "reference_site")}
    table = store.table()
    if overwrite or previous["model_checksum"] not in ("unset", checksum) or (
            previous["reference_site"] not in ("unset", reference)):
        # another model/reference: every subject's harmonized data is stale, say so before writing
        store.set_field(status, np.arange(len(table)), [S.PENDING] * len(table))
        table = store.table()
    target.attrs.update(identity)
    ingested = table[S.INGEST_STATUS].to_numpy() == S.DONE
    todo = np.flatnonzero(ingested & (table[status].to_numpy() != S.DONE))
    target_name = f"site {reference}" if reference else "the pooled sites"
    result = ApplyResult(model_dir=model_dir, reference_site=target_name,
                         skipped=table[S.SUBJECT][ingested & ~np.isin(np.arange(len(table)), todo)].tolist())
    set_aside: dict[str, str] = {}
    known = set(model.sites_)
    for i in todo:  # a site the model never saw (new scanner since the fit): that subject waits for a refit
        site = str(table[S.SITE].iat[i])
        if site not in known:
            set_aside[str(table[S.SUBJECT].iat[i])] = (
                f"site {site!r} is not one the model was trained on ({', '.join(model.sites_)}); refit the model "
                "with this site's subjects (`harmonize fit STORE`, or `harmonize run SPEC --refit`)")
    gaps = missing_covariates(table.iloc[todo], model.covariates_needed())
    lacking: dict[str, list[str]] = {}
    for name, subjects in gaps.items():  # this model keeps each subject's own age/sex effects
        for subject in subjects:
            lacking.setdefault(subject, []).append(name)
    for subject, names in lacking.items():
        set_aside.setdefault(subject, f"no {' or '.join(names)} in the store: fill it in participants.tsv and "
                                      "rerun `harmonize ingest`, then apply again")
    result.rejected = [{"subject": s, "reason": r} for s, r in sorted(set_aside.items())]
    todo = np.array([i for i in todo if str(table[S.SUBJECT].iat[i]) not in set_aside], dtype=int)
    if len(todo) == 0:
        return result
    mask = store.mask()
    images_path = store.array_path(S.IMAGES)
    resources = gpu_resources(client) if model.uses_gpu else None
    sites = [str(table[S.SITE].iat[i]) for i in todo]
    covariates = covariate_frame(table.iloc[todo], [S.AGE, S.SEX]).to_dict("records")
    if model.needs_volume_context:
        mask_future = client.scatter(mask, broadcast=True, hash=False)  # a fresh key: no race with a release
        context_futures = [client.submit(_subject_context, model_dir, checksum, images_path, int(i), mask_future,
                                          site, cov, pure=False, resources=resources)
                           for i, site, cov in zip(todo, sites, covariates, strict=True)]
        index_of = {f.key: k for k, f in enumerate(context_futures)}
        contexts = [None] * len(todo)
        for future, error in _as_finished(context_futures, "subject context", progress):
            k = index_of[future.key]
            if error is None:
                contexts[k] = future.result()
            else:  # this subject's images cannot be read: record it, the others go on
                i = int(todo[k])
                store.set_field(status, [i], [S.REJECTED])
                result.failed.append({"subject": str(table[S.SUBJECT].iat[i]),
                                      "reason": f"{type(error).__name__}: {error}"})
        keep = [k for k, c in enumerate(contexts) if c is not None]
        todo, contexts = todo[keep], [contexts[k] for k in keep]
    else:  # from the covariate table alone: errors (a missing covariate) name the subject here
        contexts = []
        for i, site, cov in zip(todo, sites, covariates, strict=True):
            try:
                contexts.append(model.subject_context(site, cov))
            except ValueError as exc:
                raise ValueError(f"sub-{table[S.SUBJECT].iat[i]}: {exc}") from exc
    images = da.from_zarr(zarr.open_array(images_path, mode="r"))
    mask_da = da.from_array(mask, chunks=store.chunks)
    target = zarr.open_array(store.array_path(output), mode="r+")
    halo = int(model.halo)
    futures = []
    for i, context in zip(todo, contexts, strict=True):
        lazy = harmonized_graph(images[i:i + 1], mask_da, model_dir, checksum, halo, context, reference)
        region = (slice(int(i), int(i) + 1),) + (slice(None),) * 3
        write = da.store(lazy, target, regions=region, lock=False, compute=False)
        # resources on compute(): dask.annotate is dropped by graph optimization (dask#7036)
        futures.append(client.compute(write, resources=resources))
    subject_of = {f.key: int(i) for f, i in zip(futures, todo, strict=True)}
    for future, error in _as_finished(futures, "apply", progress):
        # status after the data, per subject as it finishes: a run killed now keeps what it finished
        i = subject_of[future.key]
        subject = str(table[S.SUBJECT].iat[i])
        if error is None:
            store.set_field(status, [i], [S.DONE])
            result.harmonized.append(subject)
        else:  # this subject's data or task failed: record it, the others go on; the next run retries it
            store.set_field(status, [i], [S.REJECTED])
            result.failed.append({"subject": subject, "reason": f"{type(error).__name__}: {error}"})
    order = {s: k for k, s in enumerate(table[S.SUBJECT].iloc[todo])}
    result.harmonized.sort(key=order.get)
    return result


def _as_finished(futures: list, desc: str, progress: bool):
    """(future, None) or (future, exception) as each finishes, with a progress bar."""
    import sys

    from distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=desc, unit="subject", disable=not progress, file=sys.stderr) as bar:
        for future in as_completed(futures):
            bar.update(1)
            if future.status == "finished":
                yield future, None
            else:
                try:
                    error = future.exception()
                except Exception as exc:  # noqa: BLE001 - cancelled futures raise instead of returning
                    error = exc
                yield future, error
