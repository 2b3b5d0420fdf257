"""The data jobs' configuration sections: `curate` (pipelines/curate.py: crawl, filter, dedupe, balance) and
`precompute` (pipelines/precompute.py). Job settings live beside their jobs, each section registered with
@config_section (jobkit/jobs.py); jobkit/config.py puts every registered section under one root with the method's
sections (vosr/config)."""

from __future__ import annotations

from dataclasses import dataclass

from jobkit.jobs import config_section
from vosr.config import option


@dataclass
class CrawlConfig:
    timeout_s: float = option(10.0, "Per-request timeout in seconds.", gt=0)
    max_bytes: int = option(20 * 2**20, "Byte cap of one response body; larger answers are rejected (oversize).",
                            ge=1)
    max_redirects: int = option(5, "Redirects followed before a URL is rejected (redirect loop).", ge=0)
    retries: int = option(2, "Retries for retryable failures (timeouts, 429, 5xx).", ge=0)
    backoff_s: float = option(0.5, "Base of the exponential backoff between retries (Retry-After wins).", ge=0)
    max_retry_after_s: float = option(30.0, "Longest Retry-After honoured; longer waits count as failures.", ge=0)
    per_domain_rps: float = option(10.0, "Per-domain rate limit in requests per second, across the whole crawl "
                                   "(every block and node) when gate_actors > 0, else per block.", gt=0)
    per_domain_concurrency: int = option(4, "Concurrent requests per domain, across the whole crawl when "
                                         "gate_actors > 0, else per block.", ge=1)
    gate_actors: int = option(2, "Ray actors that keep the per-domain limits for the whole crawl (domains sharded "
                              "by hash; a 429/503 Retry-After pauses the domain for every block). 0 = each block "
                              "keeps its own limits (a domain then gets up to N times them with N blocks running).",
                              ge=0)
    concurrency: int = option(32, "Concurrent requests per worker in total.", ge=1)
    user_agent: str = option("vosr-curate/0.1 (+https://github.com/vosr-on-ray)", "User-Agent header sent.")
    respect_noai: bool = option(True, "Skip responses with X-Robots-Tag noai / noimageai (img2dataset style).")
    allow_private: bool = option(False, "Allow URLs that resolve to private, loopback or link-local addresses.")
    allow_hosts: list[str] = option([], "Hosts exempt from the address policy, as written in the URL: \"host\" (any "
                                    "port) or \"host:port\" / \"[v6]:port\" (e.g. 127.0.0.1 in tests). An IP entry "
                                    "never exempts other hostnames that resolve to it.")


