"""Per-GPU memory plan of a training config, computed without a GPU.

    python -m training.memory_plan --config configs/cluster/pretrain.yaml [--set train.grad_accum=2 ...] [--json]

One optimiser step of the real job (the model, the objective's loss, AdamW with clipping, the EMA update; the
distillation teacher too) runs at full size under FakeTensorMode: every tensor has its real shape and dtype but no
data, so a 0.5B step at 512 px takes seconds on a CPU and no memory. `LiveTensorBytes`, a TorchDispatchMode,
counts the bytes of every live tensor storage as ops create them and weak references release them, and keeps the
peak and what it was made of at that moment: parameters, gradients, optimizer state, EMA, teacher, the batch,
forward activations, backward and optimizer-step temporaries. The AdamW moments are made first (a step on zero
gradients), then one step runs with min(train.grad_accum, 2) micro-steps (a second micro-step carries the first
one's gradients through its forward). AdamW runs its multi-tensor (foreach) form, PyTorch's default on CUDA.

What a CPU cannot run is modelled so:
- bf16 (train.use_gpu: the loop's bf16 autocast with fp32 master weights) replays under CPU autocast, which casts
  the same matmul, convolution and attention ops to bf16 as CUDA autocast; attention runs a flash kernel on both
  (only the output and log-sum-exp are saved, never the N x N scores).
- DDP (more than one worker) adds its flat gradient buckets, one more fp32 copy of the trainable parameters
  (DistributedDataParallel's default gradient_as_bucket_view=False, as training/loop.py wraps it).
- FSDP (train.strategy=fsdp, more than one worker) is run for real: the model is fully_shard-ed over a fake
  process group of train.num_workers ranks (collectives move no data), so the shards, the all-gathered blocks and
  the reduce-scatter buffers of rank 0 are counted as they happen.
- The CUDA runtime's own memory (context, NCCL, cuBLAS workspaces) and the caching allocator's fragmentation are
  not tensors: a plan fits when peak x (1 + FRAGMENTATION) + RUNTIME_RESERVE_GIB <= train.gpu_memory_gib.
  Both are assumptions (no GPU was lent to measure them); benchmarks/gpu_train_throughput.py prints the measured
  peak next to this plan's.
- torch.compile (train.compile) is not replayed: the plan is the eager step's (compiled graphs fuse element-wise
  chains and usually need less).

The plan is checked against real CPU steps at small sizes (`measure_cpu_step`: the CPU allocator's own allocation
and free events, recorded by torch.profiler) by tests/unit/test_memory_plan.py and benchmarks/bench_memory_plan.py.
This module imports neither Ray nor MLflow (the GPU benchmark scripts use it).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
FRAGMENTATION = 0.10        # assumption: caching-allocator reserve over the allocated peak
RUNTIME_RESERVE_GIB = 2.0   # assumption: CUDA context + NCCL + cuBLAS workspaces, outside the allocator's tensors
# what a new storage counts as, by the phase it is made in (parameters, gradients, optimizer state, EMA, teacher and
# inputs are tagged by name; DDP's buckets are added after the run)
PHASE_CATEGORY = {"setup": "other", "forward": "activations", "backward": "backward temporaries",
                  "optimizer": "optimizer-step temporaries"}
DEFAULT_SETTINGS = (0, 2, 1)   # activation checkpointing intervals a plan prints: none, every 2nd block, every block


# --- counting live tensor bytes ---------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of every live tensor storage created by an op inside the mode (plus those registered with `track`),
    with the peak and its make-up by category. Works on real and on fake tensors. `stub_scalars`: answer a
    tensor-to-Python-number read (loss.item(), float(stat), bool(isfinite)) with a placeholder instead of raising,
    as a fake tensor has no value; only logging statistics and the loss's finite check read them."""

    def __init__(self, stub_scalars: bool = False):
        super().__init__()
        self.stub_scalars = stub_scalars
        self.phase = "setup"
        self.current = 0
        self.peak = 0
        self.peak_phase = "setup"
        self.peak_by_category: dict[str, int] = {}
        self._by_category: dict[str, int] = defaultdict(int)
        self._live: dict[int, list] = {}   # storage key -> [bytes, category]
        self._resize = None

    # registration
    def track(self, tensors, category: str) -> None:
        """Count tensors (parameters, EMA, the batch) under `category`, whether or not they were counted before."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.retag(t, category)

    def retag(self, t: torch.Tensor | None, category: str) -> None:
        """Move a live tensor's bytes to `category` (a gradient's storage is first an op's output)."""
        if t is None:
            return
        entry = self._live.get(t.untyped_storage()._cdata)
        if entry is None:
            self._add(t.untyped_storage(), category)
        elif entry[1] != category:
            self._by_category[entry[1]] -= entry[0]
            self._by_category[category] += entry[0]
            entry[1] = category

    def category_bytes(self) -> dict[str, int]:
        return {k: v for k, v in self._by_category.items() if v}

    # bookkeeping
    def _add(self, st: torch.UntypedStorage, category: str) -> None:
        key = st._cdata
        if key in self._live:
            return
        n = int(st.nbytes())
        self._live[key] = [n, category]
        weakref.finalize(st, self._free, key)
        self._by_category[category] += n
        self._grow(n)

    def _grow(self, n: int) -> None:
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = self.phase
            self.peak_by_category = self.category_bytes()

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._by_category[entry[1]] -= entry[0]
            self.current -= entry[0]

    def _resized(self, st: torch.UntypedStorage) -> None:
        """FSDP2 frees and re-allocates unsharded parameters by resizing their storage (not an op)."""
        entry = self._live.get(st._cdata)
        if entry is None:
            self._add(st, PHASE_CATEGORY[self.phase])
            return
        n = int(st.nbytes())
        delta, entry[0] = n - entry[0], n
        self._by_category[entry[1]] += delta
        if delta > 0:
            self._grow(delta)
        else:
            self.current += delta

    def __enter__(self):
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            out = original(st, size)
            tracker._resized(st)
            return out

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented   # let DTensor run its local ops, which come back through here
        if self.stub_scalars and func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                return True
            return 1 if not t.is_floating_point() else 0.5
        out = func(*args, **(kwargs or {}))
        category = PHASE_CATEGORY[self.phase]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), category)
        return out


