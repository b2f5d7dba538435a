"""NIfTI volumes: plain functions to check, read, conform and write them (nibabel).

Every problem with an input file raises :class:`InputRejected` with a reason a user can act on;
the caller records it and goes on with the rest of the cohort.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from harmonize.io.store import Grid

# A T1w volume on any template grid is well below this; a header claiming more is corrupt or
# not a T1w, and refusing it before allocating keeps one bad file from exhausting a worker.
MAX_VOLUME_BYTES = 2 * 1024**3
AFFINE_ATOL_MM = 1e-3


class InputRejected(ValueError):
    """An input volume cannot be used; the message says which file, what is wrong and what to do."""


_RAS = np.eye(4)  # RAS+: the orientation of an identity affine
_SAME_AXES = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])  # an orientation transform that changes nothing


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _why(exc: BaseException, path: Path, shown: str) -> str:
    """An exception in a message, with the file's absolute path replaced by how the file is shown."""
    return f"{type(exc).__name__}: {str(exc).replace(str(path), shown)}"


def _load_image(path: Path, shown: str) -> nib.Nifti1Image:
    if path.is_dir():
        raise InputRejected(f"{shown}: is a folder, not a file. Put the T1w volume itself there "
                            "(sub-<label>_T1w.nii.gz) and re-run ingest.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputRejected(f"{shown}: cannot be opened ({_why(exc, path, shown)}). "
                            "Check that the file exists and is readable, then re-run ingest.") from exc
    if size == 0:
        raise InputRejected(f"{shown}: is empty (0 bytes). The copy or conversion failed; "
                            "re-export or re-copy the file and re-run ingest.")
    try:
        # mmap=False: an uncompressed file's voxels are read into memory, never left mapped (a file truncated
        # or replaced while its volume is in use would otherwise kill the worker with SIGBUS)
        img = nib.load(str(path), mmap=False)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputRejected(f"{shown}: not a readable NIfTI file ({_why(exc, path, shown)}). Check that the "
                            "file is a complete .nii/.nii.gz (re-export or re-copy it) and re-run ingest.") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputRejected(f"{shown}: is a {type(img).__name__}, expected NIfTI-1/2. Convert it to NIfTI "
                            "(e.g. with dcm2niix or nibabel) and re-run ingest.")
    return img


def _check_dtype(shown: str, img: nib.Nifti1Image) -> None:
    """Real-valued intensities only: complex, RGB and other compound voxels have no single intensity."""
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        what = {"c": "complex", "V": "compound (e.g. RGB)", "b": "boolean"}.get(dtype.kind, "non-numeric")
        raise InputRejected(f"{shown}: voxel data type {dtype} is {what}; expected real-valued intensities "
                            "(an integer or float type). Export the T1w magnitude image as int16/float32 "
                            "and re-run ingest.")


def _spatial_shape(shown: str, img: nib.Nifti1Image) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputRejected(f"{shown}: has shape {shape} ({len(shape)}-D); expected one 3-D T1w volume. "
                            "Split a series or average the repeats into one volume and re-run ingest.")
    if min(shape) < 1:
        raise InputRejected(f"{shown}: has an empty dimension, shape {shape}; the header is corrupt. "
                            "Re-export the file and re-run ingest.")
    # Python integers: a NIfTI-2 header's 64-bit dims would overflow a numpy product and slip past the check
    nbytes = math.prod(shape) * img.get_data_dtype().itemsize
    if nbytes > MAX_VOLUME_BYTES:
        gib = nbytes / 1024**3
        size = f"{gib:.1f}" if gib < 1e6 else f"{gib:.3g}"
        raise InputRejected(f"{shown}: header claims {size} GiB of voxels (shape {shape}, {img.get_data_dtype()}); "
                            f"refusing to read it (limit {MAX_VOLUME_BYTES / 1024**3:.0f} GiB). The header is "
                            "probably corrupt: re-export the file and re-run ingest.")
    return shape


