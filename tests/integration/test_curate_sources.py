"""Curation inputs as people have them: LAION / DataComp / img2dataset Parquet lists with their own column names and
declared sizes (rows the filters would reject are decided without a request), WebDataset tar shards (written by the
webdataset package's own TarWriter and, img2dataset-style, by tarfile) from a folder and from the moto S3 server,
damaged shards, listing off the driver, bounded URL-list reads. A killed tar-source job resumed:
tests/e2e/test_curate_tar_resume.py."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobkit.config import config_from_dict
from pipelines.curation import listing
from pipelines.curation.sources import SourceError, Unit, plan_units, read_items, resolve_columns
from pipelines.curation.stage1 import reason_counts, run_unit
from pipelines.curation.tars import split_key
from tests.helpers.http_fixture import encode, http_server
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture

FILTERS = {"min_short_side": 64, "max_aspect_ratio": 3.0, "min_gradient": 0.0, "min_entropy": 2.0,
           "max_upscale": 0}
CRAWL = {"timeout_s": 2.0, "retries": 0, "allow_hosts": ["127.0.0.1"], "per_domain_rps": 500.0,
         "per_domain_concurrency": 8, "gate_actors": 0}


def _cfg(out, **kw):
    return config_from_dict({"curate": {"output": str(out), "filters": FILTERS, "crawl": CRAWL, **kw}}).curate


def small_photos(photos, folder, n=4, side=160) -> list:
    """n distinct small JPEGs cut from the real photos (fast to analyse), as files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(photos[:n]):
        img = Image.open(p).convert("RGB")
        img.thumbnail((side + 40 * i, side + 40 * i))
        f = folder / f"small{i}.jpg"
        f.write_bytes(encode(img, "JPEG", quality=92))
        out.append(f)
    return out


def _ledger(out, key) -> list[dict]:
    return pq.read_table(out / "_stage1" / f"{key}.parquet").sort_by("row").to_pylist()


def _run_all(units, cfg, prefix="k") -> list[dict]:
    rows = []
    for i, u in enumerate(units):
        run_unit(u, f"{prefix}{i:03d}", cfg)
        rows += _ledger(Path(cfg.output), f"{prefix}{i:03d}")
    return rows


# ------------------------------------------------------------------ URL lists as they come

