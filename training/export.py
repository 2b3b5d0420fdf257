"""Export a sharded (FSDP, torch.distributed.checkpoint) checkpoint to the method library's unsharded folder:
config.json + model.safetensors + ema_model.safetensors -- the format vosr.checkpoint.load_checkpoint, the
upscaler / serving (inference/model_uri.py) and the MLflow registry (training/registry.py) read.

    python -m training.export <sharded checkpoint folder> <output folder> [--endpoint URL]

Both may be local paths or s3:// URIs. No process group and no GPU: each weight file is streamed, a group of
tensors at a time (vosr/sharded.py), so memory stays near one group (256 MB) whatever the model's size. The
optimizer moments stay behind (training-only, twice the weights); the output holds no train_state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from vosr import checkpoint as vckpt
from vosr import sharded, storage


def is_sharded(folder: str, endpoint: str = "") -> bool:
    """Whether a checkpoint folder is in the sharded (DCP) layout (config.json says so)."""
    return vckpt.read_meta(folder, endpoint).get("layout") == sharded.LAYOUT


def _stream(folder: str, prefix: str, endpoint: str, specs: dict, progress: bool):
    """The tensors of `prefix`, with a progress line (MiB done, rate, ETA) at most every 5 s and at the end."""
    total = sum(sharded.nbytes(dt, shape) for dt, shape in specs.values())
    t0 = last = time.perf_counter()
    done = 0
    for i, (name, t) in enumerate(sharded.iter_tensors(folder, prefix, endpoint)):
        yield name, t
        done += t.nbytes
        now = time.perf_counter()
        if progress and (now - last > 5 or i == len(specs) - 1):
            rate = done / max(now - t0, 1e-9)
            print(f"[export] {prefix}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB, {rate / 2**20:.1f} MiB/s, "
                  f"ETA {(total - done) / max(rate, 1e-9):.0f} s", file=sys.stderr, flush=True)
            last = now


def export_checkpoint(src: str, dst: str, endpoint: str = "", weights_only: bool = False,
                      progress: bool = False) -> dict[str, Any]:
    """Write `dst` (config.json + model.safetensors + ema_model.safetensors) from the sharded checkpoint `src`.
    `weights_only`: only the two weight files (for a source without config.json). Returns the sizes."""
    meta = None
    if not weights_only:
        meta = vckpt.read_meta(src, endpoint)
        if meta.get("layout") != sharded.LAYOUT:
            raise vckpt.CheckpointError(f"{src} is not a sharded checkpoint: its {vckpt.MODEL_FILE} and "
                                        f"{vckpt.EMA_FILE} are already the export")
    rdr = sharded.reader(src, endpoint)
    out: dict[str, Any] = {"source": src, "export": dst}
    for prefix, fname in (("model", vckpt.MODEL_FILE), ("ema", vckpt.EMA_FILE)):
        specs = sharded.tensor_specs(rdr, prefix)
        out[f"{prefix}_bytes"] = sharded.write_safetensors(
            storage.join(dst, fname), specs, _stream(src, prefix, endpoint, specs, progress), endpoint)
        out[f"{prefix}_tensors"] = len(specs)
    if meta is not None:  # written last: a folder without config.json is an unfinished checkpoint
        meta = {k: v for k, v in meta.items() if k != "layout"}
        meta["files"] = [vckpt.MODEL_FILE, vckpt.EMA_FILE]
        meta["extra"] = {**meta.get("extra", {}), "exported_from": storage.join(src)}
        storage.write_bytes_atomic(storage.join(dst, vckpt.CONFIG_FILE),
                                   json.dumps(meta, indent=2, sort_keys=True).encode(), endpoint)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a sharded (FSDP) VOSR checkpoint to config.json + "
                                "model.safetensors + ema_model.safetensors for serving and the registry.")
    p.add_argument("checkpoint", help="the sharded checkpoint folder (local path or s3:// URI)")
    p.add_argument("output", help="the folder to write (local path or s3:// URI)")
    p.add_argument("--endpoint", default="", help="S3 endpoint URL (MinIO, moto); default AWS_ENDPOINT_URL")
    args = p.parse_args(argv)
    try:
        info = export_checkpoint(args.checkpoint, args.output, args.endpoint, progress=True)
    except (vckpt.CheckpointError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
