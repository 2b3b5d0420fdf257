"""Optimizer, data-position and RNG state of a training run, as the nested `train_state` of vosr/checkpoint.py.

vosr/checkpoint.py stores it without pickle (tensors in safetensors, the rest JSON), next to the model and EMA
weights; together the folder is one resumable checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

FULL_OPTIMIZER = "optimizer_full"  # FSDP: the unsharded optimizer state keyed by parameter name


def build_train_state(opt: torch.optim.Optimizer | None, position: dict[str, Any],
                      full_optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """position: step, epoch, batch_in_epoch, samples. `opt`: a plain/DDP optimizer (its state_dict is saved);
    `full_optimizer`: under FSDP, the gathered name-keyed state of training/fsdp.full_state instead."""
    rng: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    state: dict[str, Any] = {"position": dict(position), "rng": rng}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    if full_optimizer is not None:
        state[FULL_OPTIMIZER] = full_optimizer
    return state


def check_optimizer_format(state: dict[str, Any], fsdp: bool) -> None:
    """A checkpoint's optimizer state must match the run's train.strategy (FSDP keeps it keyed by name)."""
    if fsdp and state.get("optimizer") and not state.get(FULL_OPTIMIZER):
        raise ValueError("this checkpoint's optimizer state was saved by a DDP run; resume it with "
                         "train.strategy=ddp (or start a new stage with train.init_from)")
    if not fsdp and state.get(FULL_OPTIMIZER) and not state.get("optimizer"):
        raise ValueError("this checkpoint's optimizer state was saved by an FSDP run; resume it with "
                         "train.strategy=fsdp and more than one worker (or start a new stage with "
                         "train.init_from)")


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
