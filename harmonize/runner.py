"""`harmonize run SPEC`: the steps of a pipeline spec, incremental, idempotent and resumable.

    lock -> ingest (new subjects only) -> per model: fit if needed, apply to the subjects without its output
         -> export the new results -> CorEx + report (when anything changed) -> run record

Incremental and resumable because every step keeps per-subject status in the store, written after
the data it describes (ingest and apply mark each subject as it finishes): a run killed at any
moment leaves subjects either done (with their data) or pending, and the next run does the pending
ones. A second run with nothing new does nothing and says so. One run at a time per store: an
advisory lock (flock) on `<store>.lock`, which the kernel releases when its process dies, so a
killed run never leaves a lock that blocks the next night.

Each run leaves `<store>/runs/<run id>/`: run.json (what was new, done, skipped, rejected and why,
timings), performance.html (Dask's performance report) and, when anything changed, the report.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client, performance_report

from harmonize import pipeline
from harmonize.cluster import use_client
from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.store import CohortStore, dump_json
from harmonize.spec import ModelStep, PipelineSpec

# exit codes a scheduler can act on (the CLI's: 0 ok, 1 failed, 2 usage, 3 some inputs rejected)
EXIT_OK, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds this store; try again later


class RunLocked(RuntimeError):
    """Another `harmonize run` is working on this store."""


# ---- the lock ------------------------------------------------------------------------------------
def lock_path(store: Path) -> Path:
    """Beside the store (it exists before the store does, and never inside data a run may rebuild)."""
    return store.with_name(store.name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(store: Path, run_id: str, log=lambda m: None) -> Iterator[dict]:
    """Hold the store's run lock; raise RunLocked at once if another live run holds it.

    flock is released by the kernel when the holder dies (SIGKILL, power loss, OOM), so there is no
    stale lock to break by hand; the holder's details (pid, host, start) are kept in the file for
    messages, and a leftover entry of a dead run is reported as broken.
    """
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise RunLocked(
                f"another harmonize run is working on {store} (run {holder.get('run_id', '?')}, pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}); "
                "this run did nothing. It will pick up whatever that run leaves undone.") from None
        previous = _read_holder(fd)
        info = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if previous.get("pid") and not previous.get("released"):
            same_host = previous.get("host") == info["host"]
            dead = same_host and not _alive(int(previous["pid"]))
            if dead or not same_host:
                log(f"run {previous.get('run_id')} (pid {previous['pid']} on {previous.get('host')}) ended without "
                    "releasing the lock (killed?); its lock is broken and its unfinished subjects are redone now")
                info["broke_lock_of"] = previous
        _write_holder(fd, info)
        try:
            yield info
        finally:
            _write_holder(fd, {**info, "released": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    finally:
        os.close(fd)  # releases the flock


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


# ---- the record ------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    run_id: str
    spec: str
    status: str = "running"  # ok | nothing new | rejected | failed
    exit_code: int = EXIT_OK
    new: list[str] = field(default_factory=list)  # subjects ingested by this run
    done: dict[str, list[str]] = field(default_factory=dict)  # step -> subjects it finished
    skipped: dict[str, int] = field(default_factory=dict)  # step -> subjects already done before
    rejected: list[dict] = field(default_factory=list)  # {step, subject, reason} set aside (input problems)
    failed: list[dict] = field(default_factory=list)  # {step, subject, reason} processing raised
    models: dict[str, dict] = field(default_factory=dict)  # output -> {kind, action, model, why}
    timings: dict[str, float] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    error: str | None = None
    traceback: str | None = None
    folder: str | None = None  # relative to the store

    @property
    def changed(self) -> bool:
        return bool(self.new or any(self.done.values()) or any(m["action"] == "fitted" for m in self.models.values()))

    def summary(self) -> str:
        lines = [f"run {self.run_id}: {self.status}"]
        if self.status == "nothing new":
            lines[0] += f" (every subject is done: {', '.join(f'{k} {v}' for k, v in self.skipped.items())})"
        if self.new:
            lines.append(f"  new subjects: {len(self.new)} ({_labels(self.new)})")
        for output, m in self.models.items():
            lines.append(f"  {output}: {m['kind']} model {m['action']}" + (f" ({m['why']})" if m.get("why") else ""))
        for step, subjects in self.done.items():
            if subjects:
                lines.append(f"  {step}: {len(subjects)} subject(s) done")
        lines += [f"  set aside ({r['step']}) sub-{r['subject']}: {r['reason']}" for r in self.rejected]
        lines += [f"  failed ({r['step']}) sub-{r['subject']}: {r['reason']}" for r in self.failed]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.folder:
            lines.append(f"  record: {self.folder}/run.json")
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["changed"] = self.changed
        return out


def _labels(subjects: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"sub-{s}" for s in subjects[:limit])
    return shown + (f" and {len(subjects) - limit} more" if len(subjects) > limit else "")


# ---- the run ---------------------------------------------------------------------------------------
def run(spec: PipelineSpec, client: Client | None = None, refit: bool = False, progress: bool = True,
        log=None) -> RunRecord:
    """Run the spec's steps on whatever is new; returns the run record (also saved under the store).

    Raises RunLocked (doing nothing) when another run holds the store. Any other error is caught,
    recorded (status failed, exit code 1) and the record returned.
    """
    log = log or ((lambda m: print(f"harmonize run: {m}", file=sys.stderr)) if progress else (lambda m: None))
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    record = RunRecord(run_id=run_id, spec=Path(spec.source).name, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    t0 = time.perf_counter()
    with run_lock(spec.store, run_id, log):
        scratch = Path(tempfile.mkdtemp(prefix="harmonize-run-"))
        try:
            with use_client(client, spec.cluster, quiet=not progress) as cl:
                with performance_report(filename=str(scratch / "performance.html")):
                    _steps(spec, cl, refit, progress, record, log)
        except Exception as exc:  # noqa: BLE001 - recorded with its traceback; the exit code says failed
            record.status, record.exit_code = "failed", EXIT_FAILED
            record.error = f"{type(exc).__name__}: {exc}"
            record.traceback = traceback.format_exc()
        record.timings["total"] = time.perf_counter() - t0
        if record.status == "running":
            if record.rejected or record.failed:
                record.status, record.exit_code = "rejected", EXIT_REJECTED
            else:
                record.status = "ok" if record.changed else "nothing new"
        record.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _save(spec, record, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def _steps(spec: PipelineSpec, client: Client, refit: bool, progress: bool, record: RunRecord, log) -> None:
    def timed(name: str):
        return _Timer(record.timings, name)

    with timed("ingest"):
        result = ingest(spec.input, spec.store, client, chunks=spec.chunks, progress=progress)
    log(result.summary())
    record.new = list(result.ingested)
    record.done["ingest"] = list(result.ingested)
    record.skipped["ingest"] = len(result.skipped)
    record.rejected += [{"step": "ingest", **r} for r in result.rejected]
    store = CohortStore(spec.store)
    harmonized_now: dict[str, list[str]] = {}
    for step in spec.models:
        with timed(f"fit {step.output}"):
            model_dir = _model_for(store, step, client, refit, progress, record, log)
        with timed(f"apply {step.output}"):
            applied = pipeline.apply(store.path, client, model_dir=model_dir, reference_site=step.reference_site,
                                     progress=progress, output=step.output)
        log(applied.summary().replace("apply:", f"apply {step.output}:", 1))
        harmonized_now[step.output] = list(applied.harmonized)
        record.done[f"apply {step.output}"] = list(applied.harmonized)
        record.skipped[f"apply {step.output}"] = len(applied.skipped)
        record.rejected += [{"step": f"apply {step.output}", **r} for r in applied.rejected]
        record.failed += [{"step": f"apply {step.output}", **r} for r in applied.failed]
    if spec.export_dir is not None:
        with timed("export"):
            for output in spec.export_outputs:
                subjects = _to_export(store, spec.export_dir, output, harmonized_now.get(output, []))
                if subjects:
                    pipeline.export(store.path, spec.export_dir, client, progress=progress, output=output,
                                    subjects=subjects)
                record.done[f"export {output}"] = subjects
    if not record.changed:
        log("nothing new: no subject to ingest or harmonize, no model to fit")
        return
    if spec.corex is not None:
        options = dict(spec.corex)
        with timed("corex"):
            pipeline.corex(store.path, client, n_factors=options.pop("factors", 4),
                           n_regions=options.pop("regions", 48), n_permutations=options.pop("permutations", 999),
                           progress=progress, **options)
    if spec.report:
        from harmonize.report import make_report

        with timed("report"):
            make_report(store.path, groundtruth_dir=spec.groundtruth,
                        out_dir=_run_folder(store.path, record.run_id) / "report", timings=dict(record.timings))


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.t


def _pointer(store: CohortStore, step: ModelStep) -> Path:
    """Which model the spec's step uses in this store, with the settings it was fitted under."""
    return store.path / S.MODELS_DIR / f"pipeline-{step.output}.json"


