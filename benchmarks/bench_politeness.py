"""Per-domain politeness across parallel stage-1 blocks (target: hits per second on one domain with 4
blocks in parallel at most 1.1x crawl.per_domain_rps).

    .venv/bin/python benchmarks/bench_politeness.py [--blocks 4] [--urls-per-block 20] [--rps 10]

A loopback HTTP server records the arrival time of every request. The curate job's stage 1 runs --blocks blocks
at once on a local 2-CPU Ray (cpus_per_block 2/blocks), every URL on the one loopback domain, twice: with the
crawl-wide limiter (crawl.gate_actors = 2, the default) and with per-block limits only (gate_actors = 0, the
behaviour before). Prints, for each, the hits per second over the crawl (first to last hit), the most hits in any
1 s window, and both as ratios to per_domain_rps. CPU only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobkit.config import config_from_dict  # noqa: E402
from pipelines import curate  # noqa: E402
from pipelines.curation.sources import plan_units  # noqa: E402
from tests.helpers.http_fixture import http_server  # noqa: E402


def photo() -> Path:
    for root in (ROOT.parent / "shared" / "data" / "dev", ROOT / "assets" / "photos"):
        found = sorted(p for p in root.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if found:
            return found[0]
    raise SystemExit("no photos found")


def run_once(site, tmp: Path, blocks: int, per_block: int, rps: float, gate_actors: int, tag: str) -> dict:
    name = photo().name
    lists = []
    for b in range(blocks):
        lists.append(tmp / f"{tag}-{b}.txt")
        lists[-1].write_text("".join(f"{site.photo_url(name)}?{tag}={b}-{i}\n" for i in range(per_block)))
    cfg = config_from_dict({"run": {"mlflow": {"enabled": False}}, "curate": {
        "sources": [str(x) for x in lists], "output": str(tmp / f"out-{tag}"), "cpus_per_block": 2.0 / blocks,
        "crawl": {"allow_hosts": ["127.0.0.1"], "per_domain_rps": rps, "per_domain_concurrency": 4,
                  "gate_actors": gate_actors, "timeout_s": 10.0},
        "filters": {"min_short_side": 16}}}).curate
    units = plan_units(cfg.sources, cfg.rows_per_shard)
    start = len(site.hit_times)
    curate.stage_fetch_analyse(units, [u.key(tag) for u in units], cfg)
    times = sorted(site.hit_times[start:])
    assert len(times) == blocks * per_block, len(times)
    rate = (len(times) - 1) / max(times[-1] - times[0], 1e-9)
    window = max(sum(1 for t in times[i:] if t - times[i] < 1.0) for i in range(len(times)))
    return {"hits": len(times), "seconds": times[-1] - times[0], "rate": rate, "window": window}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--urls-per-block", type=int, default=20)
    ap.add_argument("--rps", type=float, default=10.0)
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        with tempfile.TemporaryDirectory(prefix="vosr-polite-") as tmp, http_server([photo()]) as site:
            tmp = Path(tmp)
            run_once(site, tmp, args.blocks, 2, 1000.0, 2, "warm")  # workers and imports started once
            for label, actors in (("crawl-wide limiter (gate_actors=2)", 2), ("per-block limits (gate_actors=0)", 0)):
                r = run_once(site, tmp, args.blocks, args.urls_per_block, args.rps, actors, f"g{actors}")
                print(f"{label}: {r['hits']} hits in {r['seconds']:.2f} s from {args.blocks} parallel blocks: "
                      f"{r['rate']:.2f} hits/s = {r['rate'] / args.rps:.2f}x per_domain_rps {args.rps:g}; "
                      f"max in a 1 s window {r['window']} = {r['window'] / args.rps:.2f}x", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
