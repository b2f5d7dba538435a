"""The command line a user meets: useful help, every stage alone on a store, honest exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harmonize.cli import EXIT_OK, EXIT_REJECTED, main

COMMANDS = ("run", "demo", "simulate", "ingest", "fit", "apply", "export", "corex", "report")


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: harmonize {command}" in capsys.readouterr().out


def test_missing_store_is_an_error_not_a_traceback(tmp_path, client, capsys):
    code = main(["apply", str(tmp_path / "nowhere.zarr"), "--cluster", client.scheduler.address, "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "nowhere.zarr" in err and "Traceback" not in err


def test_stages_one_by_one_on_a_store(cohort_copy, tmp_path, client, capsys):
    """ingest -> fit -> apply -> export -> corex -> report, each a separate command against one
    scheduler (started by the test on loopback), as a user or a scheduler would run them."""
    address = client.scheduler.address
    (cohort_copy / "sub-001" / "anat" / "sub-001_T1w.nii.gz").write_bytes(b"not a nifti")
    store = tmp_path / "cohort.zarr"
    common = ["--cluster", address, "--quiet"]
    assert main(["ingest", str(cohort_copy), str(store), *common]) == EXIT_REJECTED
    captured = capsys.readouterr()
    assert "rejected sub-001" in captured.out + captured.err  # the rejected file is named, with a reason
    assert main(["fit", str(store), "--steps", "12", "--seed", "1", *common]) == EXIT_OK
    assert main(["apply", str(store), *common]) == EXIT_OK
    assert main(["export", str(store), str(tmp_path / "out"), *common]) == EXIT_OK
    exported = sorted(p.name for p in (tmp_path / "out").rglob("*.nii.gz"))
    assert len(exported) == 11 and exported[0] == "sub-002_desc-harmonized_T1w.nii.gz"
    # ComBat beside it: its own fit, its own output array, the same report
    assert main(["fit", str(store), "--model", "combat", "--steps", "3", *common]) == 2  # not a ComBat option
    assert main(["fit", str(store), "--model", "combat", "--reference-site", "NYU", *common]) == EXIT_OK
    assert main(["apply", str(store), "--model", "combat", "--output", "harmonized_combat", *common]) == EXIT_OK
    assert main(["export", str(store), str(tmp_path / "combat"), "--output", "harmonized_combat", *common]) == EXIT_OK
    assert len(list((tmp_path / "combat").rglob("sub-*_desc-harmonizedCombat_T1w.nii.gz"))) == 11
    assert main(["corex", str(store), "--factors", "2", *common]) == EXIT_OK
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == EXIT_OK
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["model"]["model_kind"] == "invariant"  # the main output stays the invariant model's
    for name in ("raw", "harmonized (invariant)", "harmonized (combat)"):
        sp = numbers["images"][name]["site_predictability"]
        assert 0.0 <= sp["accuracy"] <= 1.0 and sp["chance"] == pytest.approx(4 / 11)
        assert np.isfinite(numbers["images"][name]["age_r2"]["r2"])
    assert (tmp_path / "report" / "report.html").exists()


def test_run_with_a_bad_spec_is_a_usage_error_naming_the_line(tmp_path, small_cohort, capsys):
    spec = tmp_path / "night.yaml"
    spec.write_text(f"input: {small_cohort['bids_dir']}\nstore: {tmp_path / 's.zarr'}\nexprot: out\n")
    assert main(["run", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{spec}, line 3, key 'exprot': unknown key 'exprot'" in err and "Traceback" not in err