def _model_for(store: CohortStore, step: ModelStep, client: Client, refit: bool, progress: bool,
               record: RunRecord, log) -> Path:
    """The model folder of a step: reused when the spec allows and nothing changed, else fitted now."""
    entry = {"kind": step.kind}
    if step.model_dir is not None:
        record.models[step.output] = {**entry, "action": "reused", "model": str(step.model_dir.name),
                                      "why": "model_dir in the spec"}
        return step.model_dir
    pointer = _pointer(store, step)
    known = json.loads(pointer.read_text()) if pointer.exists() else None
    existing = store.path / known["path"] if known else None
    usable = existing is not None and (existing / "config.json").exists()
    same = usable and known.get("settings") == step.settings_hash()
    if step.fit == "never" or (step.fit == "if-needed" and same and not refit):
        if not usable:
            raise RuntimeError(f"models[{step.output}]: fit is 'never' but the store has no model for it yet; "
                               "set fit: if-needed (or model_dir: a saved model) in the spec")
        record.models[step.output] = {**entry, "action": "reused", "model": known["path"],
                                      "why": "" if same else "settings changed, but fit is 'never'"}
        return existing
    why = ("--refit" if refit else "fit: always" if step.fit == "always" else
           "no model yet" if not usable else "the spec's settings for it changed")
    log(f"fitting {step.kind} for {step.output} ({why})")
    params = {**step.params, **({"reference_site": step.reference_site} if step.reference_site else {})}
    path = pipeline.fit(store.path, client, step.kind, params, progress=progress)
    rel = os.path.relpath(path, store.path)
    dump_json(pointer, {"path": rel, "kind": step.kind, "settings": step.settings_hash(),
                        "settings_text": step.settings()})
    record.models[step.output] = {**entry, "action": "fitted", "model": rel, "why": why}
    return path


