"""Exponential moving average of a model's parameters (docs/method.md s5: decay 0.9999, every optimiser step,
over named_parameters; re-initialised from the weights after loading a pretrained checkpoint)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds a frozen copy `module` of the model whose parameters track p_ema <- d p_ema + (1 - d) p."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = dict(model.named_parameters())
        names = [name for name, _ in self.module.named_parameters()]
        targets = [p for _, p in self.module.named_parameters()]
        sources = [src[name].detach().to(t.device, t.dtype) for name, t in zip(names, targets)]
        torch._foreach_lerp_(targets, sources, 1.0 - self.decay)  # one fused op over every parameter
        for name, b in model.named_buffers():  # buffers (none in the DiT) are copied as is
            self.module.get_buffer(name).copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Re-initialise from the model's current weights."""
        self.module.load_state_dict(model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
