"""The cohort store's schema, spelled out in one place.

A cohort store is a Zarr v3 group (a folder) that xarray opens as one Dataset:

    images      (subject, x, y, z)  float32   source intensities on the reference grid; NaN = not written
    harmonized  (subject, x, y, z)  float32   output of `harmonize apply` (attrs: model checksum, reference site)
    harmonized_<kind> (subject, x, y, z)      the same for a second model kept beside it (e.g. harmonized_combat)
    mask        (x, y, z)           uint8     brain mask of the reference grid
    parcellation(x, y, z)           int16     regions for regional features (0 = outside)
    affine      (subject, row, col) float64   each subject's original voxel-to-world affine
    subject     (subject)           string    BIDS participant label, the index
    site, sex   (subject)           string    covariates (variable-length UTF-8)
    age         (subject)           float64
    source_sha256, source_path (subject) string   provenance: content checksum, path relative to the input root
    ingest_status, <output>_status (subject) int8   written *after* the data they describe
    corex_scores (subject, factor)      float64   CorEx factor scores of the fitted source (NaN = not scored)
    corex_raw_scores (subject, factor)  float64   the same factors applied to the raw images (site-leakage audit)
    corex_weights, corex_loadings (factor, feature)  weights on standardized features; factor/feature correlations
    corex_tcs (factor)                  float64   per-factor TC (attrs: TC, source, features, restarts, audit)
    corex_feature_map (x, y, z)         int32     1-based feature of each voxel (0 = none), to draw loadings

Group attrs hold the schema version, the reference grid (shape, affine, voxel size), the chunk shape and
`mask_from` (written after the mask: how it was made). Beside the arrays, folders: models/ (fitted models,
current-<kind>.json pointers), reports/, runs/<run id>/ (run.json, performance.html, report of `harmonize run`).
No other module spells out these names: import them from here.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# dimensions
SUBJECT = "subject"
SPATIAL_DIMS = ("x", "y", "z")
VOLUME_DIMS = (SUBJECT, *SPATIAL_DIMS)
FACTOR = "factor"
REGION = "region"
FEATURE = "feature"

# arrays
IMAGES = "images"
HARMONIZED = "harmonized"
MASK = "mask"
PARCELLATION = "parcellation"
AFFINE = "affine"
SITE = "site"
AGE = "age"
SEX = "sex"
SOURCE_SHA256 = "source_sha256"
SOURCE_PATH = "source_path"
INGEST_STATUS = "ingest_status"
HARMONIZED_STATUS = "harmonized_status"
COREX_SCORES = "corex_scores"
COREX_WEIGHTS = "corex_weights"
COREX_TCS = "corex_tcs"
COREX_RAW_SCORES = "corex_raw_scores"
COREX_LOADINGS = "corex_loadings"
COREX_FEATURE_MAP = "corex_feature_map"
COREX_SOURCE = "corex_source"

# per-subject string and numeric metadata, in the order they are stored
STRING_FIELDS = (SUBJECT, SITE, SEX, SOURCE_SHA256, SOURCE_PATH)
FLOAT_FIELDS = (AGE,)
STATUS_FIELDS = (INGEST_STATUS, HARMONIZED_STATUS)
# coordinates xarray attaches to every subject-indexed variable
SUBJECT_COORDS = (SITE, AGE, SEX)


def status_of(output: str) -> str:
    """The per-subject status array of a volume output (`images` -> `ingest_status`)."""
    return INGEST_STATUS if output == IMAGES else f"{output}_status"


def output_for(kind: str | None = None) -> str:
    """Where `apply` writes: `harmonized` by default, `harmonized_<kind>` for a model kept beside it."""
    return HARMONIZED if kind is None else f"{HARMONIZED}_{kind}"


def is_output(name: str) -> bool:
    """`harmonized` or `harmonized_<kind>` (not their status arrays)."""
    return name == HARMONIZED or (name.startswith(HARMONIZED + "_") and not name.endswith("_status"))


# status codes
PENDING = 0
DONE = 1
REJECTED = 2

# group attribute written after the brain mask (its threshold and how many subjects made it)
MASK_FROM = "mask_from"

# the folders inside a store where fitted models, reports and the records of `harmonize run` live
MODELS_DIR = "models"
REPORTS_DIR = "reports"
RUNS_DIR = "runs"
