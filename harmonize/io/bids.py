"""Find T1w volumes and their covariates in a BIDS-like folder.

    BIDS_DIR/participants.tsv                    participant_id, site, age, sex (other columns ignored)
    BIDS_DIR/sub-<label>/anat/sub-<label>_T1w.nii[.gz]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.io import schema as S

LABEL = re.compile(r"\A[A-Za-z0-9]+\Z")  # the BIDS label pattern: no separators, no '..', no trailing newline
REQUIRED_COLUMNS = ("participant_id", S.SITE)
OPTIONAL_COLUMNS = (S.AGE, S.SEX)


@dataclass
class Candidate:
    subject: str
    path: Path  # absolute
    relpath: str  # relative to the BIDS root, the only path that is stored
    site: str
    age: float
    sex: str


@dataclass
class Discovery:
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"subject", "path", "reason"}
    waiting: list[str] = field(default_factory=list)  # in participants.tsv, no scan yet (not an error)


class CohortError(ValueError):
    """The cohort folder as a whole is unusable (not one subject's problem)."""


def read_participants(bids_dir: Path) -> pd.DataFrame:
    tsv = bids_dir / "participants.tsv"
    if not tsv.exists():
        raise CohortError(f"{tsv} is missing: it must list participant_id and site (age, sex optional).")
    try:
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise CohortError(f"{tsv}: cannot be read as a tab-separated table ({exc}).") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        # one column holding the separators of another format: say what the format must be
        hint = (" The file must be tab-separated (it looks comma- or semicolon-separated)."
                if len(table.columns) == 1 and any(sep in table.columns[0] for sep in ",;") else "")
        raise CohortError(f"{tsv}: missing column(s) {missing}; found {list(table.columns)}. "
                          f"Required: {list(REQUIRED_COLUMNS)}; optional: {list(OPTIONAL_COLUMNS)}.{hint}")
    keep = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in table.columns]
    table = table[keep].copy()  # only declared covariates travel any further
    table["participant_id"] = table["participant_id"].str.strip().str.removeprefix("sub-")
    return table


MAX_AGE_YEARS = 120.0
UNKNOWN = ("", "n/a", "nan")  # BIDS writes an unknown value as n/a; pandas writes a missing one as nothing


class BadValue(ValueError):
    """A participants.tsv cell that cannot be used; the message names the value and what to write."""


def _parse_age(value) -> float:
    """Age in years; n/a or an empty cell mean unknown (NaN). Anything else that is not a plausible number
    of years (text, negative, over 120) is refused: silently dropping it would hide a typo."""
    text = "" if value is None else str(value).strip()
    if text.lower() in UNKNOWN:
        return float("nan")
    try:
        age = float(text)
    except ValueError:
        age = None
    if age is None or not np.isfinite(age) or age < 0 or age > MAX_AGE_YEARS:
        why = "is not a number" if age is None or not np.isfinite(age) else (
            "is negative" if age < 0 else f"is over {MAX_AGE_YEARS:.0f} years")
        raise BadValue(f"age {text!r} {why}. Write the age in years as a number (e.g. 42 or 42.5), "
                       "or n/a if it is unknown, and re-run ingest")
    return age


def _parse_label(value) -> str:
    """A categorical covariate as text; BIDS's "n/a" (and an empty cell) mean unknown, stored as ""."""
    text = "" if value is None or (isinstance(value, float) and not np.isfinite(value)) else str(value).strip()
    return "" if text.lower() in ("n/a", "nan") else text


def discover(bids_dir: str | os.PathLike) -> Discovery:
    """List usable (subject, file, covariates) and everything set aside with the reason."""
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise CohortError(f"{root} is not a folder. Point ingest at a BIDS folder with participants.tsv.")
    table = read_participants(root)
    found = Discovery()
    rows = {}
    bad_labels = set()  # reported from participants.tsv already (its message covers the folder too)
    for _, row in table.iterrows():
        label = row["participant_id"]
        if not LABEL.match(label):
            bad_labels.add(label)
            found.rejected.append({"subject": label, "path": "participants.tsv",
                                   "reason": f"participants.tsv: participant_id {label!r} is not "
                                             "sub-<label> with a BIDS label (letters and digits only: no '/', "
                                             "'.', '_' or '-'); rename the subject (row and folder) and re-run "
                                             "ingest"})
            continue
        if label in rows:
            if rows[label] is not None:  # report a duplicate once, however many rows it has
                found.rejected.append({"subject": label, "path": "participants.tsv",
                                       "reason": f"participants.tsv: participant_id sub-{label} is listed more "
                                                 "than once; all its rows are ignored. Keep one row per subject "
                                                 "and re-run ingest"})
            rows[label] = None
            continue
        rows[label] = row
    images = {}
    for sub_dir in sorted(root.glob("sub-*")):
        label = sub_dir.name.removeprefix("sub-")
        files = sorted((sub_dir / "anat").glob(f"sub-{label}_T1w.nii*")) if LABEL.match(label) else []
        files = [f for f in files if f.name.endswith((".nii", ".nii.gz"))]
        if not LABEL.match(label):
            if label in bad_labels:
                continue
            found.rejected.append({"subject": label, "path": sub_dir.name,
                                   "reason": f"{sub_dir.name!r}: folder name is not sub-<label> with a BIDS label "
                                             "(letters and digits only: no '/', '\\', '.', '_' or '-'); rename "
                                             "it (and its participants.tsv row) and re-run ingest"})
        elif not files:
            found.rejected.append({"subject": label, "path": sub_dir.name,
                                   "reason": f"{sub_dir.name}: no anat/sub-{label}_T1w.nii[.gz] found; put the "
                                             "subject's T1w volume there (or remove the folder) and re-run "
                                             "ingest"})
        elif len(files) > 1:
            found.rejected.append({"subject": label, "path": sub_dir.name,
                                   "reason": f"{sub_dir.name}/anat: {len(files)} T1w files "
                                             f"({[f.name for f in files]}); keep exactly one (move the others "
                                             "out of the BIDS folder) and re-run ingest"})
        else:
            images[label] = files[0]
    for label, path in images.items():
        rel = str(path.relative_to(root))
        row = rows.get(label)
        if label not in rows:
            found.rejected.append({"subject": label, "path": rel,
                                   "reason": f"{rel}: sub-{label} is not listed in participants.tsv; add a row "
                                             "with its participant_id and site, and re-run ingest"})
            continue
        if row is None:
            continue
        site = str(row[S.SITE]).strip()
        if not site or site.lower() == "n/a":
            found.rejected.append({"subject": label, "path": rel,
                                   "reason": f"participants.tsv, row sub-{label}: no site "
                                             f"({repr(site) if site else 'an empty cell'}); fill in its site "
                                             "column (where the scan was acquired) and re-run ingest"})
            continue
        try:
            age = _parse_age(row[S.AGE]) if S.AGE in row else float("nan")
        except BadValue as exc:
            found.rejected.append({"subject": label, "path": "participants.tsv",
                                   "reason": f"participants.tsv, row sub-{label}: {exc}"})
            continue
        found.candidates.append(Candidate(
            subject=label, path=path, relpath=rel, site=site, age=age,
            sex=_parse_label(row[S.SEX]) if S.SEX in row else ""))
    for label, row in rows.items():
        if row is not None and label not in images and not (root / f"sub-{label}").exists():
            found.waiting.append(label)
    return found
