"""The VOSR authors' released models, read as this project's models (docs/checkpoints.md "Released models").

A released folder (VOSR_0.5B_ms, VOSR_0.5B_os, VOSR_1.4B_ms, VOSR_1.4B_os; Hugging Face CSWRY/VOSR) holds what the
authors' training run wrote: `args.json` (the run's settings) and its weights, `ema_model.safetensors` and/or
`model.safetensors`, in the parameter names of their LightningDiT. This module turns one into the project's
VOSRDiT plus a resolved config, in memory (`load_released`, used by vosr.checkpoint.load_checkpoint, so a released
folder works wherever a checkpoint folder does) or as a checkpoint folder on disk (`import_released`, `vosr import`).

How a folder is read, following what the authors' inference scripts do (docs/method.md s8):
- args.json: the folder's own, else the nearest one in up to four parent folders;
- weights: the first of ema_model.safetensors, model.safetensors found in clean_weights/, checkpoints/, then the
  folder itself (EMA first). Where none of those exists and the folder holds exactly one *.safetensors file, that
  one; several are refused with their names (the authors' scripts would take whichever a glob lists first);
- teacher or student: from the weights (the student has r_embedder.*), not from the folder's name;
- architecture from args.json: resolution -> training grid (resolution / 8 / patch), patch_size, dim, depth,
  num_heads, mlp_ratio, encdim_ratio, use_qknorm; ae_type sd2 -> sd21 (+ the light decoder the authors decode
  with), qwen -> qwen2d; enc_type dinov2b / dinov2l -> dinov2_vitb14 / dinov2_vitl14 at layer_dinov2b_list[0] and
  dinov2_size. What this project cannot run is refused naming the key (dinov2g, a block without SwiGLU, RMSNorm or
  RoPE, ...);
- parameter names are mapped (RENAMES); the RoPE tables stored in the weights are not loaded but checked against
  the tables the model builds in the released models' float32 arithmetic (model.rope_arithmetic=float32), which
  makes the imported forward bit-identical to the authors' code.
- encoders: the released layout keeps them beside the model folders (stable-diffusion-2-1-base/,
  Qwen-Image-vae-2d/, sd21_lwdecoder.pth, torch_cache/); the config points there, and autoencoder.path,
  autoencoder.light_decoder and semantic.path of a run's config point elsewhere (local paths or hf:// URIs).
Every file read is recorded with its sha256 in the model's metadata (extra.imported).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ARGS_FILE = "args.json"
WEIGHT_DIRS = ("clean_weights", "checkpoints", "")
EMA_NAME, MODEL_NAME = "ema_model.safetensors", "model.safetensors"
ARGS_SEARCH_LEVELS = 5            # the folder and four parents, as the authors' inference scripts search
FORMAT = "vosr-released"
MANIFEST = "_vosr_files.json"     # the checkpoint manifest name training/resume.py uses (docs/checkpoints.md)

# LightningDiT (authors) -> VOSRDiT (this project) parameter names; every other name is the same in both.
RENAMES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.", "x_embedder."),
    ("layer_norm.", "sem_proj.norm."),
    ("mlp_ca.fc1.", "sem_proj.fc1."),
    ("mlp_ca.fc2.", "sem_proj.fc2."),
    ("final_layer.norm_final.", "final_layer.norm."),
    (".cross_attn.q_linear.", ".cross_attn.q."),
    (".cross_attn.k_linear.", ".cross_attn.k."),
    (".cross_attn.v_linear.", ".cross_attn.v."),
)
ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")

# ae_type -> (this project's autoencoder, the folder name beside the model in the released layout)
AE_TYPES = {"sd2": ("sd21", "stable-diffusion-2-1-base"), "qwen": ("qwen2d", "Qwen-Image-vae-2d")}
LIGHT_DECODER_FILE = "sd21_lwdecoder.pth"      # the authors' SD2.1 decoder for VOSR-0.5B (docs/method.md s2)
TORCH_CACHE = "torch_cache"                     # torch.hub's folder holding the DINOv2 weights (hub/checkpoints/)
# enc_type -> (this project's semantic encoder, its token width)
ENC_TYPES = {"dinov2b": ("dinov2_vitb14", 768), "dinov2l": ("dinov2_vitl14", 1024)}
CANNOT_RUN_ENC = {"dinov2g": "DINOv2 ViT-g/14"}
VAE_DOWNSAMPLE = 8                              # both released autoencoders are f = 8 (docs/method.md s2)


class ReleasedModelError(ValueError):
    """A released folder this project cannot read or run; the message names the file and the key."""


# --- the folder ------------------------------------------------------------------------------------------------

def find_args_json(folder: str | Path) -> Path | None:
    """args.json in `folder` or the nearest of its parents (ARGS_SEARCH_LEVELS levels in all)."""
    cur = Path(folder).resolve()
    for _ in range(ARGS_SEARCH_LEVELS):
        cand = cur / ARGS_FILE
        if cand.is_file():
            return cand
        if cur.parent == cur:
            break
        cur = cur.parent
    return None


def find_weights(folder: str | Path, use_ema: bool = True) -> Path | None:
    """The weights file the authors' inference would load (EMA first; `use_ema=False`: model.safetensors first)."""
    folder = Path(folder)
    names = (EMA_NAME, MODEL_NAME) if use_ema else (MODEL_NAME, EMA_NAME)
    for sub in WEIGHT_DIRS:
        for name in names:
            cand = folder / sub / name if sub else folder / name
            if cand.is_file():
                return cand
    hits = sorted(folder.rglob("*.safetensors"))
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        listed = ", ".join(str(p.relative_to(folder)) for p in hits[:6])
        raise ReleasedModelError(f"{folder}: no {EMA_NAME} / {MODEL_NAME} in {', '.join(d or '.' for d in WEIGHT_DIRS)}"
                                 f" but {len(hits)} other *.safetensors files ({listed}); point at the folder of one")
    return None


