"""`vosr plan` (jobkit/plan.py): per-stage bounds from the owning modules, checked against the nodes the config or
its KubeRay manifest declares; every shipped cluster config fits at 100M images, and an over-size bound fails
loudly, naming the stage, the process and both numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobkit import plan
from jobkit.cli import main as vosr

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = sorted((ROOT / "configs" / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_every_shipped_cluster_config_fits_its_nodes_at_100m_images(path, capsys):
    # the host plan of every config (the GPU plans of the training recipes: tests/unit/test_memory_plan.py and below)
    assert vosr(["plan", "--config", str(path), "--images", "100000000", "--no-gpu-memory"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "at 100,000,000 images" in out and "total" in out
    if path.name != "evaluate.yaml":  # every other cluster config is run by a manifest in infra/k8s
        assert "nodes (infra/k8s/" in out


def test_a_bound_over_its_node_fails_naming_stage_process_and_numbers(capsys):
    """rows_per_shard 512 (the value the cluster configs shipped with) on 4 GiB workers: the merge task's
    reservation (10 row groups of 512 x 1.56 MiB) cannot fit; the driver on a 1 GiB head neither."""
    code = vosr(["plan", "--config", str(ROOT / "configs/cluster/precompute.yaml"), "--set",
                 "precompute.rows_per_shard=512", "--set", "run.worker_memory_gb=4", "--set", "run.head_memory_gb=1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "plan: stage write_shards: task: merge needs 7.9 GiB, over the cpu node's 4.0 GiB" in captured.err
    assert "plan: stage plan: driver needs 2.9 GiB, over the head node's 1.0 GiB" in captured.err  # 32 KiB x 61,051 shards + 1 GiB
    assert "OVER" in captured.out and "run.worker_memory_gb" in captured.out


def test_gpu_actors_sharing_a_node_are_checked_together():
    nodes = plan.Nodes(source="test", head=8 << 30, cpu=64 << 30, gpu=16 << 30, gpus_per_node=4)
    stage = plan.Stage("encode", [plan.Proc("actor: encoder", 5 << 30, "x", "gpu", gpus=1.0)])
    bad = plan.check([stage], nodes)
    assert len(bad) == 1 and "4 x 5.0 GiB = 20.0 GiB, over the gpu node's 16.0 GiB" in bad[0]
    assert plan.check([plan.Stage("encode", [plan.Proc("actor: encoder", 5 << 30, "x", "gpu", gpus=2.0)])],
                      nodes) == []


def test_nodes_come_from_the_manifest_that_runs_the_config():
    assert plan.k8s_bytes("64Gi") == 64 << 30 and plan.k8s_bytes("16G") == 16 * 10**9
    with pytest.raises(plan.PlanError, match="quantity"):
        plan.k8s_bytes("lots")
    m = plan.manifest_for(ROOT / "configs/cluster/precompute-256.yaml")
    assert m is not None and m.name == "rayjob-precompute.yaml"
    nodes = plan.nodes_from_manifest(m)
    assert (nodes.head, nodes.cpu, nodes.gpu, nodes.gpus_per_node) == (16 << 30, 64 << 30, 128 << 30, 4)
    assert plan.manifest_for(ROOT / "configs/cluster/evaluate.yaml") is None
    assert plan.manifest_for(ROOT / "configs/precompute/tiny.yaml") is None


def test_python_m_jobkit_plan_is_the_same_command():
    # a training config with a declared GPU also gets the per-GPU memory plan of one step, which fits (the tiny model:
    # the full-size plan of configs/cluster/pretrain.yaml is tests/unit/test_memory_plan.py's, in-process)
    r = subprocess.run([sys.executable, "-m", "jobkit.plan", "--config", "configs/train/tiny.yaml",
                        "--set", "train.gpu_memory_gib=8", "--images", "1e6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(job pretrain) at 1,000,000 images" in r.stdout and "trainer (host)" in r.stdout
    assert "GPU memory plan: pretrain, tiny at 64 px" in r.stdout and "8 GiB declared" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "jobkit.plan", "--config", "configs/cluster/pretrain.yaml",
                          "--job", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_docs_scale_shows_each_cluster_plan_as_the_command_prints_it():
    """docs/scale.md explains the plans of the shipped configs with the numbers the command prints."""
    doc = (ROOT / "docs" / "scale.md").read_text()
    blocks = {m.group("config"): m.group(0) for m in plan.DOC_BLOCK.finditer(doc)}
    assert sorted(blocks) == [f"configs/cluster/{p.name}" for p in CLUSTER]
    for config, block in blocks.items():
        _, text, _ = plan.run_plan(ROOT / config, 100_000_000, gpu_memory=False)
        assert plan.doc_block(text) in block, (f"docs/scale.md shows a stale plan of {config}; rewrite the blocks "
                                               "with: python -m jobkit.plan --update-doc docs/scale.md")
