"""Curation job: URL lists / folders / s3:// prefixes -> curated Parquet shards (paper s4.1 data recipe).

    python pipelines/curate.py --config configs/curate/local.yaml [--set curate.output=...]
    ray job submit --working-dir . -- python pipelines/curate.py --config configs/curate/urls.yaml

Stages (each a named step below; plain Ray tasks for stage 1 and stage 2's partition passes, Ray Data for
embedding, balance and write; only counters and summaries reach the driver):
  plan      sources -> input blocks (byte/row ranges of URL lists, tar shards, runs of listed files), each named
            by a hash; folders and prefixes are listed by Ray tasks into manifests under <output>/_listing/
  stage 1   per block: fetch -> safe decode -> filters -> hashes/embedding -> ledger shard (skipped if present)
  dedup     exact copies + near duplicates (pHash within curate.dedup.hamming, exact multi-index hashing in
            hash-partition passes; curation/dedup.py) -> edges -> connected components
  embed     (balance.embedding=semantic) CLS vectors of the semantic encoder, one encoder per actor
  balance   category from the list, else k-means on the embedding; cap each category at t (seeded)
  write     per block: final shard (CURATED_SCHEMA) + stats JSON, atomically; summary.json at the root
A run killed at any point and re-run skips finished blocks and shards and ends with the same kept set.
A re-run also fetches again the URLs that failed transiently (timeouts, 429, 5xx, connection errors; see
curation/stage1.py for the ledger generations), unless curate.retry_failed is false.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobkit.faults import FaultInjected
from jobkit.memprobe import probe
from pipelines.curate_schema import SCHEMA_VERSION, SHARDS_DIR, SUMMARY_FILE
from pipelines.curation import balance, dedup, politeness, writer
from pipelines.curation.raytools import column_sums, partitions
from pipelines.curation.semantic_embed import ClsEmbedder, check_semantic_weights
from pipelines.curation.sources import Unit, plan_units
from pipelines.curation.stage1 import ledger_uri, run_unit, scan_stage1, stage1_peak_bytes
from pipelines.curation.tars import tar_unit_peak_bytes
from vosr import storage

LISTING_DIR = "_listing"  # listing manifests and re-chunked URL lists (pipelines/curation/listing.py, sources.py)
STAGE1_COLUMNS = ["unit", "row", "reason", "id", "width", "height", "gradient", "sha256", "phash",
                  "list_category", "embedding", "fidelity", "native_scale"]


def log(msg: str) -> None:
    print(msg, flush=True)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage1_salt(ccfg) -> str:
    """What a block's ledger depends on besides its inputs: the filters, whether listed sizes decide rows
    (curate.prefilter) and the schema version."""
    return _fingerprint(SCHEMA_VERSION, asdict(ccfg.filters), ccfg.prefilter)


# ------------------------------------------------------------------------------------------- stage 1

def _stage1_task(row: dict, ccfg, gates=None) -> dict:
    return run_unit(Unit.from_row(row), row["key"], ccfg, gen=row["gen"], gates=gates)


def node_memory_cap() -> int:
    """The largest alive node's memory resource (0 when Ray reports none)."""
    import ray

    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    return int(max(nodes)) if nodes else 0


def block_memory(ccfg, kind: str = "") -> int:
    """Memory Ray reserves per stage-1 block task: the stated per-block bound (stage1_peak_bytes; for a tar shard
    tar_unit_peak_bytes), capped at the largest node's memory resource so the task always fits somewhere. The
    scheduler then never packs more blocks onto a node than its memory holds, so a block is not killed for memory
    because of its neighbours."""
    cap = node_memory_cap()
    want = tar_unit_peak_bytes(ccfg) if kind == "tar" else stage1_peak_bytes(ccfg)
    return int(min(want, cap)) if cap else 0


def ray_runner(fn, calls: list[tuple], memory: int = 0) -> list:
    """Planning tasks (listing, URL-list footers, re-chunking) as Ray tasks: at most twice the CPUs in flight,
    each reserving `memory` (its stated bound, capped at the largest node), results in call order. Only the
    tasks' small results (manifest names, unit descriptors, counts) come back to the driver."""
    import ray

    if not calls:
        return []
    cap = node_memory_cap()
    mem = int(min(memory, cap)) if memory and cap else 0
    task = ray.remote(num_cpus=0.5, max_retries=3, **({"memory": mem} if mem else {}))(fn)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    results: dict = {}
    running: dict = {}
    todo = iter(enumerate(calls))
    while True:
        for i, args in todo:
            running[task.remote(*args)] = i
            if len(running) >= limit:
                break
        if not running:
            return [results[i] for i in range(len(calls))]
        done, _ = ray.wait(list(running), num_returns=1)
        results[running.pop(done[0])] = ray.get(done[0])


def _run_blocks(items: list[dict], ccfg, gates=None):
    """One Ray task per block, a bounded number in flight, results in completion order. Plain tasks rather than
    a Ray Data map: on a 2-CPU Ray, Ray Data 2.60's streaming executor ran 40 such 0.2 s block tasks one after
    another (9.6 s) where plain tasks ran two at a time (4.1 s); Ray retries a task whose node is lost."""
    import ray

    memory = {k: block_memory(ccfg, k) for k in ("tar", "")}
    # a lost node's tasks are retried by Ray; so is a block whose crawl lost its domain gate (GateUnavailable)
    task = ray.remote(num_cpus=ccfg.cpus_per_block, max_retries=3,
                      retry_exceptions=[politeness.GateUnavailable])(_stage1_task)
    in_flight_cap = max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / ccfg.cpus_per_block))
    todo, running = iter(items), []
    while True:
        for item in todo:
            mem = memory["tar" if Unit.from_row(item).kind == "tar" else ""]
            running.append(task.options(**({"memory": mem} if mem else {})).remote(item, ccfg, gates))
            if len(running) >= in_flight_cap:
                break
        if not running:
            return
        done, running = ray.wait(running, num_returns=1)
        yield ray.get(done[0])


