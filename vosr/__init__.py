"""VOSR, the method library (pure PyTorch; never imports Ray, and MLflow only inside the resolver of models:/ URIs).

    from vosr import Upscaler
    up = Upscaler.from_pretrained("models:/vosr-student@champion")   # or a folder, s3://..., runs:/...
    sr = up(image)                                                   # PIL, numpy or torch in, the same kind out

`Upscaler` is imported on first use, so `import vosr.config` and friends stay light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Upscaler", "UpscaleOptions"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vosr import upscaler

        return getattr(upscaler, name)
    raise AttributeError(f"module 'vosr' has no attribute {name!r}")
