"""One function from a cluster spec to a `distributed.Client`, plus the worker-side set-up.

A spec is a YAML file (copy one from cluster/ and edit it), the same as a dict, 'local', or a
scheduler address. Every key is checked; an error names the key and what it may be.

    type: local        a LocalCluster on this machine (loopback by default); TLS optional
    type: scheduler    an existing scheduler by address (tcp:// or tls:// with ca_file/cert_file/key_file)
    type: slurm        a dask-jobqueue SLURMCluster (pip install 'harmonize[slurm]'); GPU jobs via gres
    type: kubernetes   a DaskCluster for the Dask Kubernetes operator (pip install 'harmonize[k8s]')

Without a spec, $HARMONIZE_SCHEDULER (an address, or the path of a YAML spec) is used if set, else a
LocalCluster on 127.0.0.1. GPU workers advertise a `GPU` resource (`--resources GPU=1`); training
and apply tasks ask for it when some worker has it (`gpu_resources`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dask
import yaml
from distributed import Client, LocalCluster, WorkerPlugin

ENV_SCHEDULER = "HARMONIZE_SCHEDULER"
PROGRESS_TOPIC = "harmonize-progress"
GPU = "GPU"  # the worker resource name GPU workers advertise (dask worker ... --resources GPU=1)
SPEC_TYPES = ("local", "scheduler", "slurm", "kubernetes")


class SpecError(ValueError):
    """A cluster spec is malformed; the message names the key and what is allowed."""


class ClusterError(RuntimeError):
    """A cluster could not be started or reached (the message says what to check)."""


class TorchThreads(WorkerPlugin):
    """The nanny pins OMP/MKL threads to 1; give torch the threads the worker was started with."""

    name = "harmonize-torch-threads"

    def setup(self, worker) -> None:
        import logging

        import torch

        torch.set_num_threads(max(1, int(worker.state.nthreads)))
        # the deeply nested profile that performance_report fetches makes sizeof() give up (harmlessly) with
        # a WARNING on every run: keep real problems visible, not that one
        logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)


# ---- spec validation ----------------------------------------------------------------------------
# Each key: (what is allowed, in words; a function returning the normalized value or raising ValueError).
Check = tuple[str, Callable[[Any], Any]]


def _int(minimum: int, maximum: int | None = None) -> Check:
    words = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
            raise ValueError
        return v
    return words, check


def _number(v):
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError
    return v


def _str(v):
    if not isinstance(v, str) or not v.strip():
        raise ValueError
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError
    return v


def _choice(*options: str) -> Check:
    def check(v):
        if v not in options:
            raise ValueError
        return v
    return "one of " + ", ".join(repr(o) for o in options), check


def _size(v):
    from dask.utils import parse_bytes

    if isinstance(v, bool) or not isinstance(v, str | int) or parse_bytes(v) <= 0:
        raise ValueError
    return v


def _size_or_auto(v):
    return v if v == "auto" else _size(v)


def _address(v):
    if not isinstance(v, str) or not re.fullmatch(r"(tcp|tls)://(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+)(:\d+)?", v):
        raise ValueError
    return v


def _host_port(v):
    if not isinstance(v, str) or not re.fullmatch(r"[^\s/]*:\d+", v):
        raise ValueError
    return v


def _walltime(v):
    if not isinstance(v, str) or not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}(:\d{2})?", v):
        raise ValueError
    return v


def _resources(v):
    if not isinstance(v, Mapping) or not v or not all(isinstance(k, str) and k for k in v):
        raise ValueError
    return {k: _number(x) for k, x in v.items()}


def _str_list(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError
    return list(v)


def _str_dict(v):
    if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
        raise ValueError
    return {k: str(x) for k, x in v.items()}


def _k8s_quantity(v):
    if isinstance(v, bool) or not re.fullmatch(r"\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(v)):
        raise ValueError
    return str(v)


def _k8s_name(v):
    if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v):
        raise ValueError
    return v


def _range(unit: str) -> Check:
    def check(v):
        if not isinstance(v, Mapping) or set(v) - {"minimum", "maximum"} or "maximum" not in v:
            raise ValueError
        lo, hi = v.get("minimum", 0), v["maximum"]
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in (lo, hi)) or hi < 1 or lo > hi:
            raise ValueError
        return {"minimum": lo, "maximum": hi}
    return f"a mapping {{minimum: {unit}, maximum: {unit}}} with 0 <= minimum <= maximum, maximum >= 1", check


def _devices(v):
    if not isinstance(v, list) or not v or not all(isinstance(d, int | str) and not isinstance(d, bool) for d in v):
        raise ValueError
    if len({str(d) for d in v}) != len(v):
        raise ValueError
    return [str(d) for d in v]


def _volume(v):
    if not isinstance(v, Mapping) or set(v) != {"claim_name", "mount_path"}:
        raise ValueError
    _k8s_name(v["claim_name"])
    if not str(v["mount_path"]).startswith("/"):
        raise ValueError
    return dict(v)


_PATH = ("a file path (relative paths are taken from the spec file's folder)", _str)
_TLS_FILES = {"ca_file": _PATH, "cert_file": _PATH, "key_file": _PATH}

_SCHEMAS: dict[str, dict[str, Check]] = {
    "local": {
        "n_workers": _int(1), "threads_per_worker": _int(1), "processes": ("true or false", _bool),
        "memory_limit": ("'auto' or a size such as 4GiB (per worker)", _size_or_auto),
        "host": ("an interface address, e.g. 127.0.0.1 (loopback: nothing else can reach it)", _str),
        "dashboard_address": ("host:port, e.g. 127.0.0.1:0 (0 = a free port)", _host_port),
        "resources": ("a mapping of resource name to amount per worker, e.g. {GPU: 1}", _resources),
        "cuda_devices": ("a list of distinct CUDA device ids or UUIDs, e.g. [0, 1]: one GPU worker per device",
                         _devices),
        "protocol": _choice("tcp", "tls"), **_TLS_FILES,
    },
    "scheduler": {
        "address": ("a scheduler address tcp://host:port or tls://host:port", _address),
        "timeout": ("a number of seconds > 0 (how long to try to connect)", _number), **_TLS_FILES,
    },
    "slurm": {
        "queue": ("a SLURM partition name", _str), "account": ("a SLURM account name", _str),
        "walltime": ("a SLURM time limit such as 02:00:00 or 1-00:00:00", _walltime),
        "cores": ("an integer >= 1 (CPU cores per job = threads of its worker)", _int(1)[1]),
        "processes": ("an integer >= 1 (worker processes per job; 1 when gpus is 1)", _int(1)[1]),
        "memory": ("a size such as 32GiB (per job)", _size),
        "gpus": ("0 or 1 (GPUs per job: one worker process per GPU; scale jobs for more GPUs)", _int(0, 1)[1]),
        "gpu_type": ("a GRES GPU type such as a100 (gives --gres=gpu:a100:1)", _str),
        "job_extra_directives": ("a list of extra #SBATCH options, e.g. ['--qos=normal']", _str_list),
        "prologue": ("a list of shell lines run before the worker, e.g. ['module load cuda']", _str_list),
        "python": ("the Python on the compute nodes that has harmonize installed", _str),
        "interface": ("a network interface name on the nodes, e.g. ib0 or eth0", _str),
        "scheduler_host": ("the address the scheduler listens on (reachable from the compute nodes)", _str),
        "dashboard_address": ("host:port, e.g. 127.0.0.1:8787 (reach it through an SSH tunnel)", _host_port),
        "local_directory": ("a folder on the nodes for worker spill files, e.g. $TMPDIR", _str),
        "log_directory": ("a folder for the job logs", _str),
        "shared_temp_directory": ("a folder every node sees, for temporary TLS certificates (0600)", _str),
        "jobs": _int(0), "adapt": _range("jobs"), "wait_for_workers": _int(0),
        "protocol": _choice("tcp", "tls"), **_TLS_FILES,
    },
    "kubernetes": {
        "name": ("a DNS-1123 name (lower case letters, digits, '-')", _k8s_name),
        "namespace": ("a Kubernetes namespace", _k8s_name),
        "image": ("a container image with harmonize installed", _str),
        "n_workers": _int(0), "adapt": _range("workers"), "threads_per_worker": _int(1),
        "cpu": ("a CPU quantity such as 2 or 500m (per worker)", _k8s_quantity),
        "memory": ("a memory quantity such as 8Gi (per worker)", _k8s_quantity),
        "gpus": ("0 or 1 (nvidia.com/gpu per worker pod)", _int(0, 1)[1]),
        "env": ("a mapping of environment variable name to value", _str_dict),
        "volume": ("{claim_name: PVC name, mount_path: /absolute/path} holding the store", _volume),
        "scheduler_service_type": _choice("ClusterIP", "NodePort", "LoadBalancer"),
        "idle_timeout": _int(0), "wait_for_workers": _int(0),
    },
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"n_workers": None, "threads_per_worker": 1, "processes": True, "memory_limit": "auto",
              "host": "127.0.0.1", "dashboard_address": None, "resources": None, "protocol": "tcp"},
    "scheduler": {"timeout": 30},
    "slurm": {"cores": 4, "processes": 1, "memory": "16GiB", "walltime": "01:00:00", "gpus": 0,
              "python": "python3", "dashboard_address": "127.0.0.1:8787", "protocol": "tls",
              "shared_temp_directory": "~", "jobs": 1, "wait_for_workers": 1},
    "kubernetes": {"name": "harmonize", "image": "ghcr.io/dask/dask:latest", "n_workers": 2,
                   "threads_per_worker": 2, "cpu": "2", "memory": "8Gi", "gpus": 0,
                   "scheduler_service_type": "ClusterIP", "idle_timeout": 0, "wait_for_workers": 1},
}
_REQUIRED = {"scheduler": ("address",), "slurm": ("queue", "walltime", "cores", "memory"),
             "kubernetes": ("name", "image")}


def _resolve_env(value: str) -> dict:
    """$HARMONIZE_SCHEDULER: an address, or the path of a YAML spec (for TLS certificates)."""
    try:
        if value.endswith((".yaml", ".yml")) or Path(value).is_file():
            return load_spec(value)
        return load_spec({"type": "scheduler", "address": value})
    except SpecError as exc:
        raise SpecError(f"${ENV_SCHEDULER}={value!r}: {exc}") from None


def load_spec(spec: str | os.PathLike | Mapping | None) -> dict:
    """Read and check a cluster spec; returns it as a dict with defaults filled in.

    `spec` is a YAML path, a dict, 'local', a scheduler address, or None ($HARMONIZE_SCHEDULER, else local).
    """
    base = Path.cwd()
    if spec is None:
        address = os.environ.get(ENV_SCHEDULER, "").strip()
        return _resolve_env(address) if address else load_spec({"type": "local"})
    if isinstance(spec, Mapping):
        data = dict(spec)
    else:
        text = str(spec)
        path = Path(text).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise SpecError(f"cluster spec {path} does not exist (copy one from cluster/ and edit it)")
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise SpecError(f"cluster spec {path} is not valid YAML: {exc}") from exc
            if data is None:
                data = {}
            if not isinstance(data, Mapping):
                raise SpecError(f"cluster spec {path} must be a mapping of keys (type: local, ...)")
            base = path.resolve().parent
        elif text == "local":
            data = {"type": "local"}
        elif "://" in text:
            data = {"type": "scheduler", "address": text}
        else:
            raise SpecError(f"cluster spec {text!r} is neither a YAML file, 'local', nor an address "
                            "such as tcp://host:8786 or tls://host:8786")
    return _check(data, base)


def _check(data: dict, base: Path) -> dict:
    kind = data.get("type", "local")
    if kind not in SPEC_TYPES:
        raise SpecError(f"cluster spec: type={kind!r} is not supported; type must be one of {list(SPEC_TYPES)}")
    schema = _SCHEMAS[kind]
    unknown = sorted(set(data) - set(schema) - {"type"})
    if unknown:
        raise SpecError(f"cluster spec ({kind}): unknown key(s) {unknown}; allowed keys: {sorted(schema)}")
    missing = [k for k in _REQUIRED.get(kind, ()) if data.get(k) is None]
    if missing:
        hint = " e.g. address: tls://10.0.0.5:8786" if kind == "scheduler" else ""
        raise SpecError(f"cluster spec ({kind}): {missing} required;{hint} allowed keys: {sorted(schema)}")
    out: dict[str, Any] = {"type": kind, **_DEFAULTS.get(kind, {})}
    for key, value in data.items():
        if key == "type" or value is None:
            continue
        words, check = schema[key]
        try:
            out[key] = check(value)
        except (ValueError, TypeError):
            raise SpecError(f"cluster spec ({kind}): {key}={value!r} is not allowed; {key} must be {words}") from None
    for key in _TLS_FILES:
        if out.get(key):
            out[key] = str((base / Path(os.path.expandvars(out[key])).expanduser()).resolve())
    given = [k for k in _TLS_FILES if out.get(k)]
    if given and len(given) < 3:
        raise SpecError(f"cluster spec ({kind}): TLS needs all of ca_file, cert_file, key_file; only {given} given")
    if kind == "scheduler" and given and not out["address"].startswith("tls://"):
        raise SpecError(f"cluster spec (scheduler): address={out['address']!r} with certificates must be tls://")
    if kind in ("local", "slurm") and given and out["protocol"] != "tls":
        raise SpecError(f"cluster spec ({kind}): certificates given but protocol={out['protocol']!r}; "
                        "set protocol: tls")
    if kind == "slurm":
        if out["gpus"] and out["processes"] != 1:
            raise SpecError("cluster spec (slurm): processes must be 1 when gpus is 1 (one worker process per "
                            f"GPU), got processes={out['processes']}")
        if out["cores"] % out["processes"]:
            raise SpecError(f"cluster spec (slurm): cores={out['cores']} must be a multiple of "
                            f"processes={out['processes']}")
        if out.get("gpu_type") and not out["gpus"]:
            raise SpecError("cluster spec (slurm): gpu_type is set but gpus is 0; set gpus: 1")
    return out


# ---- security ------------------------------------------------------------------------------------
def security_from_spec(spec: Mapping, role: str = "client"):
    """A `distributed.Security` for a spec's TLS settings (None for plain tcp).

    role 'cluster' gives the scheduler, workers and client the same certificate (a cluster this
    process starts); 'client' only the client's. Without certificate files, a cluster gets a
    temporary in-memory certificate and a client falls back to Dask's own TLS configuration.
    """
    from distributed.security import Security

    tls = spec.get("protocol") == "tls" or str(spec.get("address", "")).startswith("tls://")
    if not tls:
        return None
    files = {k: spec.get(k) for k in _TLS_FILES}
    if all(files.values()):
        for key, path in files.items():
            if not Path(path).is_file():
                raise SpecError(f"cluster spec ({spec['type']}): {key}={path} does not exist")
        ca, cert, key = files["ca_file"], files["cert_file"], files["key_file"]
        roles = {"client": (cert, key)}
        if role == "cluster":
            roles.update(scheduler=(cert, key), worker=(cert, key))
        kwargs = {f"tls_{r}_{part}": v for r, (c, k) in roles.items() for part, v in (("cert", c), ("key", k))}
        return Security(tls_ca_file=ca, require_encryption=True, **kwargs)
    if role == "cluster":
        try:
            return Security.temporary()
        except ImportError as exc:
            raise ClusterError("a TLS cluster without certificate files needs the `cryptography` package "
                               "(pip install 'harmonize[tls]'), or give ca_file, cert_file, key_file") from exc
    configured = Security()  # DASK_DISTRIBUTED__COMM__TLS__* or ~/.config/dask
    if configured.tls_ca_file and configured.tls_client_cert:
        return configured
    raise SpecError(f"cluster spec ({spec['type']}): a tls:// scheduler needs ca_file, cert_file and key_file "
                    "(the cluster CA and a client certificate it signed): put them in a spec "
                    "(cluster/scheduler.yaml) and point --cluster or $HARMONIZE_SCHEDULER at that file")


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
OPEN_SCHEDULER_WARNING = ("has no authentication: anyone who can reach {where} can run code as the workers' user. "
                          "Use protocol: tls (see cluster/), or keep it on 127.0.0.1")


def _warn_if_open(where: str) -> None:
    import warnings

    warnings.warn(f"harmonize: a plain tcp:// scheduler {OPEN_SCHEDULER_WARNING.format(where=where)}",
                  UserWarning, stacklevel=3)


# ---- SLURM -----------------------------------------------------------------------------------------
def slurm_kwargs(spec: Mapping) -> dict:
    """Keyword arguments of `dask_jobqueue.SLURMCluster` for a checked slurm spec."""
    spec = _check(dict(spec), Path.cwd())
    directives = list(spec.get("job_extra_directives") or [])
    worker_args: list[str] = []
    if spec["gpus"]:
        gres = f"gpu:{spec['gpu_type']}:1" if spec.get("gpu_type") else "gpu:1"
        directives.append(f"--gres={gres}")
        # SLURM sets CUDA_VISIBLE_DEVICES to the job's GPU: the worker sees it as cuda:0 (select_device)
        worker_args += ["--resources", f"{GPU}=1"]
    scheduler_options: dict[str, Any] = {"dashboard_address": spec["dashboard_address"]}
    if spec.get("scheduler_host"):
        scheduler_options["host"] = spec["scheduler_host"]
    kwargs: dict[str, Any] = {
        "queue": spec["queue"], "account": spec.get("account"), "walltime": spec["walltime"],
        "cores": spec["cores"], "processes": spec["processes"], "memory": spec["memory"],
        "python": spec["python"], "job_extra_directives": directives, "worker_extra_args": worker_args,
        "job_script_prologue": list(spec.get("prologue") or []), "interface": spec.get("interface"),
        "scheduler_options": scheduler_options, "local_directory": spec.get("local_directory"),
        "log_directory": spec.get("log_directory"), "shared_temp_directory": spec["shared_temp_directory"],
    }
    if spec["protocol"] == "tls":
        kwargs["protocol"] = "tls://"
        # certificate files are given as paths (the nodes read them from the shared file system);
        # without files a temporary certificate is written (0600) to shared_temp_directory
        kwargs["security"] = security_from_spec(spec, role="cluster") if spec.get("ca_file") else True
    return {k: v for k, v in kwargs.items() if v is not None}


def slurm_cluster(spec: Mapping):
    """A `dask_jobqueue.SLURMCluster` for a slurm spec (its scheduler starts here; no job is submitted yet)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ClusterError("a slurm cluster spec needs dask-jobqueue: pip install 'harmonize[slurm]'") from exc
    kwargs = slurm_kwargs(spec)
    if "security" not in kwargs:
        _warn_if_open("the scheduler's port from the HPC network")
    if kwargs.get("security") is True:
        try:
            import cryptography  # noqa: F401
        except ImportError as exc:
            raise ClusterError("protocol: tls without certificate files needs `cryptography`: "
                               "pip install 'harmonize[slurm]', or give ca_file, cert_file, key_file") from exc
        kwargs["shared_temp_directory"] = os.path.expanduser(kwargs["shared_temp_directory"])
    return SLURMCluster(**kwargs)