def stage_fetch_analyse(units: list[Unit], keys: list[str], ccfg) -> dict:
    """Blocks without a ledger run in full; with curate.retry_failed, finished blocks whose ledger still has
    retryable failures (timeouts, 429, 5xx, connection errors) fetch just those rows again."""
    ep = ccfg.s3_endpoint_url
    gens, retry, stale = scan_stage1(ccfg.output, ep)
    for uri in stale:  # superseded generations left by a run killed mid-retry
        storage.delete(uri, ep)
    new = [(u, k, -1) for u, k in zip(units, keys) if k not in gens]
    again = [(u, k, gens[k]) for u, k in zip(units, keys) if k in retry] if ccfg.retry_failed else []
    pending = new + again
    log(f"[curate] stage 1: {len(units)} blocks, {len(units) - len(new)} already done, {len(new)} to run, "
        f"{len(again)} to retry (transient failures of an earlier run)")
    counts = {"blocks_run": 0, "blocks_skipped": len(units) - len(new), "blocks_retried": 0,
              "urls_retried": 0, "retry_blocks_changed": 0}
    if not pending:
        return counts
    items = [{**u.to_row(), "key": k, "gen": g} for u, k, g in pending]
    crawls = any(u.kind in ("text", "csv", "tsv", "parquet") for u, _, _ in pending)
    gates = politeness.start_gates(ccfg.crawl) if crawls and ccfg.crawl.gate_actors else None
    try:
        _collect_blocks(_run_blocks(items, ccfg, gates), len(pending), counts, ccfg)
    finally:
        politeness.stop_gates(gates)
    return counts


def _collect_blocks(results, n: int, counts: dict, ccfg) -> None:
    for i, res in enumerate(results, 1):
        st = json.loads(res["stats"]) if res["stats"] else {}
        if res["retried"]:
            counts["blocks_retried"] += 1
            counts["urls_retried"] += res["retried"]
            counts["retry_blocks_changed"] += bool(res["changed"])
            what = f"retried {res['retried']} urls, {st.get('retryable', 0)} still failing transiently"
        else:
            counts["blocks_run"] += not res["skipped"]
            what = f"seen {st.get('seen', 0)} ok {st.get('ok', 0)}"
        log(f"[curate] stage 1 block {i}/{n} {res['unit']}: {what} in {st.get('seconds', 0):.2f}s")
        if ccfg.fail_after_blocks and i >= ccfg.fail_after_blocks:
            raise FaultInjected(f"fail_after_blocks={ccfg.fail_after_blocks} reached")


# ------------------------------------------------------------------------------------------- dedup

def _flag_unlabelled(batch: pa.Table) -> pa.Table:
    flag = pc.cast(pc.is_null(batch["list_category"]), pa.int8())
    return batch.append_column("unlabelled", flag)


def stage_dedup(meta, ccfg) -> tuple[Any, dict]:
    """(duplicate decisions: DECISION_SCHEMA rows for the dropped duplicates as a Ray Dataset, or None; the
    search's counters for the summary).

    Ray tasks over the materialized blocks (dedup.find_duplicates): vectorised partition passes, no call per
    group; only counters and object references reach the driver."""
    import ray
    import ray.data

    dcfg = ccfg.dedup
    n = meta.count()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    stars, found = dedup.find_duplicates(meta.to_arrow_refs(), dcfg.hamming, dcfg.max_bucket, partitions(n),
                                         search_tasks=cpus, local_max_edges=dcfg.local_max_edges, log=log,
                                         task_hashes=dcfg.search_task_hashes)
    if not stars:
        return None, found
    return ray.data.from_arrow_refs(stars).map_batches(_star_decisions, batch_format="pyarrow",
                                                        **dedup.block_task_memory()), found


def _star_decisions(batch: pa.Table) -> pa.Table:
    a, b = dedup.key_fields(batch["a"]), dedup.key_fields(batch["b"])
    n = batch.num_rows
    return pa.table({
        "unit": a["unit"], "row": a["row"],
        "kind": pa.array([writer.KIND_DECISION] * n, pa.int8()), "id": a["id"],
        "category": pa.nulls(n, pa.string()), "category_source": pa.nulls(n, pa.string()),
        "duplicate_of": b["id"],
        "drop_reason": pa.array(["duplicate"] * n, pa.string()), "ledger_gen": pa.nulls(n, pa.int32()),
    }, schema=writer.DECISION_SCHEMA)


# ------------------------------------------------------------------------------------------- embed

def stage_semantic_embed(meta, cfg):
    """Replace the cheap embedding of unlabelled rows by the semantic encoder's CLS vector (actor pool: the
    encoder is built once per actor, batches stream through; nothing is gathered on the driver)."""
    import ray.data

    bcfg = cfg.curate.balance
    return meta.map_batches(
        ClsEmbedder, fn_constructor_kwargs={"sem_cfg": cfg.semantic, "max_pixels": cfg.curate.filters.max_pixels,
                                            "micro_batch": bcfg.semantic_batch_size,
                                            "use_gpu": bcfg.semantic_num_gpus > 0,
                                            "threads": max(1, int(bcfg.semantic_num_cpus))},
        batch_size=bcfg.semantic_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=bcfg.semantic_actors),
        num_cpus=bcfg.semantic_num_cpus, num_gpus=bcfg.semantic_num_gpus or None)