def _check_affine(shown: str, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0)) if np.all(np.isfinite(affine)) else None
    if vox is None or np.any(vox <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputRejected(f"{shown}: its voxel-to-world affine (sform/qform) is degenerate "
                            f"({np.round(affine[:3], 3).tolist()}): non-finite or zero voxel size. "
                            "Fix the header's sform/qform (re-export the file) and re-run ingest.")
    return affine


def _rotation_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between the axis directions of two affines whose axes are in the same order."""
    ra = a[:3, :3] / np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    rb = b[:3, :3] / np.sqrt((b[:3, :3] ** 2).sum(axis=0))
    cos = np.clip(np.abs(np.sum(ra * rb, axis=0)), 0.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())


@functools.lru_cache(maxsize=256)
def _reorientation(shape: tuple[int, ...], affine_bytes: bytes, reference_bytes: bytes,
                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(transform, affine after it, shape after it) from a file's grid to the reference's axes. Cached: a
    cohort's files share a handful of grids, and nibabel's orientation code (an SVD per call) was half of
    each header check, done on the coordinator for every file before any task starts."""
    affine = np.frombuffer(affine_bytes).reshape(4, 4)
    reference = np.frombuffer(reference_bytes).reshape(4, 4)
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.io_orientation(reference))
    new_affine = affine @ ornt.inv_ornt_aff(transform, shape)
    new_shape = tuple(int(shape[int(ax)]) for ax in transform[:, 0].argsort())
    for array in (transform, new_affine):
        array.setflags(write=False)  # shared by every caller of the cache
    return transform, new_affine, new_shape


