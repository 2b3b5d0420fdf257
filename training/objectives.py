"""What each job trains: the model it optimises, its loss, and how validation samples from it.

pretrain: the multi-step teacher with the flow-matching objective of vosr/flow.py (partial conditioning and LR
noise augmentation, docs/method.md s5); validation samples with the multi-step guided sampler (s6).
distill: the one-step student initialised from the teacher's EMA (+ the target-time embedding) with the
recursive-consistency (or shortcut) loss of vosr/distill.py (s7); the teacher is frozen, in eval mode, unwrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def _strip_positions(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # docs/method.md s5: weights are loaded without RoPE tables, which are rebuilt for the new grid.
    return {k: v for k, v in state.items() if "rope" not in k and "freqs" not in k}


class PretrainObjective:
    name = "pretrain"

    def __init__(self, cfg: Any, device: torch.device):
        self.cfg = cfg
        self.device = device

    def build_model(self) -> nn.Module:
        from vosr.model import build_dit

        return build_dit(self.cfg, student=False)

    def init_from(self, model: nn.Module, folder: str) -> dict[str, Any]:
        """Progressive stage: load another checkpoint's EMA weights; RoPE follows this run's grid."""
        from vosr.checkpoint import load_checkpoint

        src, src_cfg, _ = load_checkpoint(folder, use_ema=True, device="cpu",
                                          endpoint_url=self.cfg.train.s3_endpoint_url)
        state = _strip_positions(src.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "rope" not in k and "freqs" not in k]
        if missing or unexpected:
            raise ValueError(f"train.init_from {folder}: architecture mismatch; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return {"init_from": str(folder), "init_from_resolution": src_cfg.data.resolution,
                "train_grid": int(getattr(model, "train_grid", 0))}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], gen: torch.Generator):
        from vosr.flow import training_loss

        return training_loss(model, batch["hq"], batch["lq"], batch["sem"], self.cfg.flow, gen)

    @torch.no_grad()
    def sample(self, model: nn.Module, lq: torch.Tensor, sem: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        from vosr.flow import sample_multistep

        f = self.cfg.flow
        return sample_multistep(model, lq, sem, steps=f.steps, schedule=f.schedule,
                                guidance_scale=f.guidance_scale, weak_strength=f.weak_strength, noise=noise)


class DistillObjective:
    name = "distill"

    def __init__(self, cfg: Any, device: torch.device, teacher: nn.Module | None = None):
        """`teacher`: an already built teacher on `device` (the memory plan's); by default distill_job.teacher is
        loaded and moved there."""
        self.cfg = cfg
        self.device = device
        if teacher is None:
            teacher = self._load_teacher(cfg).to(device)
        teacher.eval()
        teacher.requires_grad_(False)  # docs/method.md s7: frozen, eval mode, not wrapped
        self.teacher = teacher

    @staticmethod
    def _load_teacher(cfg: Any) -> nn.Module:
        from vosr import storage
        from vosr.checkpoint import load_checkpoint

        folder = cfg.distill_job.teacher
        if not folder or (not storage.is_remote(folder) and not Path(folder).is_dir()):
            raise FileNotFoundError(f"distill_job.teacher must be a checkpoint folder (local or s3://); "
                                    f"got {folder!r}")
        teacher, _, meta = load_checkpoint(folder, use_ema=cfg.distill_job.teacher_use_ema, device="cpu",
                                           endpoint_url=cfg.train.s3_endpoint_url)
        if meta.get("is_student"):
            raise ValueError(f"distill_job.teacher {folder} holds a student; give the multi-step teacher")
        return teacher

    def build_model(self) -> nn.Module:
        from vosr.distill import student_from_teacher

        return student_from_teacher(self.teacher, self.cfg)

    def init_from(self, model: nn.Module, folder: str) -> dict[str, Any]:
        raise ValueError("train.init_from is for the progressive pretraining stage; distillation starts from "
                         "distill_job.teacher")

    def loss(self, model: Any, batch: dict[str, torch.Tensor], gen: torch.Generator):
        from vosr.distill import distill_loss

        return distill_loss(model, self.teacher, batch["hq"], batch["lq"], batch["sem"], self.cfg.distill,
                            self.cfg.flow, gen)

    @torch.no_grad()
    def sample(self, model: nn.Module, lq: torch.Tensor, sem: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        from vosr.flow import sample_fewstep

        return sample_fewstep(model, lq, sem, steps=self.cfg.distill.onestep_steps, noise=noise)


OBJECTIVES = {"pretrain": PretrainObjective, "distill": DistillObjective}


def make_objective(name: str, cfg: Any, device: torch.device):
    if name not in OBJECTIVES:
        raise KeyError(f"unknown training objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](cfg, device)
