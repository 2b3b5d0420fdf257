"""Data-side configuration of the method: the training crop size and the held-out split."""

from __future__ import annotations

from dataclasses import dataclass, field

from .schema import option


@dataclass
class DataConfig:
    resolution: int = option(64, "HR crop size in pixels (docs/method.md s1: 512; paper's first stage 256).", ge=8)
    holdout_fraction: float = option(0.0, "Fraction of ids held out of training for in-job validation (chosen by "
                                     "id hash). Default 0: train on everything; evaluation has its own data.",
                                     ge=0, lt=1)
    extra: dict[str, str] = field(default_factory=dict, metadata={"doc": "Free-form notes carried into metadata."})