def test_laion_and_datacomp_lists_decide_listed_sizes_without_a_request(photos, tmp_path):
    imgs = small_photos(photos, tmp_path / "img")
    sizes = {f.name: Image.open(f).size for f in imgs}
    with http_server(imgs) as site:
        def url(i, name):
            return site.photo_url(name) + f"?row={i}"
        # LAION: URL, TEXT, WIDTH, HEIGHT (+ LICENSE, similarity); rows 1 and 4 too small, row 3 a banner
        laion = [(url(0, "small0.jpg"), "a cat", *sizes["small0.jpg"]), (url(1, "small1.jpg"), "tiny", 40, 30),
                 (url(2, "small2.jpg"), "a dog", *sizes["small2.jpg"]), (url(3, "small3.jpg"), "banner", 900, 90),
                 (url(4, "small0.jpg"), "thumb", 50, 500), (url(5, "small3.jpg"), None, None, None)]
        pq.write_table(pa.table({
            "SAMPLE_ID": pa.array(range(6), pa.int64()), "URL": [r[0] for r in laion], "TEXT": [r[1] for r in laion],
            "HEIGHT": pa.array([r[3] for r in laion], pa.int32()), "WIDTH": pa.array([r[2] for r in laion], pa.int32()),
            "LICENSE": ["?", "cc-by", "?", "?", "?", "?"], "similarity": [0.3] * 6}), tmp_path / "laion.parquet")
        # DataComp: uid, url, text, original_width, original_height, sha256 (+ a list column)
        pq.write_table(pa.table({
            "uid": ["u0", "u1", "u2"], "url": [url(10, "small1.jpg"), url(11, "small2.jpg"), url(12, "small0.jpg")],
            "text": ["x", "y", "z"], "original_width": [sizes["small1.jpg"][0], 2000, 60],
            "original_height": [sizes["small1.jpg"][1], 500, 60], "sha256": ["0" * 64] * 3,
            "face_bboxes": [[], [[0.1, 0.2, 0.3, 0.4]], []]}), tmp_path / "datacomp.parquet")
        out = tmp_path / "out"
        laion_cfg = _cfg(out, columns={"metadata": ["TEXT", "license"]})
        laion_units = plan_units([str(tmp_path / "laion.parquet")], 4, columns=laion_cfg.columns,
                                 workdir=str(tmp_path / "work"))
        with pytest.raises(SourceError, match=r"metadata names column 'license'.*uid"):
            plan_units([str(tmp_path / "datacomp.parquet")], 4, columns=laion_cfg.columns)
        cfg = _cfg(out, columns={"metadata": ["text", "face_bboxes"]})
        dc_units = plan_units([str(tmp_path / "datacomp.parquet")], 4, columns=cfg.columns)
        assert laion_units[0].cols["url"] == "URL" and laion_units[0].cols["width"] == "WIDTH"
        assert dc_units[0].cols["width"] == "original_width"
        rows = _run_all(laion_units, laion_cfg, "l") + _run_all(dc_units, cfg, "d")
        requested = [p for _, p, _ in site.requests]
    got = {r["source"].rsplit("=", 1)[1]: r for r in rows}
    assert {k: r["reason"] for k, r in got.items()} == {
        "0": "ok", "1": "prefilter_too_small", "2": "ok", "3": "prefilter_bad_aspect", "4": "prefilter_too_small",
        "5": "ok", "10": "ok", "11": "prefilter_bad_aspect", "12": "prefilter_too_small"}
    prefiltered = {k for k, r in got.items() if r["reason"].startswith("prefilter_")}
    assert len(requested) == len(got) - len(prefiltered)          # one request per row left, none for the others
    assert all(r["declared_type"] is None and r["image"] is None for k, r in got.items() if k in prefiltered)
    assert "listed 40x30" in got["1"]["detail"]
    assert json.loads(got["0"]["metadata"]) == {"TEXT": "a cat", "license": "?"}
    assert json.loads(got["11"]["metadata"]) == {"face_bboxes": [[0.1, 0.2, 0.3, 0.4]], "text": "y"}
    counts = reason_counts([r["reason"] for r in rows])
    assert counts["fetched"] == len(got) - len(prefiltered) and counts["filtered"]["prefilter_too_small"] == 3


def test_other_schemas_map_by_config_and_img2dataset_output_uses_original_sizes(tmp_path):
    # img2dataset's output Parquet: width/height after its resize, original_* as found: the originals decide
    pq.write_table(pa.table({"key": ["000", "001"], "url": ["http://a.example/1.jpg", "http://a.example/2.jpg"],
                             "caption": ["c0", "c1"], "status": ["success"] * 2, "width": [256, 256],
                             "height": [256, 256], "original_width": [2048, 100], "original_height": [1536, 100]}),
                   tmp_path / "i2d.parquet")
    items = [it for u in plan_units([str(tmp_path / "i2d.parquet")], 10) for it in read_items(u)]
    assert [(it.width, it.height) for it in items] == [(2048, 1536), (100, 100)]
    # any other schema through curate.columns; CSV and TSV headers matched without case
    (tmp_path / "mine.tsv").write_text("Link\tW\tH\tLabel\nhttp://b.example/x.png\t640\t480\tcats\n")
    cols = {"url": "link", "width": "w", "height": "h", "category": "LABEL"}
    it, = [it for u in plan_units([str(tmp_path / "mine.tsv")], 10, columns=cols) for it in read_items(u)]
    assert (it.source, it.width, it.height, it.category) == ("http://b.example/x.png", 640, 480, "cats")
    (tmp_path / "laion.csv").write_text("URL,TEXT\nhttp://c.example/1.jpg,hello\n")
    it, = [it for u in plan_units([str(tmp_path / "laion.csv")], 10) for it in read_items(u)]
    assert it.source == "http://c.example/1.jpg"
    with pytest.raises(SourceError, match=r"needs a url column.*curate.columns.url"):
        resolve_columns(["link", "caption"], None, "x.parquet")
    with pytest.raises(SourceError, match=r"curate.columns.width names column 'wide'"):
        resolve_columns(["url", "w"], {"width": "wide"}, "x.parquet")