@dataclass
class FilterConfig:
    min_short_side: int = option(512, "Reject images whose short side is below this (paper s4.1 resolution "
                                 "filter). Default 512: docs/method.md s1 trains on 512 px crops, so a smaller image "
                                 "cannot give one crop at native scale. Set it to the crop size of your training.",
                                 ge=1)
    max_aspect_ratio: float = option(3.0, "Reject images whose long/short side ratio exceeds this.", ge=1)
    max_pixels: int = option(64_000_000, "Decompression-bomb cap on width*height, checked from the header before "
                             "any pixel data is decoded (vosr/imageio.py).", ge=1)
    max_upscale: float = option(2.4, "Reject images whose estimated enlargement factor (native_scale: how much the "
                                "image was enlarged from the source it was made from, 1.0 for a native image; "
                                "pipelines/curation/analysis.py) is above this: an enlarged thumbnail teaches a "
                                "super-resolution model that blur is the high-resolution truth. The estimate is the "
                                "scale below which the image is interpolation-smooth (structure function of its "
                                "pixels; at most 2 where it has pixel-scale detail such as sensor noise) or its "
                                "nearest-neighbour pixel grid. Default from "
                                "benchmarks/bench_sharpness.py on the 44 dev photos: see docs/curation-quality.md "
                                "for the shares rejected per factor and filter. 0 turns it off.", ge=0)
    min_sharpness: float = option(-100.0, "Optional second upscaling filter, off by default (-100 or lower: off, and "
                                  "not computed): reject images whose native-scale sharpness (log10 of the mean "
                                  "spectral power in 0.63-1.0 of Nyquist over that in 0.125-0.315, on the 4 most "
                                  "textured of 16 crops of 128 px; analysis.native_sharpness) is below this. It "
                                  "catches more 2x enlargements than max_upscale but passes large enlargements (an "
                                  "11x enlargement scores like a sharp photo) and costs about 3 ms CPU per image; "
                                  "benchmarks/bench_sharpness.py prints both filters side by side (-3.0: the earlier "
                                  "default).")
    min_gradient: float = option(0.0, "Reject images whose mean gradient magnitude (0-255 scale) at the analysis "
                                 "size is below this. Off by default: at the analysis size it cannot see upscaling "
                                 "(an 11x enlargement scored like a sharp photo); max_upscale is the upscaling "
                                 "filter. Still useful against flat images.", ge=0)
    min_entropy: float = option(3.0, "Reject images whose grey-level entropy (bits, 256-bin histogram at the "
                                "analysis size) is below this (paper s4.1 image-entropy filtering): removes "
                                "near-constant images, graphics and scans with few grey levels. Default 3.0, under "
                                "every dev photo (lowest 4.08 bits, median 7.3; benchmarks/bench_sharpness.py "
                                "prints them); flat or two-tone images score 1 bit or less.", ge=0)
    analysis_size: int = option(256, "Short side the image is resized to before the gradient/entropy analysis.",
                                ge=16)


@dataclass
class DedupConfig:
    enabled: bool = option(True, "Run exact and near-duplicate removal.")
    hamming: int = option(6, "Near-duplicate pHash Hamming radius k (exact multi-index hashing, pipelines/curation/lsh.py).", ge=0, le=31)
    max_bucket: int = option(1000, "Cap on the size of one LSH bucket; larger buckets are split and counted.",
                             ge=2)
    search_task_hashes: int = option(1 << 22, "Most distinct pHashes one near-duplicate search task reads: above "
                                     "it the hashes are dealt to tasks by the key bits their tables share, so a "
                                     "task's memory is bounded by this (dedup.search_task_peak_bytes: 160 B per "
                                     "hash + 48 MiB, 688 MiB at the default; ~91 B per hash measured), never by "
                                     "the corpus. Smaller: less memory per task, more passes over the hashes.",
                                     ge=2)
    local_max_edges: int = option(500_000, "Duplicate edges up to which the connected components run in one Ray "
                                  "task (scipy; ~1 KiB per edge there, reserved as its memory: "
                                  "dedup.components_peak_bytes); above it they stay distributed (large/small-star "
                                  "passes). Nothing of the graph reaches the driver either way.", ge=0)


@dataclass
class BalanceConfig:
    enabled: bool = option(True, "Cap each category (MetaCLIP-style) after dedup.")
    per_category_cap: int = option(1_000_000, "Most images kept per category t.", ge=1)
    num_clusters: int = option(8, "k of k-means when the sources give no category.", ge=1)
    sample_size: int = option(10_000, "Images sampled to fit the k-means centroids (the fit runs in one Ray task "
                              "reserving balance.kmeans_peak_bytes: about 2 x sample_size x the embedding's floats "
                              "x 4 bytes).", ge=1)
    kmeans_num_cpus: float = option(2.0, "CPUs of the k-means fit's Ray task (also its BLAS threads).", gt=0)
    embedding: str = option("cheap", "What k-means clusters on: cheap (8x8 colour thumbnail + gradient/entropy "
                            "stats, computed in stage 1) or semantic (final CLS token of the configured semantic "
                            "encoder, section `semantic`: DINOv2 CLS features for the real presets, loaded from "
                            "semantic.path; computed by an actor pool in stage 2).", choices=["cheap", "semantic"])
    semantic_batch_size: int = option(32, "embedding=semantic: images per encoder call.", ge=1)
    semantic_actors: int = option(1, "embedding=semantic: encoder actors (each builds the encoder once).", ge=1)
    semantic_num_gpus: float = option(0.0, "embedding=semantic: GPUs per encoder actor (0 = CPU).", ge=0)
    semantic_num_cpus: float = option(1.0, "embedding=semantic: CPUs per encoder actor (also its torch threads "
                                      "on CPU).", gt=0)


