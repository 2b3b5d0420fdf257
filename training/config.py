"""The training jobs' configuration sections: `train` (training/pretrain.py, training/distill.py) and
`distill_job` (the distillation job's own keys), registered with @config_section (jobkit/jobs.py); jobkit/config.py
puts them under the one root."""

from __future__ import annotations

from dataclasses import dataclass

from jobkit.jobs import config_section
from vosr.config import option


@config_section("train", "Training jobs (training/pretrain.py, training/distill.py).")
@dataclass
class TrainConfig:
    features: str = option("outputs/features", "Feature shards to train on (unused when train.online).")
    online: bool = option(False, "Degrade and encode the curated shards of precompute.input inside the data "
                          "pipeline (pipelines/features/online.py) instead of reading feature shards.")
    storage_path: str = option("outputs/checkpoints", "Ray Train RunConfig storage (folder or s3://).")
    steps: int = option(200, "Optimiser steps (paper: 400K per stage).", ge=1)
    batch_size: int = option(8, "Global batch size (split across workers; paper: 256 at 512 px).", ge=1)
    grad_accum: int = option(1, "Gradient accumulation micro-steps per optimiser step.", ge=1)
    lr: float = option(1e-4, "Learning rate, constant after warm-up (paper Table 5: 1e-4 / 5e-5 / 2e-5).", gt=0)
    warmup_steps: int = option(0, "Linear warm-up steps (paper: 0).", ge=0)
    weight_decay: float = option(0.01, "AdamW weight decay on all parameters (paper Table 5).", ge=0)
    betas: list[float] = option([0.9, 0.95], "AdamW betas (paper Table 5).")
    grad_clip: float = option(1.0, "Global gradient-norm clip (paper Table 5).", gt=0)
    ema_decay: float = option(0.9999, "EMA decay (paper Table 5).", ge=0, le=1)
    num_workers: int = option(1, "Ray Train workers.", ge=1)
    use_gpu: bool = option(False, "Give each worker a GPU (bf16 autocast there; fp32 on CPU).")
    strategy: str = option("ddp", "Parallelism: ddp or fsdp.", choices=["ddp", "fsdp"])
    checkpoint_every: int = option(50, "Steps between checkpoints.", ge=1)
    keep_checkpoints: int = option(2, "Checkpoints kept (Ray CheckpointConfig num_to_keep).", ge=1)
    max_failures: int = option(2, "Ray Train FailureConfig max_failures.", ge=-1)
    validate_every: int = option(100, "Steps between validations (0 = only at the end).", ge=0)
    val_images: int = option(0, "Held-out images used for in-job validation (needs data.holdout_fraction > 0).",
                             ge=0)
    log_every: int = option(10, "Steps between metric logs.", ge=1)
    init_from: str = option("", "Checkpoint folder to start from (progressive stage; RoPE positions rebuilt).")
    fail_at_step: int = option(-1, "Fault injection: a worker raises once at this step (-1 = off).", ge=-1)
    s3_endpoint_url: str = option("", "S3 endpoint override (MinIO, moto); empty = AWS default.")
    adam_eps: float = option(1e-8, "AdamW epsilon (docs/method.md s5: 1e-8).", gt=0)
    cpus_per_worker: float = option(1.0, "CPUs reserved per Ray Train worker (also its torch thread count on CPU).",
                                    gt=0)
    shuffle_buffer: int = option(2000, "Samples in each worker's local shuffle buffer (0 = none; the reference "
                                 "mixes with a 2000-sample buffer); batches draw from it at random and keep an "
                                 "image's K variants out of one batch (docs/mixing.md).", ge=0)
    mix_shards: bool = option(True, "Mix batches: read the feature shards' row groups in a seeded order that "
                              "changes every epoch, each block drawing on many shards, rows spread by variant "
                              "(training/data.py).")
    read_block_mb: int = option(512, "Target MiB of feature rows one read task holds (a block of mixed row groups, "
                                "or slices of row groups larger than this): its peak stays under twice this "
                                "(training/data.py read_task_peak_bound, reserved as the task's Ray memory). "
                                "Rows go to the trainers in blocks of 1/16 of it.", ge=128)
    tf32: bool = option(True, "Allow TF32 matmuls on GPU (docs/method.md s5: TF32 enabled).")
    activation_checkpointing: int = option(0, "Activation checkpointing: 0 = none, 1 = every DiT block, k = every "
                                           "k-th block (blocks 0, k, 2k, ...): their activations are recomputed in "
                                           "backward instead of kept (same gradients, about one extra forward of "
                                           "those blocks; `python -m training.memory_plan` prints the memory of "
                                           "each setting).", ge=0)
    compile: bool = option(False, "torch.compile each DiT block and the final layer (as the reference does; "
                           "vosr/model/execution.py); the first steps pay the compile time.")
    gpu_memory_gib: float = option(0.0, "GPU memory of one worker in GiB that the recipe is planned for (80 for an "
                                   "80 GB A100/H100): `python -m training.memory_plan` checks one step's planned "
                                   "peak, with headroom, against it (0 = not declared).", ge=0)
    cache_data: bool = option(False, "Materialise the (small) training set in the object store once, so epochs "
                              "do not re-read the shards; leave off for large feature sets.")


@config_section("distill_job", "Distillation job specifics.")
@dataclass
class DistillTrainConfig:
    teacher: str = option("", "Teacher checkpoint folder (its EMA weights are used).")
    register_name: str = option("vosr-student", "MLflow registered-model name of the student (empty = none).")
    register_alias: str = option("champion", "Registry alias pointed at the newly registered student "
                                 "(models:/<name>@<alias>); empty = none.")
    teacher_use_ema: bool = option(True, "Load the teacher's EMA weights (docs/method.md s7: the multi-step EMA).")
