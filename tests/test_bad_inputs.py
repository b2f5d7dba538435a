"""A corpus of malformed inputs, built from the small real-anatomy cohort and ingested as one batch.

Every broken case must be set aside FOR THAT SUBJECT with a message that says which file, what is wrong
and what to do, while every good subject (and every odd-but-valid file) is ingested with the right data.
"""

from __future__ import annotations

import gzip
import shutil
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.bids import LABEL, BadValue, _parse_age
from harmonize.io.nifti import InputRejected, check_header, read_volume
from harmonize.io.store import CohortStore, Grid, open_cohort

SOURCE = "002"  # the good subject every constructed case starts from (site NYU)


def _t1(bids: Path, label: str, suffix: str = ".nii.gz") -> Path:
    path = bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _header_only(path: Path, header) -> None:
    """A .nii holding only a header (no voxel data at all): whatever it claims is absent."""
    header.set_data_offset(len(header.binaryblock) + 4)
    path.write_bytes(header.binaryblock + b"\0" * 4)


def _raw_nifti(path: Path, vol: np.ndarray, affine: np.ndarray) -> None:
    """A float32 .nii.gz whose sform is written verbatim (nibabel refuses to build images from broken affines)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(vol.shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(None, code=0)
    hdr.set_data_offset(352)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + np.asarray(vol, np.float32).tobytes(order="F")))


def _huge_header(cls=nib.Nifti1Header, shape=(2048, 2048, 2048), affine=None):
    hdr = cls()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    if affine is not None:
        hdr.set_sform(affine, code=2)
    return hdr


# ---- the corpus --------------------------------------------------------------------------------------------
# label -> fragment the subject's rejection reason must contain. Labels are how each case appears in
# result.rejected (for the unsafe ones: the raw label, which never becomes a file or array name).
REJECTED = {
    "truncated": "the file is probably truncated",
    "notnifti": "not a readable NIfTI file",
    "empty": "is empty (0 bytes)",
    "huge": "header claims 32.0 GiB of voxels",
    "hugenifti2": "GiB of voxels (shape (1099511627776, 1099511627776, 1048576)",
    "emptydim": "has an empty dimension, shape (34, 0, 33)",
    "fourd": "(4-D); expected one 3-D T1w volume",
    "nan": "voxels are NaN or Inf (1 NaN, 0 Inf)",
    "inf": "voxels are NaN or Inf (0 NaN, 2 Inf)",
    "zeros": "every voxel is 0",
    "wronggrid": "shape (32, 40, 33) instead of (34, 40, 33)",
    "wrongvox": "voxel size [7.0, 7.0, 7.0] mm instead of [6.0, 6.0, 6.0] mm",
    "oblique": "oblique: its axes are rotated 15.0 degrees",
    "shifted": "origin [-95.0, -131.0, -69.0] instead of [-98.0, -134.0, -72.0] (shifted)",
    "zeroaffine": "voxel-to-world affine (sform/qform) is degenerate",
    "nanaffine": "voxel-to-world affine (sform/qform) is degenerate",
    "complex": "voxel data type complex64 is complex; expected real-valued intensities",
    "rgb": "is compound (e.g. RGB); expected real-valued intensities",
    "t1wfolder": "is a folder, not a file",
    "dupid": "participant_id sub-dupid is listed more than once",
    "../x": "participant_id '../x' is not sub-<label> with a BIDS label",
    "../../etc": "participant_id '../../etc' is not sub-<label> with a BIDS label",
    "..": "'sub-..': folder name is not sub-<label> with a BIDS label",  # folder only
    "nl\n": "'sub-nl\\n': folder name is not sub-<label> with a BIDS label",  # '$' would match before '\n'
    "a\\..\\b": "participant_id 'a\\\\..\\\\b' is not sub-<label> with a BIDS label",  # row and folder
    "nosite": "row sub-nosite: no site (an empty cell)",
    "nasite": "row sub-nasite: no site ('n/a')",
    "ageforty": "age 'forty' is not a number. Write the age in years as a number",
    "ageneg": "age '-3' is negative. Write the age in years as a number",
    "age300": "age '300' is over 120 years. Write the age in years as a number",
    "unlisted": "sub-unlisted is not listed in participants.tsv; add a row",
    "twot1w": "2 T1w files",
    "noanat": "no anat/sub-noanat_T1w.nii[.gz] found",
}
# what the message must also tell the user to do (one of these, per case)
TO_DO = ("re-run ingest", "rerun ingest")
# valid but unusual files: ingested, with the stored volume equal to the reference orientation's data
ACCEPTED = ("bigendian", "scaled", "flipped", "permuted", "plainnii", "singleton4d", "float64", "agena", "ageblank")


def _build(bids: Path) -> dict:
    """Break a copy of the cohort in every way of REJECTED and add the ACCEPTED variants; returns expectations."""
    src = nib.load(_t1(bids, SOURCE))
    aff = src.affine.copy()
    vol = src.get_fdata(dtype=np.float32)
    raw16 = np.asanyarray(src.dataobj).astype(np.int16)
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    rows = []

    def row(pid, site="NYU", age="40", sex="F"):
        rows.append({"participant_id": pid, "site": site, "age": age, "sex": sex})

    def save(label, data, affine=aff, suffix=".nii.gz", **kw):
        nib.save(nib.Nifti1Image(data, affine, **kw), _t1(bids, label, suffix))

    good_bytes = _t1(bids, SOURCE).read_bytes()
    # --- files that cannot be read, or should not be
    _t1(bids, "truncated").write_bytes(good_bytes[: len(good_bytes) // 2])
    _t1(bids, "notnifti").write_bytes(gzip.compress(b"this is not a nifti file" * 100))
    _t1(bids, "empty").write_bytes(b"")
    _header_only(_t1(bids, "huge", ".nii"), _huge_header(affine=aff))
    _header_only(_t1(bids, "hugenifti2", ".nii"),
                 _huge_header(nib.Nifti2Header, (2**40, 2**40, 2**20), aff))  # 2**100 voxels: int64 overflows
    _header_only(_t1(bids, "emptydim", ".nii"), _huge_header(shape=(34, 0, 33), affine=aff))
    save("fourd", np.stack([vol, vol], -1))
    bad = vol.copy()
    bad[10, 10, 10] = np.nan
    save("nan", bad)
    bad = vol.copy()
    bad[10, 10, 10], bad[11, 11, 11] = np.inf, -np.inf
    save("inf", bad)
    save("zeros", np.zeros_like(vol))
    save("wronggrid", vol[:-2])
    save("wrongvox", vol, _scaled(aff, 7 / 6))  # 7 mm voxels, same shape and origin
    theta = np.radians(15)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    save("oblique", vol, rot @ aff)
    shifted = aff.copy()
    shifted[:3, 3] += 3
    save("shifted", vol, shifted)
    zero = aff.copy()
    zero[:, 0] = 0
    zero[3, 3] = 1
    _raw_nifti(_t1(bids, "zeroaffine"), vol, zero)
    nan_aff = aff.copy()
    nan_aff[0, 0] = np.nan
    _raw_nifti(_t1(bids, "nanaffine"), vol, nan_aff)
    save("complex", vol.astype(np.complex64))
    rgb = np.zeros(vol.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    save("rgb", rgb)
    _t1(bids, "t1wfolder").mkdir()
    for label in ("truncated", "notnifti", "empty", "huge", "hugenifti2", "emptydim", "fourd", "nan", "inf",
                  "zeros", "wronggrid", "wrongvox", "oblique", "shifted", "zeroaffine", "nanaffine", "complex",
                  "rgb", "t1wfolder"):
        row(f"sub-{label}")
    # --- participants.tsv and folder problems (the files themselves are good copies)
    for label in ("dupid", "nosite", "nasite", "ageforty", "ageneg", "age300", "unlisted", "twot1w"):
        _t1(bids, label).write_bytes(good_bytes)
    row("sub-dupid")
    row("sub-dupid", site="UM")
    row("../x")  # tries to climb out of the output folder
    row("sub-../../etc")
    for folder in ("sub-..", "sub-a\\..\\b", "sub-nl\n"):  # '..' and a separator-like label as folder names
        anat = bids / folder / "anat"
        anat.mkdir(parents=True)
        (anat / f"{folder}_T1w.nii.gz").write_bytes(good_bytes)
    row("sub-a\\..\\b")  # listed too: reported once, from participants.tsv
    row("sub-nosite", site="")
    row("sub-nasite", site="n/a")
    row("sub-ageforty", age="forty")
    row("sub-ageneg", age="-3")
    row("sub-age300", age="300")
    nib.save(src, _t1(bids, "twot1w", ".nii"))  # a second T1w beside the .nii.gz
    (bids / "sub-noanat" / "func").mkdir(parents=True)
    row("sub-noanat")
    # --- valid files that need care: byte order, scaling, orientation, container
    expected = {}
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(">f4")
    save("bigendian", vol.astype(">f4"), header=hdr)
    expected["bigendian"] = vol
    scaled = nib.Nifti1Image(raw16, aff)
    scaled.header.set_data_dtype(np.int16)
    scaled.header.set_slope_inter(0.37, 12.5)
    nib.save(scaled, _t1(bids, "scaled"))
    expected["scaled"] = raw16.astype(np.float64) * 0.37 + 12.5
    lps = aff.copy()  # x and y flipped: the same voxels, stored in another order
    lps[:, :2] *= -1
    lps[:3, 3] = aff[:3, :3] @ [vol.shape[0] - 1, vol.shape[1] - 1, 0] + aff[:3, 3]
    save("flipped", vol[::-1, ::-1].copy(), lps)
    expected["flipped"] = vol
    yxz = aff[:, [1, 0, 2, 3]]  # x and y swapped
    save("permuted", vol.transpose(1, 0, 2).copy(), yxz)
    expected["permuted"] = vol
    save("plainnii", vol, suffix=".nii")
    expected["plainnii"] = vol
    save("singleton4d", vol[..., None])
    expected["singleton4d"] = vol
    save("float64", vol.astype(np.float64))
    expected["float64"] = vol
    for label in ("bigendian", "scaled", "flipped", "permuted", "plainnii", "singleton4d", "float64"):
        row(f"sub-{label}")
    for label, age in (("agena", "n/a"), ("ageblank", "")):  # unknown age is allowed
        _t1(bids, label).write_bytes(good_bytes)
        row(f"sub-{label}", age=age)
        expected[label] = vol
    pd.concat([table, pd.DataFrame(rows)]).to_csv(bids / "participants.tsv", sep="\t", index=False)
    return expected


def _scaled(affine: np.ndarray, factor: float) -> np.ndarray:
    out = affine.copy()
    out[:3, :3] *= factor
    return out


@pytest.fixture(scope="module")
def corpus(small_cohort, tmp_path_factory, client):
    root = tmp_path_factory.mktemp("corpus")
    bids = root / "bids"
    shutil.copytree(small_cohort["bids_dir"], bids)
    good = sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*"))
    expected = _build(bids)
    before = {p: p.read_bytes() for p in bids.rglob("*") if p.is_file()}
    store = root / "store.zarr"
    result = ingest(bids, store, client, chunks=(16, 16, 16), progress=False)
    return {"root": root, "bids": bids, "store": store, "result": result, "good": good, "expected": expected,
            "before": before, "client": client}


def test_corpus_is_big_enough():
    assert len(REJECTED) >= 20 and len(ACCEPTED) >= 3


@pytest.mark.parametrize("label", list(REJECTED))
def test_each_bad_input_is_set_aside_with_its_reason(corpus, label):
    reasons = {r["subject"]: r for r in corpus["result"].rejected}
    assert label in reasons, f"{label!r} was not rejected; rejected: {sorted(reasons)}"
    entry = reasons[label]
    reason = entry["reason"]
    assert REJECTED[label] in reason, reason
    # which file: the message names it (relative to the input root; never an absolute path)
    assert entry["path"] in reason or repr(entry["path"]) in reason or "participants.tsv" in reason, entry
    assert str(corpus["root"]) not in reason and not reason.startswith("/"), reason
    assert any(hint in reason for hint in TO_DO), f"no 'what to do' in {reason!r}"
    assert f"sub-{label}" in corpus["result"].summary() or label in corpus["result"].summary()


def test_the_rest_of_the_batch_is_ingested_with_the_right_data(corpus):
    result, bids = corpus["result"], corpus["bids"]
    rejected = Counter(r["subject"] for r in result.rejected)
    assert set(rejected) == set(REJECTED), set(rejected) ^ set(REJECTED)
    assert max(rejected.values()) == 1, rejected  # one clear entry per subject
    assert sorted(result.ingested) == sorted(corpus["good"] + list(ACCEPTED))
    assert result.waiting == []
    ds = open_cohort(corpus["store"])
    assert sorted(ds[S.SUBJECT].values) == sorted(result.ingested)
    assert all(LABEL.match(s) for s in ds[S.SUBJECT].values)
    participants = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    for sub in corpus["good"]:
        stored = ds[S.IMAGES].sel(subject=sub).values
        np.testing.assert_array_equal(stored, nib.load(_t1(bids, sub)).get_fdata(dtype=np.float32))
        age = float(participants.loc[participants.participant_id == f"sub-{sub}", "age"].iat[0])
        assert ds[S.AGE].sel(subject=sub).item() == age
    # files are never modified by ingest
    assert {p: p.read_bytes() for p in bids.rglob("*") if p.is_file()} == corpus["before"]


@pytest.mark.parametrize("label", ACCEPTED)
def test_odd_but_valid_files_are_conformed(corpus, label):
    ds = open_cohort(corpus["store"])
    stored = ds[S.IMAGES].sel(subject=label).values
    expected = corpus["expected"][label]
    np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-4)
    # and it is what nibabel gives after conforming to the store's (RAS) grid
    path = next(corpus["bids"].glob(f"sub-{label}/anat/sub-{label}_T1w.nii*"))
    canonical = nib.as_closest_canonical(nib.funcs.squeeze_image(nib.load(path)))
    np.testing.assert_allclose(stored, canonical.get_fdata(dtype=np.float32), rtol=1e-6, atol=1e-4)
    original = nib.load(path).affine
    np.testing.assert_allclose(ds[S.AFFINE].sel(subject=label).values, original)  # provenance: its own affine


def test_unknown_age_is_kept_as_missing_not_rejected(corpus):
    ds = open_cohort(corpus["store"])
    for label in ("agena", "ageblank"):
        assert np.isnan(ds[S.AGE].sel(subject=label).item())
    assert {"agena", "ageblank"} <= set(corpus["result"].incomplete[S.AGE])


def test_rejected_subjects_never_get_data_and_a_rerun_rejects_them_again(corpus):
    store = CohortStore(corpus["store"])
    table = store.table()
    # worker-side rejections (the data was unreadable) are in the store as rejected, with no data
    worker_side = table[table[S.INGEST_STATUS] == S.REJECTED]
    assert set(worker_side[S.SUBJECT]) == {"truncated", "nan", "inf", "zeros"}
    for pos in worker_side.index:
        assert np.isnan(store.group[S.IMAGES][int(pos)]).all()
    again = ingest(corpus["bids"], corpus["store"], corpus["client"], chunks=(16, 16, 16), progress=False)
    assert again.ingested == [] and sorted(again.skipped) == sorted(corpus["result"].ingested)
    assert {r["subject"] for r in again.rejected} == set(REJECTED)
    assert CohortStore(corpus["store"]).n_subjects == len(table)  # nothing appended twice


def test_unsafe_labels_never_become_files(corpus):
    root = corpus["root"]
    made = {p.relative_to(root).parts[0] for p in root.rglob("*")}
    assert made <= {"bids", "store.zarr"}, made
    assert not (root.parent / "x").exists() and not (root / "x").exists()
    for path in corpus["store"].rglob("*"):
        assert ".." not in path.relative_to(corpus["store"]).parts and "\\" not in path.name


# ---- the size check, alone: refused before reading, quickly and without allocating -----------------------
@pytest.mark.parametrize("header", [
    _huge_header(affine=np.diag([6.0, 6.0, 6.0, 1.0])),
    _huge_header(nib.Nifti2Header, (2**40, 2**40, 2**20), np.diag([6.0, 6.0, 6.0, 1.0])),
    _huge_header(nib.Nifti2Header, (2**21, 2**21, 2**22), np.diag([6.0, 6.0, 6.0, 1.0])),  # 2**64: wraps to 0
], ids=["nifti1-32GiB", "nifti2-2^100-voxels", "nifti2-product-wraps-to-0"])
def test_huge_header_is_refused_by_the_size_check_before_allocating(tmp_path, header):
    path = tmp_path / "sub-huge_T1w.nii"
    _header_only(path, header)
    grid = Grid((34, 40, 33), np.diag([6.0, 6.0, 6.0, 1.0]))
    for step in (check_header, read_volume):
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(InputRejected, match=r"GiB of voxels .*refusing to read it") as info:
            step(path, grid)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 2.0 and peak < 8 * 1024**2, (elapsed, peak)
        assert str(path) in str(info.value) and "re-run ingest" in str(info.value)


def test_first_file_with_a_wrong_grid_does_not_become_the_reference(cohort_copy, tmp_path):
    """The reference grid is the one most files share: a bad first file is the one set aside, not the rest."""
    first = _t1(cohort_copy, "001")
    img = nib.load(first)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-3], img.affine), first)
    _header_only(_t1(cohort_copy, "000", ".nii"), _huge_header(affine=img.affine))  # sorts first, claims 32 GiB
    table = pd.read_csv(cohort_copy / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    table.loc[len(table)] = {"participant_id": "sub-000", "site": "NYU", "age": "30", "sex": "M"}
    table.to_csv(cohort_copy / "participants.tsv", sep="\t", index=False)
    result = ingest(cohort_copy, tmp_path / "s.zarr", None, chunks=(16, 16, 16), progress=False)
    reasons = {r["subject"]: r["reason"] for r in result.rejected}
    assert set(reasons) == {"000", "001"}
    assert "does not match the reference grid" in reasons["001"] and "refusing to read" in reasons["000"]
    assert len(result.ingested) == 11
    assert CohortStore(tmp_path / "s.zarr").grid.shape == img.shape


@pytest.mark.parametrize(("text", "age"), [("42", 42.0), ("42.5", 42.5), (" 7 ", 7.0), ("0", 0.0), ("120", 120.0),
                                           ("n/a", None), ("N/A", None), ("", None), ("nan", None)])
def test_plausible_or_unknown_ages_are_read(text, age):
    value = _parse_age(text)
    assert np.isnan(value) if age is None else value == age


@pytest.mark.parametrize(("text", "why"), [("forty", "is not a number"), ("-3", "is negative"),
                                           ("300", "is over 120 years"), ("inf", "is not a number"),
                                           ("42,5", "is not a number"), ("1e9", "is over 120 years")])
def test_malformed_ages_are_refused_naming_the_value(text, why):
    with pytest.raises(BadValue, match="Write the age in years as a number .* or n/a if it is unknown") as info:
        _parse_age(text)
    assert f"age {text!r} {why}" in str(info.value)
