"""The VOSR DiT backbone (docs/method.md s4): `build_dit(cfg, student=False)` and `count_parameters(cfg)`."""

from .dit import VOSRDiT, build_dit, count_parameters, model_dims, swiglu_hidden
from .execution import compile_dit, set_activation_checkpointing

__all__ = ["VOSRDiT", "build_dit", "compile_dit", "count_parameters", "model_dims", "set_activation_checkpointing",
           "swiglu_hidden"]
