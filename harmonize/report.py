"""The run report: report.json (numbers) + report.html (the numbers and PNG figures).

For raw input, harmonized output and (where it exists) ground truth: site predictability with its
chance level, age R², fidelity to ground truth; CorEx factors and how much site each one carries.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import StratifiedKFold, cross_val_predict  # noqa: E402

from harmonize import metrics  # noqa: E402
from harmonize.io import schema as S  # noqa: E402
from harmonize.io.store import CohortStore, dump_json, read_volume  # noqa: E402
from harmonize.simulate import groundtruth_path  # noqa: E402


def _volumes(store: CohortStore, name: str, positions: np.ndarray) -> list[np.ndarray]:
    path = store.array_path(name)
    return [read_volume(path, int(i)) for i in positions]


def _factor_site_leakage(scores: np.ndarray, sites: np.ndarray, age: np.ndarray, seed: int = 0) -> list[dict]:
    out = []
    k = int(min(5, np.unique(sites, return_counts=True)[1].min()))
    cv = StratifiedKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    for j in range(scores.shape[1]):
        pred = cross_val_predict(LogisticRegression(max_iter=2000), scores[:, [j]], sites, cv=cv)
        ok = np.isfinite(age)
        out.append({"factor": j, "site_accuracy": float(np.mean(pred == sites)),
                    "age_corr": float(np.corrcoef(scores[ok, j], age[ok])[0, 1])})
    pred = cross_val_predict(LogisticRegression(max_iter=2000), scores, sites, cv=cv)
    out.append({"factor": "all", "site_accuracy": float(np.mean(pred == sites))})
    return out


def make_report(store_path: str | os.PathLike, groundtruth_dir: str | os.PathLike | None = None,
                out_dir: str | os.PathLike | None = None, timings: dict | None = None) -> Path:
    """Compute the numbers and figures for a store; returns the folder holding report.html."""
    store = CohortStore(store_path)
    out = Path(out_dir) if out_dir else store.path / S.REPORTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    table = store.table()
    if S.HARMONIZED not in store.outputs():
        raise ValueError(f"{store.path} has no harmonized images yet: run `harmonize apply` first")
    positions = np.flatnonzero((table[S.INGEST_STATUS].to_numpy() == S.DONE)
                               & (table[S.HARMONIZED_STATUS].to_numpy() == S.DONE))
    if len(positions) < 4:
        raise ValueError(f"{store.path}: {len(positions)} harmonized subject(s); the report needs at least 4")
    mask = store.mask()
    sites = table[S.SITE].to_numpy()[positions].astype(str)
    age = table[S.AGE].to_numpy()[positions].astype(float)
    subjects = table[S.SUBJECT].to_numpy()[positions].astype(str)
    images = {"raw": _volumes(store, S.IMAGES, positions)}
    # every model's output kept in the store, side by side on the same subjects (the main one first)
    for output in sorted(store.outputs(), key=lambda o: o != S.HARMONIZED):
        if (table[S.status_of(output)].to_numpy()[positions] == S.DONE).all():
            kind = store.group[output].attrs.get("model_kind", output)
            images[f"harmonized ({kind})"] = _volumes(store, output, positions)
    truth_available = groundtruth_dir is not None and all(
        groundtruth_path(groundtruth_dir, s).exists() for s in subjects)
    if truth_available:
        images["ground truth"] = [np.asarray(nib.load(groundtruth_path(groundtruth_dir, s)).dataobj, np.float32)
                                  for s in subjects]
    attrs = dict(store.group[S.HARMONIZED].attrs)
    numbers: dict = {"store": str(store.path), "n_subjects": int(len(positions)),
                     "sites": sorted(set(sites.tolist())), "model": {k: attrs.get(k) for k in
                     ("model_kind", "model_checksum", "reference_site")}, "timings_s": timings or {},
                     "images": {}}
    for name, vols in images.items():
        x = metrics.brain_matrix(vols, mask)
        entry = {"site_predictability": metrics.site_predictability(x, sites),
                 "age_r2": metrics.age_r2(x, age)}
        if truth_available:
            fid = [metrics.fidelity(v, t, mask) for v, t in zip(vols, images["ground truth"], strict=True)]
            entry["fidelity"] = {"psnr_mean": float(np.mean([f["psnr"] for f in fid])),
                                 "corr_mean": float(np.mean([f["corr"] for f in fid]))}
        numbers["images"][name] = entry
    figures = {"slices": _slice_figure(images, sites, mask, out / "slices.png"),
               "intensities": _intensity_figure(images, sites, mask, out / "intensities.png")}
    if S.COREX_SCORES in store.group:
        scores = store.group[S.COREX_SCORES][...][positions]
        tcs = store.group[S.COREX_TCS]
        numbers["corex"] = {"tcs": tcs[...].tolist(), "tc": tcs.attrs.get("tc"), "source": tcs.attrs.get("source"),
                            "restart_tcs": tcs.attrs.get("restart_tcs"),
                            "site_leakage": _factor_site_leakage(scores, sites, age)}
        figures["corex"] = _corex_figure(store, scores, sites, out / "corex.png")
    dump_json(out / "report.json", numbers)
    (out / "report.html").write_text(_html(numbers, figures))
    return out


def _slice_figure(images: dict, sites: np.ndarray, mask: np.ndarray, path: Path) -> str:
    site_names = sorted(set(sites.tolist()))
    first = [int(np.flatnonzero(sites == s)[0]) for s in site_names]
    z = int(np.argmax(mask.sum(axis=(0, 1))))
    fig, axes = plt.subplots(len(images), len(first), figsize=(2.6 * len(first), 2.8 * len(images)),
                             squeeze=False)
    for r, (name, vols) in enumerate(images.items()):
        for c, i in enumerate(first):
            sl = np.rot90(vols[i][:, :, z])
            axes[r, c].imshow(sl, cmap="gray", vmin=0, vmax=np.percentile(vols[i][mask], 99.5))
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{name}\n{site_names[c]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def _intensity_figure(images: dict, sites: np.ndarray, mask: np.ndarray, path: Path) -> str:
    site_names = sorted(set(sites.tolist()))
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 3.2), squeeze=False)
    for c, (name, vols) in enumerate(images.items()):
        ax = axes[0, c]
        for k, s in enumerate(site_names):
            values = np.concatenate([vols[i][mask] for i in np.flatnonzero(sites == s)])
            ax.hist(values, bins=120, histtype="step", density=True, label=s, color=f"C{k}")
        ax.set_title(name)
        ax.set_xlabel("intensity (stored units)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def _corex_figure(store: CohortStore, scores: np.ndarray, sites: np.ndarray, path: Path) -> str:
    weights = store.group[S.COREX_WEIGHTS][...]
    labels = store.group[S.PARCELLATION][...]
    m = weights.shape[0]
    z = int(np.argmax((labels > 0).sum(axis=(0, 1))))
    fig, axes = plt.subplots(2, m, figsize=(2.8 * m, 5.4), squeeze=False)
    site_names = sorted(set(sites.tolist()))
    for j in range(m):
        loading = np.zeros(labels.shape, np.float32)
        inside = labels > 0
        loading[inside] = weights[j][labels[inside] - 1]
        vmax = np.abs(weights[j]).max() or 1.0
        axes[0, j].imshow(np.rot90(np.where(inside[:, :, z], loading[:, :, z], np.nan)), cmap="coolwarm",
                          vmin=-vmax, vmax=vmax)
        axes[0, j].set_axis_off()
        axes[0, j].set_title(f"factor {j} loadings", fontsize=9)
        axes[1, j].boxplot([scores[sites == s, j] for s in site_names], tick_labels=site_names)
        axes[1, j].set_title(f"factor {j} score by site", fontsize=9)
        axes[1, j].tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def _html(numbers: dict, figures: dict) -> str:
    rows = []
    for name, entry in numbers["images"].items():
        sp, ar = entry["site_predictability"], entry["age_r2"]
        fid = entry.get("fidelity", {})
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{sp['accuracy']:.2f} (chance {sp['chance']:.2f})</td>"
                    f"<td>{ar['r2']:.2f}</td><td>{fid.get('psnr_mean', float('nan')):.1f}</td>"
                    f"<td>{fid.get('corr_mean', float('nan')):.3f}</td></tr>")
    corex = ""
    if "corex" in numbers:
        c = numbers["corex"]
        leak = "".join(f"<tr><td>{html.escape(str(f['factor']))}</td><td>{f['site_accuracy']:.2f}</td>"
                       f"<td>{f.get('age_corr', float('nan')):.2f}</td></tr>" for f in c["site_leakage"])
        corex = (f"<h2>CorEx factors ({html.escape(str(c['source']))})</h2><p>TC = {c['tc']:.3f}; per factor: "
                 f"{', '.join(f'{t:.3f}' for t in c['tcs'])}</p><table><tr><th>factor</th>"
                 f"<th>site accuracy from its score</th><th>corr. with age</th></tr>{leak}</table>"
                 f"<img src='{figures['corex']}'>")
    model = numbers["model"]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in numbers["timings_s"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>harmonize report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 10px;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>harmonize report</h1>
<p>{numbers['n_subjects']} subjects from sites {html.escape(', '.join(numbers['sites']))};
model {html.escape(str(model['model_kind']))} {html.escape(str(model['model_checksum']))},
reference site {html.escape(str(model['reference_site']))}. {html.escape(timings)}</p>
<h2>Site leakage, biology kept, fidelity</h2>
<p>Site accuracy: cross-validated logistic regression on 20 PCA components of brain voxels (lower is better,
chance = majority-class rate). Age R²: cross-validated ridge regression on the same components (higher is
better). PSNR / correlation: against each subject's ground truth at the reference site (higher is better).</p>
<table><tr><th>images</th><th>site accuracy</th><th>age R²</th><th>PSNR (dB)</th><th>corr.</th></tr>
{''.join(rows)}</table>
<h2>Mid-slices, one subject per site</h2><img src="{figures['slices']}">
<h2>Brain intensity distributions by site</h2><img src="{figures['intensities']}">
{corex}
</body></html>"""
