"""Local weight files: locating them, hashing them, and failing clearly when they are missing.

Nothing here downloads anything. Loaders call `offline()` so that the Hugging Face libraries stay off the network
even if a path were mistaken for a repo id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """Weights for an encoder were not found locally; the message names the path and how to provide it."""


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) so repeated builds do not re-read big files."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def files_sha256(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """One hash over several files: sha256 of the sorted lines '<path relative to root> <file sha256>'."""
    lines = sorted(f"{Path(p).resolve().relative_to(Path(root).resolve())} {file_sha256(p)}" for p in paths)
    if len(lines) == 1:
        return lines[0].split(" ", 1)[1]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of tensors (name, dtype, shape, bytes in key order sorted); identifies weights that have no file."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE) for the duration of a load, restoring the old values."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    try:
        for k in keys:
            os.environ[k] = "1"
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def find_diffusers_folder(path: str, what: str, how: str) -> Path:
    """The folder holding a diffusers model's config.json: `path` itself or its `vae/` subfolder.

    `what` names the model for the error message, `how` says how to provide it.
    """
    if not path:
        raise MissingWeightsError(f"{what}: autoencoder.path is empty; set it to a local folder. {how}")
    root = Path(path).expanduser()
    for cand in (root, root / "vae"):
        if (cand / "config.json").is_file():
            if not list(cand.glob("*.safetensors")):
                raise MissingWeightsError(
                    f"{what}: {cand} has a config.json but no *.safetensors weights (pickled .bin weights are "
                    f"not loaded). {how}")
            return cand
    raise MissingWeightsError(f"{what}: no config.json found in {root} nor in {root / 'vae'}. {how}")
