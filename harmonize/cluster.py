"""One function from a cluster spec to a `distributed.Client`, plus the worker-side set-up.

Specs (YAML files in cluster/, or the same as a dict):
    type: local       n_workers, threads_per_worker, memory_limit, host (default 127.0.0.1), dashboard
    type: scheduler   address (tcp://... or tls://...), and for TLS: ca_file, cert_file, key_file
Without a spec, $HARMONIZE_SCHEDULER (an address) is used if set, else a LocalCluster on loopback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml
from distributed import Client, LocalCluster, WorkerPlugin

ENV_SCHEDULER = "HARMONIZE_SCHEDULER"
PROGRESS_TOPIC = "harmonize-progress"


class SpecError(ValueError):
    """A cluster spec is malformed; the message names the key and what is allowed."""


class TorchThreads(WorkerPlugin):
    """The nanny pins OMP/MKL threads to 1; give torch the threads the worker was started with."""

    name = "harmonize-torch-threads"

    def setup(self, worker) -> None:
        import torch

        torch.set_num_threads(max(1, int(worker.state.nthreads)))


_LOCAL_KEYS = {"type", "n_workers", "threads_per_worker", "memory_limit", "host", "dashboard_address",
               "resources"}
_SCHEDULER_KEYS = {"type", "address", "ca_file", "cert_file", "key_file"}


def load_spec(spec: str | os.PathLike | dict | None) -> dict:
    if spec is None:
        address = os.environ.get(ENV_SCHEDULER)
        return {"type": "scheduler", "address": address} if address else {"type": "local"}
    if isinstance(spec, dict):
        data = dict(spec)
    else:
        path = Path(spec)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.exists():
                raise SpecError(f"cluster spec {path} does not exist")
            data = yaml.safe_load(path.read_text()) or {}
        elif str(spec) == "local":
            data = {"type": "local"}
        else:  # an address
            data = {"type": "scheduler", "address": str(spec)}
    kind = data.get("type", "local")
    allowed = {"local": _LOCAL_KEYS, "scheduler": _SCHEDULER_KEYS}.get(kind)
    if allowed is None:
        raise SpecError(f"cluster spec type {kind!r} is not supported here; use 'local' or 'scheduler'")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"cluster spec ({kind}): unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if kind == "scheduler" and not data.get("address"):
        raise SpecError("cluster spec (scheduler): 'address' is required, e.g. tcp://10.0.0.5:8786")
    return data


def _security(data: dict):
    if not str(data["address"]).startswith("tls://"):
        return None
    from distributed.security import Security

    missing = [k for k in ("ca_file", "cert_file", "key_file") if not data.get(k)]
    if missing:
        raise SpecError(f"a tls:// scheduler needs {missing} in the cluster spec")
    return Security(tls_ca_file=data["ca_file"], tls_client_cert=data["cert_file"],
                    tls_client_key=data["key_file"], require_encryption=True)


def make_client(spec: str | os.PathLike | dict | None = None, quiet: bool = False) -> Client:
    """A Client for the spec; a LocalCluster is owned by (and closed with) the client."""
    data = load_spec(spec)
    if data["type"] == "scheduler":
        client = Client(data["address"], security=_security(data))
    else:
        host = data.get("host", "127.0.0.1")
        cluster = LocalCluster(
            n_workers=int(data.get("n_workers", min(2, os.cpu_count() or 1))),
            threads_per_worker=int(data.get("threads_per_worker", 1)),
            memory_limit=data.get("memory_limit", "auto"), processes=True, host=host,
            dashboard_address=data.get("dashboard_address", f"{host}:0"),
            resources=data.get("resources"))
        client = Client(cluster)
        client._harmonize_owns_cluster = True  # noqa: SLF001 - closed in use_client
    client.register_plugin(TorchThreads())
    if not quiet:
        print(f"harmonize: Dask dashboard at {client.dashboard_link}", file=sys.stderr)
    return client


@contextlib.contextmanager
def use_client(client: Client | None = None, spec=None, quiet: bool = False) -> Iterator[Client]:
    """Yield the given client, or make one from the spec and close it (and its LocalCluster) after."""
    if client is not None:
        yield client
        return
    client = make_client(spec, quiet=quiet)
    try:
        yield client
    finally:
        cluster = client.cluster if getattr(client, "_harmonize_owns_cluster", False) else None
        client.close()
        if cluster is not None:
            cluster.close()


def gpu_resources(client: Client) -> dict | None:
    """{'GPU': 1} when some worker advertises a GPU resource, else None (tasks go to any worker)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers) else None


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
