"""NIfTI volumes: plain functions to check, read, conform and write them (nibabel).

Every problem with an input file raises :class:`InputRejected` with a reason a user can act on;
the caller records it and goes on with the rest of the cohort.
"""

from __future__ import annotations

import hashlib
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


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _load_image(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputRejected(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc}). "
                            "Check that the file is a complete .nii/.nii.gz.") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputRejected(f"{path}: is a {type(img).__name__}, expected NIfTI-1/2.")
    return img


def _spatial_shape(path: Path, img: nib.Nifti1Image) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputRejected(f"{path}: has shape {shape} ({len(shape)}-D); expected one 3-D T1w volume.")
    if min(shape) < 1:
        raise InputRejected(f"{path}: has an empty dimension, shape {shape}.")
    nbytes = int(np.prod(shape, dtype=np.int64)) * img.get_data_dtype().itemsize
    if nbytes > MAX_VOLUME_BYTES:
        raise InputRejected(f"{path}: header claims {nbytes / 1024**3:.1f} GiB of voxels (shape {shape}); "
                            "refusing to read it. The header is probably corrupt.")
    return shape


def _to_reference(path: Path, shape, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Axis flips/permutations (lossless) that bring the file onto the reference grid, or reject."""
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.io_orientation(grid.affine))
    new_affine = affine @ ornt.inv_ornt_aff(transform, shape)
    new_shape = tuple(int(shape[int(ax)]) for ax in transform[:, 0].argsort())
    if new_shape != tuple(grid.shape) or not np.allclose(new_affine, grid.affine, atol=AFFINE_ATOL_MM):
        vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        raise InputRejected(
            f"{path}: grid {shape} at {np.round(vox, 3).tolist()} mm (origin "
            f"{np.round(affine[:3, 3], 2).tolist()}) does not match the reference grid {tuple(grid.shape)} at "
            f"{np.round(grid.voxel_size, 3).tolist()} mm (origin {np.round(grid.affine[:3, 3], 2).tolist()}). "
            "Register/resample it to the cohort's template space first (e.g. with fMRIPrep/ANTs) "
            "and re-run ingest.")
    return transform


def check_header(path: str | os.PathLike, grid: Grid) -> np.ndarray:
    """Cheap checks from the header alone; returns the file's affine. Raises InputRejected."""
    path = Path(path)
    img = _load_image(path)
    shape = _spatial_shape(path, img)
    _to_reference(path, shape, img.affine, grid)
    return np.asarray(img.affine, dtype=float)


def read_volume(path: str | os.PathLike, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume conformed to the reference grid: float32, native byte order, scaling applied.

    Returns (volume, original affine). Raises InputRejected for anything unusable.
    """
    path = Path(path)
    img = _load_image(path)
    shape = _spatial_shape(path, img)
    transform = _to_reference(path, shape, img.affine, grid)
    try:
        # get_fdata applies scl_slope/inter and returns native byte order (torch rejects '>f4')
        data = img.get_fdata(dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise InputRejected(f"{path}: the voxel data cannot be read ({type(exc).__name__}: {exc}); "
                            "the file is probably truncated. Re-export or re-copy it.") from exc
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputRejected(f"{path}: {int(bad.sum())} voxels are NaN or Inf; expected finite intensities. "
                            "Fix the preprocessing output (or mask those voxels to 0) and re-run ingest.")
    if not np.any(data):
        raise InputRejected(f"{path}: every voxel is 0; the volume is empty.")
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
