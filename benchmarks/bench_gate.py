"""The crawl's domain gate under load: N client processes against the gate actors (pipelines/curation/politeness.py).

    .venv/bin/python benchmarks/bench_gate.py [--clients 4] [--per-client 64] [--domains 20000] [--seconds 10]
        [--hold-ms 20] [--gate-actors 2] [--rps 10] [--hot-rps 20] [--compare-root /work/main]

Two runs, each on a fresh local Ray (--cpus CPUs) with the crawl's own gate actors (politeness.start_gates):

spread  --clients Ray tasks (separate worker processes), each running --per-client requests at a time on one event
        loop, as a stage-1 block's crawler does: acquire a permit for the next domain, hold it --hold-ms (the
        request), release it. Domains are taken round-robin over --domains, so no domain is over its rate
        (per_domain_rps --rps): every wait is the gate's own overhead. Prints permits per second aggregated over
        the clients, the wait per permit (median, p99), and the actor calls made per permit.
hot     the same clients all on one domain with per_domain_rps --hot-rps: starts per second over the run and the
        most starts in any 1 s window, as ratios to --hot-rps (politeness: <= 1.1x).

Targets: spread >= 3,000 permits/s with p99 wait < 50 ms; hot <= 1.1x. --compare-root runs the same with another
checkout's politeness module (before: one actor call per permit and one per release). CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def client(gates, index: int, clients: int, per_client: int, domains: int, seconds: float, hold_s: float,
           hot: bool) -> dict:
    """One client process: per_client concurrent request loops for `seconds`; waits and start times."""
    import asyncio
    import time

    async def run() -> dict:
        waits: list[float] = []
        starts: list[float] = []
        counter = [0]
        end = time.monotonic() + seconds

        async def loop_one(k: int) -> None:
            while time.monotonic() < end:
                n = counter[0]
                counter[0] += 1
                host = "hot.example" if hot else f"d{(n * clients + index) % domains}.example"
                t0 = time.monotonic()
                lease = await gates.acquire(host)
                waits.append(time.monotonic() - t0)
                starts.append(time.time())
                await asyncio.sleep(hold_s)
                gates.release(host, lease)

        await asyncio.gather(*(loop_one(k) for k in range(per_client)))
        calls = gates.calls() if hasattr(gates, "calls") else len(waits) * 2
        return {"waits": waits, "starts": starts, "calls": calls}

    return asyncio.run(run())


def child(args) -> None:
    sys.path.insert(0, args.code_root)
    import ray

    from jobkit.config import config_from_dict
    from pipelines.curation import politeness

    ray.init(address="local", num_cpus=args.cpus, object_store_memory=100 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": args.code_root}}, log_to_driver=False)
    out = {}
    try:
        task = ray.remote(num_cpus=0)(client)
        for mode, rps in (("spread", args.rps), ("hot", args.hot_rps)):
            ccfg = config_from_dict({"curate": {"crawl": {"per_domain_rps": rps, "per_domain_concurrency": 4,
                                                          "gate_actors": args.gate_actors}}}).curate.crawl
            gates = politeness.start_gates(ccfg)
            ray.get(task.remote(gates, 0, 1, 4, 100, 1.0, 0.0, False))  # warm-up: a worker, imports, the actors
            res = ray.get([task.remote(gates, i, args.clients, args.per_client, args.domains, args.seconds,
                                       args.hold_ms / 1000, mode == "hot") for i in range(args.clients)])
            politeness.stop_gates(gates)
            waits = sorted(w for r in res for w in r["waits"])
            starts = sorted(s for r in res for s in r["starts"])
            span = starts[-1] - starts[0]
            j, window = 0, 0
            for i in range(len(starts)):  # most starts in any 1 s window (two pointers)
                while starts[i] - starts[j] >= 1.0:
                    j += 1
                window = max(window, i - j + 1)
            out[mode] = {"permits": len(waits), "seconds": span, "permits_per_s": (len(starts) - 1) / span,
                         "wait_p50_ms": 1000 * waits[len(waits) // 2],
                         "wait_p99_ms": 1000 * waits[min(len(waits) - 1, int(0.99 * len(waits)))],
                         "calls_per_permit": sum(r["calls"] for r in res) / len(waits), "max_1s_window": window,
                         "rps": rps}
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps(out))


def run_child(code_root: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--code-root", code_root]
    for k in ("clients", "per_client", "domains", "seconds", "hold_ms", "gate_actors", "rps", "hot_rps", "cpus"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ, PYTHONPATH=code_root, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code_root)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=64)
    ap.add_argument("--domains", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hold-ms", type=float, default=20.0)
    ap.add_argument("--gate-actors", type=int, default=2)
    ap.add_argument("--rps", type=float, default=10.0)
    ap.add_argument("--hot-rps", type=float, default=20.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--compare-root", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code-root", default=str(ROOT), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    roots = {"this": str(ROOT)}
    if args.compare_root:
        roots["compare"] = str(Path(args.compare_root).resolve())
    for label, code in roots.items():
        r = run_child(code, args)
        s, h = r["spread"], r["hot"]
        print(f"[{label}] spread: {args.clients} clients x {args.per_client} requests at a time over {args.domains} "
              f"domains, hold {args.hold_ms:g} ms, {args.gate_actors} gate actors: {s['permits']} permits in "
              f"{s['seconds']:.1f} s = {s['permits_per_s']:.0f} permits/s, wait p50 {s['wait_p50_ms']:.1f} ms p99 "
              f"{s['wait_p99_ms']:.1f} ms, {s['calls_per_permit']:.3f} actor calls per permit (targets >= 3000/s, "
              f"p99 < 50 ms: {'met' if s['permits_per_s'] >= 3000 and s['wait_p99_ms'] < 50 else 'NOT met'})",
              flush=True)
        print(f"[{label}] hot: one domain at per_domain_rps {h['rps']:g}: {h['permits_per_s']:.2f} starts/s = "
              f"{h['permits_per_s'] / h['rps']:.2f}x, most in a 1 s window {h['max_1s_window']} = "
              f"{h['max_1s_window'] / h['rps']:.2f}x (target <= 1.1x: "
              f"{'met' if h['max_1s_window'] <= 1.1 * h['rps'] else 'NOT met'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