# ------------------------------------------------------------------------------------------- balance

def sample_rate(want: int, n: int) -> float:
    """Share of the n unlabelled rows to keep, by seeded priority, so that at least `want` survive: the expected
    count plus six standard deviations of the binomial draw (a second pass at twice the rate is then needed about
    once in a billion runs), instead of the 2x surplus the driver used to gather."""
    return min(1.0, (want + 6.0 * math.sqrt(want) + 64.0) / max(1, n))


@probe("kmeans")
def _kmeans_task(want: int, k: int, seed: int, threads: int, *blocks) -> np.ndarray:
    """k-means centres on the `want` rows of smallest (prio, id) among the blocks (id, embedding, prio): the same
    sample in the same order whatever the block layout. Memory: balance.kmeans_peak_bytes(want, dim, k)."""
    keys = pa.concat_tables([b.select(["prio", "id"]) for b in blocks]).append_column(
        "at", pa.array(np.arange(sum(b.num_rows for b in blocks), dtype=np.int64)))
    pick = keys.take(pc.sort_indices(keys, sort_keys=[("prio", "ascending"), ("id", "ascending")])[:want])
    at = pick["at"].to_numpy()
    del keys, pick
    starts = np.cumsum([0] + [b.num_rows for b in blocks])
    dim = None
    x = None
    for bi, b in enumerate(blocks):  # copy the chosen rows' embeddings into their places in the sample
        sel = np.flatnonzero((at >= starts[bi]) & (at < starts[bi + 1]))
        if not len(sel):
            continue
        emb = b["embedding"].combine_chunks() if isinstance(b["embedding"], pa.ChunkedArray) else b["embedding"]
        vals = emb.take(pa.array(at[sel] - starts[bi]))
        flat = pc.list_flatten(vals).to_numpy(zero_copy_only=False)
        if dim is None:
            dim = len(flat) // len(sel)
            x = np.empty((len(at), dim), np.float32)
        if len(flat) != len(sel) * dim:
            raise ValueError("k-means sample: embeddings of different lengths")
        x[sel] = flat.reshape(len(sel), dim)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # BLAS threads as the environment sets them
        return balance.kmeans_fit(x, k, seed)
    with threadpool_limits(limits=max(1, threads)):
        return balance.kmeans_fit(x, k, seed)


def fit_centres(meta, ccfg, seed: int) -> tuple[Any, int]:
    """(k-means centres on a deterministic sample of the rows without a listed category, None if there are
    none; how many rows have no listed category). The sample (the curate.balance.sample_size rows of smallest
    seeded priority) is selected by Ray Data where the rows are, and the fit runs in one Ray task reserving
    balance.kmeans_peak_bytes: nothing of the sample reaches the driver but the centres."""
    import ray
    from ray.data.expressions import col

    bcfg = ccfg.balance
    n = column_sums(meta, ["unlabelled"])["unlabelled"]
    if n == 0:
        return None, 0
    want = min(n, bcfg.sample_size)
    rate = sample_rate(want, n)
    while True:
        threshold = min(2**63 - 1, int(rate * 2**63))
        sample = (meta.filter(expr=col("unlabelled") == 1).select_columns(["id", "embedding"])
                  .map_batches(balance.add_priority, fn_kwargs={"seed": seed, "purpose": "kmeans-sample"},
                               batch_format="pyarrow", **dedup.block_task_memory())
                  .filter(expr=col("prio") <= threshold)
                  .materialize())
        got = sample.count()
        if got >= want or rate >= 1.0:
            break
        rate = min(1.0, 2 * rate)  # too few passed the threshold (about once in a billion runs): a larger share
    refs = sample.to_arrow_refs()
    dim = ray.get(dedup._submit(_embedding_dim, tuple(refs), memory=0))
    k = min(bcfg.num_clusters, want)
    cpus = min(bcfg.kmeans_num_cpus, dedup.node_caps(fresh=True)[1] or bcfg.kmeans_num_cpus)
    task = dedup._submit(_kmeans_task, (want, k, seed, max(1, int(cpus)), *refs),
                         memory=balance.kmeans_peak_bytes(want, dim, k), num_cpus=cpus)
    centres = ray.get(task)
    del sample, refs
    log(f"[curate] balance: k-means with k={len(centres)} on the {bcfg.embedding} embedding (dim {dim}) "
        f"fitted on {want} of {n} unlabelled rows")
    return centres, n


def _embedding_dim(*blocks) -> int:
    for b in blocks:
        if b.num_rows:
            return len(b["embedding"][0])
    return 0


