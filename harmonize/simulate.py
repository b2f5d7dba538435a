"""Multi-site cohorts with traveling-subject ground truth, made from real anatomy.

Anatomy: the MNI152 2009a T1 and its GM/WM probability maps that ship inside nilearn (no network).
Each subject is the template under a smooth random deformation, with an age effect (GM loss, CSF
gain) and a small sex effect; the T1's fine texture (what the tissue maps do not explain) is kept.

Scanners: per-scan image-quality metrics of 1,101 real ABIDE T1w scans from 17 sites (MRIQC, as
shipped in the `mriqc-learn` package). Each simulated scan borrows the metrics of one real scan of
its site: GM/WM and CSF/WM contrast (summary_*_median), SNR in white matter (snr_wm), intensity
non-uniformity (inu_range) and smoothness (fwhm_avg). A site also has a gain (arbitrary scanner
units), an intensity non-linearity (gamma) and a coil bias pattern, drawn from the seed.

Ground truth: every subject is also "scanned" at the reference site with that site's median
metrics and no noise, written to a separate folder that the pipeline never reads.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

ABIDE_SITES_DEFAULT = ("NYU", "UM", "USM", "UCLA")
_IQM_COLUMNS = ("summary_gm_median", "summary_wm_median", "summary_csf_median", "snr_wm",
                "inu_range", "fwhm_avg")
_FWHM_FLOOR_MM = 3.0  # smoothness the template itself already has, roughly; only the excess is added


@dataclass(frozen=True)
class CohortSpec:
    """What `harmonize simulate` makes. Seeded: the same spec gives the same voxels and tables."""

    sites: tuple[str, ...] = ABIDE_SITES_DEFAULT
    subjects_per_site: int = 10
    resolution_mm: float = 2.0
    seed: int = 0
    age_confounding: float = 0.6  # 0: same age distribution everywhere; 1: sites barely overlap
    deformation_mm: float = 2.5
    bias_scale: float = 0.5  # fraction of MRIQC's inu_range kept (inputs are assumed N4-corrected once)
    reference_site: str | None = None  # defaults to the first site
    # MRIQC measured SNR on the scans as acquired (ABIDE: ~1 mm); a volume resampled to coarser voxels
    # averages that noise over (res / native)^3 voxels, so its SNR is higher by the square root of that
    native_resolution_mm: float = 1.0
    # MRIQC's per-scan GM/WM and CSF/WM medians vary within a site by anatomy (tissue volumes, partial
    # volume, motion) as well as by scanner; anatomy already varies here on its own, so only this
    # fraction of a borrowed scan's deviation from its site's median contrast is taken as scanner's
    contrast_jitter: float = 0.5

    @property
    def reference(self) -> str:
        return self.reference_site or self.sites[0]


def load_abide_iqms() -> pd.DataFrame:
    """The real per-scan ABIDE image-quality metrics shipped in mriqc-learn."""
    # located without importing mriqc_learn.datasets, whose __init__ needs pkg_resources
    spec = importlib.util.find_spec("mriqc_learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "abide.tsv" if spec else None
    if path is None or not path.exists():
        raise RuntimeError("simulate needs the ABIDE quality metrics from the `mriqc-learn` package: "
                           "pip install --no-deps mriqc-learn")
    table = pd.read_csv(path, sep="\t")
    return table[["site", *_IQM_COLUMNS]].dropna()


@dataclass
class Template:
    """Tissue maps of the template at one resolution, plus what the maps do not explain."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    texture: np.ndarray  # T1 residual after the tissue model, in units of the T1's WM intensity
    mask: np.ndarray
    affine: np.ndarray


def load_template(resolution_mm: float = 2.0) -> Template:
    from nilearn import datasets  # local: nilearn is slow to import and only simulate needs it

    res = resolution_mm if resolution_mm != int(resolution_mm) else int(resolution_mm)
    t1_img = datasets.load_mni152_template(resolution=res)
    t1 = t1_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=res).get_fdata(dtype=np.float32).clip(0, 1)
    wm = datasets.load_mni152_wm_template(resolution=res).get_fdata(dtype=np.float32).clip(0, 1)
    mask = datasets.load_mni152_brain_mask(resolution=res).get_fdata(dtype=np.float32) > 0.5
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0, 1).astype(np.float32)
    # T1 ≈ a·GM + b·WM + c·CSF inside the brain; the residual is anatomy the maps miss (texture)
    design = np.stack([gm[mask], wm[mask], csf[mask]], axis=1)
    coef, *_ = np.linalg.lstsq(design, t1[mask], rcond=None)
    texture = np.zeros_like(t1)
    texture[mask] = (t1[mask] - design @ coef) / coef[1]
    return Template(gm=gm * mask, wm=wm * mask, csf=csf, texture=texture, mask=mask,
                    affine=np.asarray(t1_img.affine, dtype=float))


