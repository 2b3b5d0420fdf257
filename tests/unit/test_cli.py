"""The `vosr` console script (jobkit/cli.py) finds every job: one line each in `vosr --help`, and `vosr <job>`
runs the job module's own main (its --help lists the job's stages; its exit codes are the job's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobkit.cli import main
from jobkit.jobs import JOBS

ROOT = Path(__file__).resolve().parents[2]
STAGED = ("curate", "precompute", "pretrain", "distill", "evaluate")


def test_help_lists_every_command_with_its_purpose(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    commands = {**{j.name: (j.module, j.purpose) for j in JOBS.values()},
                "config": ("", "resolved config"), "params": ("", "parameter")}
    for name, (module, purpose) in commands.items():
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
        assert f"python -m {JOBS[job].module} --config configs/demo/{job}.yaml" in stages, job


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


def test_the_job_table_names_modules_scripts_configs_and_sections_that_exist(capsys):
    """jobkit/jobs.py is the one table of jobs: every module has a main, every submitted job's script and every
    chain stage's demo and cluster configs exist, every section a job reads is a section of the root config, and
    a config file's sections name its job."""
    import dataclasses
    import importlib.util

    from jobkit.config import Config
    from jobkit.jobs import chain, job_for_sections, submitted
    from vosr.config import read_yaml

    for job in JOBS.values():
        assert importlib.util.find_spec(job.module) is not None, job
    assert [j.name for j in chain()] == ["curate", "precompute", "pretrain", "distill", "evaluate", "serve"]
    assert [j.name for j in submitted()] == ["curate", "precompute", "pretrain", "distill", "evaluate"]
    for job in submitted():
        assert (ROOT / job.script).is_file(), job.script
    fields = {f.name for f in dataclasses.fields(Config)}
    for job in chain():
        assert (ROOT / job.demo_config).is_file() and (ROOT / job.cluster_config).is_file(), job
        assert set(job.sections) <= fields, job
        for path in (job.demo_config, job.cluster_config):
            assert job_for_sections(read_yaml(ROOT / path)) is job, path
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "python pipelines/precompute.py --config configs/cluster/precompute.yaml" in out
    assert "VOSR_CONFIG=configs/cluster/serve.yaml serve run --working-dir . inference.serve:app" in out


def test_the_registries_fail_on_an_unknown_name_listing_the_known_ones():
    from jobkit.jobs import SECTIONS, Registry, RegistryError, config_section

    with pytest.raises(KeyError) as exc:
        JOBS["precompte"]
    assert str(exc.value) == ("unknown job 'precompte'; known: curate, precompute, pretrain, distill, evaluate, serve, "
                              "upscale, export, import, demo, plan")
    with pytest.raises(RegistryError, match="registered twice"):
        config_section("curate", "a second curate section")(type("Other", (), {}))
    assert SECTIONS["curate"].cls.__name__ == "CurateConfig"
    empty = Registry("widget")
    with pytest.raises(RegistryError, match="unknown widget 'x'; known: none"):
        empty["x"]
