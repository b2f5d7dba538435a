"""Harmonizers. Each has the same face: fit(dataset) -> self, transform(dataset) -> dataset,
save(path), load(path), plus what the graph layer maps over chunks:

    halo                    voxels of context a chunk needs on every side (0: voxel-wise)
    needs_volume_context    whether subject_context reads the subject's whole volume (then on a worker)
    subject_context(site, covariates, volume, mask) -> dict   small, JSON-able, per subject
    harmonize_block(block, context, location, reference_site) -> the chunk, harmonized
    check_reference(reference_site), site_code(site), sites_, reference_site_, checksum_, kind

A saved model is a folder: weights (safetensors) + config.json (kind, params, learned state)."""

from __future__ import annotations

import os

from harmonize.models.combat import ComBatHarmonizer
from harmonize.models.files import ModelFileError, load_weights, read_config
from harmonize.models.invariant import InvariantHarmonizer
from harmonize.models.voxel_combat import VoxelComBat

__all__ = ["MODELS", "ModelFileError", "load_model", "load_weights", "model_checksum", "read_config"]

# what `harmonize fit --model KIND` trains on a store's images
MODELS = {InvariantHarmonizer.kind: InvariantHarmonizer, VoxelComBat.kind: VoxelComBat}
# every kind a saved model folder may hold (the table-level ComBat works on feature tables, not stores)
_LOADABLE = {**MODELS, ComBatHarmonizer.kind: ComBatHarmonizer}


def _config(path: str | os.PathLike) -> dict:
    return read_config(path)


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """Load any saved harmonizer (weights-only formats; nothing in a model folder is executed)."""
    kind = _config(path).get("kind")
    if kind not in _LOADABLE:
        raise ValueError(f"{path}: unknown model kind {kind!r}; known: {sorted(_LOADABLE)}")
    return _LOADABLE[kind].load(path, device=device)


def model_checksum(path: str | os.PathLike) -> str:
    return str(_config(path)["checksum"])
