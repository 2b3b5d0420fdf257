"""Stage-1 peak memory of one block against its number of rows (target: a 4096-row block of 2 MiB bodies
stays under a stated peak, whatever rows_per_shard is).

    .venv/bin/python benchmarks/bench_stage1_memory.py [--rows 256 1024 4096] [--body-mib 2]

A loopback HTTP server serves one PNG padded to --body-mib MiB (a 32x32 image plus a text chunk, so decoding is
cheap and the body size is what the ledger holds). For each size a fresh process runs stage 1 on one block of
that many URLs (crawl concurrency 32, stage1_buffer_mb 64, max_bytes 20 MiB: the shipped defaults) and reports its
peak RSS growth over its RSS before the block (ru_maxrss). Prints the growth per size, the stated bound
(stage1.stage1_peak_bytes) and the growth exponent of peak vs rows (0 = flat). The ledger goes to a temporary
folder (rows x body bytes of disk). CPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.http_fixture import http_server  # noqa: E402

PROBE = r"""
import json, resource, sys
from pipelines.curation.sources import plan_units
from pipelines.curation.stage1 import run_unit, stage1_peak_bytes
from jobkit.config import config_from_dict
listing, warm, out, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = config_from_dict({"curate": {"sources": [listing], "output": out, "rows_per_shard": 2 * rows,
    "crawl": {"allow_hosts": ["127.0.0.1"], "per_domain_rps": 100000.0, "per_domain_concurrency": 64},
    "filters": {"min_short_side": 16}}}).curate
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
run_unit(plan_units([warm], 100)[0], "warmup", cfg)
unit, = plan_units([listing], 2 * rows)
before = rss()
# reset the high-water mark so the peak is the block's own, not the warm-up's or the imports' (Linux: "5" to
# clear_refs resets VmHWM, proc(5)), as tests/test_curate_crawl.py does
open("/proc/self/clear_refs", "w").write("5")
res = run_unit(unit, "probe", cfg)
peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) * 1024
print(json.dumps({"before": before, "peak": peak, "bound": stage1_peak_bytes(cfg), "stats": json.loads(res["stats"])}))
"""


def padded_png(path: Path, mib: float) -> None:
    import numpy as np
    from PIL import Image, PngImagePlugin

    n = int(mib * 2**20)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("pad", random.Random(0).randbytes(n // 2 + 1).hex()[:n])
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, pnginfo=meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--body-mib", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vosr-s1mem-") as tmp:
        tmp = Path(tmp)
        photo = tmp / "body.png"
        padded_png(photo, args.body_mib)
        body = photo.stat().st_size
        results = []
        with http_server([photo]) as site:
            warm = tmp / "warm.txt"
            warm.write_text("".join(f"{site.photo_url('body.png')}?w={i}\n" for i in range(4)))
            for rows in args.rows:
                listing = tmp / f"urls-{rows}.txt"
                listing.write_text("".join(f"{site.photo_url('body.png')}?i={i}\n" for i in range(rows)))
                out = tmp / f"out-{rows}"
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                proc = subprocess.run([sys.executable, "-c", PROBE, str(listing), str(warm), str(out), str(rows)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                assert got["stats"]["ok"] == rows, got["stats"]
                growth = got["peak"] - got["before"]
                results.append((rows, growth))
                print(f"rows {rows:5d}  block {rows * body / 2**20:8.0f} MiB  peak RSS growth {growth / 2**20:7.1f} MiB"
                      f"  stated bound {got['bound'] / 2**20:7.0f} MiB  within: {growth <= got['bound']}", flush=True)
                for f in out.rglob("*"):
                    if f.is_file():
                        f.unlink()
    (r0, g0), (r1, g1) = results[0], results[-1]
    if len(results) > 1 and g0 > 0 and g1 > 0:
        print(f"growth exponent of peak vs rows ({r0} -> {r1}): {math.log(g1 / g0) / math.log(r1 / r0):.3f}")


if __name__ == "__main__":
    main()
