"""The notebooks run headless, top to bottom, against a scheduler + workers started by the tests on loopback.

Their parameters come from environment variables (a tiny cohort at 6 mm, few training steps); the kernel
inherits them, and HARMONIZE_SCHEDULER points `make_client()` at the test cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harmonize.io import schema as S
from harmonize.io.store import open_cohort

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ORDER = ("01-harmonize-on-a-cluster.ipynb", "02-corex-factors.ipynb")


def test_notebooks_are_saved_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(ORDER) <= set(found), found
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: saved with outputs"


def test_notebooks_run_against_a_loopback_scheduler(client, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client import KernelManager
    workdir = tmp_path / "work"
    env = {
        "HARMONIZE_SCHEDULER": client.scheduler.address,
        "HARMONIZE_NB_WORKDIR": str(workdir),
        "HARMONIZE_NB_SITES": "NYU,UM,USM",
        "HARMONIZE_NB_SUBJECTS_PER_SITE": "3",
        "HARMONIZE_NB_RESOLUTION": "6",
        "HARMONIZE_NB_STEPS": "20",
        "HARMONIZE_NB_FIT_PARAMS": '{"eval_every": 10, "crop": 12, "torch_threads": 1}',
        "HARMONIZE_NB_FACTORS": "2",
        "HARMONIZE_NB_REGIONS": "12",
        "HARMONIZE_NB_RESTARTS": "2",
        "HARMONIZE_NB_PERMUTATIONS": "50",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        # the kernel talks to this process over local sockets, not TCP ports other users could reach
        kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
        runner = nbclient.NotebookClient(nb, km=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
        runner.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
        stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        assert images >= 2, f"{name}: expected figures, got {images}"
        if name.startswith("01"):
            assert client.scheduler.address in stdout  # it used the test's scheduler, not a cluster of its own
            for bar in ("ingest", "fit invariant", "apply"):  # long steps show progress
                assert bar in stderr, bar
    ds = open_cohort(workdir / "cohort.zarr")
    assert (ds[S.HARMONIZED_STATUS].values == S.DONE).all()
    for name in (S.COREX_SCORES, S.COREX_RAW_SCORES):  # harmonized and raw images, scored by the same factors
        assert ds[name].shape == (9, 2) and np.isfinite(ds[name].values).all()
