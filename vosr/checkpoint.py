"""Checkpoint folders: model.safetensors, ema_model.safetensors, config.json, optional training state.

No pickle anywhere: weights and optimiser tensors are safetensors, everything else JSON. config.json holds the
resolved config (so `load_checkpoint` rebuilds the exact model), the preset, whether it is a student, the
training grid, and `extra` (encoder identities with weight hashes, step, ...). It is written last, so a folder
without it is an unfinished checkpoint. Local paths and s3:// URIs both work (vosr.storage).
An FSDP run writes the sharded layout instead (config.json "layout": "dcp", weights and optimizer in dcp/,
vosr/sharded.py); load_checkpoint reads both, and `python -m training.export` turns one into this layout.
RoPE is never stored: it is recomputed from the grid, so `train_grid` / `train_resolution` on load rebuild it for
another training grid (progressive 256 -> 512 stage, docs/method.md s5).
`load_checkpoint` also reads a model folder released by the VOSR authors (args.json + their EMA weights,
vosr/released.py) and `hf://owner/repo/path[@revision]` URIs of either kind (vosr/hub.py).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import storage
from .config.redact import redact
from .sharded import DCP_DIR, LAYOUT

FORMAT = "vosr-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema_model.safetensors"
CONFIG_FILE = "config.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


class CheckpointError(RuntimeError):
    """A folder that is not a (complete, compatible) VOSR checkpoint."""


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in state.items()
             if "rope" not in k and "freqs" not in k}
    return st_save(clean)


def _module_state(obj: Any) -> dict[str, torch.Tensor]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "module") and isinstance(obj.module, nn.Module):  # vosr.ema.EMA
        return obj.module.state_dict()
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    raise TypeError(f"cannot take a state dict from {type(obj).__name__}")


# --- JSON + safetensors encoding of a nested training state (optimizer, scheduler, counters, RNG) --------------

def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state holds a {type(obj).__name__}, which is not JSON/tensor encodable")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return obj


# --- save / load -----------------------------------------------------------------------------------------------

def save_checkpoint(folder: str, cfg, model: nn.Module, ema: Any = None, extra: dict | None = None,
                    train_state: dict | None = None, endpoint_url: str = "", sharded: bool = False) -> dict[str, Any]:
    """Write a checkpoint folder; returns the config.json content. `ema`: vosr.ema.EMA, a module or a state dict.
    `train_state`: nested dict of tensors and JSON values (e.g. {"optimizer": opt.state_dict(), "step": 10}).
    `sharded`: the weights are in the folder's dcp/ (vosr/sharded.py, written by every FSDP rank); only the
    train state and config.json (layout "dcp") are written here, and `model` gives only its attributes."""
    files = [DCP_DIR] if sharded else [MODEL_FILE]
    if not sharded:
        storage.write_bytes_atomic(storage.join(folder, MODEL_FILE), _state_bytes(_module_state(model)),
                                   endpoint_url)
    if ema is not None and not sharded:
        storage.write_bytes_atomic(storage.join(folder, EMA_FILE), _state_bytes(_module_state(ema)), endpoint_url)
        files.append(EMA_FILE)
    if train_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        tree = _encode(train_state, tensors)
        storage.write_bytes_atomic(storage.join(folder, STATE_TENSORS), st_save(tensors), endpoint_url)
        storage.write_bytes_atomic(storage.join(folder, STATE_JSON), json.dumps(tree).encode(), endpoint_url)
        files += [STATE_TENSORS, STATE_JSON]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "preset": cfg.preset,
        "is_student": bool(getattr(model, "is_student", False)),
        "train_grid": int(getattr(model, "train_grid", 0)),
        "latent_channels": int(getattr(model, "latent_channels", 0)),
        "sem_dim": int(getattr(model, "sem_dim", 0)),
        "files": files,
        "config": redact(cfg),             # no credentials in checkpoints (vosr.config.redact)
        "extra": redact(extra or {}),
    }
    if sharded:
        meta["layout"] = LAYOUT
    storage.write_bytes_atomic(storage.join(folder, CONFIG_FILE),
                               json.dumps(meta, indent=2, sort_keys=True).encode(), endpoint_url)
    return meta


def read_meta(folder: str, endpoint_url: str = "") -> dict[str, Any]:
    path = storage.join(folder, CONFIG_FILE)
    if not storage.exists(path, endpoint_url):
        raise CheckpointError(f"{folder} is not a VOSR checkpoint (no {CONFIG_FILE}; unfinished or wrong folder)")
    meta = json.loads(storage.read_bytes(path, endpoint_url))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta['version']} is newer than this code ({VERSION})")
    return meta


def _weights_file(folder: str, use_ema: bool, meta: dict, endpoint_url: str) -> tuple[str, str]:
    name = EMA_FILE if use_ema and EMA_FILE in meta.get("files", [EMA_FILE]) else MODEL_FILE
    wpath = storage.join(folder, name)
    if not storage.exists(wpath, endpoint_url):
        if name == EMA_FILE:
            name, wpath = MODEL_FILE, storage.join(folder, MODEL_FILE)
        if not storage.exists(wpath, endpoint_url):
            raise CheckpointError(f"{folder}: no weights file ({MODEL_FILE})")
    return name, wpath


def is_checkpoint_folder(folder: str) -> bool:
    """A local folder load_checkpoint reads: this project's (config.json) or a released one (vosr/released.py)."""
    from pathlib import Path

    from .released import is_released_folder

    return (Path(folder) / CONFIG_FILE).is_file() or is_released_folder(folder)