# ---- Kubernetes ------------------------------------------------------------------------------------
def kubernetes_manifest(spec: Mapping) -> dict:
    """The `DaskCluster` resource (kubernetes.dask.org/v1, the Dask operator) for a kubernetes spec."""
    spec = _check(dict(spec), Path.cwd())
    limits = {"cpu": spec["cpu"], "memory": spec["memory"]}
    worker_args = ["dask-worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", str(spec["threads_per_worker"]),
                   "--memory-limit", _k8s_to_dask_size(spec["memory"]), "--dashboard", "--dashboard-address", "8788"]
    if spec["gpus"]:
        limits["nvidia.com/gpu"] = "1"
        worker_args += ["--resources", f"{GPU}=1"]
    env = [{"name": k, "value": v} for k, v in (spec.get("env") or {}).items()]
    worker: dict[str, Any] = {"name": "worker", "image": spec["image"], "args": worker_args, "env": env,
                              "resources": {"requests": dict(limits), "limits": limits},
                              "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}]}
    scheduler: dict[str, Any] = {
        "name": "scheduler", "image": spec["image"], "args": ["dask-scheduler", "--host", "0.0.0.0"], "env": env,
        "ports": [{"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
                  {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"}, "initialDelaySeconds": 0,
                           "periodSeconds": 1, "timeoutSeconds": 300},
        "livenessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"}, "initialDelaySeconds": 15,
                          "periodSeconds": 20}}
    worker_pod: dict[str, Any] = {"containers": [worker]}
    if spec.get("volume"):
        vol = spec["volume"]
        worker_pod["volumes"] = [{"name": "store", "persistentVolumeClaim": {"claimName": vol["claim_name"]}}]
        worker["volumeMounts"] = [{"name": "store", "mountPath": vol["mount_path"]}]
    n_workers = spec["adapt"]["minimum"] if spec.get("adapt") else spec["n_workers"]
    return {
        "apiVersion": "kubernetes.dask.org/v1", "kind": "DaskCluster",
        "metadata": {"name": spec["name"], **({"namespace": spec["namespace"]} if spec.get("namespace") else {})},
        "spec": {
            "idleTimeout": spec["idle_timeout"],
            "worker": {"replicas": n_workers, "spec": worker_pod},
            "scheduler": {
                "spec": {"containers": [scheduler]},
                "service": {"type": spec["scheduler_service_type"],
                            "selector": {"dask.org/cluster-name": spec["name"], "dask.org/component": "scheduler"},
                            "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                                      {"name": "http-dashboard", "protocol": "TCP", "port": 8787,
                                       "targetPort": "http-dashboard"}]}},
        },
    }


