"""Safe image decoding and tensor conversion.

`decode_image(data, max_pixels)` turns untrusted bytes into an RGB PIL image or raises `ImageDecodeError` whose
`reason` is a short code that pipelines count (see DECODE_REASONS).

What is decoded is decided from the bytes, never from a file suffix or a declared Content-Type: `sniff` reads the
magic number. Only the raster formats in ALLOWED_FORMATS reach a decoder (JPEG, PNG, WebP, BMP, TIFF, GIF; of an
animation, the first frame); other image formats (ICO, PSD, HEIF, ...) are refused as `unsupported_format` and
text bodies as `not_image_html` / `_svg` / `_json` / `_xml` / `_pdf` before any decoder runs (Pillow's ICO plugin
decodes an embedded PNG inside `Image.open`). For every allowed format the pixel cap is checked from the header
(WebP: parsed here, before Pillow sees the bytes), before any pixel data is decoded, so a decompression bomb costs
nothing.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The one definition of the raster formats this project decodes (Pillow plugin names) and of their file suffixes
# (folder listings of curation, upscaling and evaluation use IMAGE_SUFFIXES).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Bodies that are not raster images, each refused with its own reason (a crawl meets them under image URLs).
TEXT_REASONS = ("not_image_html", "not_image_svg", "not_image_json", "not_image_xml", "not_image_pdf")
# Reason codes a decode can fail with (pipelines count them by these names).
DECODE_REASONS = ("empty", "not_image", *TEXT_REASONS, "unsupported_format", "too_many_pixels", "truncated",
                  "corrupt")
# The reasons that say "these bytes are not an image this project decodes" (as opposed to a broken or huge one).
NOT_IMAGE_REASONS = ("empty", "not_image", *TEXT_REASONS, "unsupported_format")


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Magic numbers of image formats that are recognised but not decoded (refused as unsupported_format).
_OTHER_IMAGE_MAGIC = (
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"), (b"8BPS", "PSD"), (b"icns", "ICNS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"), (b"\xffO\xffQ", "JPEG2000"), (b"\xff\n", "JPEGXL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEGXL"), (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"gimp xcf", "XCF"),
    (b"SIMPLE  =", "FITS"), (b"\x76\x2f\x31\x01", "EXR"), (b"#?RADIANCE", "HDR"), (b"\x0a\x05\x01", "PCX"),
    (b"FORM", "IFF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"II\x2b\x00", "BIGTIFF"),
    (b"MM\x00\x2b", "BIGTIFF"),
)
_ISO_BMFF_IMAGE_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def sniff(data: bytes) -> str:
    """What the bytes are, from their magic number: an ALLOWED_FORMATS name, another image format's name
    (refused), or one of "html", "svg", "json", "xml", "pdf", "unknown"."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in (12, 40, 52, 56, 64,
                                                                                           108, 124):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    for magic, name in _OTHER_IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_BMFF_IMAGE_BRANDS:
        return "HEIF"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PNM"
    if head.startswith(b"%PDF-"):
        return "pdf"
    return _sniff_text(data[:4096])


