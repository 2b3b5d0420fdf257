"""Import a model released by the VOSR authors into this project's checkpoint folder:
`vosr import SOURCE OUTPUT` (also `python -m inference.import_released`).

SOURCE: a released folder (VOSR_0.5B_ms, VOSR_0.5B_os, VOSR_1.4B_ms or VOSR_1.4B_os: args.json + EMA weights) or its
hf:// URI (hf://CSWRY/VOSR/VOSR_0.5B_os[@revision]; only that folder is fetched, into the Hugging Face cache;
HF_HUB_OFFLINE=1 reads the cache only). OUTPUT: the checkpoint folder to write (model.safetensors, the
ema_model.safetensors when the release has both, config.json with every imported file's sha256, _vosr_files.json).

Importing is optional: every command that takes a checkpoint also takes a released folder or its hf:// URI and
imports it in memory (vosr/released.py). The written folder serves, evaluates, registers and trains like any other
checkpoint. The encoders stay where the release keeps them (beside the model folder); config.json names those
paths, and a run's autoencoder.path / autoencoder.light_decoder / semantic.path override them.
Exit status: 0 written, 2 for a source that is not a released model or cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vosr import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="released VOSR folder or hf://owner/repo/folder[@revision]")
    p.add_argument("output", help="checkpoint folder to write (must not exist or be empty)")
    return p


def run(source: str, output: str) -> dict:
    from vosr.hub import is_hub_uri, resolve
    from vosr.released import import_released, is_released_folder

    folder = resolve(source) if is_hub_uri(source) else Path(source).expanduser()
    if not is_released_folder(folder):
        raise FileNotFoundError(f"{source}: not a released VOSR folder (args.json + ema_model.safetensors / "
                                "model.safetensors in clean_weights/, checkpoints/ or the folder)")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    meta = import_released(folder, out)
    rec = meta["extra"]["imported"]
    return {"source": source, "folder": str(folder), "output": str(out), "preset": meta["preset"],
            "student": meta["is_student"], "files": meta["files"], "rope_tables": rec["rope_tables"],
            "imported": {f["path"]: f["sha256"] for f in rec["files"]}}


def main(argv: list[str] | None = None) -> int:
    from vosr.released import ReleasedModelError

    args = build_parser().parse_args(argv)
    try:
        summary = run(args.source, args.output)
    except (FileNotFoundError, FileExistsError, ReleasedModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