def _k8s_to_dask_size(quantity: str) -> str:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    if not m:
        return "auto"
    unit = {"Ki": "KiB", "Mi": "MiB", "Gi": "GiB", "Ti": "TiB", "k": "kB", "M": "MB", "G": "GB", "T": "TB"}
    return m.group(1) + unit.get(m.group(2) or "", "B")


def kubernetes_cluster(spec: Mapping):
    """A `dask_kubernetes.operator.KubeCluster` from the spec's DaskCluster manifest (needs the operator)."""
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise ClusterError("a kubernetes cluster spec needs dask-kubernetes (and the Dask operator installed in "
                           "the Kubernetes cluster): pip install 'harmonize[k8s]'") from exc
    return KubeCluster(custom_cluster_spec=kubernetes_manifest(spec), namespace=spec.get("namespace"),
                       shutdown_on_close=True)


_NANNY_MALLOC_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
_NANNY_MALLOC_DEFAULT = 65536


@contextlib.contextmanager
def _glibc_malloc_defaults():
    """Start workers with glibc's own malloc tuning instead of the nanny's MALLOC_TRIM_THRESHOLD_=65536.

    Setting that variable also freezes glibc's mmap threshold at 128 KiB, so every torch activation
    buffer of a chunk (~20 MiB) is a fresh mmap, zero-filled page by page: apply spent as much system
    time as compute (benchmarks/results/pipeline.md: 0.60x a plain loop with it, 1.30x without). Only
    the distributed default is lifted; a value a user configured or exported is kept.
    """
    configured = dask.config.get(_NANNY_MALLOC_KEY, None)
    if configured is None or int(configured) != _NANNY_MALLOC_DEFAULT:
        yield
        return
    # a nanny of an earlier cluster in this process copied the default into os.environ, where it would win
    inherited = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    if inherited == str(_NANNY_MALLOC_DEFAULT):
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    elif inherited is not None:
        yield
        return
    with dask.config.set({_NANNY_MALLOC_KEY: None}):
        yield