def test_brace_patterns_and_member_keys():
    assert listing.expand_braces("s3://b/shards/{00000..00002}.tar") == [
        "s3://b/shards/00000.tar", "s3://b/shards/00001.tar", "s3://b/shards/00002.tar"]
    assert listing.expand_braces("/d/{a,b}/{8..10}.tar") == ["/d/a/8.tar", "/d/a/9.tar", "/d/a/10.tar",
                                                            "/d/b/8.tar", "/d/b/9.tar", "/d/b/10.tar"]
    assert listing.expand_braces("/d/{x}.tar") == ["/d/{x}.tar"] and not listing.has_braces("/d/{x}.tar")
    assert split_key("00001/000010023.seg.png") == ("00001/000010023", "seg.png")
    assert split_key("abc.JPG") == ("abc", "jpg") and split_key("README") == ("README", "")


# ------------------------------------------------------------------ tar shards

def _wds_shard(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _i2d_shard(path, samples):
    """img2dataset's layout, written with tarfile: <key>.jpg, <key>.json, <key>.txt per sample."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(folder, imgs) -> dict:
    """Three shards in `folder`: a webdataset one, an img2dataset one with a non-image sample and a member that
    is not an image, and a truncated one; returns the expected reason per source."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [f.read_bytes() for f in imgs]
    _wds_shard(folder / "a-00000.tar", [
        {"__key__": "s000", "jpg": blobs[0], "json": {"url": "http://x/0", "caption": "zero"}, "cls": b"birds"},
        {"__key__": "s001", "jpg": blobs[1], "json": {"url": "http://x/1", "caption": "one"}, "txt": "one!"}])
    meta = [json.dumps({"url": f"http://y/{k}", "key": k, "status": "success", "caption": f"cap {k}",
                        "width": 160, "height": 120}).encode() for k in ("000010000", "000010001", "000010002",
                                                                          "000010003")]
    _i2d_shard(folder / "b-00001.tar", [
        ("000010000", {"jpg": blobs[2], "json": meta[0], "txt": b"cap 000010000"}),
        ("000010001", {"json": meta[1], "txt": b"no image here"}),            # a sample with no image member
        ("000010002", {"jpg": b"<html>not a photo</html>", "json": meta[2]}),  # an image member that is not one
        ("000010003", {"mp4": b"\0\0\0\x18ftypmp42", "json": meta[3]})])
    _wds_shard(folder / "tmp-full.tar", [{"__key__": f"t{i:03d}", "jpg": blobs[i % len(blobs)]} for i in range(3)])
    full = (folder / "tmp-full.tar").read_bytes()
    (folder / "tmp-full.tar").unlink()
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(full))]
    (folder / "c-00002.tar").write_bytes(full[:offsets[2] + 700])  # cut inside the third sample's image
    a, b, c = (str(folder / n) for n in ("a-00000.tar", "b-00001.tar", "c-00002.tar"))
    return {f"{a}#s000": "ok", f"{a}#s001": "ok", f"{b}#000010000": "ok", f"{b}#000010001": "no_image_member",
            f"{b}#000010002": "not_image_html", f"{b}#000010003": "no_image_member", f"{c}#t000": "ok",
            f"{c}#t001": "ok", c: "tar_truncated"}


