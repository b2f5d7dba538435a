"""Privacy and security: what the store, the exports and the report keep (and never keep); relative provenance;
safe subject labels; a LocalCluster on loopback; model files loaded without executing code.

`assert_no_markers(paths, markers)` and `plant_markers(bids_dir)` are meant for reuse (e.g. by the test of a
nightly `harmonize run` record): plant the markers in a cohort, run, then search every output byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import pickle
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

from harmonize import pipeline
from harmonize.cluster import close_client, make_client
from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.bids import LABEL, read_participants
from harmonize.io.store import CohortStore
from harmonize.models import ModelFileError, load_model
from harmonize.report import make_report

# ---- identifying markers, and where a converter or a site would put them -------------------------------------
NAME, BIRTH, MRN, SCANNER = "Doe^Jane", "1971-03-14", "MRN8675309", "SCNR-XK42-0099"
MARKERS = (NAME, BIRTH, MRN, MRN.removeprefix("MRN"), SCANNER, "Jane Doe")
HEADER_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")


def plant_markers(bids: Path) -> None:
    """Fill every T1w header's free-text fields and extensions, the BIDS sidecars and extra participants.tsv
    columns with the markers (the voxel data and geometry stay as they are)."""
    for path in sorted(bids.glob("sub-*/anat/sub-*_T1w.nii.gz")):
        img = nib.load(path)
        out = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        hdr = out.header
        hdr["descrip"] = f"{NAME} {BIRTH} {MRN}".encode()
        hdr["aux_file"] = NAME.encode()
        hdr["db_name"] = MRN.encode()
        hdr["intent_name"] = BIRTH.encode()
        hdr.extensions.append(nib.nifti1.Nifti1Extension(
            "comment", f"PatientName={NAME};PatientBirthDate={BIRTH};DeviceSerialNumber={SCANNER}".encode()))
        hdr.extensions.append(nib.nifti1.Nifti1Extension(
            "afni", f"<AFNI_attributes><name>Jane Doe</name><id>{MRN}</id></AFNI_attributes>".encode()))
        nib.save(out, path)
        sidecar = path.with_name(path.name.replace(".nii.gz", ".json"))
        sidecar.write_text(json.dumps({"PatientName": NAME, "PatientBirthDate": BIRTH, "PatientID": MRN,
                                       "DeviceSerialNumber": SCANNER, "AcquisitionDateTime": f"{BIRTH}T09:00:00"}))
    (bids / "T1w.json").write_text(json.dumps({"InstitutionName": f"Clinic of {NAME}", "StationName": SCANNER}))
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    table["patient_name"], table["mrn"], table["birth_date"] = NAME, MRN, BIRTH
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    (bids / "participants.json").write_text(json.dumps({"mrn": {"Description": f"hospital number, e.g. {MRN}"}}))


# ---- searching every byte ----------------------------------------------------------------------------------
_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def _decoded(path: Path) -> Iterator[tuple[str, bytes]]:
    """The file's bytes, and what they decompress to (gzip: NIfTI; zstd: zarr chunks, the store's default)."""
    data = path.read_bytes()
    yield "raw", data
    if data[:2] == _GZIP:
        yield "gunzip", gzip.decompress(data)
    if data[:4] == _ZSTD:
        import numcodecs

        yield "zstd", bytes(numcodecs.Zstd().decode(data))


def _zarr_texts(root: Path) -> Iterator[tuple[str, str]]:
    """Every attribute and every string array of each Zarr store under `root`, decoded through zarr itself
    (whatever the chunks' codecs)."""
    for meta in sorted(root.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") != "group" or (meta.parent.parent / "zarr.json").exists():
            continue  # only top-level groups; their members are walked below
        group = zarr.open_group(str(meta.parent), mode="r", zarr_format=3)
        yield f"{meta.parent} attrs", json.dumps(dict(group.attrs), default=str)
        for name, node in group.members(max_depth=None):
            yield f"{meta.parent}/{name} attrs", json.dumps(dict(node.attrs), default=str)
            if isinstance(node, zarr.Array) and node.dtype.kind in "OUSTV" and node.size:
                yield f"{meta.parent}/{name}", "\n".join(str(v) for v in np.asarray(node[...]).ravel())


def _files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return out


def find_markers(paths: Iterable[str | os.PathLike], markers: Iterable[str]) -> list[tuple[str, str, str]]:
    """(where, how it was read, marker) for every marker found, case-insensitive, in files under `paths`."""
    paths, markers = list(paths), [m for m in markers if m]
    needles = [(m, m.encode().lower()) for m in markers]
    hits = []
    for f in _files(paths):
        for how, blob in _decoded(f):
            low = blob.lower()
            hits += [(str(f), how, m) for m, n in needles if n in low]
    for root in (Path(p) for p in paths):
        if root.is_dir():
            for where, text in _zarr_texts(root):
                low = text.lower()
                hits += [(where, "zarr", m) for m in markers if m.lower() in low]
    return hits


def assert_no_markers(paths: Iterable[str | os.PathLike], markers: Iterable[str]) -> None:
    """Fail, naming file and marker, if any marker appears in any byte under `paths` (raw, gunzipped,
    zstd-decoded, or decoded through zarr). Reusable: pass a run's output folders and MARKERS."""
    paths = list(paths)
    assert _files(paths), f"nothing to search under {paths}"
    hits = find_markers(paths, markers)
    assert not hits, "identifying text found in outputs:\n" + "\n".join(f"  {m!r} in {w} ({h})" for w, h, m in hits)


def _machine_paths(root: Path) -> list[str]:
    """Absolute paths of the user's machine that must never be written (long enough not to match by chance)."""
    return [p for p in {str(root), str(root.resolve()), str(Path.home())} if len(p) >= 5]


# ---- one full run on a cohort that carries identifying text ------------------------------------------------
@pytest.fixture(scope="module")
def run(small_cohort, tmp_path_factory, client):
    root = tmp_path_factory.mktemp("privacy")
    bids = root / "bids"
    shutil.copytree(small_cohort["bids_dir"], bids)
    plant_markers(bids)
    # labels that try to leave the output folder: refused before they name any file or array
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    extra = {c: "x" for c in table.columns} | {"site": "NYU", "age": "40"}
    table.loc[len(table)] = extra | {"participant_id": "../../outside"}
    table.loc[len(table)] = extra | {"participant_id": "sub-..\\outside"}
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    shutil.copytree(bids / "sub-001", bids / "sub-..")
    store, export = root / "store.zarr", root / "export"
    ingested = ingest(bids, store, client, chunks=(16, 16, 16), progress=False)
    model = pipeline.fit(store, client, "combat", {}, progress=False)
    applied = pipeline.apply(store, client, progress=False)
    exported = pipeline.export(store, export, client, progress=False)
    report = make_report(store)
    return {"root": root, "bids": bids, "store": store, "export": export, "report": report, "model": model,
            "ingested": ingested, "applied": applied, "exported": exported}


def test_markers_are_really_in_the_inputs(run):
    """The search finds what was planted (else the absence tests below prove nothing)."""
    found = {m for _, _, m in find_markers([run["bids"]], MARKERS)}
    assert found == set(MARKERS)
    img = nib.load(next(run["bids"].glob("sub-001/anat/*.nii.gz")))
    assert NAME.encode() in img.header["descrip"].item() and len(img.header.extensions) == 2
    # and it reads the store's compressed chunks, both as bytes and through zarr
    hows = {how for _, how, _ in find_markers([run["store"]], ["sub-001/anat/sub-001_T1w.nii.gz"])}
    assert {"zstd", "zarr"} <= hows, hows


def test_no_identifying_text_in_store_exports_or_report(run):
    assert len(run["ingested"].ingested) == 12 and len(run["applied"].harmonized) == 12
    assert run["report"].is_relative_to(run["store"])  # the report lives in the store folder: searched too
    assert (run["report"] / "report.html").exists()
    assert_no_markers([run["store"], run["export"], run["report"]], MARKERS)


def test_exported_niftis_have_no_header_text_or_extensions(run):
    assert len(run["exported"]) == 12
    for path in run["exported"]:
        img = nib.load(path)
        for field in HEADER_TEXT_FIELDS:
            assert img.header[field].item() == b"", (path, field, img.header[field])
        assert len(img.header.extensions) == 0, path
        assert img.get_data_dtype() == np.float32
        sub = path.name.split("_")[0]
        source = nib.load(run["bids"] / sub / "anat" / f"{sub}_T1w.nii.gz")
        np.testing.assert_allclose(img.affine, source.affine)  # geometry is kept


def test_only_declared_covariates_are_read_and_stored(run):
    assert list(read_participants(run["bids"]).columns) == ["participant_id", S.SITE, S.AGE, S.SEX]
    store = CohortStore(run["store"])
    extra = {"patient_name", "mrn", "birth_date"}
    names = set(store.group.array_keys())
    assert not extra & (names | set(store.group.attrs)), names
    # the only per-subject text kept: the label, the declared categorical covariates and the provenance
    text_arrays = {n for n in names if store.group[n].dtype.kind in "OUST"}
    assert text_arrays == set(S.STRING_FIELDS), text_arrays
    assert set(S.STRING_FIELDS) == {S.SUBJECT, S.SITE, S.SEX, S.SOURCE_SHA256, S.SOURCE_PATH}
    ds = store.dataset()
    assert not extra & (set(ds.variables) | set(ds.coords))


def test_provenance_is_a_checksum_and_a_relative_path(run):
    table = CohortStore(run["store"]).table()
    for _, row in table.iterrows():
        sub = row[S.SUBJECT]
        rel = f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz"
        assert row[S.SOURCE_PATH] == rel
        assert row[S.SOURCE_SHA256] == hashlib.sha256((run["bids"] / rel).read_bytes()).hexdigest()
    attrs = CohortStore(run["store"]).group[S.HARMONIZED].attrs
    assert attrs["model_dir"] == os.path.relpath(run["model"], run["store"])
    for pointer in (run["store"] / S.MODELS_DIR).glob("current*.json"):
        assert not Path(json.loads(pointer.read_text())["path"]).is_absolute()


def test_no_absolute_paths_in_store_or_exports(run):
    searched = [p for p in run["store"].iterdir() if p.name != S.REPORTS_DIR] + [run["export"]]
    assert_no_markers(searched, _machine_paths(run["root"]))
    for entry in run["ingested"].rejected:  # rejection messages name files relative to the input root
        assert not any(p in entry["reason"] for p in _machine_paths(run["root"])), entry


def test_no_absolute_paths_in_the_report(run):
    assert_no_markers([run["report"]], _machine_paths(run["root"]))


def test_unsafe_subject_labels_never_name_files_or_arrays(run):
    rejected = {r["subject"]: r["reason"] for r in run["ingested"].rejected}
    assert set(rejected) == {"../../outside", "..\\outside", ".."}
    assert all("BIDS label" in reason for reason in rejected.values())
    root = run["root"]
    assert {p.name for p in root.iterdir()} == {"bids", "store.zarr", "export"}
    assert not (root.parent / "outside").exists() and not (root.parent.parent / "outside").exists()
    assert all(LABEL.match(s) for s in CohortStore(run["store"]).table()[S.SUBJECT])
    for path in run["export"].rglob("*"):
        rel = path.relative_to(run["export"])
        assert rel.parts[0] == "dataset_description.json" or (
            rel.parts[0].startswith("sub-") and LABEL.match(rel.parts[0].removeprefix("sub-"))), rel


# ---- a LocalCluster started by harmonize listens on loopback only -------------------------------------------
def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    import psutil

    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _host(address: str) -> str:
    from distributed.comm import get_address_host

    return get_address_host(address)


@pytest.mark.parametrize("spec", ["local", {"type": "local", "n_workers": 1, "threads_per_worker": 1}],
                         ids=["local", "dict"])
def test_local_cluster_binds_scheduler_workers_and_dashboards_to_loopback(spec):
    from urllib.parse import urlparse

    import psutil

    client = make_client(spec, quiet=True)
    try:
        info = client.scheduler_info(n_workers=-1)
        assert _host(client.scheduler.address) == "127.0.0.1"
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        assert info["workers"]
        for address, worker in info["workers"].items():
            assert _host(address) == "127.0.0.1"
            if worker.get("nanny"):
                assert _host(worker["nanny"]) == "127.0.0.1"
        # what is really bound: every listening socket of this process and the workers it started
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        sockets = _listening({os.getpid(), *children})
        assert sockets and all(ip in ("127.0.0.1", "::1") for _, ip, _ in sockets), sockets
        ports = {port for _, _, port in sockets}
        assert int(client.scheduler.address.rsplit(":", 1)[1]) in ports
        assert urlparse(client.dashboard_link).port in ports
    finally:
        close_client(client)


def test_threads_only_local_cluster_starts_on_loopback():
    client = make_client({"type": "local", "n_workers": 1, "processes": False}, quiet=True)
    try:
        assert _host(client.scheduler.address) == "127.0.0.1"
    finally:
        close_client(client)


# ---- model files are never unpickled ------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    return path


def _torch_file(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"weights": _Payload(marker)}, str(path))
    return path


def _called_globals(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) globals a pickle looks up and calls on loading, read statically (nothing runs)."""
    import pickletools

    memo: dict[int, object] = {}
    strings: list[object] = []
    found: set[tuple[str, str]] = set()
    calls = False
    last: object = None
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            last = arg
            strings.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(int(arg))
            strings.append(last)
        elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = last
        elif op.name in ("STACK_GLOBAL", "GLOBAL"):
            last = (strings[-2], strings[-1]) if op.name == "STACK_GLOBAL" else tuple(arg.split(" ", 1))
            found.add(last)
        else:
            calls |= op.name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "BUILD")
            last = None
    return found if calls else set()


def test_the_payloads_are_live(tmp_path):
    """Loading either crafted file the unsafe way runs code; harmonize must never do that."""
    import zipfile

    marker = tmp_path / "pwned"
    plain = _pickle_file(tmp_path / "m.pkl", marker).read_bytes()
    pickle.loads(plain)  # noqa: S301 - our own bytes: shows the payload runs code when unpickled
    assert marker.exists()
    marker.unlink()
    # the torch.save file carries the same call in its pickle (read statically: never torch.load it unsafely)
    with zipfile.ZipFile(_torch_file(tmp_path / "m.pt", marker)) as archive:
        (inner,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        embedded = archive.read(inner)
    # protocol 4 names Path.touch directly, torch's protocol 2 reaches it through getattr(Path, "touch")
    assert ("pathlib", "Path.touch") in _called_globals(plain)
    assert {("__builtin__", "getattr"), ("pathlib", "Path")} <= _called_globals(embedded)
    assert b"touch" in embedded and marker.name.encode() in embedded
    assert not marker.exists()


@pytest.fixture(scope="module")
def table_combat_model(tmp_path_factory):
    from harmonize.models.combat import ComBatHarmonizer

    rng = np.random.default_rng(0)
    sites = np.repeat(["A", "B", "C"], 10)
    covars = pd.DataFrame({"age": rng.uniform(20, 80, 30)})
    x = rng.normal(size=(30, 20)) + (sites == "B")[:, None]
    return ComBatHarmonizer(covariates=["age"]).fit(x, sites, covars).save(tmp_path_factory.mktemp("m") / "table")


@pytest.fixture()
def model_folders(run, table_combat_model, fitted_model):
    """kind -> a real saved model folder of that kind, and the weights files inside it."""
    return {"combat": (run["model"], ["parameters.safetensors"]),
            "combat-table": (table_combat_model, ["parameters.safetensors"]),
            "invariant": (fitted_model, ["weights.safetensors", "calibration/parameters.safetensors"])}


NEVER = r"harmonize never unpickles model files"


@pytest.mark.parametrize(("make", "looks"), [(_pickle_file, "a Python pickle"), (_torch_file, "a zip archive")],
                         ids=["pickle", "torch.save"])
def test_a_pickle_given_as_the_model_is_refused(run, client, tmp_path, make, looks):
    marker = tmp_path / "pwned"
    crafted = make(tmp_path / "model.pt", marker)
    with pytest.raises(ModelFileError) as info:
        load_model(crafted)
    message = str(info.value)
    for part in (str(crafted), looks, "not a harmonize model folder", NEVER, "harmonize fit"):
        assert part in message, (part, message)
    with pytest.raises(ModelFileError, match=NEVER):  # the apply stage, as the CLI calls it
        pipeline.apply(run["store"], client, model_dir=crafted, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["combat", "combat-table", "invariant"])
@pytest.mark.parametrize(("make", "looks"), [(_pickle_file, "a Python pickle"),
                                             (_torch_file, "a zip archive, e.g. a torch.save .pt/.pth file")],
                         ids=["pickle", "torch.save"])
def test_a_pickle_in_place_of_the_weights_is_refused(model_folders, tmp_path, kind, make, looks):
    source, weights = model_folders[kind]
    load_model(source)  # the real folder loads
    for name in weights:  # each weights file of the folder in turn (the invariant model has two)
        folder = tmp_path / f"{kind}-{name.replace('/', '-')}"
        shutil.copytree(source, folder)
        marker = tmp_path / f"pwned-{folder.name}"
        make(folder / name, marker)
        with pytest.raises(ModelFileError) as info:
            load_model(folder)
        message = str(info.value)
        for part in (str(folder / name), looks, "not a safetensors file", NEVER, "harmonize fit"):
            assert part in message, (part, message)
        assert not marker.exists()


def test_a_model_folder_without_weights_is_a_clear_error(model_folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_folders["combat"][0], folder)
    (folder / "parameters.safetensors").unlink()
    with pytest.raises(ModelFileError, match="weights file is missing"):
        load_model(folder)


def test_a_nightly_run_record_and_its_report_carry_no_identifying_text(run, client, tmp_path):
    """`harmonize run` over the same planted inputs: the run record, its report and performance report,
    the store and the exports hold none of the markers; the record holds no path of this machine."""
    from harmonize import runner
    from harmonize.spec import load_pipeline

    store, export = tmp_path / "night.zarr", tmp_path / "nifti"
    spec = load_pipeline({"input": str(run["bids"]), "store": str(store), "chunks": [16, 16, 16],
                          "models": [{"kind": "combat"}], "export": {"dir": str(export)}, "report": True})
    record = runner.run(spec, client=client, progress=False)
    assert record.exit_code == 3 and len(record.done["apply harmonized"]) == 12  # the unsafe labels set aside
    folder = store / "runs" / record.run_id
    assert {"run.json", "performance.html", "report"} <= {p.name for p in folder.iterdir()}
    assert_no_markers([store, export], MARKERS)
    assert_no_markers([folder / "run.json", folder / "report"], _machine_paths(run["root"]) + [str(tmp_path)])
