"""The Ray Train worker loop shared by pretrain.py and distill.py.

Per worker: build the objective's model -> restore (the run's latest complete checkpoint, training/resume.py;
else `train.init_from`) -> wrap for DDP/FSDP -> stream its data shard -> optimise (AdamW, clip, constant LR with
warm-up, EMA, accumulation) -> log (rank 0, MLflow) -> validate (rank 0) -> checkpoint (rank 0 writes, every
rank reports; under FSDP every rank writes and uploads its own shards, `_checkpoint_sharded`).

Randomness: each optimiser step of each rank draws from its own generator seeded by
vosr.seeding.rank_seed(seed, rank, step) (docs/method.md s0: ranks never share a stream), so a resumed run draws the
same numbers it would have drawn without the interruption.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobkit.faults import FaultInjected

DONE_MARKER = "_vosr_done.json"
FAULT_MARKER = "_vosr_fault_injected_step{step}"


class ModelCall:
    """Calls the wrapped (DDP/FSDP) module but exposes the inner model's attributes (is_student, ...)."""

    def __init__(self, wrapped: nn.Module, inner: nn.Module):
        self._wrapped = wrapped
        self._inner = inner

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def local_micro_batch(global_batch: int, world: int, accum: int) -> int:
    """The global batch is split across workers and accumulation micro-steps (docs/method.md s5: global batch)."""
    if global_batch % (world * accum):
        raise ValueError(f"train.batch_size {global_batch} must be divisible by num_workers x grad_accum "
                         f"({world} x {accum})")
    return global_batch // (world * accum)


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Constant LR after an optional linear warm-up (docs/method.md s5: constant_with_warmup, 0 warm-up)."""
    if warmup > 0 and step <= warmup:
        return base_lr * step / warmup
    return base_lr


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _autocast(device: torch.device):
    # docs/method.md s5: bf16 autocast for the DiT with fp32 master weights on GPU; plain fp32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _wrap(model: nn.Module, strategy: str, world: int) -> nn.Module:
    import ray.train.torch

    if world == 1:
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy=None)
    if strategy == "fsdp":  # FSDP2, in place: `model` itself becomes the sharded module (training/fsdp.py)
        from training import fsdp

        return fsdp.shard(model)
    return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy=strategy)


def _no_sync(wrapped: nn.Module, fsdp: bool):
    if fsdp:
        from training import fsdp as fsdp_utils

        return fsdp_utils.no_sync(wrapped)
    return wrapped.no_sync()


def make_optimizer(params, tc) -> torch.optim.Optimizer:
    """docs/method.md s5: AdamW (0.9, 0.95), eps 1e-8, weight decay 0.01 on all parameters (one group, no
    exclusions)."""
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.adam_eps,
                             weight_decay=tc.weight_decay)


def init_from_checkpoint(objective, model: nn.Module, ema, folder: str) -> dict[str, Any]:
    """`train.init_from`: load another run's weights, then re-initialise the EMA from them (docs/method.md s5)."""
    info = objective.init_from(model, folder)
    ema.reset(model)
    return info


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, ema, grad_clip: float, fsdp: bool = False):
    """Global-norm clip (docs/method.md s5: 1.0), AdamW step, zero grads, one EMA update (every optimiser step).
    `ema`: vosr.ema.EMA, or under FSDP training/fsdp.ShardedEMA (local shards, no communication).
    Returns the pre-clip gradient norm (a float under FSDP, a tensor otherwise)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # DTensors under FSDP2
    opt.step()
    opt.zero_grad(set_to_none=True)
    if fsdp:
        from training import fsdp as fsdp_utils

        ema.update()
        return fsdp_utils.grad_norm_value(grad_norm)
    ema.update(model)
    return grad_norm


def _clock(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(job: str, step: int, total: int, loss: float | None, samples_per_s: float, eta_s: float | None,
                  last_checkpoint: int | None) -> str:
    """One human-readable progress line (printed by rank 0 every train.log_every steps)."""
    pct = 100.0 * step / max(total, 1)
    loss_s = f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "n/a"
    eta = _clock(eta_s) if eta_s is not None else "n/a"
    ckpt = f"step {last_checkpoint}" if last_checkpoint else "none yet"
    return (f"[{job}] step {step}/{total} ({pct:.1f}%) | loss {loss_s} | {samples_per_s:.2f} samples/s | "
            f"ETA {eta} | last checkpoint: {ckpt}")


def _storage_uri(spec: dict[str, Any]) -> str:
    return spec["run_uri"]


def _inject_fault(spec: dict[str, Any], step: int, rank: int, world: int) -> None:
    """train.fail_at_step: the last rank raises once; a marker in the run's storage keeps retries from re-firing."""
    from vosr import storage

    if rank != world - 1:
        return
    marker = storage.join(_storage_uri(spec), FAULT_MARKER.format(step=step))
    endpoint = spec.get("endpoint", "")
    if storage.exists(marker, endpoint):
        return
    storage.write_bytes_atomic(marker, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode(),
                               endpoint)
    raise FaultInjected(f"fault injection: rank {rank} fails at step {step} (train.fail_at_step)")