@probe("merge_decisions")
def _merge_partition(n_cats: int, *pieces) -> pa.Table:
    """One partition of the category records left-joined with the duplicate records on (unit, row), vectorised:
    a row with a duplicate record takes its duplicate_of and drop_reason, and keeps its category."""
    def concat(ts):
        return pa.concat_tables(list(ts)) if ts else writer.DECISION_SCHEMA.empty_table()
    cats = concat(pieces[:n_cats]).drop_columns(["duplicate_of", "drop_reason"])
    dups = concat(pieces[n_cats:]).select(["unit", "row", "duplicate_of"])
    if cats.num_rows == 0:
        return writer.DECISION_SCHEMA.empty_table()
    j = cats.join(dups, keys=["unit", "row"], join_type="left outer", use_threads=False)
    reason = pc.if_else(pc.is_valid(j["duplicate_of"]), pa.scalar("duplicate"), pa.scalar(None, pa.string()))
    return j.append_column("drop_reason", reason).select(writer.DECISION_SCHEMA.names).cast(
        writer.DECISION_SCHEMA)


def merge_decisions(cats, dup_decisions, parts: int):
    """Category records joined with the duplicate records by (unit, row): one hash-partition pass by unit over
    both (Ray tasks), a pyarrow join per partition; no call per row, nothing gathered on the driver."""
    import ray
    import ray.data

    cat_refs = cats.materialize().to_arrow_refs()
    dup_refs = dup_decisions.materialize().to_arrow_refs()
    cat_sizes, dup_sizes = dedup.block_sizes(cat_refs), dedup.block_sizes(dup_refs)
    cat_parts, cat_rows = dedup.hash_shuffle(cat_refs, None, "unit", parts, "string", [b for _, b in cat_sizes])
    dup_parts, dup_rows = dedup.hash_shuffle(dup_refs, None, "unit", parts, "string", [b for _, b in dup_sizes])
    row_bytes = max(1, sum(b for _, b in cat_sizes + dup_sizes)) / max(1, sum(r for r, _ in cat_sizes + dup_sizes))
    out = [dedup._submit(_merge_partition, (len(c), *c, *d),
                         memory=dedup.partition_peak_bytes((cat_rows[p] + dup_rows[p]) * row_bytes))
           for p, (c, d) in enumerate(zip(cat_parts, dup_parts))]
    return ray.data.from_arrow_refs(out)


def _category_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table({
        "unit": batch["unit"], "row": batch["row"], "kind": pa.array([writer.KIND_DECISION] * n, pa.int8()),
        "id": batch["id"], "category": batch["category"], "category_source": batch["category_source"],
        "duplicate_of": pa.nulls(n, pa.string()), "drop_reason": pa.nulls(n, pa.string()),
        "ledger_gen": pa.nulls(n, pa.int32()),
    }, schema=writer.DECISION_SCHEMA)


@probe("cap_count")
def _cap_count_task(block: pa.Table) -> dict:
    return balance.category_counts(block)


@probe("cap_candidates")
def _cap_candidates_task(block: pa.Table, limits: pa.Table):
    cand = balance.cap_candidates(block, limits)
    return cand, cand.num_rows


@probe("cap_threshold")
def _cap_threshold_task(cap: int, *pieces) -> pa.Table:
    return balance.cap_thresholds(dedup._concat(list(pieces)), cap)


@probe("cap_apply")
def _cap_apply_task(block: pa.Table, thresholds: pa.Table) -> pa.Table:
    if block.num_rows == 0:
        return writer.DECISION_SCHEMA.empty_table()
    return balance.apply_caps(block, thresholds).select(writer.DECISION_SCHEMA.names).cast(writer.DECISION_SCHEMA)