def load_checkpoint(folder: str, use_ema: bool = True, device: str | torch.device = "cpu",
                    train_grid: int | None = None, train_resolution: int | None = None,
                    dtype: torch.dtype | None = None, endpoint_url: str = "") -> tuple[nn.Module, Any, dict]:
    """Rebuild the model from config.json and load its (EMA by default) weights -> (model in eval, cfg, meta).

    Falls back to model.safetensors when the folder has no EMA (meta["weights"] says which file was used).
    `train_resolution` (pixels) or `train_grid` (tokens) rebuilds RoPE for another training grid. A released
    VOSR folder is imported in memory (vosr/released.py; meta["extra"]["imported"] lists its files' sha256);
    an hf:// URI is read through the Hugging Face cache first (vosr/hub.py)."""
    from .config import config_from_dict
    from .hub import is_hub_uri
    from .hub import resolve as hub_resolve
    from .model import build_dit, model_dims
    from .released import is_released_folder, load_released

    if is_hub_uri(folder):
        folder = str(hub_resolve(folder))
    if not storage.is_remote(folder) and is_released_folder(folder):
        return load_released(folder, use_ema=use_ema, device=device, train_grid=train_grid,
                             train_resolution=train_resolution, dtype=dtype)
    meta = read_meta(folder, endpoint_url)
    cfg = config_from_dict(meta["config"], other_sections=True)  # the method sections; jobs keep their own
    if meta.get("layout") == LAYOUT:  # an FSDP run's sharded checkpoint: assembled from every rank's shards
        from .sharded import read_tensors

        name = "dcp:ema" if use_ema else "dcp:model"
        wpath = storage.join(folder, DCP_DIR)
        state = read_tensors(folder, name[4:], endpoint_url)
    else:
        name, wpath = _weights_file(folder, use_ema, meta, endpoint_url)
        state = st_load(storage.read_bytes(wpath, endpoint_url))
    state = {k: v for k, v in state.items() if "rope" not in k and "freqs" not in k}

    grid = meta.get("train_grid") or None
    if train_resolution is not None:
        if train_grid is not None:
            raise ValueError("give train_grid or train_resolution, not both")
        cfg.data.resolution = int(train_resolution)
        grid = model_dims(cfg)["train_grid"]
    if train_grid is not None:
        grid = int(train_grid)
    model = build_dit(cfg, student=bool(meta.get("is_student")), device="meta", train_grid=grid)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{wpath} does not match the model its config.json describes: {exc}") from exc
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    meta = {**meta, "weights": name}
    return model, cfg, meta


def load_train_state(folder: str, endpoint_url: str = "") -> dict[str, Any] | None:
    """The nested training state saved with the checkpoint, or None when there is none."""
    jpath = storage.join(folder, STATE_JSON)
    if not storage.exists(jpath, endpoint_url):
        return None
    tensors = st_load(storage.read_bytes(storage.join(folder, STATE_TENSORS), endpoint_url))
    return _decode(json.loads(storage.read_bytes(jpath, endpoint_url)), tensors)