def _local(t):
    """A DTensor's local shard (what this rank holds), any other tensor (or None) itself."""
    return t.to_local() if isinstance(t, DTensor) else t


# --- what is planned ---------------------------------------------------------------------------------------------

@dataclass
class StepSetup:
    """One worker's step: the job, its micro-batch and how it executes."""

    job: str                  # pretrain | distill
    micro_batch: int
    grad_accum: int = 1
    precision: str = "bf16"   # bf16 (autocast, fp32 master weights) | fp32
    checkpointing: int = 0    # activation checkpointing interval (0 none, 1 every block, k every k-th)
    strategy: str = "ddp"
    world: int = 1


@dataclass
class StepMemory:
    setup: StepSetup
    peak_bytes: int
    peak_phase: str
    by_category: dict[str, int]
    seconds: float

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def needed_gib(self) -> float:
        """GPU memory this step needs: the allocator peak with fragmentation plus the runtime's reserve."""
        return self.peak_gib * (1 + FRAGMENTATION) + RUNTIME_RESERVE_GIB


def job_of(cfg) -> str:
    """The job a config trains: distillation when it names a teacher, else pretraining."""
    return "distill" if getattr(getattr(cfg, "distill_job", None), "teacher", "") else "pretrain"


def configured_setup(cfg, job: str | None = None, precision: str | None = None) -> StepSetup:
    from training.loop import local_micro_batch

    tc = cfg.train
    return StepSetup(job=job or job_of(cfg), micro_batch=local_micro_batch(tc.batch_size, tc.num_workers,
                                                                           tc.grad_accum),
                     grad_accum=tc.grad_accum, precision=precision or ("bf16" if tc.use_gpu else "fp32"),
                     checkpointing=tc.activation_checkpointing, strategy=tc.strategy, world=tc.num_workers)


def _batch(cfg, micro: int, device: torch.device) -> dict[str, torch.Tensor]:
    from vosr.model import model_dims

    d = model_dims(cfg)
    side = cfg.data.resolution // d["downsample"]
    hq = torch.randn(micro, d["latent_channels"], side, side, device=device)
    return {"hq": hq, "lq": torch.randn_like(hq),
            "sem": torch.randn(micro, d["sem_tokens"], d["sem_dim"], device=device)}


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; known: bf16, fp32")
    return contextlib.nullcontext()


