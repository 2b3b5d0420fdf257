"""Curation keeps the native original. The upscaling estimate (analysis.native_scale) grows with the enlargement
factor for every resampling filter, with and without a JPEG re-encode; a duplicate group is represented by the member
with the most native pixels, then the least lossy encoding, then the first in the inputs; end to end, the curate job
on real Ray over a loopback site keeps the original over its enlargements, lossy copies and a later byte-identical
copy."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobkit.config import config_from_dict
from pipelines import curate
from pipelines.curate_schema import CURATED_SCHEMA, SCHEMA_VERSION_KEY, check_schema, shard_files
from pipelines.curation import dedup
from pipelines.curation.analysis import Rejected, analyse, native_scale
from tests.helpers.http_fixture import encode, http_server
from vosr import storage
from vosr.imageio import decode_image

R = Image.Resampling
FILTERS = {"nearest": R.NEAREST, "bilinear": R.BILINEAR, "bicubic": R.BICUBIC, "lanczos": R.LANCZOS}
FACTORS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 16.0)
DEFAULT = config_from_dict({}).curate.filters


def _rgb(path) -> Image.Image:
    return decode_image(path.read_bytes(), 10**9)


def _enlarged(img: Image.Image, factor: float, flt) -> Image.Image:
    """The photo reduced by `factor` (a thumbnail) and enlarged back to its size: an enlargement by `factor`."""
    w, h = img.size
    thumb = img.resize((max(1, round(w / factor)), max(1, round(h / factor))), R.LANCZOS)
    return thumb.resize((w, h), flt)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    return decode_image(encode(img, "JPEG", quality=quality), 10**9)


def _native_photos(photos, n: int, width: int = 0) -> list[Image.Image]:
    """The first n photos the estimator scores native (optionally reduced to `width` pixels wide)."""
    out = []
    for p in photos:
        img = _rgb(p)
        if width:
            img = img.resize((width, round(img.height * width / img.width)), R.LANCZOS)
        if native_scale(img) == 1.0:
            out.append(img)
        if len(out) == n:
            return out
    raise AssertionError("no photo scored native")


# ------------------------------------------------------------------ the estimate

def test_native_scale_grows_with_the_enlargement_factor_for_every_filter(photos):
    for img in _native_photos(photos[::7], 2):
        assert native_scale(img.resize((img.width // 2, img.height // 2), R.LANCZOS)) < 1.5  # reduced: native
        for name, flt in FILTERS.items():
            for quality in (0, 75):
                est = []
                for f in FACTORS:
                    up = _enlarged(img, f, flt)
                    est.append(native_scale(_jpeg(up, quality), jpeg=True) if quality else native_scale(up))
                where = (name, quality, [round(e, 2) for e in est])
                # monotone in the factor (a step may dip by the estimate's noise, never by a factor's worth)
                assert all(b >= 0.85 * a for a, b in zip(est, est[1:])), where
                assert est[-1] > est[FACTORS.index(4.0)] > est[0], where
                # 3x and more: above the default threshold; the large factors estimated within a factor 2
                assert min(est[FACTORS.index(3.0):]) > DEFAULT.max_upscale, where
                assert 8.0 <= est[-1] <= 32.0 and 5.5 <= est[FACTORS.index(11.0)] <= 22.0, where


def test_upscaled_images_are_rejected_with_their_own_reason(photos):
    img = _native_photos(photos, 1)[0]
    filters = config_from_dict({"curate": {"filters": {"min_short_side": 128}}}).curate.filters
    a = analyse(encode(img), filters)
    assert a.native_scale == 1.0 and a.sharpness is None  # min_sharpness is off: not computed
    big = _enlarged(img, 11.0, R.BICUBIC)
    with pytest.raises(Rejected) as e:
        analyse(encode(big, "JPEG", quality=85), filters)
    assert e.value.reason == "upscaled" and "estimated enlargement" in e.value.detail
    off = config_from_dict({"curate": {"filters": {"min_short_side": 128, "max_upscale": 0,
                                                   "min_sharpness": -3.0}}}).curate.filters
    b = analyse(encode(big), config_from_dict({"curate": {"filters": {"min_short_side": 128,
                                                                      "max_upscale": 0}}}).curate.filters)
    assert b.native_scale > 8.0  # measured and stored even when the filter is off
    with pytest.raises(Rejected) as e:  # the optional sharpness filter still works when asked for
        analyse(encode(_enlarged(img, 3.0, R.BICUBIC)), off)
    assert e.value.reason == "low_sharpness"


# ------------------------------------------------------------------ the representative rule

def _key(w, h, fid, scale, rid="0" * 32, unit="u" * 24, row=0, order=0) -> str:
    return dedup.node_key(w, h, fid, scale, rid, unit, row, order)


def test_representative_rule_native_pixels_then_fidelity_then_input_order():
    native = _key(1000, 800, 100.0, 1.0, "f" * 32, order=5)
    # an enlarged copy never wins on raw pixels: 2x (estimated 2.0 or as low as 1.8) and 11x, listed first
    assert native < _key(2000, 1600, 100.0, 2.0, order=0)
    assert native < _key(2000, 1600, 100.0, 1.8, order=0)
    # an estimate below the first step (1.75) counts as native: such a copy is ranked by its pixels (a known limit)
    assert native > _key(2000, 1600, 100.0, 1.7, order=0)
    assert native < _key(11000, 8800, 100.0, 9.0, order=0)
    # more native pixels win over a better encoding; a smaller native copy loses to the original
    assert _key(1000, 800, 75.0, 1.0, order=9) < _key(900, 700, 100.0, 1.0, order=0)
    assert native < _key(800, 640, 100.0, 1.0, order=0)
    # equal native pixels: the least lossy encoding, then the input position (block order, then row; not the id)
    assert _key(1000, 800, 100.0, 1.0, "f" * 32, order=3) < _key(1000, 800, 90.0, 1.0, "0" * 32, order=0)
    first = _key(1000, 800, 100.0, 1.0, "f" * 32, "b" * 24, row=7, order=2)
    assert first < _key(1000, 800, 100.0, 1.0, "0" * 32, "a" * 24, row=0, order=3)
    assert first < _key(1000, 800, 100.0, 1.0, "0" * 32, "b" * 24, row=8, order=2)
    fields = {k: v[0].as_py() for k, v in dedup.key_fields(pa.array([first])).items()}
    assert fields == {"id": "f" * 32, "unit": "b" * 24, "row": 7}
    # a missing or sub-native estimate counts as native
    assert _key(1000, 800, 100.0, None) == _key(1000, 800, 100.0, 0.5) == _key(1000, 800, 100.0, 1.0)


def test_old_ledgers_and_shards_are_not_misread():
    old = CURATED_SCHEMA.with_metadata({SCHEMA_VERSION_KEY: b"2"})
    with pytest.raises(ValueError, match="schema version"):
        check_schema(old)
    assert "native_scale" in CURATED_SCHEMA.names
    from pipelines.curate_schema import STAGE1_SCHEMA

    assert "native_scale" in STAGE1_SCHEMA.names


# ------------------------------------------------------------------ end to end: the curate job on real Ray

def test_curate_keeps_the_original_over_enlargements_lossy_and_identical_copies(ray_local, photos, tmp_path):
    original = _native_photos(photos[1:], 1, width=160)[0]
    # several input blocks: the enlargements come before the original, the byte-identical copy is in a later block
    # (block keys are hashes: the input order, not the key, must decide)
    files = {
        "a-up11.png": encode(original.resize((original.width * 11, original.height * 11), R.LANCZOS)),
        "b-up2.png": encode(original.resize((original.width * 2, original.height * 2), R.BICUBIC)),
        "c-original.png": encode(original),
        "d-q40.jpg": encode(original, "JPEG", quality=40),
        "e-palette.png": encode(original.quantize(256)),
    }
    files["f-same.png"] = files["c-original.png"]  # byte-identical, at a later URL
    (tmp_path / "site").mkdir()
    paths = []
    for name, blob in files.items():
        paths.append(tmp_path / "site" / name)
        paths[-1].write_bytes(blob)
    with http_server(paths) as site:
        listing = tmp_path / "urls.txt"
        urls = [site.photo_url(name) for name in files]
        listing.write_text("".join(u + "\n" for u in urls))
        cfg = config_from_dict({
            "run": {"output_root": str(tmp_path / "root"), "mlflow": {"enabled": False}},
            "curate": {"sources": [str(listing)], "output": str(tmp_path / "out"), "rows_per_shard": 3,
                       "cpus_per_block": 0.5,
                       "crawl": {"allow_hosts": ["127.0.0.1"], "per_domain_rps": 500.0, "retries": 0},
                       # the filter is off so every copy reaches dedup; the rule alone must pick the original
                       "filters": {"min_short_side": 64, "max_upscale": 0},
                       "balance": {"enabled": False}}})
        summary = curate.run(cfg)
    assert summary["ok"] == 6 and summary["duplicates"] == 5 and summary["kept"] == 1
    rows = {}
    for f in shard_files(str(tmp_path / "out")):
        t = pq.read_table(f)
        assert t.schema.equals(CURATED_SCHEMA, check_metadata=False)
        rows.update({r["source"].rsplit("/", 1)[-1]: r for r in t.to_pylist()})
    kept = rows["c-original.png"]
    assert kept["kept"] and kept["duplicate_of"] is None and kept["native_scale"] == 1.0
    for name in files:
        if name != "c-original.png":
            assert rows[name]["duplicate_of"] == kept["id"] and rows[name]["drop_reason"] == "duplicate", name
    assert rows["a-up11.png"]["native_scale"] > 6.0 and rows["b-up2.png"]["native_scale"] > 1.5
    # the estimate is in the stage-1 ledger too
    ledger = pa.concat_tables(pq.read_table(f) for f in storage.list_files(str(tmp_path / "out" / "_stage1"),
                                                                               ".parquet"))
    by_source = dict(zip(ledger["source"].to_pylist(), ledger["native_scale"].to_pylist()))
    unit = dict(zip(ledger["source"].to_pylist(), ledger["unit"].to_pylist()))
    assert unit[site.photo_url("f-same.png")] != unit[site.photo_url("c-original.png")]  # a later block
    assert by_source[site.photo_url("a-up11.png")] == pytest.approx(rows["a-up11.png"]["native_scale"])
    assert np.isclose(by_source[site.photo_url("c-original.png")], 1.0)
    assert Image.open(io.BytesIO(kept["image"])).size == original.size