@dataclass
class ColumnsConfig:
    url: str = option("", "Column of a URL list holding the image URL. Empty: found by name without case (url, "
                      "image_url, img_url), so LAION (URL), DataComp and img2dataset (url) lists need nothing.")
    category: str = option("", "Column holding a category for balancing (a tar sample's JSON key). Empty: "
                           "`category` if present (a tar sample's `cls` member otherwise); else k-means decides.")
    width: str = option("", "Column holding the image's width as the list declares it. Empty: original_width, "
                        "else width (any case: LAION WIDTH, DataComp original_width, img2dataset output).")
    height: str = option("", "Column holding the image's height (as for width: original_height, else height).")
    metadata: list[str] = option([], "Further columns carried into the curated shards' `metadata` column as one "
                                 "JSON object per row (e.g. [TEXT, LICENSE] for LAION, [text, uid] for DataComp; "
                                 "for tar shards, keys of each sample's JSON or member fields such as txt). A list "
                                 "lacking a named column is an error naming it; a tar sample lacking a key has "
                                 "null there. Strings are cut at 4,096 characters.")


@config_section("curate", "Curation job (pipelines/curate.py).")
@dataclass
class CurateConfig:
    sources: list[str] = option([], "Inputs, any mix of: URL lists (.txt one URL per line with an optional TAB and "
                                "category; .csv/.tsv with a header; .parquet such as LAION, DataComp or img2dataset "
                                "lists, columns found by curate.columns), WebDataset tar shards (.tar, e.g. "
                                "img2dataset's output; a shard is one input block), brace patterns of them "
                                "(s3://bucket/shards/{00000..09999}.tar), image files, and local folders or "
                                "s3:// prefixes holding any of these (listed by Ray tasks, not on the driver).")
    columns: ColumnsConfig = option(ColumnsConfig(), "Which columns of the URL lists (or keys of tar samples' JSON) "
                                    "hold the URL, category, declared size and carried metadata.")
    prefilter: bool = option(True, "Decide a URL list's rows whose declared width/height already fail "
                             "filters.min_short_side or filters.max_aspect_ratio without fetching them (counted as "
                             "prefilter_too_small / prefilter_bad_aspect); fetched rows are still checked on the "
                             "decoded image. Measured by benchmarks/bench_prefilter.py.")
    output: str = option("outputs/curated", "Output folder or s3:// prefix for the curated Parquet shards.")
    rows_per_shard: int = option(256, "Rows per input block = per output shard (a tar shard is one block whatever "
                                 "its size).", ge=1)
    crawl: CrawlConfig = option(CrawlConfig(), "HTTP crawl.")
    filters: FilterConfig = option(FilterConfig(), "Quality filters.")
    dedup: DedupConfig = option(DedupConfig(), "Exact and perceptual dedup.")
    balance: BalanceConfig = option(BalanceConfig(), "Category balancing.")
    s3_endpoint_url: str = option("", "S3 endpoint override (MinIO, moto); empty = AWS default.")
    stage1_buffer_mb: int = option(64, "Stage 1 streams each block's ledger to storage in row groups of about this "
                                   "many MiB of image bytes, so a block's memory does not grow with rows_per_shard "
                                   "(the stated per-block bound is stage1.stage1_peak_bytes; Ray reserves it as "
                                   "the block task's memory).", ge=1)
    cpus_per_block: float = option(1.0, "CPUs Ray reserves per stage-1 block task (lower it for crawl-bound "
                                   "URL lists so more blocks fetch at once).", gt=0)
    shuffle: str = option("sort", "Ray Data shuffle behind stage 2's two group-bys (per category, per output "
                          "shard). sort: pull-based sort shuffle, plain tasks; hash: Ray 2.60's default (SHUFFLE_V2, hash "
                          "partitioned), which starts aggregator actors for every group-by: 8.3 s against 0.17 s for "
                          "a 20-row group-by on 2 CPUs (benchmarks/bench_shuffle.py), a fixed cost paid twice per "
                          "run. Both scale to the stage's row counts (group-bys of small decision rows, at most 64 "
                          "output partitions).", choices=["sort", "hash"])
    fail_after_blocks: int = option(0, "Testing aid: stop with an error after this many stage-1 blocks finish in "
                                    "this run (simulates a killed job; 0 = off).", ge=0)
    fail_after_shards: int = option(0, "Testing aid: stop with an error after this many final shards are written "
                                    "in this run (0 = off).", ge=0)
    max_attempts: int = option(3, "Times the job runs its stages when it loses a node, worker or actor mid-run "
                               "(finished blocks and shards are kept, so a repeat does only what is left); 1 = fail "
                               "at once.", ge=1)
    retry_failed: bool = option(True, "A re-run fetches again the URLs of finished blocks that failed with a "
                                "retryable reason (timeout, 429, 5xx, connection errors); 404, non-images and decode "
                                "failures are final.")


