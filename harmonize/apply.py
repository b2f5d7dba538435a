"""The graph layer: map a fitted harmonizer over a store's subjects with Dask and write the result back.

One task per subject: read `images[i]` from the store, compute the subject's context (its intensity
reference), run the model over the store's chunks of that volume with a halo of `halo` voxels from
the neighbouring chunks (zeros beyond the grid), multiply by the mask and write `<output>[i]`. Each
subject's slab is whole Zarr chunks of its own, so concurrent writers never share a chunk and a rerun
(or a task the scheduler re-runs after a worker died) rewrites the same bytes. The model is loaded
once per worker process (cached by its checksum), never shipped inside the graph. A bounded number of
tasks is in flight, so the scheduler never holds a whole cohort's tasks; worker memory stays flat as
cohorts grow (1.12x from 20 to 320 subjects). `<output>_status` is set per subject only after its write has finished.

Why a task per subject and not a task per chunk (measured in benchmarks/results/pipeline.md): the
per-chunk overlap graph had ~350 tasks per subject at 2 mm, its slicing/concatenation copies and the
scheduler's bookkeeping cost 40 % of the throughput of a plain loop, and its memory grew with the
cohort (2.8x from 20 to 320 subjects); a task per subject runs the same per-chunk arithmetic.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from distributed import Client

from harmonize.cluster import gpu_resources, total_threads
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, missing_covariates, read_volume, write_volume
from harmonize.models import load_model, model_checksum
from harmonize.models.voxel_combat import covariate_frame

# Tasks submitted ahead of the results: enough that no worker idles between tasks and that an adaptive
# cluster (SLURM, Kubernetes) sees the backlog it should scale to; bounded so that the scheduler and this
# process never hold a whole cohort's tasks. Workers' memory does not depend on it: a queued task holds
# no data, and the scheduler hands each worker about one task per thread at a time.
IN_FLIGHT_PER_THREAD = 4
IN_FLIGHT_MIN = 256

_CACHE: dict[str, object] = {}
_CACHE_LOCK = threading.Lock()
LOADS = {"count": 0}  # per process: how many times a model file was read (tests check "once per worker")


def cached_model(model_dir: str, checksum: str):
    """The model at `model_dir`, loaded at most once per process for a given checksum."""
    with _CACHE_LOCK:
        model = _CACHE.get(checksum)
        if model is None:
            # "auto": on a GPU worker the model runs on its GPU (chosen here, inside the worker), else on CPU
            model = load_model(model_dir, device="auto")
            if model.checksum_ != checksum:
                raise RuntimeError(f"model at {model_dir} changed while applying (checksum "
                                   f"{model.checksum_}, expected {checksum}); rerun apply")
            _CACHE.clear()  # one model per worker at a time keeps memory flat
            _CACHE[checksum] = model
            LOADS["count"] += 1
        return model


def load_count() -> int:
    return LOADS["count"]


def harmonize_chunked(model, volume: np.ndarray, context: dict, mask: np.ndarray, chunks: tuple[int, ...],
                      reference_site: str | None = None) -> np.ndarray:
    """`model.harmonize_block` over `chunks`-sized blocks of one in-memory volume, each with its halo, x mask.

    Equal (to float rounding) to the model on the whole volume at once: the halo covers the model's
    receptive field, so no seams at chunk borders. Chunk-sized blocks bound the model's working memory
    whatever the grid, and match the store's chunks so a block's reads never straddle them.
    """
    halo = int(model.halo)
    volume = np.asarray(volume, dtype=np.float32)
    padded = np.pad(volume, halo) if halo else volume
    out = np.empty_like(volume)
    starts = [range(0, n, c) for n, c in zip(volume.shape, chunks, strict=True)]
    for corner in itertools.product(*starts):
        location = tuple(slice(a, min(a + c, n)) for a, c, n in zip(corner, chunks, volume.shape, strict=True))
        block = padded[tuple(slice(s.start, s.stop + 2 * halo) for s in location)]
        out[location] = model.harmonize_block(block, context, location, reference_site)
    out *= mask
    return out


def harmonize_subject(images_path: str, output_path: str, position: int, model_dir: str, checksum: str,
                      mask: np.ndarray, site: str, covariates: dict, context: dict | None,
                      chunks: tuple[int, ...], reference_site: str | None) -> int:
    """Worker task: harmonize subject `position` of the store and write it to `output_path[position]`."""
    model = cached_model(model_dir, checksum)
    volume = read_volume(images_path, position)
    if context is None:  # the model's context needs the volume (an intensity reference): read it here, once
        context = model.subject_context(site, covariates, volume, mask)
    harmonized = harmonize_chunked(model, volume, context, mask, chunks, reference_site)
    write_volume(output_path, position, harmonized)
    return position


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
    contexts: list[dict | None] = [None] * len(todo)
    if not model.needs_volume_context:  # from the covariate table alone: errors (a missing covariate) name the subject
        for k, (i, site, cov) in enumerate(zip(todo, sites, covariates, strict=True)):
            try:
                contexts[k] = model.subject_context(site, cov)
            except ValueError as exc:
                raise ValueError(f"sub-{table[S.SUBJECT].iat[i]}: {exc}") from exc
    mask_future = client.scatter(mask, broadcast=True, hash=False)  # a fresh key: no race with a release
    output_path = store.array_path(output)
    chunks = tuple(int(c) for c in store.chunks)

    def submit(k: int):
        i = int(todo[k])
        return client.submit(harmonize_subject, images_path, output_path, i, model_dir, checksum, mask_future,
                             sites[k], covariates[k], contexts[k], chunks, reference, pure=False,
                             resources=resources)

    window = max(IN_FLIGHT_MIN, IN_FLIGHT_PER_THREAD * total_threads(client))
    for k, error in _bounded(submit, len(todo), window, "apply", progress):
        # status after the data, per subject as it finishes: a run killed now keeps what it finished
        i = int(todo[k])
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


def _bounded(submit, n: int, window: int, desc: str, progress: bool):
    """(k, None) or (k, exception) for tasks 0..n-1 as each finishes, at most `window` in flight, with a
    progress bar. `submit(k)` returns the future of task k."""
    import sys

    from distributed import as_completed
    from tqdm.auto import tqdm

    pending = iter(range(n))
    index_of: dict[str, int] = {}

    def start(k: int):
        future = submit(k)
        index_of[future.key] = k
        return future

    running = as_completed([start(k) for k in itertools.islice(pending, window)])
    with tqdm(total=n, desc=desc, unit="subject", disable=not progress, file=sys.stderr) as bar:
        for future in running:
            bar.update(1)
            following = next(pending, None)
            if following is not None:
                running.add(start(following))
            if future.status == "finished":
                yield index_of[future.key], None
            else:
                try:
                    error = future.exception()
                except Exception as exc:  # noqa: BLE001 - cancelled futures raise instead of returning
                    error = exc
                yield index_of[future.key], error
            future.release()