def _sniff_text(head: bytes) -> str:
    for bom in (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"):
        if head.startswith(bom):
            head = head[len(bom):]
            break
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<meta", b"<title", b"<script")):
        return "html"
    if text.startswith((b"<svg", b"<!doctype svg")) or (text.startswith(b"<?xml") and b"<svg" in text):
        return "svg"
    if text.startswith(b"<?xml"):
        return "xml"
    if text.startswith(b"<!--") or text.startswith(b"<!doctype"):
        return "html" if b"<html" in text or b"<!doctype html" in text else "xml"
    if text.startswith((b"{", b"[")):
        return "json"
    return "unknown"


def _webp_size(data: bytes) -> tuple[int, int]:
    """Canvas size of a WebP from its first chunk (VP8X, VP8L or VP8), read before any decoder runs."""
    fourcc = data[12:16]
    try:
        if fourcc == b"VP8X":
            return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
        if fourcc == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if fourcc == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack_from("<HH", data, 26)
            return w & 0x3FFF, h & 0x3FFF
    except (struct.error, IndexError):
        pass
    raise ImageDecodeError("corrupt", "unreadable WebP header")


def _webp_lossless(data: bytes) -> bool:
    """Whether the (first) image chunk of a WebP is VP8L (lossless); walks the RIFF chunks."""
    at = 12
    while at + 8 <= len(data):
        fourcc = data[at:at + 4]
        if fourcc == b"VP8L":
            return True
        if fourcc == b"VP8 ":
            return False
        size = int.from_bytes(data[at + 4:at + 8], "little")
        at += 8 + size + (size & 1)
    return False


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty", "no bytes")
    kind = sniff(data)
    if kind not in ALLOWED_FORMATS:
        if kind in ("html", "svg", "json", "xml", "pdf"):
            raise ImageDecodeError(f"not_image_{kind}", f"the body is {kind.upper()}")
        if kind == "unknown":
            raise ImageDecodeError("not_image", "unrecognised format")
        raise ImageDecodeError("unsupported_format", f"{kind} is not in {'/'.join(ALLOWED_FORMATS)}")
    if kind == "WEBP":
        w, h = _webp_size(data)
        if w * h > max_pixels:
            raise ImageDecodeError("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x its own cap raises) for huge images; our explicit cap below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("corrupt", f"{kind} header not readable") from exc
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImageDecodeError("corrupt", str(exc)[:200]) from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError("corrupt", f"bad size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    return img


# IJG (libjpeg) base quantisation tables in natural order (ITU-T T.81 Annex K, tables K.1 and K.2); encoders that
# use libjpeg's quality scale (Pillow, libjpeg-turbo, most cameras and web tools) scale these.
_IJG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_IJG_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
               47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))


def jpeg_quality(quantization: dict) -> int | None:
    """Estimated libjpeg quality (1-100) of a JPEG from its quantisation tables (PIL's `img.quantization`): the
    quality whose scaled IJG tables are closest to the stored ones. Encoders with their own tables get the nearest
    IJG-equivalent quality, which still orders coarser tables below finer ones."""
    import numpy as np

    if not quantization:
        return None
    tables = [np.asarray(quantization[k], dtype=np.float64) for k in sorted(quantization)[:2]]
    bases = [np.asarray(_IJG_LUMA, dtype=np.float64), np.asarray(_IJG_CHROMA, dtype=np.float64)]
    q = np.arange(1, 101, dtype=np.float64)
    scale = np.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[:, None]  # libjpeg jpeg_quality_scaling
    err = np.zeros(100)
    for table, base in zip(tables, bases):
        if table.size != 64:
            continue
        expected = np.clip(np.floor((base[None, :] * scale + 50.0) / 100.0), 1, 255)
        err += np.abs(np.log(expected) - np.log(np.maximum(table[None, :], 1))).sum(axis=1)
    return int(q[int(np.argmin(err))])


_LOSSY_TIFF = ("jpeg", "tiff_jpeg", "webp", "jpeg2000")


@dataclass
class SourceInfo:
    """How the decoded pixels were stored: format and mode as stored, lossless or not, palette or CMYK colour, and
    the estimated JPEG quality (None for other formats)."""

    format: str
    mode: str
    lossless: bool
    palette: bool = False       # palette or bilevel storage (mode P, PA, 1): colours were reduced
    cmyk: bool = False
    jpeg_quality: int | None = None


def _source_info(img: Image.Image, kind: str, data: bytes) -> SourceInfo:
    mode = img.mode
    info = SourceInfo(format=kind.lower(), mode=mode, lossless=True, palette=mode in ("P", "PA", "1"),
                      cmyk=mode == "CMYK")
    if kind == "JPEG":
        info.lossless = False
        info.jpeg_quality = jpeg_quality(getattr(img, "quantization", None) or {})
    elif kind == "WEBP":
        info.lossless = _webp_lossless(data)
    elif kind == "TIFF":
        info.lossless = str(img.info.get("compression", "raw")).lower() not in _LOSSY_TIFF
    elif kind == "GIF":
        info.palette = True
    return info


def decode_image(data: bytes, max_pixels: int, *, with_format: bool = False) -> Any:
    """Decode untrusted bytes into an RGB image (EXIF orientation applied).

    Returns the PIL image, or (image, format) when `with_format` is true. Raises ImageDecodeError(reason).
    """
    rgb, src = decode_with_source(data, max_pixels)
    return (rgb, src.format) if with_format else rgb


def decode_with_source(data: bytes, max_pixels: int) -> tuple[Image.Image, SourceInfo]:
    """Decode untrusted bytes into an RGB image (EXIF orientation applied) and say how it was stored
    (SourceInfo: lossless or not, palette, CMYK, estimated JPEG quality). Raises ImageDecodeError(reason)."""
    img = _open_checked(data, max_pixels)
    kind = img.format or "unknown"
    src = _source_info(img, kind, data)
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
    return _to_rgb(img), src


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
