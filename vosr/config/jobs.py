"""Training, distillation, inference, serving and evaluation configuration."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import COLOR_FIXES, MODES
from .schema import option


@dataclass
class TrainConfig:
    features: str = option("outputs/features", "Feature shards to train on (unused when train.online).")
    online: bool = option(False, "Degrade and encode the curated shards of precompute.input inside the data "
                          "pipeline (pipelines/online.py) instead of reading feature shards.")
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
    tf32: bool = option(True, "Allow TF32 matmuls on GPU (docs/method.md s5: TF32 enabled).")
    cache_data: bool = option(False, "Materialise the (small) training set in the object store once, so epochs "
                              "do not re-read the shards; leave off for large feature sets.")


@dataclass
class DistillTrainConfig:
    teacher: str = option("", "Teacher checkpoint folder (its EMA weights are used).")
    register_name: str = option("vosr-student", "MLflow registered-model name of the student (empty = none).")
    teacher_use_ema: bool = option(True, "Load the teacher's EMA weights (docs/method.md s7: the multi-step EMA).")


@dataclass
class InferenceConfig:
    mode: str = option("onestep", "onestep (distilled student, few-step with distill.onestep_steps) or multistep "
                       "(teacher with guidance flow.guidance_scale, flow.steps Euler steps).",
                       choices=list(MODES))
    checkpoint: str = option("", "Checkpoint folder or MLflow model URI (models:/name/version).")
    tile_size: int = option(0, "Tile size in pixels of the upsampled image (0 = no tiling; docs/method.md s8: 512 -> "
                            "64 latents at f=8).", ge=0)
    tile_overlap: int = option(0, "Tile overlap in pixels (at least tile/8 latents is used, docs/method.md s8).",
                               ge=0)
    tile_batch: int = option(4, "Tiles run through the DiT per forward pass when tiling.", ge=1)
    color_fix: str = option("adain", "Colour fix against the bicubic LR: adain (default), wavelet (a Gaussian "
                            "low/high swap, named as in the reference), none.",
                            choices=list(COLOR_FIXES))
    upscale: int = option(4, "Upscale factor of the input (x4; the LR is PIL-bicubic upsampled by it first).", ge=1)
    seed: int = option(42, "Noise seed (reference: 42); each image draws from its own generator.")
    device: str = option("auto", "Device: auto, cpu or cuda.", choices=["auto", "cpu", "cuda"])


@dataclass
class ServeConfig:
    host: str = option("127.0.0.1", "HTTP host of Ray Serve (loopback by default).")
    port: int = option(8000, "HTTP port of Ray Serve.", ge=1, le=65535)
    max_batch_size: int = option(8, "@serve.batch max batch size (1 = no batching).", ge=1)
    batch_wait_timeout_s: float = option(0.05, "@serve.batch wait timeout.", ge=0)
    min_replicas: int = option(1, "Autoscaling minimum replicas.", ge=0)
    max_replicas: int = option(1, "Autoscaling maximum replicas.", ge=1)
    target_ongoing_requests: float = option(8.0, "Autoscaling target ongoing requests per replica.", gt=0)
    max_ongoing_requests: int = option(64, "Requests a replica accepts at once (more wait in the proxy queue).",
                                       ge=1)
    replica_cpus: float = option(1.0, "CPUs reserved per replica (ray_actor_options.num_cpus).", gt=0)
    replica_gpus: float = option(0.0, "GPUs reserved per replica (ray_actor_options.num_gpus).", ge=0)
    max_body_bytes: int = option(20 * 2**20, "Largest accepted request body (413 above).", ge=1)
    max_pixels: int = option(4_000_000, "Largest accepted input width*height (413 above).", ge=1)
    max_steps: int = option(50, "Largest `steps` query value accepted (422 above).", ge=1)
    min_tile: int = option(64, "Smallest `tile` query value in pixels (smaller tiles only multiply the work; 422).",
                           ge=1)
    max_tile: int = option(1024, "Largest `tile` query value in pixels (422 above); also the tile used when tiling "
                           "is forced and inference.tile_size is 0.", ge=1)
    force_tile_pixels: int = option(1024 * 1024, "Tiling is forced (tile = inference.tile_size, else "
                                    "serve.max_tile) when the upscaled image has more pixels than this, so one "
                                    "model evaluation never covers more than max(this, max_tile^2) pixels.", ge=1)
    max_evaluations: int = option(20000, "Budget of one request in model evaluations (tiles x steps x guidance "
                                  "passes, each tile counted at least once and larger-than-default tiles by "
                                  "their area); 413 above, before any work.", ge=1)
    max_cost_ratio: float = option(3.0, "A request's options may cost at most this many times the server's "
                                   "default options on the same image (422 above, before any work).", ge=1)
    request_timeout_s: float = option(120.0, "Per-request deadline: the replica answers 504 past it (a client "
                                      "header can lift Ray Serve's proxy timeout, which is set to this plus "
                                      "serve.body_timeout_s and answers 408).", gt=0)
    body_timeout_s: float = option(30.0, "Deadline for reading a request body (408 after it).", gt=0)
    max_queued_requests: int = option(32, "Requests queued per caller beyond the replicas' max_ongoing_requests "
                                      "(Ray Serve max_queued_requests); more get 503 with Retry-After.", ge=1)
    retry_after_s: float = option(5.0, "Retry-After seconds sent with a 503 when the queue is full.", ge=0)
    api_key: str = option("", "A key every request must send as X-API-Key (401 otherwise); a config file value only: "
                          "never from --set (argv is visible to anyone). Prefer serve.api_key_env or "
                          "serve.api_key_file. The upload page itself is static and asks for the key.", secret=True)
    api_key_env: str = option("VOSR_API_KEY", "Environment variable holding the API key (read where the app is "
                              "built; only its SHA-256 reaches the replicas).")
    api_key_file: str = option("", "File holding API keys, one per line (# comments; a Kubernetes Secret mount).")
    allow_anonymous: bool = option(False, "Serve without a key on a non-loopback host (refused otherwise).")
    fault_injection: bool = option(False, "Tests only: seed=2**62+13 raises inside the model run, seed=2**62+14 "
                                   "sleeps past the request timeout before it.")
    app_name: str = option("vosr", "Ray Serve application name.")
    route_prefix: str = option("/", "Route prefix of the application.")


@dataclass
class EvalConfig:
    hr_dir: str = option("", "Folder of HR images, or a benchmark folder as published: HR/ + LR/, test_HR/ + "
                         "test_LR/ (DRealSR: name_x1 / name_x4), or one folder of name_HR + name_LR4 (RealSR); "
                         "LR at 1/scale, pairs matched by name without those suffixes.")
    lr_dir: str = option("", "Folder of paired LR images (empty = HR/../LR when it exists, else degrade HR with "
                         "eval.degrade_preset).")
    degrade_preset: str = option("realesrgan", "Degradation used to make LR when there is no LR folder (seeded "
                                 "per image from run.seed).", choices=["realesrgan", "bicubic"])
    crop: int = option(0, "Centre-crop HR to this size and LR to crop/scale first (paper s4: 512 GT / 128 LR, "
                       "the default of the vosr-0.5b / vosr-1.4b presets; 0 = full image).", ge=0)
    max_images: int = option(0, "Evaluate at most this many images (0 = all).", ge=0)
    dataset_name: str = option("", "Dataset name in the table (empty = the folder name).")
    teacher: str = option("", "Multi-step checkpoint (folder or models:/ URI) for the multi-step rows and the "
                          "guidance sweep; empty = no multi-step rows.")
    guidance_sweep: list[float] = option([-0.5, 0.0, 0.5, 1.0], "Guidance scales of the sweep plot (paper Fig. 4).")
    sweep_steps: int = option(0, "Euler steps of the multi-step rows and the sweep (0 = flow.steps).", ge=0)
    iqa_metrics: list[str] = option(["lpips", "stlpips", "dists", "niqe", "musiq", "maniqa", "topiq_nr", "afine"],
                                    "Perceptual metrics to try: stlpips and niqe run from local files "
                                    "(eval.metric_weights or pyiqa's cache folder; inference/iqa_local.py), the "
                                    "others through pyiqa (the iqa extra) with weights already in its cache; each "
                                    "one that cannot run is reported as skipped with the reason. Nothing is "
                                    "downloaded.")
    metric_weights: list[str] = option([], "Local metric files: metric=file (stlpips=alex_shift_tolerant.pth, "
                                       "niqe=niqe_pris_params.npz or niqe_modelparameters.mat) or folders holding "
                                       "files of those names; the table names each file with its sha256.")
    peers: list[str] = option([], "Peer SR models as local files, [name=]path (.pth/.safetensors/.ckpt of an "
                              "architecture spandrel detects: ESRGAN/Real-ESRGAN, SwinIR, HAT, DAT, ...); each is a "
                              "row of kind `peer`, run on the same crops with the same tiling as the VOSR rows. "
                              "Unsupported files (e.g. ncnn .param/.bin) are an error naming them.")
    output: str = option("outputs/eval", "Folder for the JSON, markdown table, per-image CSV, plots and "
                         "(optionally) images.")
    save_images: bool = option(False, "Also write each row's SR images under <output>/images/<row>/.")
