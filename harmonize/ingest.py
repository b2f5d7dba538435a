"""Ingest: NIfTI files of a BIDS-like folder -> the cohort store.

1. the coordinator lists subjects and checks each header (cheap): wrong grid, wrong dimensionality,
   unreadable files are set aside with the reason;
2. it appends the new subjects to the store as *pending* (the only metadata change);
3. workers read, check and write one subject each (whole chunks; one task per file, since gzip is
   not seekable);
4. the coordinator marks each subject done (or rejected, with the reason) after its data is written.
A rerun skips subjects already done and retries pending/rejected ones in place.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import Client

from harmonize.io import bids
from harmonize.io import schema as S
from harmonize.io.nifti import InputRejected, check_header, native_grid, read_volume, sha256_file
from harmonize.io.store import DEFAULT_CHUNKS, CohortStore, Grid, missing_covariates, write_volume


@dataclass
class IngestResult:
    store: str
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # listed in participants.tsv, no scan yet
    updated: list[str] = field(default_factory=list)  # already in the store; age/sex taken anew from the table
    incomplete: dict[str, list[str]] = field(default_factory=dict)  # covariate -> subjects without it

    def summary(self) -> str:
        lines = [f"ingest: {len(self.ingested)} subject(s) written, {len(self.skipped)} already in the store, "
                 f"{len(self.rejected)} set aside, {len(self.waiting)} listed without a scan yet"]
        lines += [f"  rejected sub-{r['subject']} ({r['path']}): {r['reason']}" for r in self.rejected]
        if self.updated:
            lines.append(f"  age/sex updated from participants.tsv for {_labels(self.updated)}; subjects already "
                         "harmonized keep their old output until `harmonize apply STORE --overwrite`")
        for name, subjects in self.incomplete.items():
            lines.append(f"  no {name} for {_labels(subjects)}: ComBat and the default (calibrated) model keep age "
                         "and sex effects and will refuse them; fill in participants.tsv and rerun ingest")
        return "\n".join(lines)


def _labels(subjects: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"sub-{s}" for s in subjects[:limit])
    return shown + (f" and {len(subjects) - limit} more" if len(subjects) > limit else "")


def _ingest_one(path: str, grid_attrs: dict, array_path: str, position: int, shown: str | None = None,
                with_nonzero: bool = False) -> dict:
    """Worker task: read, check and write one subject's volume. Never raises for bad input.

    `shown` names the file in messages (its path relative to the input root: no absolute paths).
    `with_nonzero`: also return the volume's non-zero voxels (bit-packed in Fortran order, 1/32 of the volume) for the
    brain mask, so that the mask needs no second pass over the store (that pass was 2/3 of ingest's
    time: benchmarks/results/pipeline.md)."""
    shown = shown or path
    grid = Grid.from_attrs(grid_attrs)
    try:
        volume, _ = read_volume(path, grid, shown=shown)
        write_volume(array_path, position, volume)
        outcome = {"ok": True, "sha256": sha256_file(path)}
        if with_nonzero:
            # Fortran order: nibabel's own layout, so no transposing copy of the volume (4 ms of ~30)
            outcome["nonzero"] = np.packbits(np.ravel(volume > 0, order="F"))
        return outcome
    except InputRejected as exc:
        return {"ok": False, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        detail = str(exc).replace(path, shown)
        return {"ok": False, "reason": f"{shown}: unexpected {type(exc).__name__}: {detail}; re-export the file "
                                       "and re-run ingest (report it if it persists)"}


def _reference_grid(candidates: list[bids.Candidate]) -> Grid:
    """The grid most usable volumes share (the first such volume's, on a tie), when the store does not exist yet.

    Only files that pass the header checks count, and the majority rules: one corrupt or wrongly
    resampled file (even the first) cannot become the grid every other subject is measured against.
    """
    grids: list[Grid] = []
    votes: dict[tuple, int] = {}
    for cand in candidates:
        try:
            grid = native_grid(cand.path, shown=cand.relpath)
        except InputRejected:  # reported by check_header below
            continue
        key = (grid.shape, tuple(np.round(grid.affine, 3).ravel().tolist()))
        if key not in votes:
            grids.append(grid)
        votes[key] = votes.get(key, 0) + 1
    if not grids:
        raise bids.CohortError("no readable 3-D NIfTI volume found to define the reference grid; "
                               "check the subjects' anat/sub-<label>_T1w.nii[.gz] files")
    keys = list(votes)
    return grids[max(range(len(keys)), key=lambda i: (votes[keys[i]], -i))]


def ingest(bids_dir: str | os.PathLike, store_path: str | os.PathLike, client: Client | None = None,
           chunks: tuple[int, int, int] = DEFAULT_CHUNKS, mask_threshold: float = 0.5,
           progress: bool = True) -> IngestResult:
    """Validate and write a cohort into a store (created on first use). See the module docstring."""
    found = bids.discover(bids_dir)
    result = IngestResult(store=str(store_path), rejected=list(found.rejected), waiting=list(found.waiting))
    store_path = Path(store_path)
    new_store = not (store_path / "zarr.json").exists()
    if new_store:
        grid = _reference_grid(found.candidates)
        store = CohortStore.create(store_path, grid, np.zeros(grid.shape, np.uint8), chunks)
    else:
        store = CohortStore(store_path)
    table = store.table()
    position_of = {s: i for i, s in enumerate(table[S.SUBJECT])}
    todo: list[tuple[bids.Candidate, int]] = []
    updates: list[tuple[bids.Candidate, int]] = []  # covariates fixed in participants.tsv after ingest
    fresh: list[tuple[bids.Candidate, np.ndarray]] = []
    for cand in found.candidates:
        pos = position_of.get(cand.subject)
        if pos is not None and _covariates_changed(table, pos, cand):
            updates.append((cand, pos))
        if pos is not None and table[S.INGEST_STATUS].iat[pos] == S.DONE:
            result.skipped.append(cand.subject)
            continue
        try:
            affine = check_header(cand.path, store.grid, shown=cand.relpath)
        except Exception as exc:  # noqa: BLE001 - InputRejected, or anything else: set this subject aside only
            reason = str(exc) if isinstance(exc, InputRejected) else (
                f"{cand.relpath}: unexpected {type(exc).__name__}: {str(exc).replace(str(cand.path), cand.relpath)}; "
                "re-export the file and re-run ingest")
            result.rejected.append({"subject": cand.subject, "path": cand.relpath, "reason": reason})
            if pos is not None:
                store.set_field(S.INGEST_STATUS, [pos], [S.REJECTED])
            continue
        if pos is None:
            fresh.append((cand, affine))
        else:
            todo.append((cand, pos))
    if fresh:
        rows = pd.DataFrame({
            S.SUBJECT: [c.subject for c, _ in fresh], S.SITE: [c.site for c, _ in fresh],
            S.AGE: [c.age for c, _ in fresh], S.SEX: [c.sex for c, _ in fresh],
            S.SOURCE_PATH: [c.relpath for c, _ in fresh], S.AFFINE: [a for _, a in fresh]})
        positions = store.append_subjects(rows)
        todo += [(c, int(p)) for (c, _), p in zip(fresh, positions, strict=True)]
    nonzero = None  # per-voxel counts of subjects with signal, when this run makes the mask
    if todo:
        array_path = store.array_path(S.IMAGES)
        grid_attrs = store.grid.to_attrs()
        # the mask is made once, from the first subjects ingested: count their voxels as they arrive when
        # every ingested subject is in this run (a run killed before the mask leaves it to a pass over the store)
        if S.MASK_FROM not in store.group.attrs and not (table[S.INGEST_STATUS] == S.DONE).any():
            nonzero = np.zeros(int(np.prod(store.grid.shape)), np.uint32)
        args = [(str(c.path), grid_attrs, array_path, p, c.relpath, nonzero is not None) for c, p in todo]
        if client is None:
            finished = ((k, _ingest_one(*a)) for k, a in enumerate(args))
        else:
            futures = [client.submit(_ingest_one, *a, pure=False, key=f"ingest-{c.subject}-{p}")
                       for a, (c, p) in zip(args, todo, strict=True)]
            finished = _as_finished(client, futures, progress)
        # status after the data, in batches as subjects finish: a run killed mid-ingest keeps what it wrote
        batch: list[tuple[int, dict]] = []
        flushed, first_rejected = time.monotonic(), len(result.rejected)
        for k, outcome in finished:
            packed = outcome.pop("nonzero", None)
            if packed is not None:
                nonzero += np.unpackbits(packed, count=nonzero.size)
            batch.append((k, outcome))
            if len(batch) >= 64 or time.monotonic() - flushed > 10:
                _record(store, todo, batch, result)
                batch, flushed = [], time.monotonic()
        _record(store, todo, batch, result)
        order = {c.subject: k for k, (c, _) in enumerate(todo)}  # completion order -> the cohort's order
        result.ingested.sort(key=order.get)
        result.rejected[first_rejected:] = sorted(result.rejected[first_rejected:], key=lambda r: order[r["subject"]])
    if updates:  # metadata only, written by this (the coordinating) process
        store.set_field(S.AGE, [p for _, p in updates], [c.age for c, _ in updates])
        store.set_field(S.SEX, [p for _, p in updates], [c.sex for c, _ in updates])
        result.updated = [c.subject for c, _ in updates]
    table = store.table()
    if S.MASK_FROM not in store.group.attrs and (table[S.INGEST_STATUS] == S.DONE).any():
        # once, from the first subjects ingested (kept afterwards so that results stay stable as the cohort
        # grows); decided by a flag written after the mask, so a run killed before it writes it next time
        if nonzero is not None:  # every done subject is one of this run's: their counts are all there
            _write_mask_from_counts(store, nonzero.reshape(store.grid.shape, order="F"), len(result.ingested),
                                    mask_threshold)
        else:
            _write_mask(store, mask_threshold)
    table = store.table()
    result.incomplete = missing_covariates(table[table[S.INGEST_STATUS] == S.DONE], (S.AGE, S.SEX))
    return result


def _as_finished(client: Client, futures: list, progress: bool):
    """(index, outcome) as each ingest task finishes (they never raise for bad input)."""
    import sys

    from distributed import as_completed
    from tqdm.auto import tqdm

    index = {f.key: k for k, f in enumerate(futures)}
    with tqdm(total=len(futures), desc="ingest", unit="subject", disable=not progress, file=sys.stderr) as bar:
        for future in as_completed(futures):
            bar.update(1)
            yield index[future.key], future.result()


def _record(store: CohortStore, todo: list, batch: list[tuple[int, dict]], result: IngestResult) -> None:
    done = [(todo[k][0], todo[k][1], o) for k, o in batch if o["ok"]]
    bad = [(todo[k][0], todo[k][1], o) for k, o in batch if not o["ok"]]
    store.set_field(S.SOURCE_SHA256, [p for _, p, _ in done], [o["sha256"] for *_, o in done])
    store.set_field(S.INGEST_STATUS, [p for _, p, _ in done], [S.DONE] * len(done))
    store.set_field(S.INGEST_STATUS, [p for _, p, _ in bad], [S.REJECTED] * len(bad))
    result.ingested += [c.subject for c, _, _ in done]
    result.rejected += [{"subject": c.subject, "path": c.relpath, "reason": o["reason"]} for c, _, o in bad]


def _covariates_changed(table: pd.DataFrame, pos: int, cand: bids.Candidate) -> bool:
    age = table[S.AGE].iat[pos]
    same_age = (np.isnan(age) and np.isnan(cand.age)) or age == cand.age
    return not same_age or str(table[S.SEX].iat[pos]) != cand.sex


def _write_mask(store: CohortStore, threshold: float) -> None:
    """Brain mask of the grid: voxels non-zero in at least `threshold` of the (skull-stripped) subjects."""
    images = store.dataset(only_ingested=True)[S.IMAGES]
    counts = (images > 0).sum(S.SUBJECT).compute().values
    _write_mask_from_counts(store, counts, int(images.sizes[S.SUBJECT]), threshold)


def _write_mask_from_counts(store: CohortStore, nonzero: np.ndarray, n_subjects: int, threshold: float) -> None:
    """The mask from per-voxel counts of subjects with signal; the flag after the data, as everywhere."""
    store.group[S.MASK][...] = (nonzero >= threshold * n_subjects).astype(np.uint8)
    store.group.attrs[S.MASK_FROM] = {"threshold": threshold, "n_subjects": int(n_subjects)}
