"""`vosr plan`: what a job costs at a corpus size, from the code's own bounds, checked against the nodes.

    vosr plan --config configs/cluster/precompute.yaml --images 100000000
    python -m jobkit.plan --config configs/cluster/curate.yaml --images 100000000 [--job curate] [--manifest ...]

For each stage of the job: the stated peak memory of the driver and of each task / actor kind, the storage
bytes the stage writes, and its CPU- and GPU-hours. Every number comes from the module that owns the stage: each
job module has `plan_stages(cfg, images) -> list[Stage]`, built from the same bound functions its code passes to
Ray as `memory=` (e.g. pipelines/features/writer.merge_peak_bound, training/data.read_task_peak_bound) and from
constants measured by the benchmarks (named next to each constant). docs/scale.md explains every line.

The nodes come from the config (run.head_memory_gb / run.worker_memory_gb / run.gpu_worker_memory_gb, when
set) or else from the KubeRay manifest in infra/k8s that runs this config (its head group and worker groups'
memory limits and GPUs). The driver is checked against the head; a task or actor against the worker group it
runs on (GPU work on the GPU group), times the number of them that share one node when that number is fixed
(GPU actors and trainers: GPUs per node). Exit status 1, naming the stage, the process and both numbers, when a
bound exceeds its node; 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jobkit.jobs import JOBS, job_for_sections, planned

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
GiB = 2**30
# Sustained GPU throughput assumed for GPU-hours: 40% MFU of 989 TFLOP/s dense bf16 (H100/H200 SXM; docs/scale.md s0)
GPU_EFFECTIVE_FLOPS = 0.4 * 989e12

@dataclass
class Proc:
    """One process kind of a stage: its stated peak (bytes), the bound in words, where it runs."""
    kind: str                  # "driver", "task: merge", "actor: encoder", "trainer"
    peak: int
    formula: str
    node: str = "cpu"          # "head" (the driver's node), "cpu" (CPU workers) or "gpu" (GPU workers)
    per_node: int = 1          # how many share one node at most (fixed)
    reserved: bool = False     # declared to Ray as the task's / actor's `memory`
    gpus: float = 0.0          # GPUs each one holds: then as many share a node as its GPUs allow

    def sharing(self, nodes: Nodes) -> int:
        if self.gpus and nodes.gpus_per_node:
            return max(1, int(nodes.gpus_per_node // self.gpus))
        return max(1, self.per_node)


@dataclass
class Stage:
    name: str
    procs: list[Proc] = field(default_factory=list)
    written: int = 0           # storage bytes the stage writes
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    note: str = ""


@dataclass
class Nodes:
    """Node memory (bytes) and GPUs per node; 0 / None where nothing is declared."""
    source: str
    head: int = 0
    cpu: int = 0
    gpu: int = 0
    gpus_per_node: int = 0
    groups: list[tuple[str, int, int]] = field(default_factory=list)  # (group, memory, gpus)

    def limit(self, node: str) -> int:
        if node == "head":
            return self.head
        if node == "gpu":
            return self.gpu or self.cpu
        return self.cpu or self.gpu


class PlanError(ValueError):
    """A bad command line or config for the plan (exit 2)."""


# --- nodes ---------------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def k8s_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity ("64Gi", "16G", "512Mi", 1024) in bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kMGT]i?)?\s*", str(q))
    if not m:
        raise PlanError(f"not a Kubernetes memory quantity: {q!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _container_limits(template: dict) -> tuple[int, int]:
    c = (template.get("spec", {}).get("containers") or [{}])[0]
    res = c.get("resources", {})
    lim = res.get("limits") or res.get("requests") or {}
    return (k8s_bytes(lim["memory"]) if "memory" in lim else 0), int(lim.get("nvidia.com/gpu", 0))


def manifest_for(config_path: Path, k8s_dir: Path = K8S) -> Path | None:
    """The manifest in infra/k8s that runs this config (its entrypoint or environment names the file)."""
    needle = f"configs/cluster/{config_path.name}"
    if config_path.resolve().parent != (ROOT / "configs" / "cluster").resolve():
        return None
    for m in sorted(k8s_dir.glob("*.yaml")):
        if needle in m.read_text():
            return m
    return None


def nodes_from_manifest(path: Path) -> Nodes:
    import yaml

    doc = yaml.safe_load(path.read_text())
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or {}
    head, _ = _container_limits(cluster.get("headGroupSpec", {}).get("template", {}))
    out = Nodes(source=str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), head=head)
    for g in cluster.get("workerGroupSpecs", []):
        mem, gpus = _container_limits(g.get("template", {}))
        out.groups.append((g.get("groupName", "?"), mem, gpus))
        if gpus:
            out.gpu = max(out.gpu, mem)
            out.gpus_per_node = max(out.gpus_per_node, gpus)
        else:
            out.cpu = max(out.cpu, mem)
    return out


def nodes_for(cfg, config_path: Path | None, manifest: Path | None = None) -> Nodes:
    """Config keys win over the manifest; with neither, nothing is declared (no check)."""
    found = manifest or (manifest_for(config_path) if config_path else None)
    nodes = nodes_from_manifest(found) if found else Nodes(source="")
    r = cfg.run
    declared = []
    if r.head_memory_gb:
        nodes.head, _ = int(r.head_memory_gb * GiB), declared.append("run.head_memory_gb")
    if r.worker_memory_gb:
        nodes.cpu, _ = int(r.worker_memory_gb * GiB), declared.append("run.worker_memory_gb")
    if r.gpu_worker_memory_gb:
        nodes.gpu, _ = int(r.gpu_worker_memory_gb * GiB), declared.append("run.gpu_worker_memory_gb")
    if declared:
        nodes.source = " + ".join(([nodes.source] if nodes.source else []) + declared)
    return nodes


# --- the plan ------------------------------------------------------------------------------------------------------

def job_of(raw: dict) -> str:
    """The job a config file is for, from the sections it sets (jobkit/jobs.py job_for_sections)."""
    found = job_for_sections(raw)
    if found is None:
        raise PlanError(f"cannot tell the job from the config's sections {sorted(raw)}; pass --job "
                        f"({', '.join(j.name for j in planned())})")
    return found.name


def plan_stages(job: str, cfg, images: int) -> list[Stage]:
    known = [j.name for j in planned()]
    if job not in known:
        raise PlanError(f"unknown job {job!r}; known: {', '.join(known)}")
    module = importlib.import_module(JOBS[job].plan)
    return module.plan_stages(cfg, int(images), job) if job in ("pretrain", "distill") else \
        module.plan_stages(cfg, int(images))


def check(stages: list[Stage], nodes: Nodes) -> list[str]:
    """One line per bound that exceeds its node's memory."""
    bad = []
    for st in stages:
        for p in st.procs:
            limit = nodes.limit(p.node)
            n = p.sharing(nodes)
            need = p.peak * n
            if limit and need > limit:
                times = f"{n} x {gib(p.peak)} = " if n > 1 else ""
                bad.append(f"stage {st.name}: {p.kind} needs {times}{gib(need)}, over the {p.node} node's "
                           f"{gib(limit)} ({nodes.source}); bound: {p.formula}")
    return bad


