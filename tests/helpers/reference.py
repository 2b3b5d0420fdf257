"""The VOSR authors' reference code (../shared/reference/VOSR, Apache-2.0), imported for equivalence tests only.

The project's own modules never import it. `load()` imports its modules under private names, so that its `vosr.py`
does not shadow this project's `vosr` package and its `models` package stays out of sys.modules' global names.
Importing `inference_vosr*.py` runs their top level, which sets torch.hub's folder: that is put back. The reference
decorates functions with @torch.compile; tests run them eagerly (`eager()`), as compiling needs a C++ toolchain
and minutes, and changes no number the comparisons look at beyond float rounding.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT.parent / "shared" / "reference" / "VOSR"
_LOADED: SimpleNamespace | None = None


def unavailable() -> str | None:
    """Why the reference cannot be imported here (None when it can)."""
    if not (REF / "models" / "lightningdit.py").is_file():
        return f"the authors' reference code is not at {REF} (a clone without ../shared/reference)"
    missing = [m for m in ("einops", "fairscale", "diffusers", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the reference's test-only dependencies are not installed: {missing} (pip install '.[reference]')"
    return None


def _module(name: str, path: Path, package: str | None = None) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[str(path.parent)]
                                                  if path.name == "__init__.py" else None)
    mod = importlib.util.module_from_spec(spec)
    if package:
        mod.__package__ = package
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _as_top_level(names: dict[str, ModuleType]) -> Iterator[None]:
    """Let `import <name>` inside the reference find its own modules for the duration of an import."""
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load() -> SimpleNamespace:
    """The reference's modules: dit (models.lightningdit), light_decoder, qwen_vae (models.qwenimage_vae2d),
    sampler (vosr.py), infer_ms / infer_os (inference_vosr.py / inference_vosr_onestep.py)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    import torch

    pkg = _module("vosr_reference_models", REF / "models" / "__init__.py")
    sub = {}
    for name in ("pos_embed", "rmsnorm", "swiglu_ffn", "lightningdit", "light_decoder", "qwenimage_vae2d"):
        sub[name] = _module(f"vosr_reference_models.{name}", REF / "models" / f"{name}.py",
                            package="vosr_reference_models")
        setattr(pkg, name, sub[name])
    sampler = _module("vosr_reference_sampler", REF / "vosr.py")
    hub_dir = torch.hub.get_dir()
    aliases = {"models": pkg, "vosr": sampler, **{f"models.{k}": v for k, v in sub.items()}}
    try:
        with _as_top_level(aliases):
            infer_ms = _module("vosr_reference_inference", REF / "inference_vosr.py")
            infer_os = _module("vosr_reference_inference_onestep", REF / "inference_vosr_onestep.py")
    finally:
        torch.hub.set_dir(hub_dir)
    _LOADED = SimpleNamespace(dit=sub["lightningdit"], light_decoder=sub["light_decoder"],
                              qwen_vae=sub["qwenimage_vae2d"], sampler=sampler, infer_ms=infer_ms, infer_os=infer_os)
    return _LOADED


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run the reference's @torch.compile functions eagerly inside the block."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield
