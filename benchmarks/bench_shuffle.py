"""Fixed and per-row cost of the group-by behind curate's stage 2 under both Ray Data shuffles (curate.shuffle).

Runs the stage's shape, a group-by on a string key into N partitions followed by map_groups, at three row counts
for each strategy, warm (the first call of each strategy is printed separately: it includes worker start-up),
and prints seconds, the growth exponent between sizes and the hash/sort ratio per size.

    .venv/bin/python benchmarks/bench_shuffle.py [--rows 20 20000 200000] [--partitions 16]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pyarrow as pa


def _identity(table: pa.Table) -> pa.Table:
    return table.slice(0, 1)


def one(rows: int, partitions: int) -> float:
    import ray.data

    rng = np.random.default_rng(rows)
    table = pa.table({"unit": pa.array(rng.integers(0, 4 * partitions, rows).astype(str)),
                      "id": pa.array(np.arange(rows).astype(str)), "x": rng.random(rows)})
    t = time.perf_counter()
    ds = ray.data.from_arrow(table).repartition(max(1, min(64, rows // 2000 or 1)))
    n = sum(len(b["id"]) for b in ds.groupby("unit", num_partitions=partitions)
            .map_groups(_identity, batch_format="pyarrow").iter_batches(batch_format="pyarrow"))
    assert n > 0
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs=3, default=[20, 20_000, 200_000])
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import ray
    import ray.data
    from ray.data.context import ShuffleStrategy

    ray.init(num_cpus=args.num_cpus, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    times: dict[str, list[float]] = {}
    for name, strategy in (("sort", ShuffleStrategy.SORT_SHUFFLE_PULL_BASED), ("hash", ShuffleStrategy.SHUFFLE_V2)):
        ctx.shuffle_strategy = strategy
        first = one(args.rows[0], args.partitions)
        times[name] = [one(r, args.partitions) for r in args.rows]
        print(f"{name}: first call {first:.2f} s; warm " +
              ", ".join(f"{r} rows {s:.2f} s" for r, s in zip(args.rows, times[name])), flush=True)
    print("\n| rows | sort s | hash s | hash / sort |\n|---:|---:|---:|---:|")
    for i, r in enumerate(args.rows):
        print(f"| {r} | {times['sort'][i]:.2f} | {times['hash'][i]:.2f} | {times['hash'][i] / times['sort'][i]:.1f}x |")
    for name, ts in times.items():
        a, b = args.rows[1:], ts[1:]
        print(f"{name}: growth exponent {a[0]}->{a[1]} rows: {math.log(b[1] / b[0]) / math.log(a[1] / a[0]):.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
