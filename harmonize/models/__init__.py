"""Harmonizers. Each has the same face: fit(dataset) -> self, transform(dataset) -> dataset,
save(path), load(path), plus what the graph layer maps over chunks:

    halo                    voxels of context a chunk needs on every side (0: voxel-wise)
    needs_volume_context    whether subject_context reads the subject's whole volume (then on a worker)
    subject_context(site, covariates, volume, mask) -> dict   small, JSON-able, per subject
    harmonize_block(block, context, location, reference_site) -> the chunk, harmonized
    check_reference(reference_site), site_code(site), sites_, reference_site_, checksum_, kind

A saved model is a folder: weights (safetensors) + config.json (kind, params, learned state)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping

from harmonize.models.files import ModelFileError, load_weights, read_config

__all__ = ["MODELS", "ModelFileError", "load_model", "load_weights", "model_checksum", "read_config"]


class _Registry(Mapping):
    """kind -> harmonizer class, imported on first use: the table-level ComBat and the voxel ComBat do
    not pay for importing torch (~200 MiB of RSS, benchmarks/results/combat.md) unless the invariant
    model is asked for."""

    def __init__(self, classes: dict[str, str]):
        self._classes = classes

    def __getitem__(self, kind: str):
        module, name = self._classes[kind].split(":")
        return getattr(importlib.import_module(module), name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


# what `harmonize fit --model KIND` trains on a store's images
MODELS = _Registry({"invariant": "harmonize.models.invariant:InvariantHarmonizer",
                    "combat": "harmonize.models.voxel_combat:VoxelComBat"})
# every kind a saved model folder may hold (the table-level ComBat works on feature tables, not stores)
_LOADABLE = _Registry({**MODELS._classes, "combat-table": "harmonize.models.combat:ComBatHarmonizer"})


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


_CLASSES = {"InvariantHarmonizer": "invariant", "VoxelComBat": "combat", "ComBatHarmonizer": "combat-table"}


def __getattr__(name: str):
    """`harmonize.models.InvariantHarmonizer` and the others, imported when first asked for."""
    if name in _CLASSES:
        return _LOADABLE[_CLASSES[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
