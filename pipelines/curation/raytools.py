"""Small Ray helpers shared by the curation stages (this module imports Ray; the others need not)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray


@ray.remote(num_cpus=0.1)
def _block_sums(block: pa.Table, columns: list[str]) -> dict:
    out = {}
    for c in columns:
        if c.startswith("#"):  # "#col" = number of non-null values of col
            out[c] = int(block.num_rows - block[c[1:]].null_count) if block.num_rows else 0
        else:
            out[c] = int(pc.sum(block[c]).as_py() or 0) if block.num_rows else 0
    return out


def column_sums(materialized, columns: list[str]) -> dict:
    """Sums of integer columns of a materialized Dataset, computed where its blocks live (only ints return).

    Kept over `Dataset.sum`: in Ray 2.60 that plans a hash-aggregate shuffle (aggregator actors) even for a
    global sum: 6.2-6.7 s on 16k rows and 2 CPUs, where the whole of fit_centres with these per-block tasks took
    0.6 s, and the next plan then waited on its actors (benchmarks/bench_stage2_read.py, `centres`)."""
    refs = materialized.to_arrow_refs()
    totals = dict.fromkeys(columns, 0)
    for part in ray.get([_block_sums.remote(r, columns) for r in refs]):
        for c, v in part.items():
            totals[c] += v
    return totals


def partitions(n_rows: int, rows_per_partition: int = 50_000, most: int = 200) -> int:
    """Shuffle partitions for a group-by over n_rows (few for small data: each partition has a fixed cost)."""
    return max(1, min(most, -(-max(n_rows, 1) // rows_per_partition)))
