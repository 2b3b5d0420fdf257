"""Ray Serve throughput with dynamic batching (inference/serve/batching.py, max_batch_size 8) vs without
(max_batch_size 1) at client concurrency 8, with p50 / p99 latency; both applications run side by side in one local
Ray and are measured in one run.
Target: batched throughput >= 1.5x unbatched, 0 errors.

    python benchmarks/bench_serve.py                       # tiny random student on CPU, 64 px LR -> 256 px
    python benchmarks/bench_serve.py --size 32             # 32 px LR -> 128 px
    python benchmarks/bench_serve.py --requests 400 --size 32 --device cuda --gpus 0.5     # on a GPU machine

Where the time goes, per request and per process (CPU time from /proc, so that other load on the machine does not
inflate it): the HTTP proxy, the ingress replica (HTTP, body, decoding, PNG encoding), the model replica (batching
and the forward pass) and this client; the model replica's own account of its batches (batch sizes, seconds in the
forward pass, seconds waiting for a batch to fill) from /healthz. The model replica runs one forward pass at a time
on --replica-cpus torch threads, so its CPU per request bounds the throughput: batching pays only as much as it
lowers that. Before serving, `model_only` times the model alone in this process at batch 1 and at --max-batch:
their ratio is the ceiling of any batching policy on this device.

The student is a tiny random-weight checkpoint saved and loaded like a real one. Each replica gets
--replica-cpus CPUs and as many torch threads; the local Ray gets --num-cpus.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_student(folder: Path) -> str:
    import torch

    from jobkit.config import config_from_dict
    from vosr.checkpoint import save_checkpoint
    from vosr.model import build_dit

    cfg = config_from_dict({})
    torch.manual_seed(0)
    model = build_dit(cfg, student=True)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)
    save_checkpoint(str(folder), cfg, model)
    return str(folder)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a local process (Linux /proc), all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def serve_pids(app: str) -> dict[str, int]:
    """role -> pid of the proxy and of this application's replicas (Ray's named-actor API)."""
    import ray

    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith("SERVE_REPLICA::"):
            app_name, deployment = name.split("::", 1)[1].split("#")[:2]
            if app_name != app:
                continue
            role = deployment
        elif name.startswith("SERVE_PROXY_ACTOR"):
            role = "proxy"
        else:
            continue
        handle = ray.get_actor(name, namespace=entry["namespace"])
        out[role] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return out


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int):
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url, content=bodies[i % len(bodies)], params={"seed": i})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"requests": requests, "errors": errors, "seconds": round(wall, 3),
            "throughput_rps": round(requests / wall, 2), "p50_ms": round(q[49] * 1000, 1),
            "p99_ms": round(q[98] * 1000, 1)}


def model_account(base: str) -> dict:
    import httpx

    info = httpx.get(f"{base}/healthz", timeout=60).json()
    return {"batch_sizes": info.get("batch_sizes", {}), "time": info.get("model_time", {})}


def measure(name: str, base: str, bodies: list[bytes], args) -> dict:
    """One measured run of an application: load figures, CPU ms per request per process, the model's account."""
    pids = serve_pids(name)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    client_before = time.process_time()
    account_before = model_account(base)
    result = asyncio.run(load(f"{base}/upscale", bodies, args.requests, args.concurrency))
    client_s = time.process_time() - client_before
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    account_after = model_account(base)
    n = args.requests
    cpu = {k: round((after[k] - before[k]) * 1000 / n, 2) for k in pids}
    cpu["client"] = round(client_s * 1000 / n, 2)
    sizes = {k: v - account_before["batch_sizes"].get(k, 0) for k, v in account_after["batch_sizes"].items()}
    sizes = {k: v for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0])) if v}
    timing = {k: round((v - account_before["time"].get(k, 0)) * 1000 / n, 2)
              for k, v in account_after["time"].items()}
    return {**result, "cpu_ms_per_request": cpu, "batch_sizes": sizes,
            "mean_batch": round(sum(int(k) * v for k, v in sizes.items()) / max(1, sum(sizes.values())), 2),
            "model_ms_per_request": timing}