def gib(n: float) -> str:
    n = float(n)
    if n >= GiB:
        return f"{n / GiB:,.1f} GiB"
    if n >= 10 * 2**20:
        return f"{n / 2**20:,.0f} MiB"
    if n >= 2**20:
        return f"{n / 2**20:,.2f} MiB"
    return f"{n / 2**10:,.0f} KiB"


def tb(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e11 else f"{n / 1e9:,.1f} GB"


def render(title: str, stages: list[Stage], nodes: Nodes) -> str:
    lines = [title]
    if nodes.source:
        groups = ", ".join(f"{g} {gib(m)}" + (f" ({n} GPUs)" if n else "") for g, m, n in nodes.groups)
        lines.append(f"nodes ({nodes.source}): head {gib(nodes.head) if nodes.head else '-'}"
                     + (f"; workers: {groups}" if groups else
                        f"; workers: cpu {gib(nodes.cpu) if nodes.cpu else '-'}, gpu {gib(nodes.gpu) if nodes.gpu else '-'}"))
    else:
        lines.append("nodes: none declared (no manifest in infra/k8s runs this config and run.*_memory_gb are 0): "
                     "bounds are printed, not checked")
    lines.append("")
    w = max([len("process")] + [len(p.kind) for s in stages for p in s.procs])
    lines.append(f"{'stage / process':<{w + 2}}  {'peak':>10}  {'node':>17}  bound")
    total_w = total_c = total_g = 0.0
    for st in stages:
        lines.append(f"{st.name}" + (f"  ({st.note})" if st.note else ""))
        for p in st.procs:
            limit = nodes.limit(p.node)
            n = p.sharing(nodes)
            per = f" x{n}" if n > 1 else ""
            node = f"{p.node}{per} {gib(limit)}" if limit else p.node + per
            flag = "  OVER" if limit and p.peak * n > limit else ""
            res = " [reserved]" if p.reserved else ""
            lines.append(f"  {p.kind:<{w}}  {gib(p.peak):>10}  {node:>17}  {p.formula}{res}{flag}")
        total_w += st.written
        total_c += st.cpu_hours
        total_g += st.gpu_hours
    lines.append("")
    lines.append(f"{'stage':<24} {'writes':>12} {'CPU-hours':>12} {'GPU-hours':>12}")
    for st in stages:
        lines.append(f"{st.name:<24} {tb(st.written) if st.written else '-':>12} "
                     f"{st.cpu_hours:>12,.0f} {st.gpu_hours:>12,.0f}")
    lines.append(f"{'total':<24} {tb(total_w):>12} {total_c:>12,.0f} {total_g:>12,.0f}")
    return "\n".join(lines)


def run_plan(config: str | Path, images: int, job: str | None = None, manifest: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = (), gpu_memory: bool = True) -> tuple[int, str, list[str]]:
    """(exit status, the printed plan, the lines naming bounds over their nodes) for one config. A training job
    with a declared GPU (train.gpu_memory_gib) also gets the per-GPU memory plan of one optimiser step
    (training/memory_plan.py: the real model, loss and optimiser under FakeTensorMode, ~30 s at 0.5B) unless
    `gpu_memory` is false."""
    from jobkit.config import load_config
    from vosr.config import read_yaml

    path = Path(config)
    cfg = load_config(path, list(overrides))
    job = job or job_of(read_yaml(path) or {})
    nodes = nodes_for(cfg, path, Path(manifest) if manifest else None)
    stages = plan_stages(job, cfg, int(images))
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    text = render(f"vosr plan: {shown} (job {job}) at {int(images):,} images", stages, nodes)
    bad = check(stages, nodes)
    if gpu_memory and job in ("pretrain", "distill"):
        from training.memory_plan import gpu_memory_section

        fits, section = gpu_memory_section(cfg, job)
        if fits is not None:
            text += "\n\n" + section
        if fits is False:
            bad.append(f"stage fit: one optimiser step does not fit train.gpu_memory_gib "
                       f"{cfg.train.gpu_memory_gib:g} GiB per GPU at the configured micro-batch (GPU memory plan above)")
    return (1 if bad else 0), text, bad


DOC_BLOCK = re.compile(r"(<!-- plan: (?P<config>\S+) -->\n)(?:```text\n.*?```\n)?(<!-- /plan -->)", re.S)


def doc_block(text: str) -> str:
    return f"```text\n{text}\n```\n"


def update_doc(doc: Path, images: int) -> int:
    """Rewrite every `<!-- plan: <config> -->` block of a Markdown file with that config's current plan."""
    body = doc.read_text()

    def fill(m: re.Match) -> str:
        _, text, _ = run_plan(ROOT / m.group("config"), images, gpu_memory=False)  # GPU plans: docs/gpu-memory.md
        return m.group(1) + doc_block(text) + m.group(3)

    new, n = DOC_BLOCK.subn(fill, body)
    doc.write_text(new)
    print(f"{doc}: {n} plan blocks written")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vosr plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the job's YAML config")
    ap.add_argument("--images", type=float, default=100_000_000, help="kept images of the corpus (default 100M)")
    ap.add_argument("--job", default=None, choices=sorted(j.name for j in planned()),
                    help="default: from the config's sections")
    ap.add_argument("--manifest", default=None, help="KubeRay manifest declaring the nodes (default: the one in "
                                                     "infra/k8s that runs this config)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--update-doc", default=None, metavar="MARKDOWN",
                    help="rewrite the `<!-- plan: <config> -->` blocks of a document (docs/scale.md) instead")
    ap.add_argument("--no-gpu-memory", action="store_true",
                    help="training configs: leave out the per-GPU memory plan of one step (~30 s at 0.5B)")
    args = ap.parse_args(argv)
    from jobkit.config import ConfigError

    try:
        if args.update_doc:
            return update_doc(Path(args.update_doc), int(args.images))
        if not args.config:
            raise PlanError("--config is required")
        code, text, bad = run_plan(args.config, int(args.images), args.job, args.manifest, args.set,
                                   gpu_memory=not args.no_gpu_memory)
    except (ConfigError, PlanError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if bad:
        print("", file=sys.stderr)
        for line in bad:
            print(f"plan: {line}", file=sys.stderr)
    return code


def hours(cpu_seconds: float) -> float:
    return cpu_seconds / 3600.0


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b)) if b else 0


if __name__ == "__main__":
    raise SystemExit(main())
