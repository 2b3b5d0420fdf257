"""Optimizer, data-position and RNG state of a training run, as the nested `train_state` of vosr/checkpoint.py.

vosr/checkpoint.py stores it without pickle (tensors in safetensors, the rest JSON), next to the model and EMA
weights; together the folder is one resumable checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch


def build_train_state(opt: torch.optim.Optimizer | None, position: dict[str, Any]) -> dict[str, Any]:
    """position: step, epoch, batch_in_epoch, samples. The optimizer is omitted when None (FSDP shards)."""
    rng: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    state: dict[str, Any] = {"position": dict(position), "rng": rng}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    return state


def restore_train_state(state: dict[str, Any], opt: torch.optim.Optimizer | None,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the optimizer (when given and saved) and the RNG states; return the position dict."""
    if opt is not None and state.get("optimizer"):
        osd = state["optimizer"]
        opt.load_state_dict(osd)  # torch moves moment tensors to each parameter's device
    rng = state.get("rng") or {}
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"].to(torch.uint8))
    return dict(state["position"])