def model_ceiling(ckpt: str, bodies: list[bytes], args, seconds: float = 2.0) -> dict:
    """The model alone, in this process with --replica-cpus torch threads: wall ms per image of one upscale_batch
    call at batch 1 and at --max-batch (same images, same options). Their ratio bounds what any batching policy can
    gain on this device: serving adds per-request work on top, never takes it away."""
    import torch
    from PIL import Image

    from jobkit.config import config_from_dict
    from vosr.upscaler import Upscaler

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(round(args.replica_cpus))))
    try:
        cfg = config_from_dict({}, [f"inference.checkpoint={ckpt}", f"inference.device={args.device}", *args.set])
        up = Upscaler(ckpt, cfg)
        opts = up.resolve(up.defaults)
        images = [Image.open(io.BytesIO(bodies[i % len(bodies)])).convert("RGB") for i in range(args.max_batch)]
        ms = {}
        for b in sorted({1, args.max_batch}):
            up.upscale_batch(images[:b], opts, seeds=list(range(b)))          # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 2 * b:
                up.upscale_batch(images[:b], opts, seeds=list(range(b)))
                n += b
            ms[b] = (time.perf_counter() - t0) * 1000 / n
    finally:
        torch.set_num_threads(threads)
    return {"ms_per_image_by_batch": {str(b): round(v, 1) for b, v in ms.items()},
            "ceiling_ratio": round(ms[1] / ms[args.max_batch], 2)}


def main(argv: list[str] | None = None) -> int:
    import ray
    from PIL import Image
    from ray import serve

    from inference.serve import build_app
    from jobkit.config import config_from_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="LR side in pixels (output is 4x)")
    p.add_argument("--num-cpus", type=int, default=3, help="logical CPUs of the local Ray (two applications)")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--wait-ms", type=float, default=20.0, help="serve.batch_wait_timeout_s of the batched app, in ms")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the batched app")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for both applications")
    args = p.parse_args(argv)

    photos = sorted(q for q in (ROOT / "assets" / "photos").iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    bodies = []
    for path in photos[:4]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(buf, format="PNG")
        bodies.append(buf.getvalue())

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_student(Path(tmp) / "student")
            ceiling = model_ceiling(ckpt, bodies, args)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, batch in (("batched", args.max_batch), ("unbatched", 1)):
                cfg = config_from_dict({}, [
                    f"inference.checkpoint={ckpt}", f"inference.device={args.device}", f"serve.port={port}",
                    f"serve.max_batch_size={batch}", f"serve.batch_wait_timeout_s={args.wait_ms / 1000}",
                    f"serve.replica_cpus={args.replica_cpus}", f"serve.replica_gpus={args.gpus}",
                    f"serve.app_name={name}", f"serve.route_prefix=/{name}", *args.set])
                serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
            for name in ("batched", "unbatched"):                       # warm-up: first forward, allocator
                asyncio.run(load(f"http://127.0.0.1:{port}/{name}/upscale", bodies, 2 * args.concurrency,
                                 args.concurrency))
            for name in ("unbatched", "batched"):
                results[name] = measure(name, f"http://127.0.0.1:{port}/{name}", bodies, args)
            serve.shutdown()
    finally:
        ray.shutdown()
    ratio = results["batched"]["throughput_rps"] / max(results["unbatched"]["throughput_rps"], 1e-9)
    errors = results["batched"]["errors"] + results["unbatched"]["errors"]
    print(json.dumps({"lr_size": args.size, "output_size": 4 * args.size, "concurrency": args.concurrency,
                      "device": args.device, "replica_cpus": args.replica_cpus, "wait_ms": args.wait_ms, **results,
                      "model_only": ceiling, "throughput_ratio": round(ratio, 2), "target": 1.5,
                      "meets_target": ratio >= 1.5 and errors == 0}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