# ---- the client ----------------------------------------------------------------------------------
def _local_cluster(data: Mapping) -> tuple[LocalCluster, int]:
    """A LocalCluster and how many workers it will have.

    With `cuda_devices`, one GPU worker per device (named gpu-<device>) joins the CPU workers.

    A GPU worker sees only its device (CUDA_VISIBLE_DEVICES, so torch calls it cuda:0 and select_device
    picks it) and advertises `GPU: 1`, which training and apply ask for. `n_workers` then counts the
    CPU workers beside them (default none).
    """
    host = data["host"]
    security = security_from_spec(data, role="cluster")
    devices = data.get("cuda_devices") or []
    n_cpu = data["n_workers"] if data["n_workers"] is not None else (0 if devices else min(2, os.cpu_count() or 1))
    if security is None and host not in _LOOPBACK:
        _warn_if_open(f"{host}")
    if devices and not data["processes"]:
        raise SpecError("cluster spec (local): cuda_devices needs processes: true (each GPU worker is a process "
                        "that sees only its device)")
    with _glibc_malloc_defaults():
        cluster = LocalCluster(
            n_workers=int(n_cpu), threads_per_worker=int(data["threads_per_worker"]),
            memory_limit=data["memory_limit"],
            processes=bool(data["processes"]), host=host, dashboard_address=data["dashboard_address"] or f"{host}:0",
            resources=data.get("resources"), security=security,
            # explicit tcp: without it, processes: false picks inproc://, which cannot bind 127.0.0.1
            protocol="tls://" if security is not None else "tcp://")
        if devices:  # inside: workers added later would take the nanny's malloc setting
            template = next(iter(cluster.new_worker_spec().values()))
            for device in devices:
                options = {**template["options"], "resources": {**(data.get("resources") or {}), GPU: 1},
                           "env": {"CUDA_VISIBLE_DEVICES": device}}
                cluster.worker_spec[f"gpu-{device}"] = {**template, "options": options}
            cluster.scale(len(cluster.worker_spec))  # starts the workers added to the spec
            cluster.wait_for_workers(len(cluster.worker_spec), timeout=120)  # their nannies read the config now
    return cluster, int(n_cpu) + len(devices)


