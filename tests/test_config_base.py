"""`base:` in a config file: the file extends another (vosr/config/root.py, read_yaml), resolved relative to the
file that names it, recursively, with clear errors for a missing file, a cycle or a malformed value."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobkit.config import ConfigError, explain_config, load_config
from vosr.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_merges_mappings_and_replaces_lists_and_scalars(tmp_path, monkeypatch):
    _write(tmp_path / "recipes" / "root.yaml", "preset: tiny\nmodel:\n  depth: 6\n  hidden_size: 64\n"
           "train:\n  betas: [0.8, 0.9]\n  lr: 1.0e-3\n  steps: 10\n")
    _write(tmp_path / "recipes" / "stage.yaml", "base: root.yaml\ntrain:\n  steps: 20\n  lr: 2.0e-3\n")
    top = _write(tmp_path / "cluster" / "job.yaml", "base: ../recipes/stage.yaml\nmodel:\n  depth: 2\n"
                 "train:\n  betas: [0.7]\n")
    monkeypatch.chdir(tmp_path / "cluster")  # relative to the naming file, not to the working directory
    assert read_yaml(top) == {"preset": "tiny", "model": {"depth": 2, "hidden_size": 64},
                              "train": {"betas": [0.7], "lr": 2.0e-3, "steps": 20}}
    cfg = load_config(top, ["train.steps=30"])  # --set goes over the whole chain
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.train.lr, cfg.train.steps) == (2, 64, 2.0e-3, 30)
    assert cfg.train.betas == [0.7]


def test_absolute_base(tmp_path):
    root = _write(tmp_path / "a" / "root.yaml", "model:\n  depth: 3\n")
    top = _write(tmp_path / "b" / "top.yaml", f"base: {root}\n")
    assert load_config(top).model.depth == 3


def test_missing_base_names_the_file_and_who_named_it(tmp_path):
    top = _write(tmp_path / "top.yaml", "base: nowhere/recipe.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere/recipe\.yaml \(the base of .*top\.yaml\)"):
        load_config(top)


def test_base_cycle_is_refused_with_the_chain(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: c.yaml\n")
    _write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        read_yaml(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="base cycle"):
        read_yaml(tmp_path / "self.yaml")


@pytest.mark.parametrize("value", ["[a.yaml, b.yaml]", "3", "''", "{x: 1}"])
def test_base_must_be_one_path(tmp_path, value):
    top = _write(tmp_path / "top.yaml", f"base: {value}\n")
    with pytest.raises(ConfigError, match="base must be the path of a config file"):
        read_yaml(top)


def test_shipped_cluster_files_resolve_inside_a_copied_checkout(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the job in an uploaded copy: the cluster files' bases resolve inside the
    copy, from any working directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "checkout" / "configs")
    recipe = tmp_path / "checkout" / "configs" / "train" / "vosr-0.5b.yaml"
    recipe.write_text(recipe.read_text().replace("steps: 400000", "steps: 123"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("checkout/configs/cluster/pretrain.yaml"))
    assert cfg.train.steps == 123  # the copy's recipe, not the repository's
    assert cfg.train.gpu_memory_gib == 80 and cfg.run.output_root == "/tmp/vosr"  # the overlay's own keys


def test_explain_and_the_cli_know_base():
    assert explain_config().startswith("  base: str")
    r = subprocess.run([sys.executable, "-m", "jobkit.cli", "config", "--config", "configs/cluster/distill.yaml"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "lr: 2.0e-05" in r.stdout and "base:" not in r.stdout  # the resolved config, the recipe's method in it
