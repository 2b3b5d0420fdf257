"""Curation keeps what an SR model should learn from. The upscaling filter rejects enlarged copies, the
best copy represents a duplicate group, bytes (not the declared type) decide what is an image, and only listed
raster formats are decoded, each with the pixel cap checked before any pixel data is decoded."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobkit.config import config_from_dict
from pipelines.curation import analysis, dedup
from pipelines.curation.analysis import Rejected, analyse, native_scale, native_sharpness
from tests.helpers.curation import fetch_urls
from tests.helpers.http_fixture import encode, http_server
from vosr.imageio import ALLOWED_FORMATS, IMAGE_SUFFIXES, ImageDecodeError, decode_image, jpeg_quality, sniff

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = config_from_dict({}).curate.filters
# the photos used in tests may be smaller than the 512 px default; every other filter stays at its default
FILTERS = config_from_dict({"curate": {"filters": {"min_short_side": 128}}}).curate.filters


def _rgb(path: Path) -> Image.Image:
    return decode_image(path.read_bytes(), 10**9)


def _upscaled(img: Image.Image, factor: float, method) -> Image.Image:
    w, h = img.size
    return img.resize((round(w / factor), round(h / factor)), method).resize((w, h), method)


# ------------------------------------------------------------------ the upscaling filter

def test_default_threshold_keeps_originals_and_rejects_upscaled_copies(photos):
    sample = photos[::4][:8]
    orig = [native_scale(_rgb(p)) for p in sample]
    jpeg = [native_scale(decode_image(encode(_rgb(p), "JPEG", quality=85), 10**9), jpeg=True) for p in sample]
    up = [native_scale(_upscaled(_rgb(p), f, m)) for p in sample
          for f, m in ((3, Image.Resampling.LANCZOS), (4, Image.Resampling.BICUBIC), (11, Image.Resampling.BICUBIC))]
    thr = DEFAULT.max_upscale
    assert sum(s <= thr for s in orig) >= len(orig) - 1, (thr, orig)
    assert sum(s <= thr for s in jpeg) >= len(jpeg) - 1, (thr, jpeg)
    assert sum(s > thr for s in up) >= len(up) - 1, (thr, up)
    # the filter is applied by stage 1 with its own reason; an original passes the same call
    big = _rgb(sample[0])
    with pytest.raises(Rejected) as e:
        analyse(encode(_upscaled(big, 4, Image.Resampling.BICUBIC)), FILTERS)
    assert e.value.reason == "upscaled"
    assert analyse(sample[0].read_bytes(), FILTERS).native_scale == pytest.approx(orig[0], abs=1e-4)
    # the earlier sharpness filter, off by default, still rejects 2x and larger copies when it is asked for
    sharp = config_from_dict({"curate": {"filters": {"min_short_side": 128, "max_upscale": 0,
                                                     "min_sharpness": -3.0}}}).curate.filters
    two = [_upscaled(_rgb(p), 2, Image.Resampling.LANCZOS) for p in sample]
    assert sum(native_sharpness(t) < sharp.min_sharpness for t in two) >= len(two) - 1
    with pytest.raises(Rejected) as e:
        analyse(encode(_upscaled(big, 4, Image.Resampling.BICUBIC)), sharp)
    assert e.value.reason == "low_sharpness"


def test_a_soft_photo_with_pixel_scale_detail_is_kept_and_its_enlargements_are_not(photos, monkeypatch):
    """opencv_basketball1 (motion blur; in the dev set and in assets/photos) is smooth above 2 px like a 3x
    enlargement; its pixel-scale detail keeps it, while its own 3x enlargements, with or without JPEG, are rejected."""
    img = _rgb(next(p for p in photos if p.name == "opencv_basketball1.png"))
    thr = DEFAULT.max_upscale
    as_jpeg = decode_image(encode(img, "JPEG", quality=90), 10**9)
    assert native_scale(img) <= thr and native_scale(as_jpeg, jpeg=True) <= thr
    with monkeypatch.context() as m:  # without the pixel-scale test it scores as an enlargement
        m.setattr(analysis, "SCALE_DETAIL", 0.0)
        assert native_scale(img) > thr and native_scale(as_jpeg, jpeg=True) > thr
    for method in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS):
        up = _upscaled(img, 3, method)
        assert native_scale(up) > thr, method
        assert native_scale(decode_image(encode(up, "JPEG", quality=75), 10**9), jpeg=True) > thr, method


def test_jpeg_block_edges_are_not_taken_for_pixel_scale_detail(photos):
    """A JPEG re-encode of a 3x enlargement has steps at its 8 x 8 block edges; inside the blocks it stays smooth, so
    the exponent over in-block pairs is higher than over all pairs, and above SCALE_DETAIL."""
    for path in photos[::6][:6]:
        img = _rgb(path)
        img = img.crop((0, 0, min(img.width, 1024), min(img.height, 1024)))
        up = _upscaled(img, 3, Image.Resampling.BILINEAR)
        grey = np.asarray(decode_image(encode(up, "JPEG", quality=75), 10**9).convert("L"))
        d, _, _ = analysis.structure_function(grey, analysis.SCALE_LAGS, analysis.SCALE_STRIDE, analysis.SCALE_LINES)
        inside, across = (analysis.pixel_detail_exponent(grey, d, analysis.SCALE_STRIDE, analysis.SCALE_LINES, jpeg)
                          for jpeg in (True, False))
        assert across < inside and inside > analysis.SCALE_DETAIL, (path.name, across, inside)


def test_paper_recipe_defaults():
    assert DEFAULT.min_short_side == 512 and DEFAULT.min_entropy > 0 and 1.0 < DEFAULT.max_upscale < 3.0
    assert DEFAULT.min_sharpness <= -100  # the earlier sharpness filter is opt-in
    from jobkit.config import explain_config

    text = explain_config("curate")
    assert "bench_sharpness" in text and "512 px crops" in text


# ------------------------------------------------------------------ representative of a duplicate group

def _variants(img: Image.Image) -> dict[str, bytes]:
    q = 90
    return {
        "jpeg_q90": encode(img, "JPEG", quality=q),
        "jpeg_q75": encode(img, "JPEG", quality=75),
        "palette_png": encode(img.quantize(256)),
        "cmyk_jpeg": encode(img.convert("CMYK"), "JPEG", quality=95),
        "webp_lossy": encode(img, "WEBP", quality=90),
        "gif": encode(img, "GIF"),
    }


def _key(a, rid: str) -> str:
    return dedup.node_key(a.width, a.height, a.fidelity, a.native_scale, rid, "u" * 24, 0)


def test_lossless_original_beats_its_reencodes_at_equal_size(photos):
    png = next(p for p in photos if p.suffix.lower() == ".png")
    img = _rgb(png)
    original = analyse(encode(img), FILTERS)
    copies = {k: analyse(v, FILTERS) for k, v in _variants(img).items()}
    assert original.fidelity == 100.0
    assert copies["jpeg_q90"].fidelity == 90 and copies["jpeg_q75"].fidelity == 75
    assert copies["palette_png"].fidelity <= 40 and copies["gif"].fidelity <= 40
    assert copies["cmyk_jpeg"].fidelity <= 50 and copies["webp_lossy"].fidelity < 100
    # compression artefacts raise gradient scores: the old rule (size, gradient) preferred a re-encode here
    assert max(c.gradient for c in copies.values()) > original.gradient
    # ids chosen so the id tie-break alone would pick a copy: only the encoding rule makes the original win
    keys = {k: _key(a, f"{i:032x}") for i, (k, a) in enumerate(copies.items())}
    keys["original"] = _key(original, "f" * 32)
    assert min(keys, key=keys.get) == "original"
    assert min(("jpeg_q90", "jpeg_q75"), key=keys.get) == "jpeg_q90"
    assert min(("jpeg_q75", "palette_png", "cmyk_jpeg"), key=keys.get) == "jpeg_q75"
    # native pixels, not raw pixels, come first: a 2x enlargement (a JPEG at the same quality as the q90 copy, so
    # bigger in every raw measure) does not beat the smaller lossless original (the upscaling filter is off here)
    no_filter = config_from_dict({"curate": {"filters": {"min_short_side": 128, "max_upscale": 0}}})
    bigger = analyse(encode(img.resize((img.width * 2, img.height * 2), Image.Resampling.LANCZOS), "JPEG",
                            quality=90), no_filter.curate.filters)
    assert bigger.native_scale > 1.5
    assert _key(bigger, "0" * 32) > keys["original"]


def test_every_original_represents_its_reencodes_and_mislabelled_copies(photos):
    """The representative rule on real photos: the original wins its group against lossy re-encodes (no finer than the
    original itself: a JPEG re-saved at a higher quality setting cannot be told apart from its tables) and
    copies whose name or container lies about the content."""
    k = config_from_dict({}).curate.dedup.hamming
    for p in photos[1::6][:5]:
        data = p.read_bytes()
        img = decode_image(data, 10**9)
        original = analyse(data, FILTERS)
        q = jpeg_quality(Image.open(io.BytesIO(data)).quantization) if original.format == "jpeg" else 95
        copies = {"jpeg": encode(img, "JPEG", quality=max(q - 10, 30)), "palette": encode(img.quantize(256)),
                  "cmyk": encode(img.convert("CMYK"), "JPEG", quality=q),
                  "mislabelled.png": encode(img, "JPEG", quality=max(q - 5, 30)),  # a JPEG under a .png name
                  "webp": encode(img, "WEBP", quality=80)}
        keys = {"original": _key(original, "f" * 32)}
        for i, (name, blob) in enumerate(copies.items()):
            a = analyse(blob, FILTERS)
            assert bin((a.phash ^ original.phash) & (2**64 - 1)).count("1") <= k, (p.name, name)  # same group
            keys[name] = _key(a, f"{i:032x}")
        assert min(keys, key=keys.get) == "original", (p.name, original.format, q)


# ------------------------------------------------------------------ the bytes decide, not the declared type

def test_png_served_as_text_is_kept_and_text_bodies_get_their_own_reasons(photos):
    png = next(p for p in photos if p.suffix.lower() == ".png")
    with http_server([png]) as site:
        urls = [site.url(f"/mislabelled/text/plain/{png.name}"),
                site.url(f"/mislabelled/application/octet-stream/{png.name}"),
                site.url("/html"), site.url("/svg.png"), site.url("/json.jpg")]
        res = fetch_urls(urls, config_from_dict({"curate": {"crawl": {"allow_hosts": ["127.0.0.1"],
                                                                      "retries": 0}}}).curate.crawl)
    assert [r.reason for r in res] == ["ok"] * 5  # bodies arrive whatever their declared type
    assert [r.content_type.split(";")[0] for r in res] == ["text/plain", "application/octet-stream",
                                                          "text/html", "image/png", "image/jpeg"]
    kept = analyse(res[0].data, FILTERS)
    assert kept.format == "png" and (kept.width, kept.height) == Image.open(png).size
    assert analyse(res[1].data, FILTERS).sha256 == kept.sha256
    for r, reason in zip(res[2:], ("not_image_html", "not_image_svg", "not_image_json")):
        with pytest.raises(Rejected) as e:
            analyse(r.data, FILTERS)
        assert e.value.reason == reason


def test_sniff_and_the_one_list_of_formats():
    assert sniff(encode(Image.new("RGB", (4, 4)))) == "PNG" and sniff(b"\xef\xbb\xbf  <!DOCTYPE html>") == "html"
    assert sniff(b"%PDF-1.7") == "pdf" and sniff(b"\x00\x00\x01\x00\x01\x00") == "ICO"
    assert sniff(b"\x00\x00\x00\x18ftypavif") == "HEIF" and sniff(b"random bytes") == "unknown"
    from inference import evaluate, upscale
    from pipelines.curation import sources

    assert sources.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert upscale.IMAGE_SUFFIXES is IMAGE_SUFFIXES and evaluate.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    for fmt in ALLOWED_FORMATS:  # every allowed format round-trips through decode
        img = Image.new("RGB", (24, 16), (30, 140, 220))
        out = decode_image(encode(img, fmt), 10**6)
        assert out.size == (24, 16) and out.mode == "RGB", fmt
    for fmt in ("ICO", "PPM", "TGA", "PCX"):
        with pytest.raises(ImageDecodeError) as e:
            decode_image(encode(Image.new("RGB", (16, 16)), fmt), 10**6)
        assert e.value.reason in ("unsupported_format", "not_image"), fmt


def test_jpeg_quality_estimate_follows_the_encoder_setting():
    img = Image.new("RGB", (64, 64))
    img.putdata([(x * 4 % 256, (x * 7) % 256, 90) for x in range(64 * 64)])
    for q in (40, 60, 75, 85, 92, 98):
        assert jpeg_quality(Image.open(io.BytesIO(encode(img, "JPEG", quality=q))).quantization) == q


# ------------------------------------------------------------------ the pixel cap holds before decoding

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bilevel_png(side: int) -> bytes:
    """A real side x side 1-bit PNG (all black), built row by row so making it costs no memory."""
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def ico_holding(png: bytes) -> bytes:
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def _header_bombs() -> dict[str, bytes]:
    """One small file per allowed format whose header claims far more pixels than the 64M default cap."""
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    out = {}
    b = bytearray(encode(img, "JPEG"))
    sof = b.index(b"\xff\xc0")
    b[sof + 5:sof + 9] = struct.pack(">HH", 30000, 30000)
    out["JPEG"] = bytes(b)
    b = bytearray(encode(img))
    b[16:24] = struct.pack(">II", 30000, 30000)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    out["PNG"] = bytes(b)
    b = bytearray(encode(img, "GIF"))
    b[6:10] = struct.pack("<HH", 65535, 65535)
    out["GIF"] = bytes(b)
    b = bytearray(encode(img, "BMP"))
    b[18:26] = struct.pack("<ii", 30000, 30000)
    out["BMP"] = bytes(b)
    b = bytearray(encode(img, "WEBP", quality=80))
    assert b[12:16] == b"VP8 "
    b[26:30] = struct.pack("<HH", 16383, 16383)
    out["WEBP"] = bytes(b)
    b = bytearray(encode(img, "TIFF"))
    ifd = struct.unpack_from("<I", b, 4)[0]
    for i in range(struct.unpack_from("<H", b, ifd)[0]):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", b, at)
        if tag in (256, 257):
            fmt = "<H" if typ == 3 else "<I"
            struct.pack_into(fmt, b, at + 8, 30000)
    out["TIFF"] = bytes(b)
    return out


_MEASURE = """
import json, resource, sys, time
from vosr.imageio import ImageDecodeError, decode_image
blobs = {name: open(path, "rb").read() for name, path in json.loads(sys.argv[1]).items()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
reasons = {}
for name, data in blobs.items():
    try:
        decode_image(data, 64_000_000)
        reasons[name] = "decoded"
    except ImageDecodeError as exc:
        reasons[name] = exc.reason
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reasons": reasons, "peak_growth_kib": peak - before, "seconds": time.perf_counter() - t0}))
"""


def test_unlisted_formats_and_bombs_are_refused_before_decoding(tmp_path):
    files = {"ICO": ico_holding(bilevel_png(13000)), **{f"bomb_{k}": v for k, v in _header_bombs().items()}}
    assert len(files["ICO"]) < 2**20  # a small file holding a 13000x13000 image (169 M pixels decoded)
    paths = {}
    for name, data in files.items():
        paths[name] = str(tmp_path / name)
        Path(paths[name]).write_bytes(data)
    # a fresh process, so its peak memory is this decode's and not an earlier test's
    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(paths)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = {"ICO": "unsupported_format", **{f"bomb_{k}": "too_many_pixels" for k in ALLOWED_FORMATS}}
    assert got["reasons"] == want
    assert got["peak_growth_kib"] < 8 * 1024, got  # a few MiB at most, not the hundreds a decode would take


def test_shard_stats_count_decoded_images_by_declared_type():
    import pyarrow as pa

    from pipelines.curation.writer import ledger_counts

    ledger = pa.table({"reason": ["ok", "ok", "ok", "ok", "not_image_html", "ok"],
                       "declared_type": ["image/png", "text/plain; charset=utf-8", None, "image/svg+xml",
                                         "text/html", "made up!"]})
    stats = ledger_counts(ledger)
    assert stats["ok_by_declared_type"] == {"image/png": 1, "image/svg_xml": 1, "none": 1, "other": 1,
                                            "text/plain": 1}
    assert stats["failed"] == {"not_image_html": 1} and stats["fetched"] == 6  # a refused body was fetched
