"""Cluster specs, GPU placement, torch threads, TLS and SLURM job scripts, all on loopback.

Placement is checked where tasks really ran (the scheduler's task stream), on a cluster whose one worker
advertises a fake `GPU` resource and whose other does not.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import operator
import os
import socket
import ssl
from pathlib import Path

import pytest
import yaml
from dask.utils import key_split
from distributed import Client, get_task_stream

from harmonize import apply as apply_mod
from harmonize import pipeline
from harmonize.cluster import (
    ENV_SCHEDULER,
    ClusterError,
    SpecError,
    close_client,
    gpu_resources,
    gpu_workers,
    kubernetes_manifest,
    load_spec,
    make_client,
    slurm_cluster,
)
from harmonize.ingest import ingest
from harmonize.io import schema as S
from harmonize.io.store import CohortStore
from harmonize.simulate import CohortSpec, simulate_cohort

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
FAST_FIT = {"steps": 20, "eval_every": 10, "crop": 12, "seed": 3, "torch_threads": 1}  # mechanics, not quality


# ---- specs ----------------------------------------------------------------------------------------
def test_every_spec_in_cluster_folder_loads():
    kinds = {}
    for path in sorted(CLUSTER_DIR.glob("*.yaml")):
        spec = load_spec(path)
        kinds[spec["type"]] = path.name
    assert set(kinds) == {"local", "scheduler", "slurm", "kubernetes"}, kinds
    local = load_spec(CLUSTER_DIR / "local.yaml")
    assert local["host"] == "127.0.0.1" and local["n_workers"] == 2 and local["memory_limit"] == "4GiB"


@pytest.mark.parametrize(("spec", "words"), [
    ({"type": "local", "n_workers": 0}, ["n_workers=0", "an integer >= 1"]),
    ({"type": "local", "workers": 2}, ["unknown key(s) ['workers']", "n_workers"]),
    ({"type": "local", "memory_limit": "lots"}, ["memory_limit='lots'", "4GiB"]),
    ({"type": "local", "resources": {"GPU": "one"}}, ["resources=", "{GPU: 1}"]),
    ({"type": "local", "protocol": "tls", "ca_file": "ca.pem"}, ["ca_file, cert_file, key_file", "['ca_file']"]),
    ({"type": "local", "cuda_devices": [0, 0]}, ["cuda_devices=[0, 0]", "distinct CUDA device ids"]),
    ({"type": "swarm"}, ["type='swarm'", "'local', 'scheduler', 'slurm', 'kubernetes'"]),
    ({"type": "scheduler"}, ["['address'] required", "tls://"]),
    ({"type": "scheduler", "address": "http://host:8786"}, ["address='http://host:8786'", "tcp://host:port"]),
    ({"type": "scheduler", "address": "tcp://h:1", "ca_file": "a", "cert_file": "b", "key_file": "c"},
     ["must be tls://"]),
    ({"type": "slurm", "queue": "q", "walltime": "2h", "cores": 4, "memory": "8GiB"}, ["walltime='2h'", "02:00:00"]),
    ({"type": "slurm", "queue": "q", "walltime": "01:00:00", "cores": 4, "memory": "8GiB", "gpus": 2},
     ["gpus=2", "0 or 1"]),
    ({"type": "slurm", "queue": "q", "walltime": "01:00:00", "cores": 4, "memory": "8GiB", "gpus": 1,
      "processes": 2}, ["processes must be 1 when gpus is 1"]),
    ({"type": "slurm", "walltime": "01:00:00", "cores": 4, "memory": "8GiB"}, ["['queue'] required"]),
    ({"type": "slurm", "queue": "q", "walltime": "01:00:00", "cores": 4, "memory": "8GiB",
      "adapt": {"minimum": 3, "maximum": 1}}, ["adapt=", "minimum <= maximum"]),
    ({"type": "kubernetes", "name": "Harmonize_1", "image": "img"}, ["name='Harmonize_1'", "DNS-1123"]),
    ({"type": "kubernetes", "name": "h", "image": "img", "memory": "lots"}, ["memory='lots'", "8Gi"]),
    ({"type": "kubernetes", "name": "h", "image": "img", "volume": {"claim_name": "data"}},
     ["volume=", "mount_path"]),
])
def test_spec_errors_name_the_key_and_what_is_allowed(spec, words):
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(bad)
    with pytest.raises(SpecError, match="neither a YAML file"):
        load_spec("my-scheduler:8786")


def test_cli_reports_a_bad_spec_without_a_traceback(tmp_path, capsys):
    from harmonize.cli import main

    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("type: local\nn_workers: two\n")
    code = main(["apply", str(tmp_path / "cohort.zarr"), "--cluster", str(spec_file), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "n_workers='two'" in err and "an integer >= 1" in err and "Traceback" not in err


def test_tls_paths_are_taken_from_the_spec_folder(tmp_path):
    spec_file = tmp_path / "sched.yaml"
    spec_file.write_text(yaml.safe_dump({"type": "scheduler", "address": "tls://10.0.0.5:8786",
                                         "ca_file": "certs/ca.pem", "cert_file": "certs/c.pem",
                                         "key_file": "certs/k.pem"}))
    spec = load_spec(spec_file)
    assert spec["ca_file"] == str(tmp_path / "certs" / "ca.pem")
    with pytest.raises(SpecError, match=r"ca_file=.*ca\.pem does not exist"):
        make_client(spec, quiet=True)


def test_harmonize_scheduler_env_points_commands_at_a_running_scheduler(client, monkeypatch, tmp_path):
    address = client.scheduler.address
    monkeypatch.setenv(ENV_SCHEDULER, address)
    assert load_spec(None) == {"type": "scheduler", "address": address, "timeout": 30}
    other = make_client(quiet=True)
    try:
        assert other.scheduler.address == address
        assert other.submit(operator.add, 2, 3).result() == 5
    finally:
        close_client(other)  # a client of a running scheduler leaves the cluster up
    assert client.submit(operator.mul, 2, 3).result() == 6
    spec_file = tmp_path / "sched.yaml"
    spec_file.write_text(yaml.safe_dump({"type": "scheduler", "address": address, "timeout": 5}))
    monkeypatch.setenv(ENV_SCHEDULER, str(spec_file))
    assert load_spec(None)["timeout"] == 5
    monkeypatch.delenv(ENV_SCHEDULER)
    assert load_spec(None)["type"] == "local"


def test_unreachable_scheduler_is_a_clear_error():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError, match=f"could not connect to the Dask scheduler at tcp://127.0.0.1:{port}"):
        make_client({"type": "scheduler", "address": f"tcp://127.0.0.1:{port}", "timeout": 1}, quiet=True)


# ---- SLURM and Kubernetes without either ----------------------------------------------------------
def _slurm_spec(tmp_path, **changes) -> dict:
    spec = load_spec(CLUSTER_DIR / "slurm.yaml")
    # the scheduler starts here, on loopback; certificates and logs go to the test's folder
    spec.update(scheduler_host="127.0.0.1", dashboard_address="127.0.0.1:0", shared_temp_directory=str(tmp_path),
                log_directory=str(tmp_path / "logs"), **changes)
    return spec


def test_slurm_job_script_carries_gpu_memory_walltime_from_the_spec(tmp_path):
    pytest.importorskip("dask_jobqueue")
    spec = _slurm_spec(tmp_path)
    assert spec["gpus"] == 1 and spec["memory"] == "32GiB" and spec["walltime"] == "04:00:00"
    cluster = slurm_cluster(spec)
    try:
        script = cluster.job_script()
        key = Path(script.split("--tls-key ")[1].split()[0])
        key_mode = key.stat().st_mode
    finally:
        cluster.close()
    print(script)
    lines = script.splitlines()
    for directive in ("#SBATCH -p gpu", "#SBATCH -A mylab", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
                      "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --qos=normal"):
        assert directive in lines, directive
    assert "module load cuda" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.startswith("python3 ")
    assert "--resources GPU=1" in worker and "--nthreads 8" in worker and "--memory-limit 32.00GiB" in worker
    # TLS by default on a shared HPC network: the temporary key is written for the workers, owner-only
    assert " tls://127.0.0.1:" in worker and "--tls-key" in worker
    assert key.parent == tmp_path and key_mode & 0o077 == 0


def test_slurm_cpu_jobs_and_gpu_types(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from harmonize.cluster import slurm_kwargs

    cpu = slurm_kwargs(_slurm_spec(tmp_path, gpus=0, processes=2, protocol="tcp"))
    assert not any("gres" in d for d in cpu["job_extra_directives"]) and cpu["worker_extra_args"] == []
    assert "security" not in cpu and cpu["processes"] == 2
    typed = slurm_kwargs(_slurm_spec(tmp_path, gpu_type="a100"))
    assert "--gres=gpu:a100:1" in typed["job_extra_directives"]


def test_plain_tcp_on_an_hpc_network_is_warned_about(tmp_path):
    pytest.importorskip("dask_jobqueue")
    with pytest.warns(UserWarning, match="anyone who can reach .* can run code as the workers' user"):
        cluster = slurm_cluster(_slurm_spec(tmp_path, protocol="tcp"))
    try:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert "--tls" not in cluster.job_script()
    finally:
        cluster.close()


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    with pytest.raises(ClusterError, match=r"pip install 'harmonize\[slurm\]'"):
        slurm_cluster(_slurm_spec(tmp_path))
    if importlib.util.find_spec("dask_kubernetes") is None:
        with pytest.raises(ClusterError, match=r"pip install 'harmonize\[k8s\]'"):
            make_client(CLUSTER_DIR / "kubernetes.yaml", quiet=True)


def test_kubernetes_spec_becomes_a_daskcluster_manifest():
    manifest = kubernetes_manifest(load_spec(CLUSTER_DIR / "kubernetes.yaml"))
    assert manifest["apiVersion"] == "kubernetes.dask.org/v1" and manifest["kind"] == "DaskCluster"
    assert manifest["metadata"] == {"name": "harmonize", "namespace": "neuroimaging"}
    worker = manifest["spec"]["worker"]
    assert worker["replicas"] == 2
    container = worker["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--resources GPU=1" in args and "--nthreads 4" in args and "--memory-limit 16GiB" in args
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container["volumeMounts"] == [{"name": "store", "mountPath": "/data"}]
    assert worker["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "harmonize-data"}
    assert manifest["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    cpu = kubernetes_manifest({**load_spec(CLUSTER_DIR / "kubernetes.yaml"), "gpus": 0})
    cpu_container = cpu["spec"]["worker"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert "--resources" not in cpu_container["args"]


# ---- placement ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_client():
    """A LocalCluster on 127.0.0.1 from a spec: worker 'gpu-0' is given CUDA device 0 and advertises a
    (fake, on this machine) GPU; worker '0' has no GPU."""
    client = make_client({"type": "local", "n_workers": 1, "cuda_devices": [0], "threads_per_worker": 2,
                          "memory_limit": "2GiB"}, quiet=True)
    yield client
    close_client(client)


def _names(client: Client) -> dict[str, str]:
    return {address: str(w["name"]) for address, w in client.scheduler_info(n_workers=-1)["workers"].items()}


def _ran_on(stream: list[dict], names: dict[str, str]) -> dict[str, set[str]]:
    """task name prefix -> worker names it ran on."""
    out: dict[str, set[str]] = {}
    for record in stream:
        out.setdefault(key_split(record["key"]), set()).add(names.get(record["worker"], record["worker"]))
    return out


@pytest.fixture(scope="module")
def tiny_bids(tmp_path_factory) -> Path:
    """3 sites x 2 subjects at 6 mm: enough for fit + apply, few tasks (placement, not quality)."""
    out = tmp_path_factory.mktemp("tiny")
    spec = CohortSpec(sites=("NYU", "UM", "USM"), subjects_per_site=2, resolution_mm=6.0, seed=11)
    return Path(simulate_cohort(out, spec)["bids_dir"])


def _tiny_store(tiny_bids: Path, tmp_path: Path, client: Client) -> Path:
    path = tmp_path / "cohort.zarr"
    result = ingest(tiny_bids, path, client, chunks=(24, 24, 24), progress=False)
    assert not result.rejected and len(result.ingested) == 6
    return path


def test_gpu_worker_sees_only_its_device_and_torch_uses_each_workers_threads(mixed_client):
    import torch

    names = _names(mixed_client)
    assert sorted(names.values()) == ["0", "gpu-0"]
    visible = {names[a]: v for a, v in mixed_client.run(os.getenv, "CUDA_VISIBLE_DEVICES").items()}
    assert visible["gpu-0"] == "0"  # torch sees it as cuda:0, which select_device picks
    # the nanny pins OMP threads to 1; the TorchThreads plugin gives torch the worker's threads
    assert mixed_client.run(torch.get_num_threads) == mixed_client.nthreads() == dict.fromkeys(names, 2)


def test_workers_keep_glibc_malloc_defaults_and_a_users_setting_wins(client, mixed_client, monkeypatch):
    # distributed's nanny default (MALLOC_TRIM_THRESHOLD_=65536) made apply page-fault its way to 0.6x a
    # plain loop; harmonize's LocalClusters (CPU and GPU workers) leave glibc's own tuning in place
    for c in (client, mixed_client):
        assert set(c.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")  # a lab's own choice is kept
    own = make_client({"type": "local", "n_workers": 1, "threads_per_worker": 1, "memory_limit": "1GiB"},
                      quiet=True)
    try:
        assert set(own.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {"1048576"}
    finally:
        close_client(own)


def test_fit_and_apply_run_on_the_gpu_worker(mixed_client, tiny_bids, tmp_path):
    store = _tiny_store(tiny_bids, tmp_path, mixed_client)
    names = _names(mixed_client)
    assert [names[a] for a in gpu_workers(mixed_client)] == ["gpu-0"]
    assert gpu_resources(mixed_client) == {"GPU": 1}
    with get_task_stream(mixed_client) as fit_stream:
        pipeline.fit(store, mixed_client, params=FAST_FIT, progress=False)
    with get_task_stream(mixed_client) as apply_stream:
        result = pipeline.apply(store, mixed_client, progress=False)
    assert len(result.harmonized) == 6
    assert (CohortStore(store).status(S.HARMONIZED_STATUS) == S.DONE).all()
    fit_ran = _ran_on(fit_stream.data, names)
    apply_ran = _ran_on(apply_stream.data, names)
    print("fit tasks:", fit_ran, "\napply tasks:", apply_ran)
    # training (and the reading of its data, inside the task) ran on the GPU worker, nothing elsewhere
    assert fit_ran == {"fit-invariant": {"gpu-0"}}, fit_ran
    # apply is one task per subject (read, model over the chunks, write), each where the GPU is
    assert len(apply_stream.data) == 6 and apply_ran == {"harmonize_subject": {"gpu-0"}}, apply_ran
    # and the model was loaded in the GPU worker's process only
    loads = {names[a]: n for a, n in mixed_client.run(apply_mod.load_count).items()}
    assert loads["gpu-0"] >= 1 and loads["0"] == 0, loads


def test_without_gpu_workers_everything_runs_on_cpu_workers(client, tiny_bids, tmp_path):
    store = _tiny_store(tiny_bids, tmp_path, client)
    assert gpu_workers(client) == [] and gpu_resources(client) is None
    with get_task_stream(client) as stream:
        pipeline.fit(store, client, params=FAST_FIT, progress=False)
        result = pipeline.apply(store, client, progress=False)
    assert len(result.harmonized) == 6
    workers = {record["worker"] for record in stream.data}
    assert workers and workers <= set(client.scheduler_info(n_workers=-1)["workers"])
    assert any(str(r["key"]).startswith("fit-invariant") for r in stream.data)


# ---- TLS ------------------------------------------------------------------------------------------
def _certificates(folder: Path, ca_name: str, leaves: tuple[str, ...]) -> None:
    """A CA and leaf certificates it signed (for 127.0.0.1 / localhost), as PEM files in `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key, cert) -> None:
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = folder / f"{stem}-key.pem"
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)

    now = datetime.datetime.now(datetime.timezone.utc)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    for leaf in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(leaf)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        write(leaf, key, cert)


def _tls_spec(address: str, folder: Path, leaf: str, ca: Path | None = None) -> dict:
    return {"type": "scheduler", "address": address, "timeout": 5, "ca_file": str(ca or folder / "ca.pem"),
            "cert_file": str(folder / f"{leaf}.pem"), "key_file": str(folder / f"{leaf}-key.pem")}


def test_tls_cluster_accepts_its_own_certificates_and_refuses_others(tmp_path):
    pytest.importorskip("cryptography")
    lab, other = tmp_path / "lab", tmp_path / "other"
    _certificates(lab, "lab CA", ("node", "client"))
    _certificates(other, "another CA", ("client",))
    owner = make_client({"type": "local", "n_workers": 1, "protocol": "tls", "ca_file": str(lab / "ca.pem"),
                         "cert_file": str(lab / "node.pem"), "key_file": str(lab / "node-key.pem")}, quiet=True)
    try:
        address = owner.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        user = make_client(_tls_spec(address, lab, "client"), quiet=True)
        try:
            assert user.submit(operator.add, 20, 22).result() == 42
            assert all(a.startswith("tls://") for a in user.scheduler_info()["workers"])
        finally:
            close_client(user)
        # a certificate from another CA: the scheduler does not know its issuer
        with pytest.raises(ClusterError, match="could not connect"):
            make_client(_tls_spec(address, other, "client", ca=lab / "ca.pem"), quiet=True)
        # trusting another CA: the client refuses the scheduler's certificate too
        with pytest.raises(ClusterError, match="could not connect"):
            make_client(_tls_spec(address, other, "client"), quiet=True)
        # plain tcp to a TLS scheduler
        with pytest.raises(ClusterError, match="could not connect"):
            make_client({"type": "scheduler", "address": address.replace("tls://", "tcp://"), "timeout": 5},
                        quiet=True)
        # no client certificate at all: the scheduler ends the TLS handshake (mutual TLS)
        host, port = address.removeprefix("tls://").rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(lab / "ca.pem"))
        context.check_hostname = False
        with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as conn:
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|HANDSHAKE_FAILURE"):
                conn.recv(16)
        # the cluster still works for its own client after all that
        assert owner.submit(operator.sub, 5, 3).result() == 2
    finally:
        close_client(owner)
