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

from harmonize import metrics  # noqa: E402
from harmonize.io import schema as S  # noqa: E402
from harmonize.io.store import CohortStore, dump_json, read_volume  # noqa: E402
from harmonize.simulate import groundtruth_path  # noqa: E402


def _volumes(store: CohortStore, name: str, positions: np.ndarray) -> list[np.ndarray]:
    path = store.array_path(name)
    return [read_volume(path, int(i)) for i in positions]


def _corex_numbers(store: CohortStore, positions: np.ndarray, sites: np.ndarray, age: np.ndarray) -> dict:
    """CorEx results from the store and the site-leakage audit (as computed by `harmonize corex`; recomputed
    from the stored scores for stores written before the audit existed)."""
    from harmonize.corex import site_leakage_audit

    tcs = store.group[S.COREX_TCS]
    attrs = dict(tcs.attrs)
    source = attrs.get("source", S.HARMONIZED)
    audit = attrs.get("audit")
    if not audit:
        sex = store.table()[S.SEX].to_numpy()[positions]
        audit = {}
        arrays = [(S.COREX_RAW_SCORES, "raw"), (S.COREX_SCORES, "raw" if source == S.IMAGES else source)]
        for array, name in arrays:
            if array in store.group:
                audit[name] = site_leakage_audit(store.group[array][...][positions], sites, age, sex)
    after = audit.get(source) if source != S.IMAGES else None
    return {"source": source, "features": attrs.get("features", "regions"), "feature_info": attrs.get("feature_info"),
            "tc": attrs.get("tc"), "tcs": tcs[...].tolist(), "n_features": attrs.get("n_features"),
            "restarts": attrs.get("restarts"), "audit": audit,
            "flagged": list(after["flagged_factors"]) if after else []}


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
    numbers: dict = {"store": store.path.name,  # never an absolute path of this machine
                      "n_subjects": int(len(positions)),
                     "sites": sorted(set(sites.tolist())), "model": {k: attrs.get(k) for k in
                     ("model_kind", "model_checksum", "reference_site")}, "timings_s": timings or {},
                     "images": {}}
    for name, vols in images.items():
        x = metrics.brain_matrix(vols, mask)
        entry = {"site_predictability": metrics.site_predictability(x, sites),
                 "age_r2": metrics.age_r2(x, age)}
        if truth_available and name != "ground truth":  # against itself it says nothing
            fid = [metrics.fidelity(v, t, mask) for v, t in zip(vols, images["ground truth"], strict=True)]
            entry["fidelity"] = {"psnr_mean": float(np.mean([f["psnr"] for f in fid])),
                                 "corr_mean": float(np.mean([f["corr"] for f in fid]))}
        numbers["images"][name] = entry
    figures = {"slices": slice_figure(images, sites, mask, out / "slices.png"),
               "intensities": intensity_figure(images, sites, mask, out / "intensities.png")}
    if S.COREX_SCORES in store.group and S.COREX_TCS in store.group:
        numbers["corex"] = _corex_numbers(store, positions, sites, age)
        figures["corex"] = _corex_figure(store, positions, sites, numbers["corex"], out / "corex.png")
    dump_json(out / "report.json", numbers)
    (out / "report.html").write_text(_html(numbers, figures))
    return out


def slice_figure(images: dict, sites: np.ndarray, mask: np.ndarray, path: Path) -> str:
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


def intensity_figure(images: dict, sites: np.ndarray, mask: np.ndarray, path: Path) -> str:
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


_COREX_MAX_PLOTTED = 8