def _to_export(store: CohortStore, out_dir: Path, output: str, harmonized_now: list[str]) -> list[str]:
    """Subjects harmonized by this run, and any harmonized earlier whose file is missing (a killed export)."""
    table = store.table()
    done = table[S.SUBJECT][store.status(S.status_of(output)) == S.DONE].astype(str).tolist()
    now = set(harmonized_now)
    return [s for s in done if s in now or not pipeline.export_path(out_dir, s, output).exists()]


def _run_folder(store: Path, run_id: str) -> Path:
    return store / S.RUNS_DIR / run_id


def _save(spec: PipelineSpec, record: RunRecord, scratch: Path) -> None:
    """run.json (+ performance.html) under the store; without a store (it could not be made) only the log."""
    if not (spec.store / "zarr.json").exists():
        return
    folder = _run_folder(spec.store, record.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    if (scratch / "performance.html").exists():
        shutil.move(str(scratch / "performance.html"), folder / "performance.html")
    record.folder = os.path.relpath(folder, spec.store.parent)
    dump_json(folder / "run.json", record.to_json())


# ---- the demo --------------------------------------------------------------------------------------
def demo_spec_path() -> Path:
    """pipelines/demo.yaml (the package carries a link to it, so an installed wheel has it too)."""
    return Path(__file__).with_name("data") / "demo.yaml"


def demo(workdir: str | os.PathLike = "harmonize-demo", cohort=None, client: Client | None = None,
         cluster_spec=None, fit_params: dict | None = None, progress: bool = True) -> RunRecord:
    """Simulate a multi-site cohort from real anatomy into `workdir`, then run pipelines/demo.yaml on it.

    `cohort` is a harmonize.simulate.CohortSpec; the spec's models harmonize to its reference site.
    A second demo in the same folder finds nothing new and says so.
    """
    from harmonize.simulate import CohortSpec, simulate_cohort
    from harmonize.spec import load_pipeline

    cohort = cohort or CohortSpec()
    work = Path(workdir)
    log = (lambda m: print(f"harmonize demo: {m}", file=sys.stderr)) if progress else (lambda m: None)
    log(f"simulating {len(cohort.sites)} sites x {cohort.subjects_per_site} subjects at "
        f"{cohort.resolution_mm:g} mm into {work}")
    t0 = time.perf_counter()
    simulate_cohort(work / "cohort", cohort, progress=progress)
    spec = load_pipeline(demo_spec_path(), base=work, overrides={"cluster": cluster_spec} if cluster_spec else None)
    for step in spec.models:
        step.reference_site = cohort.reference
        if step.kind == "invariant":
            step.params.update(fit_params or {})
    record = run(spec, client=client, progress=progress, log=log)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return record


def latest_report(store: str | os.PathLike) -> Path | None:
    """The report folder of the newest run that made one (None if none did)."""
    runs = sorted((Path(store) / S.RUNS_DIR).glob("*/report/report.json"))
    return runs[-1].parent if runs else None