class _Untracked:
    """Stands in for LiveTensorBytes when a worker's step runs for real without counting (GPU benchmarks)."""

    phase = "setup"

    def track(self, tensors, category: str) -> None:
        pass

    def retag(self, t, category: str) -> None:
        pass


@dataclass
class WorkerState:
    """What one training worker holds: the objective (with any teacher), model, step EMA, optimizer, a batch."""

    objective: Any
    model: nn.Module
    ema: Any
    opt: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    sharded: bool = False
    extras: list = field(default_factory=list)   # kept alive as the loop keeps them (the full EMA under FSDP)


def build_worker(cfg, setup: StepSetup, device: torch.device, tracker: LiveTensorBytes | None = None,
                 mesh=None) -> WorkerState:
    """The worker's objects as training/loop.py builds them (random weights, a random batch of the config's
    shapes), registered with the tracker by category. `mesh`: fully_shard them over it (FSDP)."""
    tracker = tracker or _Untracked()
    from training.loop import make_optimizer
    from training.objectives import DistillObjective, PretrainObjective
    from vosr.ema import EMA
    from vosr.model import build_dit, set_activation_checkpointing

    torch.manual_seed(0)
    with torch.device(device):
        if setup.job == "distill":
            objective = DistillObjective(cfg, device, teacher=build_dit(cfg))
            tracker.track(list(objective.teacher.parameters()), "teacher")
        elif setup.job == "pretrain":
            objective = PretrainObjective(cfg, device)
        else:
            raise ValueError(f"unknown job {setup.job!r}; known: distill, pretrain")
        model = objective.build_model()
    model.train()
    ema = EMA(model, cfg.train.ema_decay)
    set_activation_checkpointing(model, setup.checkpointing)
    sharded = mesh is not None
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    tracker.track([_local(p) for p in model.parameters()], "parameters")
    step_ema = ema
    if sharded:
        from training.fsdp import ShardedEMA

        step_ema = ShardedEMA(ema, model)   # the loop keeps the full EMA too (validation, exports)
        tracker.track(step_ema.shards, "ema")
    tracker.track(list(ema.module.parameters()), "ema")
    opt = make_optimizer(model.parameters(), cfg.train)
    batch = _batch(cfg, setup.micro_batch, device)
    tracker.track(list(batch.values()), "inputs")
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(
                lambda q: tracker.retag(_local(q.grad), "gradients"))
    return WorkerState(objective, model, step_ema, opt, batch, sharded, extras=[ema])


def train_step(job: WorkerState, setup: StepSetup, step: int, device: torch.device, grad_clip: float,
               tracker: LiveTensorBytes | None = None) -> None:
    """training/loop.py's optimiser step: micro-steps of loss and backward, then clip, AdamW, zero grads, EMA
    (min(grad_accum, 2) micro-steps: a third would repeat the second)."""
    tracker = tracker or _Untracked()
    from training.loop import optimizer_step
    from vosr.seeding import generator, rank_seed

    accum = min(setup.grad_accum, 2)
    gen = generator(rank_seed(0, 0, step))
    for _ in range(accum):
        tracker.phase = "forward"
        with _autocast(setup.precision, device):
            loss, _ = job.objective.loss(job.model, job.batch, gen)
        tracker.phase = "backward"
        (loss / accum).backward()
        del loss
        for p in job.model.parameters():   # FSDP2 sets sharded gradients without accumulate-grad hooks
            tracker.retag(_local(p.grad), "gradients")
    tracker.phase = "optimizer"
    optimizer_step(job.model, job.opt, job.ema, grad_clip, fsdp=job.sharded)
    tracker.phase = "setup"
    _tag_optimizer_state(job, tracker)


def _tag_optimizer_state(job: WorkerState, tracker) -> None:
    for state in job.opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tracker.retag(_local(v), "optimizer state")


