"""Bytes read per unit of a Parquet URL list written with huge row groups (LAION's files hold ~1M-row groups):
before (a unit reads every row group it overlaps: the whole 1M-row group) and after (a unit reads its own
re-chunked file, made once per large row group by a streaming task; pipelines/curation/sources.py).

    .venv/bin/python benchmarks/bench_url_list_read.py [--rows 1000000] [--rows-per-unit 4096]

The list: --rows LAION-like rows (URL ~90 chars, TEXT ~60 chars, WIDTH, HEIGHT, similarity) in ONE row group,
zstd. "The unit's own bytes" is its share of the compressed bytes of the columns a unit reads (URL, WIDTH, HEIGHT)
in the source file: rows_per_unit / rows of them. Bytes read are the process's read() bytes (/proc/self/io rchar)
around each read, from a local file (page cache or not, the bytes asked of the filesystem). Prints, for the first,
middle and last unit: bytes read before and after, each as a multiple of the unit's own bytes; then the one-off
re-chunking: seconds, bytes read and written, and its peak RSS growth against its stated bound
(sources.rechunk_peak_bytes). Target: after < 2x. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.curation.sources import Unit, _row_bytes, plan_units, read_items, rechunk_peak_bytes  # noqa: E402


def io_counters() -> tuple[int, int]:
    vals = dict(line.split(":") for line in open("/proc/self/io"))
    return int(vals["rchar"]), int(vals["wchar"])


def rss_reset() -> int:
    open("/proc/self/clear_refs", "w").write("5")   # resets VmHWM to the current RSS (proc(5))
    return _status("VmRSS")


def _status(key: str) -> int:
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key + ":")) * 1024


def write_list(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    urls = [f"https://img{i % 997}.example.com/photos/{rng.integers(1 << 44):x}/{i}-a-longer-path-segment.jpg"
            for i in range(n)]
    text = [f"a photo of row {i}, with a caption of some words" for i in range(n)]
    pq.write_table(pa.table({"URL": urls, "TEXT": text, "WIDTH": rng.integers(100, 3000, n).astype(np.int32),
                             "HEIGHT": rng.integers(100, 3000, n).astype(np.int32),
                             "similarity": rng.random(n).astype(np.float32)}),
                   path, row_group_size=n, compression="zstd")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-per-unit", type=int, default=4096)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-url-list-"))
    try:
        src = work / "laion-part-00000.parquet"
        write_list(src, args.rows)
        meta = pq.ParquetFile(src).metadata
        rg = meta.row_group(0)
        used = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                   if rg.column(c).path_in_schema in ("URL", "WIDTH", "HEIGHT"))
        own = used * args.rows_per_unit / args.rows
        print(f"list: {args.rows} rows in {meta.num_row_groups} row group(s), {src.stat().st_size / 2**20:.1f} MiB; "
              f"rows_per_unit {args.rows_per_unit}; a unit's own bytes {own / 1024:.1f} KiB")

        base = rss_reset()
        r0, w0 = io_counters()
        t0 = time.perf_counter()
        units = plan_units([str(src)], args.rows_per_unit, workdir=str(work / "work"))
        took = time.perf_counter() - t0
        r1, w1 = io_counters()
        peak = _status("VmHWM") - base
        bound = rechunk_peak_bytes(args.rows_per_unit, _row_bytes(meta, [0], ["URL", "WIDTH", "HEIGHT"]))
        print(f"re-chunking (once): {took:.2f} s, read {(r1 - r0) / 2**20:.1f} MiB, wrote {(w1 - w0) / 2**20:.1f} MiB "
              f"into {len(units)} unit files; peak RSS growth {peak / 2**20:.0f} MiB (stated bound "
              f"{bound / 2**20:.0f} MiB)")
        worst_after = 0.0
        for name, unit in (("first", units[0]), ("middle", units[len(units) // 2]), ("last", units[-1])):
            whole = Unit(kind="parquet", uri=unit.uri, start=unit.start, end=unit.end, size=unit.size,
                         cols=unit.cols)
            share = own * (unit.end - unit.start) / args.rows_per_unit
            out = {}
            for tag, u in (("before", whole), ("after", unit)):
                list(read_items(u))                     # warm
                r0, _ = io_counters()
                got = [it.source for it in read_items(u)]
                out[tag] = io_counters()[0] - r0
                assert len(got) == unit.end - unit.start
            worst_after = max(worst_after, out["after"] / share)
            print(f"{name:6s} unit rows {unit.start}-{unit.end}: before {out['before'] / 2**20:7.2f} MiB "
                  f"({out['before'] / share:6.1f}x), after {out['after'] / 1024:7.1f} KiB ({out['after'] / share:.2f}x)")
        print(f"worst after: {worst_after:.2f}x the unit's own bytes (target < 2x)")
        return 0 if worst_after < 2 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