def _corex_figure(store: CohortStore, positions: np.ndarray, sites: np.ndarray, corex: dict, path: Path) -> str:
    """Per factor: its loadings (factor/feature correlations) on the axial slice with the most brain, and its
    score by site on the raw images (before) and on the fitted source (after); at most 8 factors."""
    g = store.group
    loadings = g[S.COREX_LOADINGS][...] if S.COREX_LOADINGS in g else g[S.COREX_WEIGHTS][...]
    feature_map = g[S.COREX_FEATURE_MAP][...] if S.COREX_FEATURE_MAP in g else g[S.PARCELLATION][...]
    rows = []
    if S.COREX_RAW_SCORES in g:
        rows.append(("before (raw)", g[S.COREX_RAW_SCORES][...][positions]))
    rows.append((f"after ({corex['source']})" if corex["source"] != S.IMAGES else "raw",
                 g[S.COREX_SCORES][...][positions]))
    m = min(loadings.shape[0], _COREX_MAX_PLOTTED)
    inside = feature_map > 0
    z = int(np.argmax(inside.sum(axis=(0, 1))))
    mask_slice = store.mask()[:, :, z]
    site_names = sorted(set(sites.tolist()))
    flagged = set(corex.get("flagged", []))
    fig, axes = plt.subplots(1 + len(rows), m, figsize=(2.8 * m, 2.6 * (1 + len(rows))), squeeze=False)
    for j in range(m):
        loading = np.full(feature_map.shape[:2], np.nan)
        sl = feature_map[:, :, z]
        loading[sl > 0] = loadings[j][sl[sl > 0] - 1]
        vmax = float(np.nanmax(np.abs(loadings[j]))) or 1.0
        ax = axes[0, j]
        ax.imshow(np.rot90(np.where(mask_slice, 0.0, np.nan)), cmap="gray", vmin=-1, vmax=1)
        im = ax.imshow(np.rot90(loading), cmap="coolwarm", vmin=-vmax, vmax=vmax)
        ax.set_axis_off()
        title = f"factor {j} loadings" + ("\nTRACKS SITE" if j in flagged else "")
        ax.set_title(title, fontsize=9, color="red" if j in flagged else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        for r, (label, scores) in enumerate(rows, start=1):
            ok = np.isfinite(scores[:, j])
            axes[r, j].boxplot([scores[ok & (sites == s), j] for s in site_names], tick_labels=site_names)
            axes[r, j].set_title(f"factor {j} score by site, {label}", fontsize=8)
            axes[r, j].tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def _corex_html(c: dict, figure: str) -> str:
    audit = c.get("audit", {})
    names = list(audit)
    head = "".join(f"<th>site acc. {html.escape(n)} (p)</th>" for n in names)
    first = audit[names[0]] if names else {}

    def cell(entry: dict) -> str:
        if entry.get("site_accuracy") is None:
            return "<td>n/a</td>"
        style = " style='color:#b00;font-weight:bold'" if entry.get("flagged") else ""
        return f"<td{style}>{entry['site_accuracy']:.2f} ({entry['p_value']:.3g})</td>"

    def num(value) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    rows = []
    after = audit.get(c["source"]) or (audit[names[-1]] if names else {})
    for j, tc in enumerate(c["tcs"]):
        per = [audit[n]["factors"][j] for n in names]
        flag = "tracks site" if j in c.get("flagged", []) else ""
        mine = after["factors"][j] if after else {}
        rows.append(f"<tr><td>{j}</td><td>{tc:.3f}</td>{''.join(cell(e) for e in per)}"
                    f"<td>{num(mine.get('age_r'))}</td><td>{num(mine.get('sex_r'))}</td>"
                    f"<td style='color:#b00'>{flag}</td></tr>")
    joint_flag = "tracks site" if (after.get("all") or {}).get("flagged") else ""
    rows.append(f"<tr><td>all</td><td>{c['tc']:.3f}</td>{''.join(cell(audit[n]['all']) for n in names)}"
                f"<td></td><td></td><td style='color:#b00'>{joint_flag}</td></tr>")
    spread = c.get("restarts") or {}
    restarts = (f"{len(spread.get('tcs', []))} restarts (parallel Dask tasks): TC from {spread['tc_min']:.3f} to "
                f"{spread['tc_max']:.3f}, cluster agreement with the best (ARI) &ge; {spread['agreement_min']:.2f}."
                if spread else "")
    flagged = (f"<p style='color:#b00'><b>Factor(s) {c['flagged']} still track site after harmonization.</b></p>"
               if c.get("flagged") else "<p>No factor tracks site after harmonization.</p>")
    sex_levels = first.get("sex_levels")
    sex_note = f" (r with sex = {html.escape(sex_levels[1])} vs {html.escape(sex_levels[0])})" if sex_levels else ""
    return (f"<h2>CorEx factors: {html.escape(str(c['features']))} features of {html.escape(str(c['source']))}</h2>"
            f"<p>Linear CorEx on {c.get('n_features')} features; TC = {c['tc']:.3f} nats. {restarts}</p>"
            f"<p>Site-leakage audit: cross-validated accuracy ({first.get('folds', '?')}-fold LDA) of predicting site "
            f"from each factor score, and from all together, on the raw images and after harmonization, with a "
            f"permutation-test p-value ({first.get('n_permutations', '?')} permutations of the site labels). "
            f"A factor <b>tracks site</b> when its accuracy exceeds chance ({first.get('chance', float('nan')):.2f}) "
            f"by at least {first.get('margin', 0.1):.2f} and p &le; {first.get('threshold_p', float('nan')):.3g} "
            f"(0.05 Bonferroni-corrected over the factors and the joint test). Age and sex: Pearson r with the "
            f"scores on {html.escape(str(c['source']))}{sex_note}. Raw scores: the same weights applied to the raw "
            f"features, standardized over all subjects (units drop out, site differences stay).</p>{flagged}"
            f"<table><tr><th>factor</th><th>TC</th>{head}<th>r age</th><th>r sex</th><th></th></tr>"
            f"{''.join(rows)}</table><img src='{figure}'>")


def fidelity_text(fidelity: dict, key: str, fmt: str) -> str:
    """A fidelity number, or an em dash where there is no ground truth to compare with (real cohorts)."""
    return format(fidelity[key], fmt) if key in fidelity else "—"


def _html(numbers: dict, figures: dict) -> str:
    rows = []
    for name, entry in numbers["images"].items():
        sp, ar = entry["site_predictability"], entry["age_r2"]
        fid = entry.get("fidelity", {})
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{sp['accuracy']:.2f} (chance {sp['chance']:.2f})</td>"
                    f"<td>{ar['r2']:.2f}</td><td>{fidelity_text(fid, 'psnr_mean', '.1f')}</td>"
                    f"<td>{fidelity_text(fid, 'corr_mean', '.3f')}</td></tr>")
    corex = _corex_html(numbers["corex"], figures["corex"]) if "corex" in numbers else ""
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