def _load_weights(folder: Path, model: nn.Module, ema) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    ema_file = folder / "ema_model.safetensors"
    ema.load_state_dict(load_file(str(ema_file)) if ema_file.is_file() else model.state_dict())


def _resume_point(spec: dict[str, Any], rank: int, world: int, device: torch.device):
    """(step, folder URI, "ray" | "storage") of the checkpoint to continue from, or None. Rank 0 decides (the
    latest complete checkpoint in the run's storage, see training/resume.py) and every rank takes its answer."""
    import ray.train

    from training.resume import choose

    choice = [choose(spec["run_uri"], spec.get("endpoint", ""), ray.train.get_checkpoint()) if rank == 0 else None]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0, device=device if device.type == "cuda" else None)
    return choice[0]


def _mean_across_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


@dataclass
class Worker:
    """One Ray Train worker's state, built by the named steps of `train_loop_per_worker` below."""

    spec: dict[str, Any]
    cfg: Any
    rank: int
    world: int
    device: torch.device
    micro: int
    objective: Any = None
    model: nn.Module | None = None
    ema: Any = None                 # vosr.ema.EMA: full weights (validation, unsharded checkpoints)
    step_ema: Any = None            # what each optimiser step updates: `ema`, or under FSDP its local shards
    wrapped: nn.Module | None = None
    call: ModelCall | None = None
    opt: torch.optim.Optimizer | None = None
    fsdp: bool = False
    position: dict[str, Any] = field(default_factory=lambda: {"step": 0, "epoch": 0, "batch_in_epoch": 0,
                                                               "samples": 0})
    resume: tuple | None = None     # (step, folder URI, source) of the checkpoint continued from
    sharded: bool = False           # that checkpoint is in the sharded (DCP) layout
    resumed_from: int | None = None
    init_info: dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    validator: Any = None
    stream: Any = None

    @property
    def tc(self):
        return self.cfg.train

    @property
    def endpoint(self) -> str:
        return self.spec.get("endpoint", "")