def _reoriented(shape, affine: np.ndarray, reference_affine: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """:func:`_reorientation` for arrays (the cache needs hashable keys)."""
    return _reorientation(tuple(int(n) for n in shape), np.asarray(affine, dtype=np.float64).tobytes(),
                          np.asarray(reference_affine, dtype=np.float64).tobytes())


def _to_reference(shown: str, shape, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Axis flips/permutations (lossless) that bring the file onto the reference grid, or reject."""
    transform, new_affine, new_shape = _reoriented(shape, affine, grid.affine)
    if new_shape != tuple(grid.shape) or not np.allclose(new_affine, grid.affine, atol=AFFINE_ATOL_MM):
        vox = np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0))
        ref_vox = np.asarray(grid.voxel_size)
        problems = []
        if new_shape != tuple(grid.shape):
            problems.append(f"shape {new_shape} instead of {tuple(grid.shape)} (in the reference's axis order)")
        if not np.allclose(vox, ref_vox, atol=AFFINE_ATOL_MM):
            problems.append(f"voxel size {np.round(vox, 3).tolist()} mm instead of "
                            f"{np.round(ref_vox, 3).tolist()} mm")
        angle = _rotation_degrees(new_affine, grid.affine)
        if angle > 0.01:
            problems.append(f"oblique: its axes are rotated {angle:.1f} degrees from the reference axes "
                            "(only lossless axis flips/permutations are applied at ingest)")
        if not problems:
            problems.append(f"origin {np.round(new_affine[:3, 3], 2).tolist()} instead of "
                            f"{np.round(grid.affine[:3, 3], 2).tolist()} (shifted)")
        raise InputRejected(
            f"{shown}: does not match the reference grid: {'; '.join(problems)}. The reference grid is "
            f"{tuple(grid.shape)} at {np.round(ref_vox, 3).tolist()} mm, origin "
            f"{np.round(grid.affine[:3, 3], 2).tolist()}. Register/resample it to the cohort's template space "
            "first (e.g. with fMRIPrep/ANTs) and re-run ingest.")
    return transform


def _interpreted(path: Path, shown: str, step):
    """Run a header check; anything but InputRejected (nibabel on a malformed header) becomes one too."""
    try:
        return step()
    except InputRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed header must not stop the batch
        raise InputRejected(f"{shown}: the NIfTI header cannot be interpreted ({_why(exc, path, shown)}). "
                            "Re-export the file and re-run ingest.") from exc


def _usable(path: Path, shown: str) -> tuple[nib.Nifti1Image, tuple[int, int, int], np.ndarray]:
    """(image, spatial shape, affine) of a file whose header passes every check that needs no reference."""
    img = _load_image(path, shown)

    def step():
        _check_dtype(shown, img)
        return img, _spatial_shape(shown, img), _check_affine(shown, img.affine)
    return _interpreted(path, shown, step)


def _checked(path: Path, shown: str, grid: Grid) -> tuple[nib.Nifti1Image, tuple[int, int, int], np.ndarray]:
    """Every check the header allows: (image, spatial shape, orientation transform to the reference)."""
    img, shape, affine = _usable(path, shown)
    return img, shape, _interpreted(path, shown, lambda: _to_reference(shown, shape, affine, grid))


def native_grid(path: str | os.PathLike, shown: str | None = None) -> Grid:
    """A usable file's own grid in RAS+ axis order (lossless flips/permutations); raises InputRejected."""
    path = Path(path)
    shown = shown or str(path)
    _, shape, affine = _usable(path, shown)

    def step():  # RAS+ is the orientation of an identity affine
        _, ras_affine, ras_shape = _reoriented(shape, affine, _RAS)
        return Grid(ras_shape, np.array(ras_affine))
    return _interpreted(path, shown, step)


def check_header(path: str | os.PathLike, grid: Grid, shown: str | None = None) -> np.ndarray:
    """Cheap checks from the header alone; returns the file's affine. Raises InputRejected.

    `shown` is how messages name the file (ingest passes the path relative to the input root).
    """
    path = Path(path)
    img, _, _ = _checked(path, shown or str(path), grid)
    return np.asarray(img.affine, dtype=float)


def read_volume(path: str | os.PathLike, grid: Grid, shown: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume conformed to the reference grid: float32, native byte order, scaling applied.

    Returns (volume, original affine). Raises InputRejected for anything unusable.
    """
    path = Path(path)
    shown = shown or str(path)
    img, shape, transform = _checked(path, shown, grid)
    try:
        # get_fdata applies scl_slope/inter and returns native byte order (torch rejects '>f4')
        data = img.get_fdata(dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise InputRejected(f"{shown}: the voxel data cannot be read ({_why(exc, path, shown)}); "
                            "the file is probably truncated. Re-export or re-copy it and re-run ingest.") from exc
    # one float64 sum tells whether any voxel is NaN/Inf (a finite float32 volume cannot overflow it); the
    # counts for the message are taken only then: three full passes per volume were 10 % of ingest's read
    if not np.isfinite(data.sum(dtype=np.float64)):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise InputRejected(f"{shown}: {n_nan + n_inf} voxels are NaN or Inf ({n_nan} NaN, {n_inf} Inf); "
                            "expected finite intensities. Fix the preprocessing output (or set those voxels to 0) "
                            "and re-run ingest.")
    if not np.any(data):
        raise InputRejected(f"{shown}: every voxel is 0; the volume is empty. Check the step that wrote it "
                            "(conversion, skull stripping, registration) and re-run ingest.")
    if np.array_equal(transform, _SAME_AXES):
        # already on the reference's axes: keep nibabel's (Fortran-ordered) array; a C-order copy of every
        # volume was 20 % of ingest's read, and the store's writer copies chunk by chunk anyway
        return data, np.asarray(img.affine, dtype=float)
    volume = np.ascontiguousarray(ornt.apply_orientation(data, transform), dtype=np.float32)
    return volume, np.asarray(img.affine, dtype=float)


def write_volume(volume: np.ndarray, grid: Grid, original_affine: np.ndarray,
                 path: str | os.PathLike) -> Path:
    """Write a volume on the reference grid back in the subject's original orientation and affine.

    The header is built fresh (float32, no free-text fields or extensions copied from any source).
    """
    path = Path(path)
    transform = ornt.ornt_transform(ornt.io_orientation(grid.affine), ornt.io_orientation(original_affine))
    data = ornt.apply_orientation(np.asarray(volume, dtype=np.float32), transform)
    img = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(original_affine, float))
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    img.set_qform(original_affine, code=1)
    img.set_sform(original_affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name with the same suffix (nibabel picks gzip from it), then an atomic rename
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path