def test_tar_shards_from_a_folder_stream_with_counted_reasons(photos, tmp_path):
    imgs = small_photos(photos, tmp_path / "img")
    expected = make_shards(tmp_path / "shards", imgs)
    (tmp_path / "shards" / "b-00001.parquet").write_bytes(b"img2dataset's status table: not a URL list")
    (tmp_path / "shards" / "junk.tar").write_bytes(b"\x89PNG" + b"x" * 2000)  # not a tar at all
    expected[str(tmp_path / "shards" / "junk.tar")] = "tar_corrupt"
    good = bytearray((tmp_path / "shards" / "a-00000.tar").read_bytes())
    second = next(m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(good))) if m.name.startswith("s001"))
    good[second + 148:second + 156] = b"0000000\0"              # a header whose checksum is wrong, mid-shard
    (tmp_path / "shards" / "d-00003.tar").write_bytes(bytes(good))
    d = str(tmp_path / "shards" / "d-00003.tar")
    expected.update({f"{d}#s000": "ok", d: "tar_corrupt"})      # tarfile alone would end there quietly
    cfg = _cfg(tmp_path / "out", columns={"metadata": ["caption", "txt", "url"]})
    units = plan_units([str(tmp_path / "shards")], 2, columns=cfg.columns, workdir=str(tmp_path / "work"))
    assert [u.kind for u in units] == ["tar"] * 5                          # a shard is a unit, whatever its size
    rows = _run_all(units, cfg)
    assert {r["source"]: r["reason"] for r in rows} == expected
    by = {r["source"].rsplit("#", 1)[-1]: r for r in rows}
    assert json.loads(by["s000"]["metadata"]) == {"caption": "zero", "txt": None, "url": "http://x/0"}
    assert json.loads(by["s001"]["metadata"])["txt"] == "one!" and by["s000"]["list_category"] == "birds"
    assert json.loads(by["000010000"]["metadata"]) == {"caption": "cap 000010000", "txt": "cap 000010000",
                                                       "url": "http://y/000010000"}
    assert "mp4" in by["000010003"]["detail"] and "tar_truncated" not in by["t001"]["reason"]
    assert all(r["image"] is not None and r["width"] > 0 for r in rows if r["reason"] == "ok")


def test_tar_shards_from_s3_with_a_brace_pattern_and_a_missing_shard(s3, photos, tmp_path):  # noqa: F811
    imgs = small_photos(photos, tmp_path / "img")
    make_shards(tmp_path / "shards", imgs)
    for name in ("a-00000.tar", "b-00001.tar"):
        s3.put_file(tmp_path / "shards" / name, f"wds/{name}")
    s3.put_file(tmp_path / "shards" / "a-00000.tar", "wds/00000.tar")
    s3.put_file(tmp_path / "shards" / "c-00002.tar", "wds/00002.tar")
    cfg = _cfg(tmp_path / "out", s3_endpoint_url=s3.endpoint_url)
    units = plan_units([s3.uri("wds/{00000..00003}.tar")], 8, s3.endpoint_url)
    assert [u.uri for u in units] == [s3.uri(f"wds/{i:05d}.tar") for i in range(4)]
    rows = _run_all(units, cfg)
    reasons = {r["source"]: r["reason"] for r in rows}
    assert reasons == {s3.uri("wds/00000.tar#s000"): "ok", s3.uri("wds/00000.tar#s001"): "ok",
                       s3.uri("wds/00001.tar"): "tar_missing", s3.uri("wds/00002.tar#t000"): "ok",
                       s3.uri("wds/00002.tar#t001"): "ok", s3.uri("wds/00002.tar"): "tar_truncated",
                       s3.uri("wds/00003.tar"): "tar_missing"}
    # a prefix is listed (by the listing tasks' streaming S3 listing) into its shards, by key order
    listed = plan_units([s3.uri("wds")], 8, s3.endpoint_url, workdir=str(tmp_path / "work"))
    assert [u.uri.rsplit("/", 1)[1] for u in listed] == ["00000.tar", "00002.tar", "a-00000.tar", "b-00001.tar"]
    assert all(u.size > 0 for u in listed)


# ------------------------------------------------------------------ listing and reads

@pytest.fixture(scope="module")
def env(s3, ray_local):  # noqa: F811 - moto first, so Ray workers inherit its credentials
    return s3


