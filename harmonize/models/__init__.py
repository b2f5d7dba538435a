"""Harmonizers. Each has the same face: fit(dataset) -> self, transform(dataset) -> dataset,
save(path), load(path), plus what the graph layer maps over chunks: `halo`, `subject_scale`,
`harmonize_block`, `site_code`, `sites_`, `reference_site_`, `checksum_`.
A saved model is a folder: weights (safetensors) + config.json (kind, params, learned state)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harmonize.models.invariant import InvariantHarmonizer

MODELS = {InvariantHarmonizer.kind: InvariantHarmonizer}


def _config(path: str | os.PathLike) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} is not a saved harmonize model (no config.json); "
                                "fit one with `harmonize fit STORE`")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc}); the model folder is corrupt") from exc


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """Load any saved harmonizer (weights-only formats; nothing in a model folder is executed)."""
    kind = _config(path).get("kind")
    if kind not in MODELS:
        raise ValueError(f"{path}: unknown model kind {kind!r}; known: {sorted(MODELS)}")
    return MODELS[kind].load(path, device=device)


def model_checksum(path: str | os.PathLike) -> str:
    return str(_config(path)["checksum"])
