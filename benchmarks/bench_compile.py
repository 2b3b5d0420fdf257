"""torch.compile of the DiT on this CPU (vosr/model/execution.py compile_dit, inductor): speed ratio compiled vs
eager, equality, and compiles across tile sizes.

Rows: the tiny preset (whole DiT, 64 px) and a 0.5B-shaped stack (the vosr-0.5b preset's blocks: D 1024, 16 heads,
SwiGLU 2730, cross-attention to 1024 DINOv2-B tokens; --blocks of them, 256 px = 256 image tokens), each as
- inference: forward under inference_mode, compiled with dynamic shapes (inference.compile), and
- training: forward + backward of the flow-matching loss, compiled as train.compile does.
Per row: eager and compiled median seconds per call (after warm-up; the first compiled call, which compiles, is
printed apart), their ratio (> 1: compiled faster) and the largest absolute output/gradient difference.
Last, recompiles: the tiny DiT compiled with dynamic shapes runs tile-shaped inputs of several sizes; printed is
the number of compiled graphs after each size.

    python benchmarks/bench_compile.py                     # ~3-6 min on 2 CPUs (compiles included)
    python benchmarks/bench_compile.py --blocks 4 --iters 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _model(preset: str, overrides: list[str]):
    from jobkit.config import config_from_dict
    from vosr.model import build_dit

    extra = ["semantic.allow_random=true"] if preset != "tiny" else []
    cfg = config_from_dict({"preset": preset}, overrides + extra)
    torch.manual_seed(0)
    model = build_dit(cfg)
    with torch.no_grad():   # the final layer starts at zero (docs/method.md s4); make the output depend on the blocks
        model.final_layer.linear.weight.normal_(0, 0.02)
        model.final_layer.adaLN_modulation[1].weight.normal_(0, 0.02)
    return cfg, model


def _inputs(cfg, batch: int):
    from vosr.model import model_dims

    d = model_dims(cfg)
    side = cfg.data.resolution // d["downsample"]
    g = torch.Generator().manual_seed(0)
    hq = torch.randn(batch, d["latent_channels"], side, side, generator=g)
    return hq, torch.randn(hq.shape, generator=g), torch.randn(batch, d["sem_tokens"], d["sem_dim"], generator=g)


def _time(fn, iters: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def _row(label: str, cfg, eager, batch: int, iters: int, training: bool) -> dict:
    from vosr.flow import training_loss
    from vosr.model import compile_dit
    from vosr.seeding import generator

    hq, lq, sem = _inputs(cfg, batch)
    t = torch.rand(batch, generator=torch.Generator().manual_seed(1))
    compiled = compile_dit(copy.deepcopy(eager), dynamic=None if training else True)

    def call(model):
        if not training:
            with torch.inference_mode():
                return model(hq, t, lq, sem)
        model.zero_grad(set_to_none=True)
        loss, _ = training_loss(model, hq, lq, sem, cfg.flow, generator(3))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    _, eager_s, ref = _time(lambda: call(eager), iters)
    first_s, comp_s, out = _time(lambda: call(compiled), iters)
    diff = float((out - ref).abs().max())
    row = {"row": label, "mode": "training fwd+bwd" if training else "inference fwd", "batch": batch,
           "eager_s": round(eager_s, 4), "compiled_s": round(comp_s, 4), "speedup": round(eager_s / comp_s, 3),
           "first_compiled_call_s": round(first_s, 1), "max_abs_diff": diff, "within_1e-5": diff <= 1e-5}
    print(f"{label:<34} {row['mode']:<17} eager {eager_s:8.4f} s  compiled {comp_s:8.4f} s  "
          f"ratio {row['speedup']:5.2f}x  (compile call {first_s:6.1f} s)  max |diff| {diff:.2e}", flush=True)
    return row


def recompiles(tile_sides: list[int]) -> dict:
    """Graphs compiled after each tile size (latent side), tiny DiT with dynamic shapes, a 2-tile batch."""
    from torch._dynamo.utils import counters

    from vosr.model import compile_dit

    cfg, model = _model("tiny", [])
    compile_dit(model, dynamic=True)
    _, _, sem = _inputs(cfg, 2)
    torch._dynamo.reset()
    start = int(counters["stats"]["unique_graphs"])
    after = {}
    with torch.inference_mode():
        for side in tile_sides:
            z = torch.randn(2, model.latent_channels, side, side)
            model(z, torch.rand(2), z, sem)
            after[side] = int(counters["stats"]["unique_graphs"]) - start
    print(f"graphs compiled after each tile size (latent side: graphs): {after}", flush=True)
    return after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2, help="blocks of the 0.5B-shaped stack")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiles", default="16,24,32,40,12", help="latent tile sides for the recompile count")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for training in (False, True):   # a fresh model per row: its RoPE tables are cached by the first call's mode
        cfg, tiny = _model("tiny", [])
        rows.append(_row("tiny preset (4 blocks, D96, 64 px)", cfg, tiny, 4, args.iters, training))
    for training in (False, True):
        cfg, big = _model("vosr-0.5b", [f"model.depth={args.blocks}", "data.resolution=256"])
        rows.append(_row(f"0.5B-shaped x{args.blocks} blocks (256 tok)", cfg, big, 1, args.iters, training))
    tiles = recompiles([int(s) for s in args.tiles.split(",")])
    result = {"benchmark": "bench_compile", "torch": torch.__version__, "threads": args.threads, "rows": rows,
              "graphs_after_tile_size": tiles}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if all(r["within_1e-5"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
