"""The endpoint under an abuse mix: valid images mixed with oversize bodies (raw and chunked multipart),
non-images, slow bodies and extreme query options, at client concurrency 16, against the real Ray Serve app on
loopback. Prints per class the status codes and p50/p95 latency, and the p95 of the same valid requests sent
alone (idle) at the same concurrency, measured in the same run; then, one request at a time on a 2x larger
image, each extreme option's status and time over the default options' time.
Targets: 0 5xx, every valid request answered 200, valid p95 under the mix <= 3x idle p95; every served option
<= 3x the defaults' time (the others refused before work).

    python benchmarks/bench_serve_abuse.py                    # 200 requests, tiny random student on CPU
    python benchmarks/bench_serve_abuse.py --requests 400 --oversize-mib 60 --device cuda --gpus 1

Extreme options are the ones an attacker would pick (64 px tiles with half-tile overlap, the largest step count,
tile=0 on a large image); the server refuses them before work (422/413) or, within serve.max_cost_ratio of the
defaults, serves them. tests/test_serve.py runs a shorter mix (`run_mix`) against the suite's service.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOUNDARY = "vosr-abuse-boundary"
EXTREME_REFUSED = [{"tile": "64", "tile_overlap": "32"}, {"steps": "50"}, {"tile": "64", "steps": "2"},
                   {"steps": "4"}]
EXTREME_SERVED = [{"steps": "3"}, {"steps": "2", "color_fix": "wavelet"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def raw_post(port: int, headers: dict[str, str], first: bytes, total: int, chunk: int = 65536,
                   chunked: bool = True, pause_s: float = 0.0, path: str = "/upscale") -> tuple[int, int]:
    """POST `first` then zeros up to `total` body bytes over a raw connection (chunked, or with Content-Length),
    stopping as soon as an answer arrives. Returns (status, body bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = {"Host": "127.0.0.1", **headers}
    head.update({"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(total)})
    writer.write(("POST " + path + " HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n")
                 .encode())
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    sent, data = 0, first
    try:
        while not answer.done():
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.wait({drain, answer}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                drain.cancel()
                break
            drain.result()
            sent += len(data)
            if sent >= total:
                if chunked:
                    writer.write(b"0\r\n\r\n")
                break
            if pause_s:
                await asyncio.sleep(pause_s)
            data = b"\0" * min(chunk, total - sent)
    except (ConnectionError, OSError):
        pass
    try:
        header = await asyncio.wait_for(answer, 120)
        status = int(header.split()[1])
    except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError):
        status = 0                       # the connection closed without an answer
    writer.close()
    return status, sent


def make_bodies(photos: list[Path], sizes: list[int]) -> list[bytes]:
    from PIL import Image

    out = []
    for i, side in enumerate(sizes):
        buf = io.BytesIO()
        Image.open(photos[i % len(photos)]).convert("RGB").resize((side, side), Image.BICUBIC).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def plan_mix(requests: int, seed: int = 0) -> list[str]:
    """Class of each request: 40% valid, the rest spread over the abuse classes, shuffled with a fixed seed."""
    shares = {"valid": 0.40, "oversize_raw": 0.08, "oversize_multipart": 0.08, "non_image": 0.12,
              "slow_body": 0.08, "extreme_refused": 0.14, "extreme_served": 0.10}
    kinds = [k for k, f in shares.items() for _ in range(int(round(f * requests)))]
    kinds = (kinds + ["valid"] * requests)[:requests]
    random.Random(seed).shuffle(kinds)
    return kinds


async def run_mix(url: str, port: int, kinds: list[str], valid: list[bytes], concurrency: int, oversize: int,
                  key: str = "", big: bytes | None = None) -> dict[str, list[tuple[int, float]]]:
    """Send requests of the given classes at `concurrency`; returns class -> [(status, seconds)]."""
    import httpx

    headers = {"X-API-Key": key} if key else {}
    rng = random.Random(1)
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    sem = asyncio.Semaphore(concurrency)
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    async with httpx.AsyncClient(timeout=300, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int, kind: str):
            async with sem:
                t0 = time.perf_counter()
                if kind == "valid":
                    status = (await client.post(url, content=valid[i % len(valid)], params={"seed": i})).status_code
                elif kind == "oversize_raw":
                    status, _ = await raw_post(port, {**headers, "Content-Type": "image/png"}, b"\x89PNG", oversize)
                elif kind == "oversize_multipart":
                    status, _ = await raw_post(port, {**headers, "Content-Type":
                                                      f"multipart/form-data; boundary={BOUNDARY}"}, part, oversize)
                elif kind == "non_image":
                    body = bytes(rng.getrandbits(8) for _ in range(4096))
                    status = (await client.post(url, content=body)).status_code
                elif kind == "slow_body":
                    status, _ = await raw_post(port, {**headers, "Content-Type": "image/png"}, b"\x89PNG", 2048,
                                               chunk=16, chunked=False, pause_s=0.25)
                elif kind == "extreme_refused":
                    params = EXTREME_REFUSED[i % len(EXTREME_REFUSED)]
                    body = big if big is not None and i % 3 == 0 else valid[i % len(valid)]
                    status = (await client.post(url, content=body, params=params)).status_code
                else:  # extreme_served: the costliest options still within serve.max_cost_ratio
                    params = EXTREME_SERVED[i % len(EXTREME_SERVED)]
                    status = (await client.post(url, content=valid[i % len(valid)], params=params)).status_code
                out[kind].append((status, time.perf_counter() - t0))

        await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))
    return out


PROBE_OPTIONS = [{"steps": "2"}, {"steps": "3"}, {"steps": "4"}, {"steps": "50"}, {"tile": "1024"},
                 {"tile": "64", "tile_overlap": "0"}, {"tile": "64", "tile_overlap": "32"},
                 {"tile": "128", "tile_overlap": "64"}, {"tile": "256", "tile_overlap": "128"},
                 {"tile": "0"}, {"color_fix": "wavelet"}]


def probe_costs(url: str, body: bytes, repeats: int = 3, key: str = "") -> list[dict]:
    """Each option alone on one image, sequentially: status and median time over the defaults' median time.
    Target: every answered (200) option within 3x the defaults; the others refused (4xx) in about no time."""
    import httpx

    def median_time(params: dict) -> tuple[int, float]:
        times, status = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            status = httpx.post(url, content=body, params=params, timeout=600,
                                headers={"X-API-Key": key} if key else {}).status_code
            times.append(time.perf_counter() - t0)
        return status, statistics.median(times)

    _, base = median_time({})
    rows = [{"options": "defaults", "status": 200, "ms": round(base * 1000, 1), "ratio": 1.0}]
    for params in PROBE_OPTIONS:
        status, t = median_time(params)
        rows.append({"options": "&".join(f"{k}={v}" for k, v in params.items()), "status": status,
                     "ms": round(t * 1000, 1), "ratio": round(t / base, 2)})
    return rows


def quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(results: dict[str, list[tuple[int, float]]]) -> dict[str, dict]:
    table = {}
    for kind, rows in sorted(results.items()):
        lat = [t for _, t in rows]
        table[kind] = {"n": len(rows), "status": dict(sorted(Counter(s for s, _ in rows).items())),
                       "p50_ms": round(quantile(lat, 50) * 1000, 1), "p95_ms": round(quantile(lat, 95) * 1000, 1)}
    return table


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from inference.serve import start
    from jobkit.config import config_from_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="LR side of the valid images (output 4x)")
    p.add_argument("--oversize-mib", type=float, default=16.0, help="size of each oversize body")
    p.add_argument("--max-body-mib", type=float, default=2.0, help="serve.max_body_bytes")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--gpus", type=float, default=0.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = p.parse_args(argv)

    from bench_serve import make_student

    photos = sorted(q for q in (ROOT / "assets" / "photos").iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    valid = make_bodies(photos, [args.size] * 4)
    big = make_bodies(photos, [8 * args.size])[0]        # tile=0 on it is forced to tiles; too costly for extremes
    kinds = plan_mix(args.requests)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_from_dict({}, [
                f"inference.checkpoint={make_student(Path(tmp) / 'student')}", f"inference.device={args.device}",
                f"serve.port={port}", f"serve.replica_cpus={args.replica_cpus}", f"serve.replica_gpus={args.gpus}",
                f"serve.max_body_bytes={int(args.max_body_mib * 2**20)}", "serve.body_timeout_s=3",
                "serve.request_timeout_s=60", f"serve.max_ongoing_requests={2 * args.concurrency}",
                f"serve.max_queued_requests={2 * args.concurrency}", f"run.output_root={tmp}"])
            url = start(cfg) + "/upscale"
            n_valid = kinds.count("valid")
            asyncio.run(run_mix(url, port, ["valid"] * args.concurrency, valid, args.concurrency, 0))   # warm-up
            t0 = time.perf_counter()
            idle = asyncio.run(run_mix(url, port, ["valid"] * n_valid, valid, args.concurrency, 0))
            idle_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            mixed = asyncio.run(run_mix(url, port, kinds, valid, args.concurrency, int(args.oversize_mib * 2**20),
                                        big=big))
            mix_s = time.perf_counter() - t0
            probe = probe_costs(url, make_bodies(photos, [2 * args.size])[0])
            serve.shutdown()
    finally:
        ray.shutdown()
    table = summarise(mixed)
    idle_p95 = summarise(idle)["valid"]["p95_ms"]
    valid_rows = mixed.get("valid", [])
    five_xx = sum(n for row in table.values() for s, n in row["status"].items() if s >= 500 or s == 0)
    ratio = table["valid"]["p95_ms"] / idle_p95
    report = {"requests": args.requests, "concurrency": args.concurrency, "device": args.device,
              "lr_size": args.size, "oversize_bytes": int(args.oversize_mib * 2**20),
              "max_body_bytes": int(args.max_body_mib * 2**20), "classes": table,
              "idle_valid": {**summarise(idle)["valid"], "seconds": round(idle_s, 2)},
              "mix_seconds": round(mix_s, 2), "five_xx_or_no_answer": five_xx,
              "valid_all_200": all(s == 200 for s, _ in valid_rows),
              "valid_p95_over_idle_p95": round(ratio, 2),
              "meets_target": five_xx == 0 and all(s == 200 for s, _ in valid_rows) and ratio <= 3.0,
              "option_cost_probe": probe,
              "max_served_option_ratio": max(r["ratio"] for r in probe if r["status"] == 200)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