def _smooth_field(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return field / (np.abs(field).max() + 1e-12)


def _coil_pattern(rng: np.random.Generator, shape) -> np.ndarray:
    """A smooth multiplicative-bias log-pattern: low-order cosines, as receive coils produce."""
    grids = np.meshgrid(*[np.linspace(0, np.pi, n, dtype=np.float32) for n in shape], indexing="ij")
    pattern = np.zeros(shape, dtype=np.float32)
    for _ in range(6):
        freq = rng.integers(0, 3, size=3)
        phase = rng.uniform(0, 2 * np.pi)
        pattern += rng.normal() * np.cos(freq[0] * grids[0] + freq[1] * grids[1] + freq[2] * grids[2] + phase)
    return pattern


@dataclass(frozen=True)
class Scanner:
    """What one scan at one site looks like (intensities relative to white matter = 1)."""

    site: str
    gm: float
    csf: float
    gamma: float
    gain: float
    snr: float
    bias_range: float
    fwhm_mm: float


def _site_draws(spec: CohortSpec, iqms: pd.DataFrame, rng: np.random.Generator, shape):
    unknown = [s for s in spec.sites if s not in set(iqms.site)]
    if unknown:
        raise ValueError(f"unknown ABIDE site(s) {unknown}; choose from {sorted(set(iqms.site))}")
    sites = {}
    for site in spec.sites:
        sites[site] = {"gamma": float(rng.uniform(0.8, 1.25)), "gain": float(np.exp(rng.normal(0, 0.35))),
                       "pattern": _coil_pattern(rng, shape)}
    return sites


def _tissue_ratios(row: pd.Series) -> tuple[float, float]:
    wm = float(row["summary_wm_median"])
    return float(row["summary_gm_median"]) / wm, float(row["summary_csf_median"]) / wm


def _site_contrast(iqms: pd.DataFrame, site: str) -> tuple[float, float]:
    """The site's median GM/WM and CSF/WM ratios over its real scans."""
    rows = iqms[iqms.site == site]
    return (float((rows.summary_gm_median / rows.summary_wm_median).median()),
            float((rows.summary_csf_median / rows.summary_wm_median).median()))


def _scanner_from_row(site: str, row: pd.Series, draws: dict, bias_scale: float,
                      site_ratios: tuple[float, float] | None = None, contrast_jitter: float = 1.0) -> Scanner:
    gm, csf = _tissue_ratios(row)
    if site_ratios is not None:  # keep only part of this scan's deviation from its site's contrast
        gm = site_ratios[0] + contrast_jitter * (gm - site_ratios[0])
        csf = site_ratios[1] + contrast_jitter * (csf - site_ratios[1])
    return Scanner(site=site, gm=gm, csf=csf, gamma=draws["gamma"], gain=draws["gain"],
                   snr=float(row["snr_wm"]), bias_range=bias_scale * float(row["inu_range"]),
                   fwhm_mm=float(row["fwhm_avg"]))


def _deform(template: Template, rng: np.random.Generator, spec: CohortSpec, age: float, sex: str):
    shape = template.mask.shape
    res = spec.resolution_mm
    sigma = 12.0 / res  # displacement varies over ~1 cm: gyral-scale shape differences
    disp = [_smooth_field(rng, shape, sigma) * (spec.deformation_mm / res) for _ in range(3)]
    centre = (np.array(shape) - 1) / 2
    scale = 1.0 + (0.015 if sex == "M" else -0.015) + rng.normal(0, 0.02)  # head size
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coords[axis] = centre[axis] + (coords[axis] - centre[axis]) / scale + disp[axis]
    warp = lambda vol: ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)  # noqa: E731
    gm, wm, csf = warp(template.gm), warp(template.wm), warp(template.csf)
    texture, mask = warp(template.texture), warp(template.mask.astype(np.float32)) > 0.5
    # ageing: cortical/subcortical GM thins (≈0.4 %/year around mid-life), CSF takes its place
    gm_keep = np.clip(1.0 - 0.004 * (age - 45.0) - (0.01 if sex == "M" else 0.0), 0.6, 1.2)
    lost = gm * (1.0 - gm_keep)
    return gm - lost, wm, csf + lost, texture, mask


