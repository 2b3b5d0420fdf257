"""A tiny random-weight checkpoint for the tests that need a model to load (upscaler, CLI, endpoint, MLflow
model, evaluation)."""

from __future__ import annotations

import torch

from jobkit.config import config_from_dict
from vosr.checkpoint import save_checkpoint
from vosr.model import build_dit


def make_checkpoint(folder, student: bool, seed: int = 0) -> str:
    """A tiny random-weight checkpoint saved and loaded the way real ones are. The final layer is zero at init
    (docs/method.md s4), which would make the velocity 0; give it small random weights so the model matters."""
    cfg = config_from_dict({})
    torch.manual_seed(seed)
    model = build_dit(cfg, student=student)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)
        model.final_layer.adaLN_modulation[1].weight.normal_(0, 0.05)
    save_checkpoint(str(folder), cfg, model)
    return str(folder)
