"""The one table of the project's jobs, and the registry of the config sections the jobs declare.

    from jobkit.jobs import JOBS
    JOBS["curate"].module            # "pipelines.curate": `python -m pipelines.curate`, `vosr curate`
    JOBS["curate"].script            # "pipelines/curate.py": `ray job submit -- python pipelines/curate.py`
    JOBS["curate"].sections          # ("curate",): the config sections it reads besides the method's and `run`
    JOBS["curate"].demo_config       # "configs/demo/curate.yaml"; .cluster_config: "configs/cluster/curate.yaml"
    [j.name for j in chain()]        # the main chain, in order: curate ... evaluate, serve

Everything that lists jobs reads this table: the `vosr` console script (jobkit/cli.py), `vosr plan`
(jobkit/plan.py), the demo chain and its report (demo/), the root config (jobkit/config.py). Nothing here imports
a job: modules are named, and imported by whoever runs or plans the job.

A job declares its own config section beside its code, with `@config_section(name, doc)` on the section's dataclass
(pipelines/config.py, training/config.py, inference/config.py); the table names the module that declares them
(`config_module`), and jobkit/config.py builds the one root from the registered sections (job_sections: modules in
table order, sections in declaration order).

Both registries fail loudly on an unknown name, listing the known ones (RegistryError, a KeyError).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """Names -> objects, in registration order; a read of an unknown name raises RegistryError listing the known
    names, and registering a name twice is an error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self._items) or 'none'}") \
                from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


# --- the jobs ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobSpec:
    name: str
    module: str                       # its main(argv) runs the job: `python -m <module>`, `vosr <name>`
    purpose: str                      # one line for `vosr --help`
    sections: tuple[str, ...] = ()    # config sections it reads besides the method's and `run`; its own first
    config_module: str = ""           # the module that declares those sections with @config_section
    plan: str = ""                    # module with plan_stages(cfg, images[, job]) for `vosr plan`; "" = none
    chain: bool = False               # a stage of the main chain (the demo, the README's cluster section)
    submit: bool = False              # runs on a cluster as `ray job submit -- python <script>`

    @property
    def script(self) -> str:
        """The file `ray job submit -- python <script>` runs, relative to the repository root."""
        return self.module.replace(".", "/") + ".py"

    @property
    def demo_config(self) -> str:
        """Its stage config in the demo chain (the tiny preset on one machine)."""
        return f"configs/demo/{self.name}.yaml"

    @property
    def cluster_config(self) -> str:
        """Its config on a cluster (the README's cluster section, infra/k8s)."""
        return f"configs/cluster/{self.name}.yaml"


JOBS: Registry[JobSpec] = Registry("job")


def _job(name: str, module: str, purpose: str, **kw) -> None:
    JOBS.register(name, JobSpec(name, module, purpose, **kw))


# The main chain, in order (chain=True), then the tools.
_job("curate", "pipelines.curate",
     "crawl or ingest images, filter, dedupe and balance them into curated Parquet shards",
     sections=("curate",), config_module="pipelines.config", plan="pipelines.curate", chain=True, submit=True)
_job("precompute", "pipelines.precompute",
     "degrade and encode curated shards into feature shards (latents + semantic tokens)",
     sections=("precompute",), config_module="pipelines.config", plan="pipelines.features.job", chain=True,
     submit=True)
_job("pretrain", "training.pretrain", "train the multi-step teacher on Ray Train",
     sections=("train",), config_module="training.config", plan="training.job", chain=True, submit=True)
_job("distill", "training.distill", "distil the teacher into the one-step student and register it in MLflow",
     sections=("distill_job", "train"), config_module="training.config", plan="training.job", chain=True,
     submit=True)
_job("evaluate", "inference.evaluate", "score bicubic, peers, the student and the teacher on a paired benchmark",
     sections=("eval",), config_module="inference.config", plan="inference.evaluate", chain=True, submit=True)
_job("serve", "inference.serve", "serve the upscaler over HTTP with Ray Serve",
     sections=("serve",), config_module="inference.config", plan="inference.serve.plan", chain=True)
_job("upscale", "inference.upscale", "upscale image files or folders on this machine")
_job("export", "training.export",
     "export a sharded (FSDP) checkpoint to the folder serving and the registry read")
_job("import", "inference.import_released",
     "import a model released by the VOSR authors (folder or hf:// URI) as a checkpoint folder")
_job("demo", "demo.chain", "run the whole chain on the embedded tiny preset on this machine (make demo)")
_job("plan", "jobkit.plan", "a job's cost at a corpus size: peak memory per process, storage, CPU/GPU-hours; "
                            "fails when a bound exceeds the nodes")


def chain() -> list[JobSpec]:
    """The main chain's jobs in order: curate -> precompute -> pretrain -> distill -> evaluate -> serve."""
    return [j for j in JOBS.values() if j.chain]


def submitted() -> list[JobSpec]:
    """The chain's jobs submitted to a cluster with `ray job submit` (the endpoint is deployed with `serve run`)."""
    return [j for j in chain() if j.submit]


def planned() -> list[JobSpec]:
    """The jobs `vosr plan` can plan."""
    return [j for j in JOBS.values() if j.plan]


def job_for_sections(names) -> JobSpec | None:
    """The planned job a config file is for, from the top-level sections it sets: a job whose own section is set
    and all of whose sections are set, the one with the most sections (a distill config sets `train` too)."""
    names = set(names)
    found = [j for j in planned() if j.sections and j.sections[0] in names and set(j.sections) <= names]
    return max(found, key=lambda j: len(j.sections)) if found else None


# --- the config sections -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    name: str
    cls: type          # a dataclass of vosr.config.option(...) fields
    doc: str           # one line for `vosr config --explain`


SECTIONS: Registry[Section] = Registry("config section")


def config_section(name: str, doc: str) -> Callable[[type], type]:
    """Class decorator: register a job's config section (a dataclass of option() fields) under `name`."""

    def register(cls: type) -> type:
        SECTIONS.register(name, Section(name, cls, doc))
        return cls

    return register


def job_sections() -> list[Section]:
    """Every registered config section, grouped by declaring module in the job table's order and in declaration
    order within a module. Imports the modules that declare them; fails when a job names a section its module does
    not declare."""
    modules = list(dict.fromkeys(j.config_module for j in JOBS.values() if j.config_module))
    for module in modules:
        importlib.import_module(module)
    for job in JOBS.values():
        for name in job.sections:
            if name not in SECTIONS:
                raise RegistryError(f"job {job.name!r} reads config section {name!r}, which "
                                    f"{job.config_module or 'no module'} does not declare with @config_section; "
                                    f"declared: {', '.join(SECTIONS) or 'none'}")
    order = list(SECTIONS)
    rank = {m: i for i, m in enumerate(modules)}
    return sorted(SECTIONS.values(), key=lambda s: (rank.get(s.cls.__module__, len(rank)), order.index(s.name)))