def _image(anatomy, scanner: Scanner, pattern: np.ndarray, subject_bias: np.ndarray | None,
           rng: np.random.Generator | None, resolution_mm: float, fwhm_floor_mm: float,
           native_resolution_mm: float = 1.0) -> np.ndarray:
    gm, wm, csf, texture, mask = anatomy
    relative = scanner.gm * gm + wm + scanner.csf * csf + 0.5 * texture * (gm + wm)
    relative = np.clip(relative, 0, None) ** scanner.gamma
    log_bias = pattern.copy()
    if subject_bias is not None:
        log_bias = log_bias + 0.25 * subject_bias * np.abs(pattern).max()
    inside = log_bias[mask]
    spread = np.percentile(inside, 95) - np.percentile(inside, 5)
    log_bias = (log_bias - np.median(inside)) * (scanner.bias_range / max(spread, 1e-6))
    image = relative * np.exp(log_bias)
    extra_fwhm = np.sqrt(max(scanner.fwhm_mm**2 - fwhm_floor_mm**2, 0.0))
    if extra_fwhm > 0:
        image = ndimage.gaussian_filter(image, extra_fwhm / 2.3548 / resolution_mm)
    image = image * mask * (1000.0 * scanner.gain)
    if rng is not None:  # Rician noise: magnitude of a complex signal with Gaussian noise
        snr = scanner.snr * (resolution_mm / native_resolution_mm) ** 1.5
        sigma = 1000.0 * scanner.gain / snr
        real = image + rng.normal(0, sigma, image.shape)
        imag = rng.normal(0, sigma, image.shape)
        image = np.sqrt(real**2 + imag**2) * mask
    return image.astype(np.float32)


def simulate_cohort(out_dir: str | os.PathLike, spec: CohortSpec | None = None,
                    progress: bool = False) -> dict:
    """Write a BIDS-like cohort to OUT/bids and traveling-subject ground truth to OUT/groundtruth.

    Returns a summary (paths, per-site scanner parameters, subjects).
    """
    spec = spec or CohortSpec()
    if spec.reference not in spec.sites:
        raise ValueError(f"reference site {spec.reference!r} is not one of {spec.sites}")
    out = Path(out_dir)
    bids, truth = out / "bids", out / "groundtruth"
    rng = np.random.default_rng(spec.seed)
    template = load_template(spec.resolution_mm)
    iqms = load_abide_iqms()
    shape = template.mask.shape
    draws = _site_draws(spec, iqms, rng, shape)
    ref_rows = iqms[iqms.site == spec.reference]
    reference_scanner = _scanner_from_row(spec.reference, ref_rows[list(_IQM_COLUMNS)].median(),
                                          draws[spec.reference], spec.bias_scale)
    n_sites = len(spec.sites)
    site_contrast = {site: _site_contrast(iqms, site) for site in spec.sites}
    rows, records = [], []
    iterator = [(k, site, j) for k, site in enumerate(spec.sites) for j in range(spec.subjects_per_site)]
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="simulate", unit="subject")
    for k, site, j in iterator:
        subject = f"{len(rows) + 1:03d}"
        sub_rng = np.random.default_rng([spec.seed, k, j])
        # site shifts the age distribution: partly confounded, as in real multi-site studies
        centre = 45.0 + spec.age_confounding * 20.0 * ((k / max(n_sites - 1, 1)) * 2 - 1)
        age = float(np.clip(sub_rng.normal(centre, 10.0), 18, 85).round(1))
        sex = "M" if sub_rng.random() < 0.5 else "F"
        anatomy = _deform(template, sub_rng, spec, age, sex)
        site_rows = iqms[iqms.site == site]
        scan_row = site_rows.iloc[int(sub_rng.integers(len(site_rows)))]
        scanner = _scanner_from_row(site, scan_row, draws[site], spec.bias_scale, site_contrast[site],
                                    spec.contrast_jitter)
        subject_bias = _smooth_field(sub_rng, shape, 20.0 / spec.resolution_mm)
        image = _image(anatomy, scanner, draws[site]["pattern"], subject_bias, sub_rng, spec.resolution_mm,
                       _FWHM_FLOOR_MM, spec.native_resolution_mm)
        truth_image = _image(anatomy, reference_scanner, draws[spec.reference]["pattern"], None, None,
                             spec.resolution_mm, _FWHM_FLOOR_MM)
        _save(np.round(image).astype(np.int16), template.affine,
              bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
        _save(truth_image, template.affine,
              truth / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-groundtruth_T1w.nii.gz")
        rows.append({"participant_id": f"sub-{subject}", "site": site, "age": age, "sex": sex})
        records.append(asdict(scanner))
    bids.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)
    pd.DataFrame(rows).assign(**{f"scanner_{k}": [r[k] for r in records] for k in records[0]}).to_csv(
        truth / "scanners.tsv", sep="\t", index=False)
    (bids / "dataset_description.json").write_text(
        '{"Name": "harmonize simulated multi-site cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw"}\n')
    return {"bids_dir": str(bids), "groundtruth_dir": str(truth), "n_subjects": len(rows),
            "sites": list(spec.sites), "reference_site": spec.reference,
            "reference_scanner": asdict(reference_scanner)}


def groundtruth_path(groundtruth_dir: str | os.PathLike, subject: str) -> Path:
    return Path(groundtruth_dir) / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-groundtruth_T1w.nii.gz"


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=4)  # MNI152 space
    img.set_sform(affine, code=4)
    nib.save(img, str(path))