@config_section("precompute", "Feature precompute job (pipelines/precompute.py).")
@dataclass
class PrecomputeConfig:
    input: str = option("outputs/curated", "Curated output root (folder or s3:// prefix) whose shards/ are read.")
    output: str = option("outputs/features", "Feature output root (folder or s3:// prefix).")
    mode: str = option("materialize", "materialize (write K variants per image) or online (stream, write nothing).",
                       choices=["materialize", "online"])
    variants: int = option(2, "K, seeded LR variants per image (each with its own crop and degradation).", ge=1)
    dtype: str = option("float16", "Storage dtype of latents and tokens (bfloat16 is stored as uint16 bits).",
                        choices=["float16", "bfloat16", "float32"])
    batch_size: int = option(8, "Encoder batch size (rows of (image, variant) per actor call).", ge=1)
    encoder_concurrency: int = option(1, "Encoder actors in the pool.", ge=1)
    num_gpus_per_encoder: float = option(0.0, "GPUs per encoder actor (0 on CPU machines; the actor uses CUDA "
                                         "when this is > 0).", ge=0)
    num_cpus_per_encoder: float = option(1.0, "CPUs reserved per encoder actor.", ge=0)
    degrade_batch_size: int = option(4, "Images per decode+crop+degrade CPU task batch.", ge=1)
    num_cpus_per_degrade: float = option(1.0, "CPUs per decode+crop+degrade task.", gt=0)
    rows_per_shard: int = option(64, "Rows per Parquet row group of a feature shard (not rows per shard: one "
                                 "feature shard per curated shard keeps resumption deterministic). The unit of "
                                 "memory downstream: a merge task holds ~10 row groups (features.writer."
                                 "merge_peak_bound: ~1 GiB at 64 rows of 1.56 MiB, vosr-0.5b / 512 px) and "
                                 "training reads mix row groups of many shards per block (train.read_block_mb).",
                                 ge=1)
    compression: str = option("zstd", "Parquet compression of feature shards.",
                              choices=["zstd", "snappy", "lz4", "none"])
    max_shards: int = option(0, "Process at most this many pending input shards (0 = all).", ge=0)
    fail_after_shards: int = option(0, "Fault injection for tests: abort the run after writing this many shards "
                                    "(0 = never).", ge=0)
    s3_endpoint_url: str = option("", "S3 endpoint override (MinIO, moto); empty = AWS default.")