def _connect(data: Mapping) -> Client:
    address = data["address"]
    try:
        return Client(address, security=security_from_spec(data), timeout=data["timeout"])
    except (OSError, TimeoutError) as exc:
        hint = ("the scheduler runs with TLS and that ca_file is the cluster's CA and cert_file/key_file a "
                "client certificate it signed" if address.startswith("tls://") else
                "the scheduler runs and the address is right (a tls:// scheduler refuses tcp://)")
        raise ClusterError(f"could not connect to the Dask scheduler at {address} within {data['timeout']} s "
                           f"({type(exc).__name__}: {exc}); check that {hint}") from None


def _scale(cluster, data: Mapping, unit: str) -> None:
    if data.get("adapt"):
        lo, hi = data["adapt"]["minimum"], data["adapt"]["maximum"]
        if unit == "jobs":
            cluster.adapt(minimum_jobs=lo, maximum_jobs=hi)
        else:
            cluster.adapt(minimum=lo, maximum=hi)
    elif unit == "jobs":
        cluster.scale(jobs=data["jobs"])
    else:
        cluster.scale(data["n_workers"])


def _planned_workers(data: Mapping) -> int:
    """Workers the spec starts without any work submitted (an adaptive cluster stays at its minimum)."""
    per_job = data.get("processes", 1) if data["type"] == "slurm" else 1
    if data.get("adapt"):
        return data["adapt"]["minimum"] * per_job
    if data["type"] == "slurm":
        return data["jobs"] * per_job
    return data.get("n_workers") or 0


