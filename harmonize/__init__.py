"""harmonize: remove scanner (site) effects from multi-site MRI at scale.

Library entry points (the CLI and notebooks call the same functions):
    harmonize.pipeline    simulate / ingest / fit / apply / export / corex / demo
    harmonize.io.store    open_cohort(path) -> xarray.Dataset
    harmonize.models      InvariantHarmonizer, load_model
"""

__version__ = "0.1.0"