def is_released_folder(folder: str | Path) -> bool:
    """A local folder that is not this project's checkpoint (no config.json) but holds released weights and has
    an args.json (its own or a parent's)."""
    p = Path(folder)
    if not p.is_dir() or (p / "config.json").is_file() or find_args_json(p) is None:
        return False
    try:
        return find_weights(p) is not None
    except ReleasedModelError:
        return True  # weights, but several candidates: loading it reports the ambiguity


def read_args(path: str | Path) -> dict[str, Any]:
    try:
        args = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ReleasedModelError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(args, dict):
        raise ReleasedModelError(f"{path}: expected a JSON object of the training run's settings")
    return args


# --- args.json -> this project's config --------------------------------------------------------------------------

def _need(args: dict, key: str, where: Path) -> Any:
    if key not in args or args[key] is None:
        raise ReleasedModelError(f"{where}: '{key}' is missing; it is needed to rebuild the model")
    return args[key]


def _check_block(args: dict, where: Path) -> None:
    """Refuse the LightningDiT variants VOSRDiT does not implement (the released models use none of them)."""
    for key, what in (("use_swiglu", "SwiGLU MLPs"), ("use_rmsnorm", "RMSNorm"), ("use_rope", "2D RoPE")):
        if not bool(args.get(key, False)):
            raise ReleasedModelError(f"{where}: {key}={args.get(key)!r}; this project's DiT always has {what} "
                                     "(docs/method.md s4), as every released VOSR model does")
    if args.get("learn_sigma"):
        raise ReleasedModelError(f"{where}: learn_sigma is set; VOSR predicts the velocity only")


def _semantic(args: dict, where: Path) -> tuple[str, int, int]:
    enc = _need(args, "enc_type", where)
    if enc in CANNOT_RUN_ENC:
        raise ReleasedModelError(f"{where}: enc_type={enc} ({CANNOT_RUN_ENC[enc]}) cannot be run by this project: its "
                                 f"semantic encoders are {', '.join(v[0] for v in ENC_TYPES.values())} "
                                 f"(enc_type {', '.join(ENC_TYPES)})")
    if enc not in ENC_TYPES:
        raise ReleasedModelError(f"{where}: unknown enc_type {enc!r}; known: {', '.join(ENC_TYPES)}")
    name, dim = ENC_TYPES[enc]
    enc_dim = int(args.get("enc_dim", dim))
    if enc_dim != dim:
        raise ReleasedModelError(f"{where}: enc_dim {enc_dim} does not match {name}'s token width {dim}")
    layers = _need(args, "layer_dinov2b_list", where)
    if not isinstance(layers, list) or not layers:
        raise ReleasedModelError(f"{where}: layer_dinov2b_list must be a non-empty list of block indices")
    # the authors' DiT uses only the first listed layer (z[0]; docs/method.md s3)
    return name, int(layers[0]), int(args.get("dinov2_size", 448))