def _start(spec: dict[str, Any]) -> Worker:
    """This worker's rank, device and micro-batch; CPU threads or TF32 as configured."""
    import ray.train

    from jobkit.config import config_from_dict

    cfg = config_from_dict(spec["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(tc.use_gpu)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    elif tc.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Worker(spec, cfg, rank, world, device, local_micro_batch(tc.batch_size, world, tc.grad_accum))


def _restore_weights(w: Worker) -> None:
    """Model and EMA: the same init on every rank, then the run's latest complete checkpoint (an unsharded one
    here; a sharded one after wrapping, shard by shard) or else `train.init_from`."""
    from training.export import is_sharded
    from training.objectives import make_objective
    from training.resume import open_checkpoint
    from vosr.ema import EMA
    from vosr.seeding import rank_seed

    torch.manual_seed(rank_seed(w.cfg.run.seed, 0, -1))  # same init on every rank (DDP also broadcasts rank 0)
    w.objective = make_objective(w.spec["job"], w.cfg, w.device)
    w.model = w.objective.build_model().to(w.device)
    w.ema = EMA(w.model, w.tc.ema_decay)
    w.resume = _resume_point(w.spec, w.rank, w.world, w.device)
    w.sharded = w.resume is not None and is_sharded(w.resume[1], w.endpoint)
    if w.resume is not None and not w.sharded:
        with open_checkpoint(w.resume[1], w.endpoint).as_directory() as d:
            _load_weights(Path(d), w.model, w.ema)
    elif w.resume is None and w.tc.init_from:
        w.init_info = init_from_checkpoint(w.objective, w.model, w.ema, w.tc.init_from)


def set_execution(model: nn.Module, tc, teacher: nn.Module | None = None) -> None:
    """train.activation_checkpointing and train.compile on the trained model (before any DDP/FSDP wrapper, after
    the EMA copy was taken); a distillation teacher is compiled too (it runs a doubled batch every step)."""
    from vosr.model.execution import compile_dit, set_activation_checkpointing

    set_activation_checkpointing(model, tc.activation_checkpointing)
    if tc.compile:
        compile_dit(model)
        if teacher is not None:
            compile_dit(teacher)


def _wrap_and_optimiser(w: Worker) -> None:
    """Checkpointing and compile (set_execution), DDP or FSDP wrapper, AdamW, and the EMA the steps update (under
    FSDP: local shards, no communication)."""
    set_execution(w.model, w.tc, getattr(w.objective, "teacher", None))
    w.fsdp = w.tc.strategy == "fsdp" and w.world > 1
    w.wrapped = _wrap(w.model, w.tc.strategy, w.world)
    w.call = ModelCall(w.wrapped, w.model)
    w.opt = make_optimizer(w.wrapped.parameters(), w.tc)
    w.step_ema = w.ema
    if w.fsdp:  # the EMA is gathered into `ema` only to export or validate
        from training import fsdp as fsdp_utils

        w.step_ema = fsdp_utils.ShardedEMA(w.ema, w.model)


def _restore_state(w: Worker) -> None:
    """Optimizer moments, RNG and data position of the checkpoint continued from (a sharded one also its weights:
    DCP reshards to any world size and strategy, each rank reading only the pieces it holds)."""
    from training.resume import open_checkpoint
    from training.train_state import FULL_OPTIMIZER, check_optimizer_format, restore_train_state
    from vosr.checkpoint import load_train_state

    if w.resume is None:
        return
    if w.sharded:
        w.position = _load_sharded(w.resume[1], w.endpoint, w.wrapped, w.opt, w.step_ema, w.device)
    else:
        with open_checkpoint(w.resume[1], w.endpoint).as_directory() as d:
            saved = load_train_state(str(d))
        if saved:
            check_optimizer_format(saved, w.fsdp)
            w.position = restore_train_state(saved, None if w.fsdp else w.opt, w.device)
            if w.fsdp:  # every rank holds the full, name-keyed state; each keeps its shard
                from training import fsdp as fsdp_utils

                fsdp_utils.load_optimizer(w.wrapped, w.opt, saved[FULL_OPTIMIZER])
    w.resumed_from = int(w.position["step"])


def _open_logging_and_data(w: Worker, t_start: float) -> None:
    """MLflow logger (rank 0 logs), the validator (rank 0) and this rank's batch stream from its position."""
    import ray.train

    from training.data import BatchStream
    from training.tracking import RunLogger

    w.logger = RunLogger(w.spec.get("tracking_uri", ""), w.spec.get("run_id", ""), enabled=w.rank == 0)
    if w.rank == 0 and w.resumed_from is not None:
        w.logger.metrics({"train/resumed_from_step": w.resumed_from}, step=w.resumed_from)
        w.logger.tag("vosr.last_resume_source", w.resume[2])
    if w.rank == 0 and w.init_info:
        w.logger.params({f"init.{k}": v for k, v in w.init_info.items()})
    if w.rank == 0 and w.tc.val_images > 0:
        from training.validation import Validator

        w.validator = Validator(w.cfg, w.objective, ray.train.get_dataset_shard("val"), w.device,
                                w.spec.get("feature_meta"))
    w.stream = BatchStream(ray.train.get_dataset_shard("train"), w.micro, seed=w.cfg.run.seed, rank=w.rank,
                           shuffle_buffer=w.tc.shuffle_buffer, device=w.device, epoch=w.position["epoch"],
                           batch_in_epoch=w.position["batch_in_epoch"], meta=w.spec.get("feature_meta"))
    if w.rank == 0:
        w.logger.metrics({"train/setup_s": time.perf_counter() - t_start}, step=int(w.position["step"]))


def _optimise(w: Worker, step: int) -> tuple[float, dict[str, float], float]:
    """One optimiser step: constant LR (after any warm-up), `grad_accum` micro-batches (gradient sync on the last
    only), the loss's own generator per rank and step, clip, AdamW, EMA. Returns (lr, mean stats, grad norm)."""
    from vosr.seeding import generator, rank_seed

    tc = w.tc
    if tc.fail_at_step == step:
        _inject_fault(w.spec, step, w.rank, w.world)
    lr = lr_at(step, tc.lr, tc.warmup_steps)
    for group in w.opt.param_groups:
        group["lr"] = lr
    gen = generator(rank_seed(w.cfg.run.seed, w.rank, step))
    stats_sum: dict[str, float] = {}
    for k in range(tc.grad_accum):
        batch = next(w.stream)
        last_micro = k == tc.grad_accum - 1 or w.world == 1
        with contextlib.nullcontext() if last_micro else _no_sync(w.wrapped, w.fsdp):
            with _autocast(w.device):
                loss, stats = w.objective.loss(w.call, batch, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {step} on rank {w.rank}")
            (loss / tc.grad_accum).backward()
        for key, v in stats.items():
            if isinstance(v, (int, float)):
                stats_sum[key] = stats_sum.get(key, 0.0) + float(v) / tc.grad_accum
    grad_norm = optimizer_step(w.model, w.opt, w.step_ema, tc.grad_clip, w.fsdp)
    return lr, stats_sum, grad_norm


def _checkpoint(w: Worker, step: int, samples: int, last: dict[str, float]) -> None:
    """Every rank reports; rank 0 writes (under FSDP every rank writes and uploads its own shards); a checkpoint
    step ends for every rank only once the checkpoint is registered, so a failure after it restores this one."""
    import ray.train

    from training.resume import checkpoint_name, write_manifest

    w.position = {"step": step, "epoch": w.stream.epoch, "batch_in_epoch": w.stream.batch_in_epoch,
                  "samples": samples}
    metrics = {"step": step, "samples": samples, **{k: v for k, v in last.items()
                                                     if isinstance(v, (int, float)) and math.isfinite(v)}}
    if w.fsdp:  # no rank gathers the full state
        _checkpoint_sharded(w.spec, w.cfg, w.model, w.wrapped, w.opt, w.step_ema, w.position, metrics, w.rank,
                            w.world)
    elif w.rank == 0:
        with tempfile.TemporaryDirectory(prefix="vosr-ckpt-") as tmp:
            folder = Path(tmp)
            _save(folder, w.cfg, w.model, w.ema, w.opt, w.position, w.spec)
            write_manifest(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=checkpoint_name(step))
        # Wait until the controller has registered it (at most one health-check poll): a restart after a failure
        # from here on gets this checkpoint from Ray itself (training/resume.py).
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    else:
        ray.train.report(metrics)
    if w.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _print_progress(job: str, step: int, total: int, progress: tuple, last_ckpt_step: int | None) -> None:
    """On the job's console (Ray forwards the worker's stdout to the driver); written to the stream, not print():
    Ray Train patches print into its logger and may also tee it (twice)."""
    sys.stdout.write(progress_line(job, step, total, progress[0], progress[1], progress[2], last_ckpt_step) + "\n")
    sys.stdout.flush()


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. `spec`: job, cfg (dict), run_uri, endpoint, tracking_uri, run_id.
    start -> restore weights -> wrap and optimiser -> restore state -> logging and data -> per step: optimise,
    log, validate, checkpoint, progress line."""
    t_start = time.perf_counter()
    w = _start(spec)
    _restore_weights(w)
    _wrap_and_optimiser(w)
    _restore_state(w)
    _open_logging_and_data(w, t_start)

    tc = w.tc
    step, samples = int(w.position["step"]), int(w.position["samples"])
    window_t0, window_samples = time.perf_counter(), 0
    loop_t0, first_step = window_t0, step
    last_ckpt_step = w.resumed_from
    last: dict[str, float] = {}
    w.model.train()
    while step < tc.steps:
        step += 1
        lr, stats_sum, grad_norm = _optimise(w, step)
        samples += tc.batch_size
        window_samples += tc.batch_size

        is_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        is_log = step % tc.log_every == 0 or is_ckpt
        if is_log:
            stats_sum["grad_norm"] = float(grad_norm)
            mean = _mean_across_ranks(stats_sum, w.world, w.device)
            now = time.perf_counter()
            throughput = window_samples / max(now - window_t0, 1e-9)
            window_t0, window_samples = now, 0
            last = {f"train/{k}": v for k, v in mean.items()}
            last.update({"train/lr": lr, "train/samples_per_s": throughput, "train/epoch": w.stream.epoch})
            w.logger.metrics(last, step=step)
            per_step = (now - loop_t0) / max(step - first_step, 1)
            progress = (mean.get("loss"), throughput, per_step * (tc.steps - step))

        val_due = tc.validate_every > 0 and step % tc.validate_every == 0
        if w.fsdp and tc.val_images > 0 and (val_due or step == tc.steps):
            w.step_ema.gather_into(w.ema)  # collective, on step-determined conditions only
        if w.validator is not None and (val_due or step == tc.steps):
            last.update(w.validator.run(w.ema.module, step, w.logger))
        if is_ckpt:
            _checkpoint(w, step, samples, last)
            last_ckpt_step = step
        if is_log and w.rank == 0:
            _print_progress(spec["job"], step, tc.steps, progress, last_ckpt_step)
    w.stream.close()


def _save(folder: Path, cfg, model: nn.Module, ema, opt, position: dict[str, Any], spec: dict[str, Any],
          sharded: bool = False) -> None:
    """One resumable checkpoint in the method library's format plus optimiser/RNG/data position.
    `sharded`: only config.json and the position/RNG state (the weights and moments are in dcp/)."""
    from training.train_state import build_train_state
    from vosr.checkpoint import save_checkpoint

    state = build_train_state(None if sharded else opt, position)
    save_checkpoint(str(folder), cfg, model, ema=None if sharded else ema.module,
                    extra={"job": spec["job"], "step": position["step"], "mlflow_run_id": spec.get("run_id", "")},
                    train_state=state, sharded=sharded)


def _checkpoint_sharded(spec: dict[str, Any], cfg, model: nn.Module, wrapped: nn.Module, opt, ema,
                        position: dict[str, Any], metrics: dict[str, Any], rank: int, world: int) -> None:
    """Collective FSDP checkpoint. Every rank writes its shards of the model, the AdamW moments and the EMA
    (training/fsdp.save_sharded) into a local folder and reports it; Ray Train V2 uploads each rank's folder into
    the same checkpoint_<step> (TrainContext.report syncs the name from rank 0, StorageContext.
    persist_current_checkpoint copies the files) and registers it once every rank has reported. Rank 0 adds
    config.json, the position/RNG state and the manifest of every rank's files, so training/resume.py counts the
    folder complete only once all shards are in."""
    import ray.train
    import torch.distributed as dist

    from training import fsdp as fsdp_utils
    from training.resume import checkpoint_name, local_files, write_manifest
    from vosr.sharded import DCP_DIR

    with tempfile.TemporaryDirectory(prefix="vosr-ckpt-") as tmp:
        folder = Path(tmp)
        fsdp_utils.save_sharded(wrapped, opt, ema, str(folder / DCP_DIR))
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, local_files(folder))
        if rank == 0:
            _save(folder, cfg, model, None, None, position, spec, sharded=True)
            write_manifest(folder, {k: v for files in everyone[1:] for k, v in files.items()})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=checkpoint_name(position["step"]))
        if rank == 0:  # registered before any rank moves on (see the unsharded path)
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _load_sharded(uri: str, endpoint: str, wrapped: nn.Module, opt, ema, device: torch.device) -> dict[str, Any]:
    """Resume a sharded checkpoint into this run (any world size; FSDP, DDP or one worker): model, optimizer and
    EMA from dcp/, then the RNG state; returns the data position."""
    from training import fsdp as fsdp_utils
    from training.train_state import restore_train_state
    from vosr.checkpoint import load_train_state
    from vosr.sharded import reader

    fsdp_utils.load_sharded(wrapped, opt, ema, reader(uri, endpoint))
    return restore_train_state(load_train_state(uri, endpoint), None, device)
