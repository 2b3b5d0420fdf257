"""The inference jobs' configuration sections: `serve` (inference/serve/) and `eval` (inference/evaluate.py).
The upscaler's own section, `inference`, is the method library's (vosr/config/inference.py). Each is registered
with @config_section (jobkit/jobs.py); jobkit/config.py puts every registered section under the one root."""

from __future__ import annotations

from dataclasses import dataclass

from jobkit.jobs import config_section
from vosr.config import option


@config_section("serve", "Ray Serve application.")
@dataclass
class ServeConfig:
    host: str = option("127.0.0.1", "HTTP host of Ray Serve (loopback by default).")
    port: int = option(8000, "HTTP port of Ray Serve.", ge=1, le=65535)
    max_batch_size: int = option(8, "Most requests one model replica runs together (inference/serve/batching.py; "
                                 "1 = no batching). Batching pays where one image leaves the device idle (a GPU); "
                                 "on a CPU only for small images, whose fixed per-call cost it shares (tiny model "
                                 "alone, batch 8 vs 1: 1.44x at 32 px, 0.96x at 64 px; benchmarks/bench_serve.py).", ge=1)
    batch_wait_timeout_s: float = option(0.05, "Seconds a request that finds the model idle waits for others to "
                                         "join its batch; requests that queued while a batch ran never wait.",
                                         ge=0)
    min_replicas: int = option(1, "Autoscaling minimum model replicas (2 or more: a request held by a replica that dies is "
                              "served by another at once instead of waiting for a replacement).", ge=0)
    max_replicas: int = option(1, "Autoscaling maximum model replicas.", ge=1)
    target_ongoing_requests: float = option(8.0, "Autoscaling target ongoing requests per replica.", gt=0)
    max_ongoing_requests: int = option(64, "Requests a replica accepts at once (more wait in the proxy queue).",
                                       ge=1)
    replica_cpus: float = option(1.0, "CPUs reserved per replica (ray_actor_options.num_cpus).", gt=0)
    replica_gpus: float = option(0.0, "GPUs reserved per replica (ray_actor_options.num_gpus).", ge=0)
    max_replicas_per_node: int = option(0, "At most this many replicas of each deployment (model, ingress) on one "
                                        "node (0 = no limit); 1 spreads them over nodes, so that a lost node loses "
                                        "one replica of each.", ge=0, le=100)
    ingress_replicas: int = option(1, "Replicas of the HTTP ingress (key, options, body, decoding and PNG "
                                   "encoding; it calls the model replicas and resends a request whose model "
                                   "replica died).", ge=1)
    ingress_cpus: float = option(0.25, "CPUs reserved per ingress replica.", ge=0)
    health_check_period_s: float = option(2.0, "Seconds between Serve's health checks of a replica: how soon a "
                                          "dead replica is noticed and replaced.", gt=0)
    max_surge_percent: int = option(0, "Extra model replicas (percent of the target count, rounded up) started "
                                    "during a redeploy, so that the old ones serve until their replacements have "
                                    "loaded (0 = old ones stop first; requests wait for the new ones).", ge=0,
                                    le=100)
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
    request_timeout_s: float = option(120.0, "Per-request deadline of the model: a model replica answers 504 when "
                                      "a request takes longer from its arrival there. The ingress's deadline for "
                                      "the whole request (queueing and retries after a replica death included) is "
                                      "this plus serve.body_timeout_s (503 + Retry-After for a request still "
                                      "waiting for a model replica then), and Ray Serve's proxy answers 408 5 s "
                                      "after that.",
                                      gt=0)
    body_timeout_s: float = option(30.0, "Deadline for reading a request body (408 after it).", gt=0)
    max_queued_requests: int = option(32, "Requests each ingress replica queues for the model beyond the model "
                                      "replicas' max_ongoing_requests (Ray Serve max_queued_requests); more get 503 "
                                      "with Retry-After at once.", ge=1)
    retry_after_s: float = option(5.0, "Retry-After seconds sent with a 503 when the queue is full.", ge=0)
    api_key: str = option("", "A key every request must send as X-API-Key (401 otherwise); a config file value only: "
                          "never from --set (argv is visible to anyone). Prefer serve.api_key_env or "
                          "serve.api_key_file. The upload page itself is static and asks for the key.", secret=True)
    api_key_env: str = option("VOSR_API_KEY", "Environment variable holding the API key (read where the app is "
                              "built; only its SHA-256 reaches the replicas).")
    api_key_file: str = option("", "File holding API keys, one per line (# comments; a Kubernetes Secret mount).")
    allow_anonymous: bool = option(False, "Serve without a key on a non-loopback host (refused otherwise).")
    app_name: str = option("vosr", "Ray Serve application name.")
    route_prefix: str = option("/", "Route prefix of the application.")


@config_section("eval", "Evaluation runner.")
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
