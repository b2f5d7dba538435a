"""Model folders on disk: config.json and safetensors weights, read without executing anything.

A saved model is a folder: config.json (kind, params, learned state, checksum) + *.safetensors.
Nothing here unpickles: a pickle or torch.save file where weights should be is refused unread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ModelFileError(ValueError):
    """A model path that is not a harmonize model folder, or weights that are not safetensors."""


_NEVER_UNPICKLE = ("harmonize never unpickles model files (loading a pickle, including a torch.save .pt file, "
                   "can run arbitrary code)")
_SAFETENSORS_MAX_HEADER = 100 * 1024**2


def _looks_like(path: Path) -> str:
    """What a file that is not a model seems to be, from its first bytes (nothing is decoded or run)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"PK\x03\x04":
        return "a zip archive, e.g. a torch.save .pt/.pth file (zip + pickle)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    if not head:
        return "an empty file"
    return "a file of unknown format"


def _is_safetensors(path: Path) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then that many bytes of a JSON object."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            return False
        try:
            return isinstance(json.loads(fh.read(n)), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False


def read_config(path: str | os.PathLike, kind: str | None = None) -> dict:
    """A model folder's config.json (checked to be of `kind` when given). Nothing is unpickled."""
    path = Path(path)
    if path.is_file():
        what = "a bare safetensors file" if _is_safetensors(path) else _looks_like(path)
        raise ModelFileError(f"{path}: is {what}, not a harmonize model folder; {_NEVER_UNPICKLE}. "
                             "Give the folder written by `harmonize fit` (config.json + *.safetensors weights).")
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} is not a saved harmonize model (no config.json); "
                                "fit one with `harmonize fit STORE`")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc}); the model folder is corrupt") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object; the model folder is corrupt")
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')!r} model, not {kind!r}")
    return config


def load_weights(path: str | os.PathLike, loader, **kwargs):
    """Read a weights file with a safetensors `loader` (safetensors.numpy/torch load_file) after checking that
    it is a safetensors file: anything else (a pickle, a torch.save file) is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: the model's weights file is missing; the model folder is incomplete. "
                             "Copy the whole folder written by `harmonize fit`, or refit.")
    if not _is_safetensors(path):
        raise ModelFileError(f"{path}: is {_looks_like(path)}, not a safetensors file; "
                             f"{_NEVER_UNPICKLE}, so it was not loaded. Use the model folder written by "
                             "`harmonize fit` (or refit); weights from elsewhere must be converted to safetensors "
                             "by someone who trusts them.")
    try:
        return loader(str(path), **kwargs)
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise ModelFileError(f"{path}: the safetensors file is corrupt ({type(exc).__name__}: {exc}); copy the "
                             "model folder again or refit.") from exc
