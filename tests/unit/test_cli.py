"""The `vosr` console script (jobkit/cli.py) finds every job: one line each in `vosr --help`, and `vosr <job>`
runs the job module's own main (its --help lists the job's stages; its exit codes are the job's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobkit.cli import JOBS, main

ROOT = Path(__file__).resolve().parents[2]
STAGED = ("curate", "precompute", "pretrain", "distill", "evaluate")


def test_help_lists_every_command_with_its_purpose(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, (module, purpose) in {**JOBS, "config": ("", "resolved config"), "params": ("", "parameter")}.items():
        assert f"\n    {name}" in out, name
        assert purpose.split()[0] in out and module in out, name


@pytest.mark.parametrize("job", STAGED)
def test_a_jobs_help_is_its_stage_list(job, capsys):
    with pytest.raises(SystemExit) as exc:
        main([job, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vosr {job} ") and "--config" in out and "--set" in out
    assert "Stages" in out, out[:400]


def test_the_demo_is_a_command_whose_help_lists_the_jobs_it_chains(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vosr demo ")
    stages = out.split("Stages, top to bottom")[1]
    for job in ("curate", "precompute", "pretrain", "distill", "evaluate", "serve"):
        assert f"python -m {JOBS[job][0]} --config configs/demo/{job}.yaml" in stages, job


def test_the_console_script_and_the_module_give_the_same_exit_code_and_error():
    bad = ["--set", "curate.no_such_key=1"]
    via_cli = subprocess.run([sys.executable, "-m", "jobkit.cli", "curate", *bad], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    via_module = subprocess.run([sys.executable, "-m", "pipelines.curate", *bad], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    assert via_cli.returncode == via_module.returncode == 2
    assert "no_such_key" in via_cli.stderr and via_cli.stderr == via_module.stderr


def test_no_library_or_job_module_edits_the_import_path():
    """The packages are installed (make setup, the image: pip install -e), and `ray job submit --working-dir .`
    puts the working dir on the entrypoint's and workers' PYTHONPATH, so no module edits sys.path or PYTHONPATH."""
    offenders = []
    for pkg in ("vosr", "pipelines", "training", "inference", "jobkit", "demo"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            text = f.read_text()
            if "sys.path" in text or "PYTHONPATH" in text:
                offenders.append(str(f.relative_to(ROOT)))
    assert not offenders, offenders


def test_exit_codes_usage_2_runtime_1_with_one_error_line_and_traceback_only_with_debug(tmp_path, capsys):
    from pipelines.precompute import main as precompute

    base = ["--config", "configs/precompute/tiny.yaml", "--set", f"precompute.input={tmp_path / 'none'}",
            "--set", f"precompute.output={tmp_path / 'out'}", "--set", "run.mlflow.enabled=false"]
    with pytest.raises(SystemExit) as exc:  # a usage error: the config names a key that does not exist
        precompute([*base, "--set", "precompute.no_such_key=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no_such_key" in err[0]
    assert precompute(base) == 1  # a runtime failure: no curated shards under the input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: FileNotFoundError: no curated shards under")
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        precompute([*base, "--debug"])
