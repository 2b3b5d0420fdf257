"""The VOSR upscaler as an MLflow pyfunc model ("models from code": MLflow stores this file with the model and
runs it on load; training/registry.py logs it). It imports only MLflow, pandas, PIL, numpy and vosr, which the
logged model carries in its code_paths, so it loads in any environment holding the model's requirements.

Input (what `mlflow models serve` hands to predict): a DataFrame with a string column `image`, or a list of
strings, or a dict {"image": [...]}; each string is a base64-encoded image file (PNG, JPEG, WebP, ...; a
`data:image/...;base64,` prefix is accepted). Parameters (the signature's ParamSchema, all optional):
  seed (long, the checkpoint's inference.seed), steps (long, 0 = the mode's default), guidance (double, the
  multi-step teacher's guidance scale), tile (long, 0 = automatic: tiles only when the image would not fit the
  memory budget; N = tiles of N pixels of the x4 image), color_fix (string: adain, wavelet or none).
Output: a DataFrame with one row per image: `image` (base64 PNG of the x4 result), `width`, `height`.
Model config (`mlflow.pyfunc.load_model(uri, model_config={...})`): device (auto | cpu | cuda), dtype (fp32 |
bf16 | fp16), max_pixels (largest input accepted, pixels), memory_budget_mb (0 = detect).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "checkpoint"
DEFAULT_CONFIG = {"device": "auto", "dtype": "fp32", "max_pixels": 16_777_216, "memory_budget_mb": 0}
PARAMS = ("seed", "steps", "guidance", "tile", "color_fix")


class BadInput(ValueError):
    """An input row that is not a base64-encoded image."""


def decode_b64_image(text: Any, max_pixels: int):
    """A base64 string (or bytes) of an image file -> RGB PIL image, through vosr.imageio's checked decoder."""
    from vosr.imageio import ImageDecodeError, decode_image

    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise BadInput(f"expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"not base64: {exc}") from None
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise BadInput(f"not a decodable image ({exc.reason}: {exc.detail})") from None


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def input_strings(model_input: Any) -> list:
    if isinstance(model_input, pd.DataFrame):
        col = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[col])
    if isinstance(model_input, dict):
        value = model_input.get("image", next(iter(model_input.values()), []))
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(model_input, (list, tuple)):
        return [row.get("image") if isinstance(row, dict) else row for row in model_input]
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    raise BadInput(f"cannot read images from a {type(model_input).__name__}; send a DataFrame with an 'image' "
                   "column of base64 strings")


def option_overrides(params: dict[str, Any] | None) -> dict[str, Any]:
    """The pyfunc parameters as UpscaleOptions overrides (unset ones keep the checkpoint's defaults)."""
    p = dict(params or {})
    unknown = sorted(set(p) - set(PARAMS))
    if unknown:
        raise BadInput(f"unknown parameter(s) {unknown}; known: {list(PARAMS)}")
    out: dict[str, Any] = {}
    if p.get("seed") is not None:
        out["seed"] = int(p["seed"])
    if p.get("steps"):
        out["steps"] = int(p["steps"])
    if p.get("guidance") is not None:
        out["guidance"] = float(p["guidance"])
    if p.get("tile"):
        out["tile_size"] = int(p["tile"])
    if p.get("color_fix"):
        out["color_fix"] = str(p["color_fix"])
    return out


class UpscalerModel(PythonModel):
    """pyfunc: base64 images in, base64 PNGs x4 out (see the module docstring)."""

    def load_context(self, context):
        from vosr.model_uri import find_checkpoint
        from vosr.upscaler import Upscaler

        conf = {**DEFAULT_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.max_pixels = int(conf["max_pixels"])
        self.upscaler = Upscaler(find_checkpoint(context.artifacts[ARTIFACT_KEY]), device=conf["device"],
                                 dtype=conf["dtype"], memory_budget_mb=int(conf["memory_budget_mb"]))

    # the DataFrame hint: MLflow converts every accepted input to one and validates it against the logged signature
    # (a list of strings included); it infers no signature from it
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        overrides = option_overrides(params)
        opts = self.upscaler.resolve(**overrides)
        rows = []
        for i, text in enumerate(input_strings(model_input)):
            try:
                img = decode_b64_image(text, self.max_pixels)
            except BadInput as exc:
                raise BadInput(f"row {i}: {exc}") from None
            out = self.upscaler.upscale(img, opts)
            rows.append({"image": png_b64(out), "width": out.width, "height": out.height})
        return pd.DataFrame(rows, columns=["image", "width", "height"])


mlflow.models.set_model(UpscalerModel())