def apply_category_cap(singles, cap: int, parts: int):
    """The per-category cap over the rows without a drop reason (with their "prio"), as Ray tasks over its blocks
    (balance: counts per block, candidates under a priority limit shuffled by category, the exact cap-th
    (prio, id) per category, then every block marked): no task holds a whole category, only counters per
    category reach the driver. Returns block references of DECISION_SCHEMA rows."""
    import ray

    refs = singles.to_arrow_refs()
    sizes = dedup.block_sizes(refs)
    mem = [balance.cap_peak_bytes(b) for _, b in sizes]
    counts: Counter = Counter()
    for part in ray.get([dedup._submit(_cap_count_task, (r,), memory=m) for r, m in zip(refs, mem)]):
        counts.update(part)
    over = {c: n for c, n in counts.items() if n > cap}
    thresholds = balance.THRESHOLD_SCHEMA.empty_table()
    while over:
        limits = pa.table({"category": list(over), "limit": [balance.prio_limit(cap, n) for n in over.values()]})
        lim_ref = ray.put(limits)
        cand = [dedup._submit(_cap_candidates_task, (r, lim_ref), num_returns=2, memory=m) for r, m in zip(refs, mem)]
        rows = ray.get([c[1] for c in cand])
        row_bytes = 8 + 40 + 40  # prio, id, category (offsets included)
        pieces, prow = dedup.hash_shuffle([c[0] for c in cand], None, "category", parts, "string",
                                          [r * row_bytes for r in rows])
        found = pa.concat_tables(ray.get([
            dedup._submit(_cap_threshold_task, (cap, *pieces[p]), memory=balance.cap_peak_bytes(prow[p] * row_bytes))
            for p in range(parts)]))
        short = pc.less(found["candidates"], cap)
        thresholds = pa.concat_tables([thresholds, found.filter(pc.invert(short))])
        again = set(found.filter(short)["category"].to_pylist())  # a limit too low: about once in a billion
        over = {c: max(1, n // 2) for c, n in over.items() if c in again}  # n halved: twice the share under it
    thr_ref = ray.put(thresholds)
    return [dedup._submit(_cap_apply_task, (r, thr_ref), memory=m) for r, m in zip(refs, mem)]


def stage_balance(meta, dup_decisions, centres, ccfg, seed: int):
    """All per-row decisions (duplicate / category_cap / kept with its category) as a Ray Dataset."""
    import ray.data
    from ray.data.expressions import col

    block = ray.data.DataContext.get_current().target_max_block_size or 128 * 2**20
    k = len(centres) if centres is not None else 0
    cats = (meta.select_columns(["unit", "row", "id", "list_category", "embedding"])
            .map_batches(balance.assign_categories, fn_kwargs={"centres": centres}, batch_format="pyarrow",
                         **dedup._reserve(balance.assign_peak_bytes(block // 4, 1, k)))
            .map_batches(_category_rows, batch_format="pyarrow", **dedup.block_task_memory()))
    cap_can_bind = ccfg.balance.enabled and meta.count() > ccfg.balance.per_category_cap
    if not cap_can_bind:  # no category can exceed t: the writer merges category and duplicate records by row
        return cats if dup_decisions is None else cats.union(dup_decisions)
    if dup_decisions is not None:
        merged = merge_decisions(cats, dup_decisions, partitions(meta.count()))
    else:
        merged = cats
    merged = merged.materialize()
    dups = merged.filter(expr=col("drop_reason") == "duplicate")
    singles = (merged.filter(expr=col("drop_reason").is_null())
               .map_batches(balance.add_priority, fn_kwargs={"seed": seed, "purpose": "balance"},
                            batch_format="pyarrow", **dedup.block_task_memory())
               .materialize())
    capped = apply_category_cap(singles, ccfg.balance.per_category_cap, partitions(meta.count()))
    return dups.union(ray.data.from_arrow_refs(capped))


# ------------------------------------------------------------------------------------------- write

def stage_write(decisions, keys: list[str], gens: dict[str, int], ccfg, fingerprint: str):
    import ray.data

    markers = ray.data.from_arrow(pa.table({
        "unit": keys, "row": pa.array([-1] * len(keys), pa.int32()),
        "ledger_gen": pa.array([gens[k] for k in keys], pa.int32()),
        "kind": pa.array([writer.KIND_MARKER] * len(keys), pa.int8()), "id": pa.nulls(len(keys), pa.string()),
        "category": pa.nulls(len(keys), pa.string()), "category_source": pa.nulls(len(keys), pa.string()),
        "duplicate_of": pa.nulls(len(keys), pa.string()), "drop_reason": pa.nulls(len(keys), pa.string()),
    }, schema=writer.DECISION_SCHEMA))
    allrows = markers if decisions is None else markers.union(decisions)
    return allrows.groupby("unit", num_partitions=partitions(len(keys), 64)).map_groups(
        writer.write_unit_shard, fn_kwargs={"output": ccfg.output, "endpoint_url": ccfg.s3_endpoint_url,
                                            "fingerprint": fingerprint}, batch_format="pyarrow",
        **dedup._reserve(writer.write_task_memory(ccfg)))


def remove_stale_shards(ccfg, keys: list[str]) -> int:
    """Delete final shards of blocks no longer in the plan, and shards without their stats JSON (the commit
    marker, written last: a shard without one was cut off by a kill; the writer makes it again)."""
    ep = ccfg.s3_endpoint_url
    want = {f"part-{k}" for k in keys}
    removed = 0
    files = storage.list_files(storage.join(ccfg.output, SHARDS_DIR), endpoint_url=ep)
    present = set(files)
    for f in files:
        name = Path(f).name
        stem = name.split(".", 1)[0]
        uncommitted = name.endswith(".parquet") and f[:-len(".parquet")] + ".stats.json" not in present
        if stem not in want or uncommitted:
            storage.delete(f, ep)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------- job

def _merge_counts(total: dict, part: dict) -> None:
    for k, v in part.items():
        if k in ("unit", "fingerprint") or isinstance(v, str):
            continue
        if isinstance(v, dict):
            _merge_counts(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def run(cfg) -> dict:
    import ray.data

    from jobkit.ray_env import init_ray

    ccfg = cfg.curate
    if not ccfg.sources:
        raise ValueError("curate.sources is empty: give URL lists, folders or s3:// prefixes")
    semantic = ccfg.balance.enabled and ccfg.balance.embedding == "semantic"
    if semantic:
        check_semantic_weights(cfg.semantic)
    init_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    for attempt in range(1, ccfg.max_attempts + 1):
        try:
            return run_stages(cfg, semantic)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lost node, worker or actor
            if attempt == ccfg.max_attempts or not lost_cluster_resource(exc):
                raise
            log(f"[curate] attempt {attempt} of {ccfg.max_attempts} lost part of the cluster "
                f"({type(exc).__name__}); running again: finished blocks and shards are kept")
    raise AssertionError("unreachable")


# Ray errors that mean "part of the cluster went away", not "this job's code failed": matched by type
# (ray.exceptions). Ray Data may hand them over wrapped in an exception that keeps only the original's text
# ("... Original exception: ray.exceptions.ActorDiedError: ..."), so a message naming one of them counts too.
_LOST = ("ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError",
         "ActorUnavailableError", "LocalRayletDiedError")


def lost_cluster_resource(exc: BaseException) -> bool:
    import ray.exceptions

    types = tuple(getattr(ray.exceptions, name) for name in _LOST if hasattr(ray.exceptions, name))
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, types):
            return True
        text = str(exc)  # a wrapped one names its original as ray.exceptions.<Name>
        if "node has died" in text or any(f"ray.exceptions.{name}" in text for name in _LOST):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def set_shuffle(name: str) -> None:
    """The shuffle strategy of this driver's Ray Data group-bys (curate.shuffle)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    strategy = {"sort": ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, "hash": ShuffleStrategy.SHUFFLE_V2}[name]
    ray.data.DataContext.get_current().shuffle_strategy = strategy


def stage_plan(ccfg) -> tuple[list[Unit], list[str]]:
    """The input blocks of every source and their keys (the names of their ledgers and shards)."""
    storage.makedirs(ccfg.output, ccfg.s3_endpoint_url)
    units = plan_units(ccfg.sources, ccfg.rows_per_shard, ccfg.s3_endpoint_url, columns=ccfg.columns,
                       workdir=storage.join(ccfg.output, LISTING_DIR), runner=ray_runner)
    salt = stage1_salt(ccfg)
    keys = [u.key(salt) for u in units]
    if len(set(keys)) != len(keys):
        dupes = [k for k, n in Counter(keys).items() if n > 1]
        raise ValueError(f"the same input block appears twice in curate.sources (block {dupes[0]})")
    kinds = Counter(u.kind for u in units)
    log(f"[curate] plan: {len(units)} input blocks ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) "
        f"from {len(ccfg.sources)} sources -> {ccfg.output}")
    return units, keys


def stage2_begin(cfg, keys: list[str], semantic: bool) -> tuple[dict[str, int], str, int]:
    """(the ledger generation of every block, stage 2's fingerprint, stale shards removed). Each final shard
    records the fingerprint it was made with; only shards with this one are skipped."""
    ccfg, ep = cfg.curate, cfg.curate.s3_endpoint_url
    gens, _, _ = scan_stage1(ccfg.output, ep)
    missing = [k for k in keys if k not in gens]
    if missing:
        raise RuntimeError(f"stage 1 left {len(missing)} blocks without a ledger (e.g. {missing[0]})")
    gens = {k: gens[k] for k in keys}
    fp2 = _fingerprint(sorted(keys), asdict(ccfg.dedup), asdict(ccfg.balance), cfg.run.seed, SCHEMA_VERSION,
                       asdict(cfg.semantic) if semantic else None, sorted((k, g) for k, g in gens.items() if g))
    storage.write_bytes_atomic(storage.join(ccfg.output, "_stage2.json"),
                               json.dumps({"fingerprint": fp2, "blocks": len(keys)}).encode(), ep)
    return gens, fp2, remove_stale_shards(ccfg, keys)


def read_ok_rows(cfg, keys: list[str], gens: dict[str, int], semantic: bool) -> tuple[Any, int]:
    """(the rows that passed stage 1, with node keys and the unlabelled flag, materialised; their count)."""
    import ray.data
    from ray.data.expressions import col

    ccfg, ep = cfg.curate, cfg.curate.s3_endpoint_url
    if not keys:
        return None, 0
    fs, _ = storage.open_fs(ccfg.output, ep)
    paths = [storage.open_fs(ledger_uri(ccfg.output, k, gens[k]), ep)[1] for k in keys]
    meta = (ray.data.read_parquet(paths, filesystem=fs, **dedup.block_task_memory())
            .select_columns(STAGE1_COLUMNS + (["image"] if semantic else []))
            .filter(expr=col("reason") == "ok")  # right after the read: pushed into the Parquet scan
            .map_batches(dedup.add_node_keys, fn_kwargs={"unit_order": {k: i for i, k in enumerate(keys)}},
                         batch_format="pyarrow", **dedup.block_task_memory())
            .map_batches(_flag_unlabelled, batch_format="pyarrow", **dedup.block_task_memory()))
    if semantic:
        meta = stage_semantic_embed(meta, cfg)
    meta = meta.materialize()
    return meta, meta.count()


def stage_decide(cfg, meta) -> tuple[Any, dict]:
    """(every row's decision: duplicate, category cap or kept with its category; the counters for the summary)."""
    ccfg = cfg.curate
    info: dict = {}
    dups = centres = None
    if ccfg.dedup.enabled:
        dups, info = stage_dedup(meta, ccfg)
    if ccfg.balance.enabled:
        centres, info["unlabelled"] = fit_centres(meta, ccfg, cfg.run.seed)
    return stage_balance(meta, dups, centres, ccfg, cfg.run.seed), info


def write_all(decisions, keys: list[str], gens: dict[str, int], ccfg, fp2: str) -> tuple[dict, int, int]:
    """(the shards' summed stats, shards written, shards skipped as already made with this fingerprint)."""
    totals: dict = {}
    written = skipped = 0
    for res in stage_write(decisions, keys, gens, ccfg, fp2).iter_rows():
        _merge_counts(totals, json.loads(res["stats"]))
        written += not res["skipped"]
        skipped += bool(res["skipped"])
        if ccfg.fail_after_shards and written >= ccfg.fail_after_shards:
            raise FaultInjected(f"fail_after_shards={ccfg.fail_after_shards} reached")
    return totals, written, skipped


def make_summary(ccfg, keys: list[str], s1: dict, totals: dict, written: int, skipped: int, info: dict,
                 t0: float, t1: float, t2: float) -> dict:
    summary = {
        "schema_version": SCHEMA_VERSION, "output": ccfg.output, "blocks": len(keys),
        "stage1_blocks_run": s1["blocks_run"], "stage1_blocks_skipped": s1["blocks_skipped"],
        "stage1_blocks_retried": s1["blocks_retried"], "urls_retried": s1["urls_retried"],
        "retry_blocks_changed": s1["retry_blocks_changed"],
        "shards_written": written, "shards_skipped": skipped,
        "seen": totals.get("seen", 0), "fetched": totals.get("fetched", 0), "ok": totals.get("ok", 0),
        "failed": totals.get("failed", {}), "filtered": totals.get("filtered", {}),
        "duplicates": totals.get("duplicates", 0), "capped": totals.get("capped", 0), "kept": totals.get("kept", 0),
        "kept_by_category": dict(sorted(totals.get("kept_by_category", {}).items())),
        "ok_by_declared_type": dict(sorted(totals.get("ok_by_declared_type", {}).items())),  # how often servers declare the wrong type
        **info,
        "seconds": {"stage1": round(t1 - t0, 3), "stage2": round(t2 - t1, 3), "total": round(t2 - t0, 3)},
    }
    summary["throughput_images_per_s"] = round(summary["seen"] / max(t2 - t0, 1e-9), 3)
    summary["stage1_images_per_s"] = round(
        summary["seen"] / max(t1 - t0, 1e-9), 3) if s1["blocks_run"] == len(keys) else None
    return summary


def run_stages(cfg, semantic: bool) -> dict:
    """plan -> stage 1 -> dedup -> embed -> balance -> write; every finished piece is on storage, so a repeat
    after a failure redoes only what is missing."""
    ccfg = cfg.curate
    t0 = time.perf_counter()
    set_shuffle(ccfg.shuffle)
    units, keys = stage_plan(ccfg)
    s1 = stage_fetch_analyse(units, keys, ccfg)
    t1 = time.perf_counter()
    # stage 2: dedup + balance from the ledgers (written by other processes: scan_stage1 lists afresh)
    gens, fp2, stale = stage2_begin(cfg, keys, semantic)
    meta, n_ok = read_ok_rows(cfg, keys, gens, semantic)
    decisions, info = stage_decide(cfg, meta) if n_ok else (None, {})
    totals, written, skipped = write_all(decisions, keys, gens, ccfg, fp2)
    summary = make_summary(ccfg, keys, s1, totals, written, skipped, {"stale_shards_removed": stale, **info},
                           t0, t1, time.perf_counter())
    storage.write_bytes_atomic(storage.join(ccfg.output, SUMMARY_FILE), json.dumps(summary, indent=1).encode(),
                               ccfg.s3_endpoint_url)
    if cfg.run.mlflow.enabled:
        _track(cfg, summary)
    return summary


def _track(cfg, summary: dict) -> None:
    from jobkit.tracking import log_job_run, numeric_leaves
    from vosr.config import to_dict

    params = numeric_leaves(to_dict(cfg.curate), "curate.")
    params["curate.sources"] = ",".join(cfg.curate.sources)[:500]
    log_job_run(cfg, "curate", params, summary)


# ------------------------------------------------------------------------------------------- vosr plan
# Assumptions and measured constants of the curation plan (docs/scale.md explains each).

PLAN_URLS_PER_KEPT = 2.5      # U = 2.5 N: 40% of crawled URLs end up kept (docs/scale.md s0)
PLAN_FETCHED_PER_URL = 0.75   # ~25% of old web URLs fail to fetch
PLAN_PASSING_PER_KEPT = 1.25  # rows passing stage 1 per kept row (dedup + balance keep ~80%)
PLAN_BODY_BYTES = 400_000     # mean encoded image of a >= 512 px web image (assumption)
PLAN_URL_ROW_BYTES = 200      # a URL-list row in memory (URL, caption, a few metadata columns; assumption)
PLAN_LEDGER_ROW_BYTES = 250   # ledger metadata per URL (reason, hashes, embedding; computed from STAGE1_SCHEMA)
PLAN_SHARD_ROW_BYTES = 300    # curated shard metadata per row besides the image bytes
STAGE1_CPU_S_PER_MP = 0.070   # measured: benchmarks/bench_stage1_cpu.py, 70 ms CPU per megapixel
PLAN_MEGAPIXELS = 1.5         # mean size of a fetched web image with short side >= 512 (assumption)
STAGE2_CPU_S_PER_ROW = 90e-6  # stage-2 search + components + balance at ~125M rows (docs/scale.md s2)
DRIVER_BASE_BYTES = 1 << 30   # the driver with Ray and the job's imports
PLAN_ACTIVE_DOMAINS = 1_000_000  # domains one gate actor keeps state for at once (assumption; pruned after 60 s)
GATE_BYTES_PER_DOMAIN = 400
PLAN_BLOCK_BYTES = 128 * 2**20  # Ray Data's DataContext.target_max_block_size default (stage 2's blocks)


def plan_stages(cfg, images: int) -> list:
    """`vosr plan` entries of the curation job for `images` kept images (jobkit/plan.py)."""
    from jobkit.plan import Proc, Stage, ceil_div, gib, hours
    from pipelines.curation import listing
    from pipelines.curation.analysis import EMBED_DIM
    from pipelines.curation.sources import rechunk_peak_bytes

    cc = cfg.curate
    urls = int(images * PLAN_URLS_PER_KEPT)
    fetched = int(urls * PLAN_FETCHED_PER_URL)
    passing = int(images * PLAN_PASSING_PER_KEPT)
    blocks = ceil_div(urls, cc.rows_per_shard)
    driver = DRIVER_BASE_BYTES + listing.listing_peak_bytes(blocks)
    gate = PLAN_ACTIVE_DOMAINS * GATE_BYTES_PER_DOMAIN // max(1, cc.crawl.gate_actors) + (256 << 20)
    parts = partitions(passing)
    pieces = dedup.shuffle_pieces(passing * dedup.ROW_BYTES["key_phash"], parts)
    block = PLAN_BLOCK_BYTES
    map_in = parts * dedup.SHUFFLE_PIECE_BYTES + block  # blocks gathered up to parts x piece bytes, plus the last
    part_bytes = passing // parts * dedup.ROW_BYTES["star"]
    task_hashes = min(passing, cc.dedup.search_task_hashes)
    k = cc.balance.num_clusters if cc.balance.enabled else 0
    d = (f"listing_peak_bytes: {listing.UNIT_DRIVER_BYTES} B x {blocks:,} blocks + {gib(DRIVER_BASE_BYTES)} "
         f"base")
    stages = [
        Stage("plan", [Proc("driver", driver, d, "head"),
                       Proc("task: list files", listing.listing_task_peak_bytes(cc.rows_per_shard),
                            "listing_task_peak_bytes: one manifest's paths + 96 MiB", reserved=True),
                       Proc("task: re-chunk URL list", rechunk_peak_bytes(cc.rows_per_shard, PLAN_URL_ROW_BYTES),
                            f"rechunk_peak_bytes: 64 MiB + 6 x {cc.rows_per_shard} rows x {PLAN_URL_ROW_BYTES} B",
                            reserved=True)],
              note=f"{urls:,} URLs in {blocks:,} blocks"),
        Stage("stage 1", [Proc("task: block", stage1_peak_bytes(cc),
                               f"stage1_peak_bytes: (crawl.concurrency {cc.crawl.concurrency} + 1) x max_bytes + "
                               f"3 x stage1_buffer_mb + 6 B x max_pixels", reserved=True),
                          Proc("actor: domain gate", gate, f"{GATE_BYTES_PER_DOMAIN} B x {PLAN_ACTIVE_DOMAINS:,} "
                                                           f"active domains / {cc.crawl.gate_actors} actors",
                               "head")],
              written=urls * PLAN_LEDGER_ROW_BYTES + passing * PLAN_BODY_BYTES,
              cpu_hours=hours(fetched * STAGE1_CPU_S_PER_MP * PLAN_MEGAPIXELS),
              note=f"{fetched:,} fetched, {passing:,} pass"),
        Stage("dedup", [Proc("driver", DRIVER_BASE_BYTES + dedup.driver_peak_bytes(passing, parts),
                             f"driver_peak_bytes: {dedup.REF_BYTES} B x {pieces:,} shuffle pieces + {parts} x "
                             f"{gib(dedup.SHUFFLE_PIECE_BYTES)} + {gib(DRIVER_BASE_BYTES)} base", "head"),
                        Proc("task: shuffle map", dedup.shuffle_map_peak_bytes(map_in),
                             f"shuffle_map_peak_bytes: 3 x {gib(map_in)} of blocks + margin", reserved=True),
                        Proc("task: partition", dedup.partition_peak_bytes(part_bytes),
                             f"partition_peak_bytes: 4 x {passing // parts:,} rows x {dedup.ROW_BYTES['star']} B "
                             f"(widest pass) + margin", reserved=True),
                        Proc("task: near-duplicate search", dedup.search_task_peak_bytes(task_hashes),
                             f"search_task_peak_bytes: {dedup.SEARCH_BYTES_PER_HASH} B x {task_hashes:,} hashes "
                             f"(dedup.search_task_hashes) + margin", reserved=True),
                        Proc("task: components", dedup.components_peak_bytes(cc.dedup.local_max_edges),
                             f"components_peak_bytes: {dedup.COMPONENTS_EDGE_BYTES} B x local_max_edges "
                             f"{cc.dedup.local_max_edges:,} + margin", reserved=True)],
              cpu_hours=hours(passing * STAGE2_CPU_S_PER_ROW), note=f"{parts} partitions"),
        Stage("balance", [Proc("task: k-means fit", balance.kmeans_peak_bytes(
                                   cc.balance.sample_size, EMBED_DIM, cc.balance.num_clusters),
                               f"kmeans_peak_bytes: sample_size {cc.balance.sample_size:,} x dim {EMBED_DIM}, "
                               f"num_clusters {cc.balance.num_clusters:,}", reserved=True),
                          Proc("task: assign categories", balance.assign_peak_bytes(block // 4, 1, k),
                               f"assign_peak_bytes: a {gib(block)} block's embeddings, k {k:,}", reserved=True),
                          Proc("task: category cap", balance.cap_peak_bytes(block),
                               f"cap_peak_bytes: 4 x a {gib(block)} block + 32 MiB", reserved=True)]),
        Stage("write", [Proc("task: write shard", writer.write_task_memory(cc),
                             f"write_task_memory: 8 x {gib(writer.WRITE_SLICE_BYTES)} slices + "
                             f"{writer.WRITE_ROW_BYTES} B x {cc.rows_per_shard} rows + 2 pages + margin",
                             reserved=True)],
              written=images * (PLAN_BODY_BYTES + PLAN_SHARD_ROW_BYTES) + (urls - images) * PLAN_SHARD_ROW_BYTES),
    ]
    return stages


def main(argv: list[str] | None = None) -> int:
    from jobkit.args import job_main

    return job_main(__doc__, argv, lambda cfg, _: run(cfg), writes=["curate.output"])


if __name__ == "__main__":
    raise SystemExit(main())