def test_folders_are_listed_by_ray_tasks_into_manifests_and_the_driver_holds_no_paths(env, tmp_path):
    from pipelines.curate import ray_runner

    work = str(tmp_path / "work")
    (tmp_path / "warm" / "d").mkdir(parents=True)
    (tmp_path / "warm" / "d" / "x.jpg").write_bytes(b"")
    plan_units([str(tmp_path / "warm")], 1000, workdir=work, runner=ray_runner)  # task functions shipped once
    peaks = {}
    for n in (600, 6000):
        folder = tmp_path / f"f{n}"
        for d in range(3):
            (folder / f"d{d}").mkdir(parents=True)
        for i in range(n):
            (folder / f"d{i % 3}" / f"img{i:06d}.jpg").write_bytes(b"")
        tracemalloc.start()
        units = plan_units([str(folder)], 1000, workdir=work, runner=ray_runner)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert all(u.kind == "files" and len(u.to_row()["unit"]) < 400 for u in units)  # references, no paths
        paths = [it.source for u in units for it in read_items(u)]
        assert len(paths) == n and len(set(paths)) == n
        assert paths == sorted(paths)                       # directory by directory, names sorted
        again = plan_units([str(folder)], 1000, workdir=work)   # in-process listing: the same manifests
        assert [u.key() for u in again] == [u.key() for u in units]   # content-addressed: same files, same units
    # the former planner held every path on the driver (~150 B each); listed in tasks, the driver stays flat
    per_file = (peaks[6000] - peaks[600]) / 5400
    print(f"driver peak {peaks[600] / 1024:.0f} KiB at 600 files, {peaks[6000] / 1024:.0f} KiB at 6000: "
          f"{per_file:.1f} B per file")
    assert per_file < 10, peaks
    assert listing.listing_peak_bytes(units=len(units), manifests=len(units), subdirs=3) < 64 * 1024


def _rchar() -> int:
    return next(int(x.split()[1]) for x in open("/proc/self/io") if x.startswith("rchar:"))


def test_a_unit_of_a_list_with_huge_row_groups_reads_about_its_own_bytes(tmp_path):
    import numpy as np

    n, rows = 40_000, 500
    rng = np.random.default_rng(0)
    urls = [f"https://img{i % 97}.example.com/{rng.integers(1 << 40):x}/photo-{i}.jpg" for i in range(n)]
    src = tmp_path / "laion-part.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"a caption of photo {i}, with words" for i in range(n)],
                             "WIDTH": rng.integers(100, 3000, n), "HEIGHT": rng.integers(100, 3000, n),
                             "similarity": rng.random(n)}), src, row_group_size=n)  # one 40k-row group
    units = plan_units([str(src)], rows, workdir=str(tmp_path / "work"))
    assert len(units) == n // rows and all(u.part for u in units)
    meta = pq.ParquetFile(src).metadata.row_group(0)
    used = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns)
               if meta.column(c).path_in_schema in ("URL", "WIDTH", "HEIGHT"))
    own = used * rows / n                                   # the unit's share of the columns it reads
    unit = units[len(units) // 2]
    list(read_items(unit))                                  # warm: imports, first allocations
    before = _rchar()
    items = list(read_items(unit))
    read = _rchar() - before
    assert [it.source for it in items] == urls[unit.start:unit.end]
    whole = Unit(kind="parquet", uri=str(src), start=unit.start, end=unit.end, size=unit.size, cols=unit.cols)
    before = _rchar()
    assert [it.source for it in read_items(whole)] == urls[unit.start:unit.end]
    naive = _rchar() - before
    print(f"bytes read per unit: {read} via the re-chunked copy, {naive} from the original row group; "
          f"the unit's own bytes {own:.0f}")
    assert read < 2 * own and naive > 20 * own
    first = (tmp_path / "work" / "lists").stat().st_mtime_ns
    plan_units([str(src)], rows, workdir=str(tmp_path / "work"))       # made once: a re-plan reuses the copy
    assert (tmp_path / "work" / "lists").stat().st_mtime_ns == first