def make_client(spec: str | os.PathLike | Mapping | None = None, quiet: bool = False) -> Client:
    """A `distributed.Client` for the spec; a cluster it starts is owned by (and closed with) the client.

    spec: a YAML spec path, a dict, 'local', a scheduler address, or None ($HARMONIZE_SCHEDULER, else a
    LocalCluster on 127.0.0.1). Prints the dashboard link unless `quiet`.
    """
    data = load_spec(spec)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"harmonize: {msg}", file=sys.stderr))
    if data["type"] == "scheduler":
        client = _connect(data)
    else:
        if data["type"] == "local":
            cluster, wait = _local_cluster(data)
        else:
            cluster = slurm_cluster(data) if data["type"] == "slurm" else kubernetes_cluster(data)
            wait = min(data["wait_for_workers"], _planned_workers(data))
        try:
            if data["type"] != "local":
                _scale(cluster, data, "jobs" if data["type"] == "slurm" else "workers")
            client = Client(cluster, security=getattr(cluster, "security", None))
            client._harmonize_owns_cluster = True  # noqa: SLF001 - closed in use_client / close_client
            if wait and data["type"] != "local":
                say(f"waiting for {wait} worker(s) to join ({data['type']} jobs may queue; "
                    f"dashboard {client.dashboard_link})")
            if wait:
                client.wait_for_workers(wait)
        except BaseException:  # Ctrl-C while jobs queue, or a failed start: do not leave jobs/pods behind
            cluster.close()
            raise
    client.register_plugin(TorchThreads())
    say(f"Dask dashboard at {client.dashboard_link}")
    return client