@contextlib.contextmanager
def _fake_process_group(world: int):
    """A process group of `world` ranks whose collectives move nothing (torch's "fake" backend); rank 0 is us."""
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
    from torch._C._distributed_c10d import FakeStore
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        raise RuntimeError("the FSDP memory plan needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def create_optimizer_state(job: WorkerState, grad_clip: float, tracker: LiveTensorBytes | None = None) -> None:
    """AdamW creates its moments on its first step: one step on zero gradients makes them, so the step that is
    counted is the steady state (the moments exist throughout it), at the cost of no extra forward or backward."""
    from training.loop import optimizer_step

    for p in job.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer_step(job.model, job.opt, job.ema, grad_clip, fsdp=job.sharded)
    _tag_optimizer_state(job, tracker or _Untracked())


def simulate_step(cfg, setup: StepSetup, fake: bool = True, foreach: bool = True) -> StepMemory:
    """Peak live tensor bytes of one optimiser step of `setup` (fake tensors: full size, no memory; real tensors
    on the CPU: what measure_cpu_step checks the fake count against). `foreach`: AdamW's multi-tensor
    implementation, PyTorch's default on CUDA (its step temporaries span all parameters at once); False is the
    CPU default, one parameter at a time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    device = torch.device("cpu")
    tracker = LiveTensorBytes(stub_scalars=fake)
    fsdp = setup.strategy == "fsdp" and setup.world > 1
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # copying a module of fake tensors (the EMA) reads their data pointer: a deprecation warning per tensor
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        mesh = stack.enter_context(_fake_process_group(setup.world)) if fsdp else None
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        with tracker:
            job = build_worker(cfg, setup, device, tracker, mesh)
            for group in job.opt.param_groups:
                group["foreach"] = foreach
            create_optimizer_state(job, cfg.train.grad_clip, tracker)
            train_step(job, setup, 1, device, cfg.train.grad_clip, tracker)
        by_category = dict(tracker.peak_by_category)
        peak = tracker.peak
        if setup.strategy == "ddp" and setup.world > 1:
            buckets = sum(p.numel() * 4 for p in job.model.parameters() if p.requires_grad)
            by_category["ddp buckets"] = buckets
            peak += buckets
        del job
    return StepMemory(setup, peak, tracker.peak_phase, by_category, time.perf_counter() - t0)


# --- the CPU check -----------------------------------------------------------------------------------------------

def measure_cpu_step(cfg, setup: StepSetup, foreach: bool = True) -> int:
    """Peak bytes held by the CPU allocator during simulate_step's real run of `setup`, from torch.profiler's
    allocation and free events (every tensor allocation of the CPU allocator reports its size; their running sum
    from before the model is built is what is allocated at each moment)."""
    from torch.profiler import ProfilerActivity, profile

    if setup.strategy == "fsdp" and setup.world > 1:
        raise ValueError("measure_cpu_step runs one process; plan FSDP with simulate_step")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        simulate_step(cfg, setup, fake=False, foreach=foreach)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


# --- the plan ----------------------------------------------------------------------------------------------------

@dataclass
class SettingPlan:
    checkpointing: int
    checkpointed_blocks: int
    micro_batch: int
    peak_gib: float
    needed_gib: float
    fits: bool | None
    max_micro_batch: int | None
    grad_accum_needed: int | None
    recompute_forward_fraction: float
    by_category_gib: dict[str, float]
    peak_phase: str


@dataclass
class TrainingPlan:
    job: str
    preset: str
    resolution: int
    precision: str
    strategy: str
    workers: int
    global_batch: int
    grad_accum: int
    micro_batch: int
    gpu_memory_gib: float
    usable_gib: float | None
    configured: SettingPlan
    settings: list[SettingPlan]
    seconds: float

    @property
    def fits(self) -> bool | None:
        return self.configured.fits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fits": self.fits}


def usable_peak_gib(gpu_memory_gib: float) -> float:
    """The largest allocator peak that fits a GPU of `gpu_memory_gib` (inverse of StepMemory.needed_gib)."""
    return max(0.0, (gpu_memory_gib - RUNTIME_RESERVE_GIB) / (1 + FRAGMENTATION))


def largest_micro_batch(cfg, setup: StepSetup, usable_gib: float, at: StepMemory) -> tuple[int, StepMemory | None]:
    """The largest micro-batch whose planned peak stays within `usable_gib` (0 when even one sample does not).
    The peak is affine in the micro-batch (every activation scales with it), so a second plan gives the slope;
    the answer is then checked with a plan of its own and walked down while it does not fit."""
    other = setup.micro_batch * 2 if setup.micro_batch < 4 else max(1, setup.micro_batch // 2)
    second = simulate_step(cfg, _with(setup, micro_batch=other))
    slope = (at.peak_bytes - second.peak_bytes) / (setup.micro_batch - other)
    base = at.peak_bytes - slope * setup.micro_batch
    limit = usable_gib * GIB
    guess = int((limit - base) // slope) if slope > 0 else setup.micro_batch
    guess = max(guess, 0)
    checked = None
    while guess > 0:
        checked = at if guess == setup.micro_batch else simulate_step(cfg, _with(setup, micro_batch=guess))
        if checked.peak_bytes <= limit:
            return guess, checked
        guess = max(guess - max(1, guess // 20), 0) if guess > 1 else 0
    return 0, None


def _with(setup: StepSetup, **changes) -> StepSetup:
    return StepSetup(**(asdict(setup) | changes))


def grad_accum_for(per_worker_batch: int, max_micro: int) -> int | None:
    """Smallest accumulation count that divides the worker's batch into micro-batches of at most `max_micro`."""
    if max_micro <= 0:
        return None
    for accum in range(1, per_worker_batch + 1):
        if per_worker_batch % accum == 0 and per_worker_batch // accum <= max_micro:
            return accum
    return None


def _setting_plan(cfg, setup: StepSetup, usable: float | None, search: bool, log) -> SettingPlan:
    from vosr.model.execution import checkpointed_blocks

    mem = simulate_step(cfg, setup)
    log(f"checkpointing {_setting_name(setup.checkpointing)}, micro-batch {setup.micro_batch}: peak "
        f"{mem.peak_gib:.2f} GiB ({mem.seconds:.0f} s)")
    depth = cfg.model.depth
    max_micro = accum = None
    if usable is not None and search:
        max_micro, _ = largest_micro_batch(cfg, setup, usable, mem)
        accum = grad_accum_for(cfg.train.batch_size // setup.world, max_micro)
        log(f"checkpointing {_setting_name(setup.checkpointing)}: largest micro-batch {max_micro}")
    n_ckpt = checkpointed_blocks(depth, setup.checkpointing)
    return SettingPlan(
        checkpointing=setup.checkpointing, checkpointed_blocks=n_ckpt, micro_batch=setup.micro_batch,
        peak_gib=round(mem.peak_gib, 2), needed_gib=round(mem.needed_gib(), 2),
        fits=None if usable is None else mem.peak_gib <= usable, max_micro_batch=max_micro,
        grad_accum_needed=accum, recompute_forward_fraction=round(n_ckpt / max(depth, 1), 3),
        by_category_gib={k: round(v / GIB, 2) for k, v in sorted(mem.by_category.items(), key=lambda kv: -kv[1])},
        peak_phase=mem.peak_phase)


def plan_training(cfg, job: str | None = None, precision: str | None = None,
                  settings: tuple[int, ...] = DEFAULT_SETTINGS, gpu_memory_gib: float | None = None,
                  search: bool = True, log=None) -> TrainingPlan:
    """The configured step's peak, then each activation-checkpointing setting's peak and largest micro-batch
    (`search`). `settings`: intervals planned besides the configured one (() = only it). `log(line)`: progress."""
    t0 = time.perf_counter()
    log = log or (lambda line: None)
    setup = configured_setup(cfg, job, precision)
    gpu = cfg.train.gpu_memory_gib if gpu_memory_gib is None else gpu_memory_gib
    usable = usable_peak_gib(gpu) if gpu > 0 else None
    rows: dict[int, SettingPlan] = {}
    for k in dict.fromkeys((setup.checkpointing, *settings)):
        if k > cfg.model.depth:
            continue
        rows[k] = _setting_plan(cfg, _with(setup, checkpointing=k), usable, search, log)
    return TrainingPlan(job=setup.job, preset=cfg.preset, resolution=cfg.data.resolution,
                        precision=setup.precision, strategy=setup.strategy, workers=setup.world,
                        global_batch=cfg.train.batch_size, grad_accum=setup.grad_accum,
                        micro_batch=setup.micro_batch, gpu_memory_gib=gpu,
                        usable_gib=None if usable is None else round(usable, 2),
                        configured=rows[setup.checkpointing], settings=list(rows.values()),
                        seconds=round(time.perf_counter() - t0, 1))


def _setting_name(k: int) -> str:
    if k in (0, 1):
        return "none" if k == 0 else "every block"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"every {k}{suffix} block"


def format_plan(plan: TrainingPlan) -> str:
    """The plan as the lines `vosr plan` / `python -m training.memory_plan` print."""
    gpu = (f"{plan.gpu_memory_gib:g} GiB declared (train.gpu_memory_gib), {plan.usable_gib:g} GiB for tensors after "
           f"{FRAGMENTATION:.0%} fragmentation and {RUNTIME_RESERVE_GIB:g} GiB runtime reserve"
           if plan.usable_gib is not None else "no GPU memory declared (train.gpu_memory_gib = 0)")
    lines = [f"GPU memory plan: {plan.job}, {plan.preset} at {plan.resolution} px, {plan.precision}, "
             f"{plan.strategy} x {plan.workers} workers, global batch {plan.global_batch} = "
             f"{plan.workers} x {plan.grad_accum} accumulation x micro-batch {plan.micro_batch}",
             f"  per GPU: {gpu}",
             f"  {'checkpointing':<18}{'blocks':>7}{'micro':>7}{'peak GiB':>10}{'needs GiB':>11}{'fits':>6}"
             f"{'max micro':>11}{'accum':>7}{'+fwd':>7}"]
    for s in plan.settings:
        mark = " *" if s is plan.configured else ""
        fits = "-" if s.fits is None else ("yes" if s.fits else "NO")
        lines.append(f"  {_setting_name(s.checkpointing) + mark:<18}{s.checkpointed_blocks:>7}{s.micro_batch:>7}"
                     f"{s.peak_gib:>10.2f}{s.needed_gib:>11.2f}{fits:>6}"
                     f"{'-' if s.max_micro_batch is None else s.max_micro_batch:>11}"
                     f"{'-' if s.grad_accum_needed is None else s.grad_accum_needed:>7}"
                     f"{s.recompute_forward_fraction:>7.0%}")
    c = plan.configured
    parts = ", ".join(f"{k} {v:.2f}" for k, v in c.by_category_gib.items() if v >= 0.005)
    lines.append(f"  * configured (train.activation_checkpointing = {c.checkpointing}); its peak ({c.peak_phase}) "
                 f"in GiB: {parts}")
    lines.append("  +fwd: share of the forward recomputed in backward; accum: train.grad_accum for the largest "
                 "micro-batch")
    if plan.fits is False:
        lines.append(f"  DOES NOT FIT: {c.needed_gib:.2f} GiB needed > {plan.gpu_memory_gib:g} GiB")
    return "\n".join(lines)


def gpu_memory_section(cfg, job: str | None = None, settings: tuple[int, ...] = (), log=None
                       ) -> tuple[bool | None, str]:
    """(fits, the printed plan) of a training config's step on its declared GPU, for other commands to show (the
    configured checkpointing setting and the largest micro-batch by default; None: no GPU memory declared)."""
    plan = plan_training(cfg, job, settings=settings, log=log)
    return plan.fits, format_plan(plan)


def main(argv: list[str] | None = None) -> int:
    from jobkit.args import job_parser, parse_job_args

    p = job_parser(__doc__.split("\n\n")[0], prog="python -m training.memory_plan")
    p.add_argument("--job", choices=["auto", "pretrain", "distill"], default="auto",
                   help="auto: distill when distill_job.teacher is set")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 when train.use_gpu (the loop's autocast), else fp32")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="override train.gpu_memory_gib")
    p.add_argument("--checkpointing", default=",".join(map(str, DEFAULT_SETTINGS)),
                   help="comma-separated activation checkpointing intervals to plan besides the configured one")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    cfg, args = parse_job_args(p.description, argv, p)
    settings = tuple(int(x) for x in args.checkpointing.split(",") if x.strip())
    plan = plan_training(cfg, None if args.job == "auto" else args.job,
                         None if args.precision == "auto" else args.precision, settings, args.gpu_memory_gib,
                         log=lambda line: print(f"[memory plan] {line}", file=sys.stderr, flush=True))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 1 if plan.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
