"""Pipeline specs: the YAML file `harmonize run SPEC` reads (see pipelines/nightly.yaml).

Every key is checked before anything runs; an error names the file, the line, the key, what was
found and what is allowed. Relative paths are taken from the spec file's folder (or from `base`).

    input:   BIDS folder (participants.tsv + sub-*/anat/sub-*_T1w.nii[.gz])       required
    store:   the cohort store (created by the first run)                              required
    cluster: a cluster spec file (cluster/*.yaml), 'local', or tcp://|tls://host:port  default local
    chunks:  [x, y, z] chunk shape of a new store                                     default [32, 32, 32]
    models:  harmonizers, fitted (or reused) and applied in order; each item:
        kind: invariant | combat                                                      required
        output: harmonized | harmonized_<name>       default harmonized for the first, harmonized_<kind> after
        fit: if-needed | always | never       if-needed (default): fit when there is no model of this kind in
                                              the store or this item's settings changed since it was fitted
        model_dir: a saved model folder to reuse instead of fitting (implies fit: never)
        reference_site: site to harmonize to
        params: {steps: 1500, lam: ..., seed: ...}   the model's parameters
    export:  {dir: folder, outputs: [harmonized, ...]}  NIfTI files of new results      optional
    corex:   {factors: 4, restarts: 3, source: harmonized, max_iter: 2000} or false       default false
    report:  true | false | {groundtruth: folder}                                       default true
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harmonize.io import schema as S

FIT_POLICIES = ("if-needed", "always", "never")
MODEL_KINDS = ("invariant", "combat")
_TOP = ("input", "store", "cluster", "chunks", "models", "export", "corex", "report")
_MODEL_KEYS = ("kind", "output", "fit", "model_dir", "reference_site", "params")
_EXPORT_KEYS = ("dir", "outputs")
_COREX_KEYS = ("factors", "restarts", "source", "features", "regions", "permutations", "seed", "max_iter")
_REPORT_KEYS = ("groundtruth",)


class PipelineSpecError(ValueError):
    """The spec file is unusable; the message says where (file, line, key) and what is allowed."""


@dataclass
class ModelStep:
    kind: str
    output: str
    fit: str = "if-needed"
    model_dir: Path | None = None
    reference_site: str | None = None
    params: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """What a fitted model must match to be reused under fit: if-needed."""
        return {"kind": self.kind, "reference_site": self.reference_site, "params": self.params}

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PipelineSpec:
    source: str  # the spec file's name (or "<dict>"), for messages and the run record
    input: Path
    store: Path
    cluster: Any = "local"
    chunks: tuple[int, int, int] = (32, 32, 32)
    models: list[ModelStep] = field(default_factory=list)
    export_dir: Path | None = None
    export_outputs: list[str] = field(default_factory=list)
    corex: dict | None = None
    report: bool = True
    groundtruth: Path | None = None


class _Where:
    """Line numbers of the keys of a YAML document (from its node tree), for messages."""

    def __init__(self, text: str | None, source: str):
        self.source, self.lines = source, {}
        if text:
            try:
                self._walk(yaml.compose(text), ())
            except yaml.YAMLError:
                pass  # reported by safe_load with its own position

    def _walk(self, node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[(*path, key.value)] = key.start_mark.line + 1
                self._walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = item.start_mark.line + 1
                self._walk(item, (*path, i))

    def error(self, path: tuple, message: str) -> PipelineSpecError:
        line = next((self.lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self.lines), None)
        key = ".".join(str(p) for p in path)
        where = f"{self.source}" + (f", line {line}" if line else "") + (f", key '{key}'" if key else "")
        return PipelineSpecError(f"{where}: {message}")


def load_pipeline(spec: str | os.PathLike | Mapping, base: str | os.PathLike | None = None,
                  overrides: Mapping | None = None) -> PipelineSpec:
    """Read and check a pipeline spec (a YAML path or a mapping).

    `base`: the folder relative paths are taken from (default: the spec file's folder, or the working
    directory for a mapping). `overrides`: top-level keys replacing the file's (e.g. from the command line).
    """
    if isinstance(spec, Mapping):
        data, where = dict(spec), _Where(None, "<pipeline spec>")
        root = Path(base) if base else Path.cwd()
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PipelineSpecError(f"pipeline spec {path} does not exist; start from pipelines/nightly.yaml")
        text = path.read_text()
        where = _Where(text, str(path))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PipelineSpecError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise PipelineSpecError(f"{path}: a pipeline spec is a mapping of keys ({', '.join(_TOP)})")
        data = dict(data)
        root = Path(base) if base else path.resolve().parent
    for key, value in (overrides or {}).items():
        # from the command line: a relative path there means from the working directory
        is_file = isinstance(value, str) and value.endswith((".yaml", ".yml")) and key == "cluster"
        data[key] = str(Path(value).expanduser().resolve()) if is_file else value
    _known(where, (), data, _TOP)
    for key in ("input", "store"):
        if not data.get(key):
            raise where.error((), f"'{key}' is required (the {'BIDS folder' if key == 'input' else 'cohort store'})")

    def local_path(key: tuple, value, must_exist: bool = False) -> Path:
        if not isinstance(value, str | os.PathLike) or not str(value).strip():
            raise where.error(key, f"expected a path, got {value!r}")
        p = Path(os.path.expandvars(str(value))).expanduser()
        p = p if p.is_absolute() else root / p
        if must_exist and not p.exists():
            raise where.error(key, f"{p} does not exist")
        return p

    out = PipelineSpec(source=str(spec) if not isinstance(spec, Mapping) else "<pipeline spec>",
                       input=local_path(("input",), data["input"], must_exist=True),
                       store=local_path(("store",), data["store"]))
    if not out.input.is_dir():
        raise where.error(("input",), f"{out.input} is not a folder (expected a BIDS folder with participants.tsv)")
    cluster = data.get("cluster", "local")
    if isinstance(cluster, str) and cluster.endswith((".yaml", ".yml")):
        cluster = str(local_path(("cluster",), cluster, must_exist=True))
    elif not isinstance(cluster, str | Mapping):
        raise where.error(("cluster",), f"expected a cluster spec file, 'local', an address or a mapping; "
                                        f"got {cluster!r}")
    out.cluster = dict(cluster) if isinstance(cluster, Mapping) else cluster
    if "chunks" in data:
        chunks = data["chunks"]
        if not (isinstance(chunks, list) and len(chunks) == 3 and all(isinstance(c, int) and c >= 8 for c in chunks)):
            raise where.error(("chunks",), f"expected three integers >= 8 such as [32, 32, 32]; got {chunks!r}")
        out.chunks = tuple(chunks)
    out.models = _models(where, data.get("models"), local_path)
    outputs = [m.output for m in out.models]
    export = data.get("export")
    if export:
        if isinstance(export, str):
            export = {"dir": export}
        if not isinstance(export, Mapping):
            raise where.error(("export",), f"expected {{dir: folder, outputs: [...]}} or a folder; got {export!r}")
        _known(where, ("export",), export, _EXPORT_KEYS)
        if "dir" not in export:
            raise where.error(("export",), "'dir' is required (the folder for the NIfTI files)")
        out.export_dir = local_path(("export", "dir"), export["dir"])
        out.export_outputs = list(export.get("outputs") or outputs[:1])
        for i, name in enumerate(out.export_outputs):
            if name not in outputs:
                raise where.error(("export", "outputs", i), f"{name!r} is not written by any model of this spec; "
                                                            f"choose from {outputs}")
    corex = data.get("corex", False)
    if corex not in (False, None):
        corex = {} if corex is True else corex
        if not isinstance(corex, Mapping):
            raise where.error(("corex",), f"expected true/false or a mapping of {list(_COREX_KEYS)}; got {corex!r}")
        _known(where, ("corex",), corex, _COREX_KEYS)
        source = corex.get("source", S.HARMONIZED)
        if source != S.IMAGES and source not in outputs:
            raise where.error(("corex", "source"), f"{source!r} is not written by any model of this spec; "
                                                   f"choose from {[S.IMAGES, *outputs]}")
        out.corex = dict(corex)
    report = data.get("report", True)
    if isinstance(report, Mapping):
        _known(where, ("report",), report, _REPORT_KEYS)
        if report.get("groundtruth"):
            out.groundtruth = local_path(("report", "groundtruth"), report["groundtruth"])
        report = True
    if not isinstance(report, bool):
        raise where.error(("report",), f"expected true, false or {{groundtruth: folder}}; got {report!r}")
    out.report = report and S.HARMONIZED in outputs
    return out


def _known(where: _Where, path: tuple, data: Mapping, allowed: tuple) -> None:
    for key in data:
        if key not in allowed:
            raise where.error((*path, key), f"unknown key {key!r}; allowed here: {', '.join(allowed)}")


def _models(where: _Where, items, local_path) -> list[ModelStep]:
    if items is None:
        return [ModelStep(kind="invariant", output=S.HARMONIZED)]
    if not isinstance(items, list) or not items:
        raise where.error(("models",), f"expected a list of models (- kind: invariant ...); got {items!r}")
    steps, outputs = [], set()
    for i, item in enumerate(items):
        at = ("models", i)
        if not isinstance(item, Mapping):
            raise where.error(at, f"expected a mapping with kind, output, fit, ...; got {item!r}")
        _known(where, at, item, _MODEL_KEYS)
        kind = item.get("kind")
        if kind not in MODEL_KINDS:
            raise where.error((*at, "kind"), f"{kind!r} is not a model kind; choose from {list(MODEL_KINDS)}")
        output = item.get("output", S.HARMONIZED if i == 0 else S.output_for(kind))
        if not isinstance(output, str) or not S.is_output(output) or not output.replace("_", "").isalnum():
            raise where.error((*at, "output"), f"{output!r}: expected 'harmonized' or 'harmonized_<letters/digits>'")
        if output in outputs:
            raise where.error((*at, "output"), f"{output!r} is written by an earlier model too; give each its own")
        outputs.add(output)
        fit = item.get("fit", "if-needed")
        if fit not in FIT_POLICIES:
            raise where.error((*at, "fit"), f"{fit!r}; allowed: {', '.join(FIT_POLICIES)}")
        model_dir = None
        if item.get("model_dir") is not None:
            model_dir = local_path((*at, "model_dir"), item["model_dir"], must_exist=True)
            if fit == "always":
                raise where.error((*at, "fit"), "'always' contradicts model_dir (a saved model is reused as is)")
            fit = "never"
        params = item.get("params") or {}
        if not isinstance(params, Mapping):
            raise where.error((*at, "params"), f"expected a mapping such as {{steps: 1500}}; got {params!r}")
        allowed = _model_params(kind)
        for key in params:
            if key not in allowed:
                raise where.error((*at, "params", key), f"unknown {kind} parameter {key!r}; allowed: "
                                                        f"{', '.join(allowed)}")
        reference = item.get("reference_site")
        if reference is not None and not isinstance(reference, str | int):
            raise where.error((*at, "reference_site"), f"expected a site name; got {reference!r}")
        steps.append(ModelStep(kind=kind, output=output, fit=fit, model_dir=model_dir,
                               reference_site=None if reference is None else str(reference), params=dict(params)))
    return steps


def _model_params(kind: str) -> list[str]:
    """The model's own parameters (its __init__ signature), less the one the spec sets by its own key."""
    import inspect

    from harmonize.models import MODELS

    return [p for p in inspect.signature(MODELS[kind].__init__).parameters if p not in ("self", "reference_site")]
