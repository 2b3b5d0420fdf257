"""Safe image decoding and tensor conversion.

`decode_image(data, max_pixels)` turns untrusted bytes into an RGB PIL image or raises `ImageDecodeError` whose
`reason` is a short code that pipelines count (empty, not_image, too_many_pixels, truncated, corrupt). The pixel
cap is checked from the header, before any pixel data is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Reason codes a decode can fail with (pipelines count them by these names).
DECODE_REASONS = ("empty", "not_image", "too_many_pixels", "truncated", "corrupt")


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty", "no bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x its own cap raises) for huge images; our explicit cap below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_image", "unrecognised format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("corrupt", str(exc)[:200]) from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError("corrupt", f"bad size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    return img


def probe_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header only; raises ImageDecodeError like decode_image."""
    img = _open_checked(data, max_pixels)
    return (img.format or "unknown").lower(), img.size[0], img.size[1]


def decode_image(data: bytes, max_pixels: int, *, with_format: bool = False) -> Any:
    """Decode untrusted bytes into an RGB image (EXIF orientation applied).

    Returns the PIL image, or (image, format) when `with_format` is true. Raises ImageDecodeError(reason).
    """
    img = _open_checked(data, max_pixels)
    fmt = (img.format or "unknown").lower()
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated files would decode silently")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except OSError as exc:
        msg = str(exc)
        reason = "truncated" if ("truncated" in msg or "broken data stream" in msg or "EOF" in msg) else "corrupt"
        raise ImageDecodeError(reason, msg[:200]) from exc
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError("corrupt", str(exc)[:200]) from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the pixels as stored
        pass
    rgb = _to_rgb(img)
    return (rgb, fmt) if with_format else rgb


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited on white rather than turning black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
    return img.convert("RGB")


def image_to_tensor(img: Image.Image):
    """PIL image -> float32 tensor [3, H, W] in [0, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(_to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_image(t) -> Image.Image:
    """Tensor [3, H, W] (or [1, 3, H, W]) in [0, 1] -> RGB PIL image (rounded, clamped)."""
    import numpy as np

    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"tensor_to_image takes one image, got batch of {t.shape[0]}")
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected [3, H, W], got {tuple(t.shape)}")
    arr = (t.detach().float().clamp(0, 1) * 255.0 + 0.5).to("cpu").numpy().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")