def close_client(client: Client) -> None:
    """Close the client, and the cluster too when make_client started it."""
    cluster = client.cluster if getattr(client, "_harmonize_owns_cluster", False) else None
    client.close()
    if cluster is not None:
        cluster.close()


@contextlib.contextmanager
def use_client(client: Client | None = None, spec=None, quiet: bool = False) -> Iterator[Client]:
    """Yield the given client, or make one from the spec and close it (and its cluster) after."""
    if client is not None:
        yield client
        return
    client = make_client(spec, quiet=quiet)
    try:
        yield client
    finally:
        close_client(client)


# ---- placement -----------------------------------------------------------------------------------
def gpu_workers(client: Client) -> list[str]:
    """Addresses of the workers that advertise a GPU resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get(GPU, 0) > 0)


def gpu_resources(client: Client) -> dict | None:
    """{'GPU': 1} when some worker advertises a GPU resource, else None (tasks go to any worker).

    Pass it as `resources=` to client.submit / client.compute: dask.annotate is dropped by graph
    optimization (dask#7036).
    """
    return {GPU: 1} if gpu_workers(client) else None


def total_threads(client: Client) -> int:
    return sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values())


def gather_with_progress(client: Client, futures: list, desc: str, show: bool = True) -> list:
    """Results in submission order, with a progress bar as they complete."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=desc, unit="task", disable=not show, file=sys.stderr) as bar:
        for _ in as_completed(futures):
            bar.update(1)
    return client.gather(futures, errors="raise")
