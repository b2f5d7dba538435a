"""What a harmonization is judged by: site leakage, biology kept, fidelity to ground truth.

- site predictability: cross-validated accuracy of a logistic regression on PCA components of brain
  voxels (PCA fitted inside each training fold), against the chance level (majority-class rate);
- age association kept: cross-validated R² of a ridge regression of age on the same components;
- fidelity: PSNR and correlation against the same subject's ground-truth image, both scaled to
  their 99th percentile inside the mask (intensities in different units stay comparable).
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def brain_matrix(volumes: np.ndarray, mask: np.ndarray, max_voxels: int = 60000, seed: int = 0) -> np.ndarray:
    """subjects x voxels inside the mask (a fixed random subset above `max_voxels`), each subject
    scaled to its own 99th percentile so units do not decide the answer."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size > max_voxels:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_voxels, replace=False))
    x = np.stack([np.asarray(v, dtype=np.float64).ravel()[idx] for v in volumes])
    scale = np.percentile(x, 99, axis=1, keepdims=True)
    return x / np.where(scale > 0, scale, 1.0)


def _folds(n: int, labels: np.ndarray | None, folds: int, seed: int):
    if labels is not None:
        counts = np.unique(labels, return_counts=True)[1]
        k = int(min(folds, counts.min()))
        return StratifiedKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    return KFold(n_splits=min(folds, n), shuffle=True, random_state=seed)


def _components(x: np.ndarray, labels: np.ndarray | None, cv, wanted: int) -> int:
    """PCA size that every training fold can support (the PCA is fitted inside each fold)."""
    smallest = min(len(train) for train, _ in cv.split(x, labels))
    return int(max(1, min(wanted, smallest - 1, x.shape[1])))


def site_predictability(x: np.ndarray, sites: np.ndarray, n_components: int = 20, folds: int = 5,
                        seed: int = 0) -> dict:
    sites = np.asarray(sites).astype(str)
    n = len(sites)
    cv = _folds(n, sites, folds, seed)
    k = _components(x, sites, cv, n_components)
    model = make_pipeline(StandardScaler(), PCA(k, random_state=seed),
                          LogisticRegression(max_iter=5000, C=1.0))
    pred = cross_val_predict(model, x, sites, cv=cv)
    values, counts = np.unique(sites, return_counts=True)
    return {"accuracy": float(np.mean(pred == sites)), "chance": float(counts.max() / n),
            "n_sites": len(values), "n_subjects": n, "n_components": k}


def age_r2(x: np.ndarray, age: np.ndarray, n_components: int = 20, folds: int = 5, seed: int = 0) -> dict:
    age = np.asarray(age, dtype=float)
    keep = np.isfinite(age)
    x, age = x[keep], age[keep]
    n = len(age)
    cv = _folds(n, None, folds, seed)
    k = _components(x, None, cv, n_components)
    model = make_pipeline(StandardScaler(), PCA(k, random_state=seed), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    pred = cross_val_predict(model, x, age, cv=cv)
    r2 = 1.0 - np.sum((age - pred) ** 2) / np.sum((age - age.mean()) ** 2)
    return {"r2": float(r2), "n_subjects": n, "n_components": k}


def fidelity(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    a = np.asarray(image, dtype=np.float64)[mask]
    b = np.asarray(truth, dtype=np.float64)[mask]
    a = a / max(np.percentile(a, 99), 1e-12)
    b = b / max(np.percentile(b, 99), 1e-12)
    mse = float(np.mean((a - b) ** 2))
    return {"psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))), "corr": float(np.corrcoef(a, b)[0, 1])}