def released_config_dict(args: dict, args_path: Path, student: bool) -> dict[str, Any]:
    """The project's config (a mapping for vosr.config.config_from_dict) of a released model's args.json.

    Encoders are looked for where the released layout keeps them: beside the folder holding args.json."""
    where = args_path
    _check_block(args, where)
    ae_type = _need(args, "ae_type", where)
    if ae_type not in AE_TYPES:
        raise ReleasedModelError(f"{where}: unknown ae_type {ae_type!r}; known: {', '.join(AE_TYPES)}")
    ae_name, ae_dir = AE_TYPES[ae_type]
    sem_name, layer, sem_size = _semantic(args, where)
    dim, heads = int(_need(args, "dim", where)), int(_need(args, "num_heads", where))
    patch = int(args.get("patch_size", 2))
    resolution = int(_need(args, "resolution", where))
    if dim % heads or (dim // heads) % 4:
        raise ReleasedModelError(f"{where}: dim {dim} / num_heads {heads} must give a head dim divisible by 4")
    if resolution % (VAE_DOWNSAMPLE * patch):
        raise ReleasedModelError(f"{where}: resolution {resolution} is not a multiple of 8 x patch_size {patch}")
    root = args_path.parent.parent          # the released layout: <root>/<model folder>/args.json
    ae_path = root / Path(str(args.get("ae_path") or ae_dir)).name
    weak = [float(v) for v in args.get("weak_cond_strength_aelq_list", [0.05, 0.25])]
    aug = [float(v) for v in args.get("cond_strength_aelq_list", [5.0, 1.0])]
    cfg_scale = float(args.get("cfg_scale", 0.5))
    steps = int(args.get("infer_steps") or (1 if student else 25))
    cfg: dict[str, Any] = {
        "preset": "vosr-0.5b" if ae_name == "sd21" else "vosr-1.4b",
        "model": {"hidden_size": dim, "depth": int(_need(args, "depth", where)), "num_heads": heads,
                  "patch_size": patch, "mlp_ratio": float(args.get("mlp_ratio", 4.0)),
                  "encdim_ratio": int(args.get("encdim_ratio", 3)), "qk_norm": bool(args.get("use_qknorm", True)),
                  "rope_arithmetic": "float32"},
        "autoencoder": {"name": ae_name, "path": str(ae_path),
                        "light_decoder": str(root / LIGHT_DECODER_FILE) if ae_name == "sd21" else ""},
        "semantic": {"name": sem_name, "layer": layer, "input_size": sem_size, "path": str(root / TORCH_CACHE)},
        "data": {"resolution": resolution},
        "flow": {"cfg_ratio": float(args.get("cfg_ratio", 0.1)), "weak_strength_min": weak[0],
                 "weak_strength_max": weak[1], "lr_aug_mu": aug[0], "lr_aug_sigma": aug[1],
                 "guidance_scale": cfg_scale, "weak_strength": (weak[0] + weak[1]) / 2},
        "inference": {"mode": "onestep" if student else "multistep"},
    }
    if student:
        cfg["distill"] = {"omega": cfg_scale, "weak_strength": float(args.get("weak_cond_strength_aelq", 0.1)),
                          "method": str(args.get("distill_type", "rcgm")) if args.get("distill_type", "rcgm")
                          in ("rcgm", "shortcut") else "rcgm",
                          "delta_t": float(args.get("rcgm_delta_t", 0.01)),
                          "rollout_steps": int(args.get("rcgm_n_steps", 2)),
                          "consistency_weight": float(args.get("u_weight", 1.0)), "onestep_steps": steps}
    else:
        cfg["flow"]["steps"] = steps
    return cfg


# --- weights ---------------------------------------------------------------------------------------------------

def map_name(key: str) -> str:
    """A released parameter name in this project's naming (RENAMES: prefixes, and infixes inside blocks.N)."""
    for old, new in RENAMES:
        if old.startswith("."):
            key = key.replace(old, new)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key


def map_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the project's state dict, the stored RoPE tables) of a released LightningDiT state dict."""
    rope = {k: v for k, v in state.items() if k in ROPE_KEYS}
    out = {map_name(k): v for k, v in state.items() if k not in ROPE_KEYS}
    return out, rope


def check_rope(rope: dict[str, torch.Tensor], model, where: Path) -> dict[str, Any]:
    """Compare the stored training-grid tables with the model's own (float32 arithmetic)."""
    if not rope:
        return {"stored": False}
    g = int(model.train_grid)
    cos, sin = model.rope(g, g, torch.device("cpu"))
    stored_cos, stored_sin = rope.get(ROPE_KEYS[0]), rope.get(ROPE_KEYS[1])
    if stored_cos is None or stored_sin is None or stored_cos.shape != cos.shape or stored_sin.shape != sin.shape:
        shape = None if stored_cos is None else tuple(stored_cos.shape)
        raise ReleasedModelError(f"{where}: stored RoPE tables {shape} do not fit a {g}x{g} training grid with head "
                                 f"dim {model.head_dim} {tuple(cos.shape)} (args.json resolution / patch_size?)")
    diff = max(float((stored_cos.float() - cos).abs().max()), float((stored_sin.float() - sin).abs().max()))
    if diff > 1e-5:
        raise ReleasedModelError(f"{where}: stored RoPE tables differ from the {g}x{g} grid's by {diff:.3g}; the "
                                 "weights were not trained at args.json's resolution")
    return {"stored": True, "grid": g, "max_abs_diff": diff,
            "bit_identical": bool(torch.equal(stored_cos.float(), cos) and torch.equal(stored_sin.float(), sin))}


def _file_record(path: Path, base: Path) -> dict[str, Any]:
    from .encoders.weights import file_sha256

    return {"path": os.path.relpath(path, base), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def read_released(folder: str | Path, use_ema: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                     dict[str, torch.Tensor], dict[str, Any]]:
    """(config mapping, project state dict, stored RoPE tables, import record) of a released folder."""
    from safetensors.torch import load_file

    folder = Path(folder).resolve()
    args_path = find_args_json(folder)
    if args_path is None:
        raise ReleasedModelError(f"{folder}: no {ARGS_FILE} in it or in the {ARGS_SEARCH_LEVELS - 1} folders above; "
                                 "a released VOSR folder carries the args.json of its training run")
    wpath = find_weights(folder, use_ema)
    if wpath is None:
        raise ReleasedModelError(f"{folder}: no weights ({EMA_NAME} or {MODEL_NAME} in "
                                 f"{', '.join(d or '.' for d in WEIGHT_DIRS)})")
    args = read_args(args_path)
    raw = load_file(str(wpath), device="cpu")
    state, rope = map_state(raw)
    student = any(k.startswith("r_embedder.") for k in state)
    cfg = released_config_dict(args, args_path, student)
    record = {"format": FORMAT, "source": str(folder), "student": student,
              "weights": "ema" if wpath.name == EMA_NAME else ("model" if wpath.name == MODEL_NAME else wpath.name),
              "files": [_file_record(args_path, folder), _file_record(wpath, folder)]}
    return cfg, state, rope, record


def build_released(cfg_dict: dict[str, Any], state: dict[str, torch.Tensor], rope: dict[str, torch.Tensor],
                   record: dict[str, Any], where: Path, train_grid: int | None = None):
    """(model, cfg) with the weights loaded strictly; the RoPE check goes into `record`."""
    from .config import config_from_dict
    from .model import build_dit

    cfg = config_from_dict(cfg_dict)
    model = build_dit(cfg, student=record["student"], device="meta")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ReleasedModelError(f"{where}: the weights do not match the architecture args.json describes: "
                                 f"{str(exc)[:600]}") from exc
    record["rope_tables"] = check_rope(rope, model, where)
    if train_grid is not None:
        model.set_train_grid(int(train_grid))
    return model, cfg


def load_released(folder: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                  train_grid: int | None = None, train_resolution: int | None = None,
                  dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A released folder as (model in eval mode, config, metadata), like vosr.checkpoint.load_checkpoint."""
    from .config.redact import redact

    cfg_dict, state, rope, record = read_released(folder, use_ema)
    model, cfg = build_released(cfg_dict, state, rope, record, Path(folder), train_grid)
    if train_resolution is not None:
        if train_grid is not None:
            raise ValueError("give train_grid or train_resolution, not both")
        model.set_train_grid(int(train_resolution) // (VAE_DOWNSAMPLE * model.patch_size))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    meta = {"format": FORMAT, "preset": cfg.preset, "is_student": record["student"],
            "train_grid": int(model.train_grid), "latent_channels": int(model.latent_channels),
            "sem_dim": int(model.sem_dim), "files": [f["path"] for f in record["files"]], "config": redact(cfg),
            "extra": {"imported": record}, "weights": record["files"][1]["path"]}
    return model, cfg, meta


def import_released(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """Write a released folder as this project's checkpoint folder `out`: model.safetensors (+ ema_model.safetensors
    when the release has both), config.json with the import record (every source file's sha256) and the
    _vosr_files.json manifest (each written file's size, each imported file's sha256). Returns config.json's
    content."""
    from .checkpoint import save_checkpoint

    folder, out = Path(folder).resolve(), Path(out)
    cfg_dict, state, rope, record = read_released(folder, use_ema=True)
    model, cfg = build_released(cfg_dict, state, rope, record, folder)
    ema_state = None
    other = find_weights(folder, use_ema=False)
    if record["weights"] == "ema" and other is not None and other.name == MODEL_NAME:
        from safetensors.torch import load_file

        ema_state = {k: v.clone() for k, v in model.state_dict().items()}
        plain, _ = map_state(load_file(str(other), device="cpu"))
        model.load_state_dict(plain, strict=True, assign=True)
        record["files"].append(_file_record(other, folder))
    meta = save_checkpoint(str(out), cfg, model, ema=ema_state, extra={"imported": record})
    manifest = {"files": {name: (out / name).stat().st_size for name in [*meta["files"], "config.json"]},
                "imported": {f["path"]: f["sha256"] for f in record["files"]}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return meta


__all__ = ["FORMAT", "RENAMES", "ReleasedModelError", "build_released", "find_args_json", "find_weights",
           "import_released", "is_released_folder", "load_released", "map_name", "map_state", "read_released",
           "released_config_dict"]
