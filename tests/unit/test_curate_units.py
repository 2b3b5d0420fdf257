"""Curation building blocks without Ray: safe decoding, quality measures, LSH, sources, the crawler against a
real loopback HTTP server, and the star-contraction connected components run by a local group-by."""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobkit.config import config_from_dict
from pipelines.curation import dedup, lsh
from pipelines.curation.analysis import Rejected, analyse, hash_to_int64
from pipelines.curation.crawl import address_allowed, parse_retry_after
from pipelines.curation.sources import plan_units, read_items
from tests.helpers.curation import brute_force_pairs, fetch_urls
from tests.helpers.http_fixture import bomb_png_header_only, bomb_png_real, encode, http_server
from vosr.imageio import ImageDecodeError, decode_image, image_to_tensor, tensor_to_image


def crawl_cfg(**kw):
    base = {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05, "max_bytes": 2 * 2**20, "max_redirects": 3,
            "allow_hosts": ["127.0.0.1"]}
    base.update(kw)
    return config_from_dict({"curate": {"crawl": base}}).curate.crawl


# ------------------------------------------------------------------ decoding

def test_decode_real_photo_and_reject_hostile_bytes(photos):
    data = photos[0].read_bytes()
    img, fmt = decode_image(data, 50_000_000, with_format=True)
    assert img.mode == "RGB" and fmt in ("png", "jpeg") and img.size == Image.open(photos[0]).size
    jpeg = encode(img, "JPEG", quality=90)
    cases = {b"": "empty", b"<html>hi</html>": "not_image_html", b"this is not an image": "not_image", jpeg[: len(jpeg) // 2]: "truncated",
             bomb_png_header_only(): "too_many_pixels", bomb_png_real(9000): "too_many_pixels"}
    for blob, reason in cases.items():
        with pytest.raises(ImageDecodeError) as e:
            decode_image(blob, 50_000_000)
        assert e.value.reason == reason
    # the pixel cap is ours, not PIL's: a small cap rejects an ordinary photo from its header
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        decode_image(data, 1000)


def test_exif_orientation_and_alpha_are_applied():
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rotated = decode_image(encode(img, "JPEG", exif=exif.tobytes()), 10**6)
    assert rotated.size == (20, 40)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = decode_image(encode(rgba), 10**6)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)
    t = image_to_tensor(out)
    assert t.shape == (3, 8, 8) and float(t.min()) == 1.0
    assert tensor_to_image(t).getpixel((0, 0)) == (255, 255, 255)


def test_filters_reject_by_reason_and_measure_sharpness(photos):
    f = config_from_dict({"curate": {"filters": {"min_short_side": 64, "min_gradient": 1.0,
                                                 "min_entropy": 3.0, "max_upscale": 0}}}).curate.filters
    a = analyse(photos[0].read_bytes(), f)
    assert a.gradient > 1.0 and 3.0 < a.entropy <= 8.0 and a.embedding.shape == (196,)
    blurred = Image.open(photos[0]).convert("RGB").resize((64, 64)).resize((512, 512), Image.Resampling.BICUBIC)
    b = analyse(encode(blurred), f)
    assert b.gradient < a.gradient  # blur lowers the gradient score
    with pytest.raises(Rejected, match="too_small"):
        analyse(encode(Image.new("RGB", (32, 300))), f)
    with pytest.raises(Rejected, match="bad_aspect"):
        analyse(encode(Image.new("RGB", (1000, 100))), config_from_dict({}).curate.filters.__class__(
            min_short_side=16))
    with pytest.raises(Rejected, match="low_gradient"):
        analyse(encode(Image.new("RGB", (300, 300), (9, 9, 9))), f)
    noise = np.random.default_rng(0).integers(0, 2, (200, 200), dtype=np.uint8) * 255  # below analysis size
    with pytest.raises(Rejected, match="low_entropy"):  # sharp but only two grey levels: 1 bit
        analyse(encode(Image.fromarray(noise).convert("RGB")), f)


def test_hash_to_int64_roundtrip_sign():
    import imagehash

    h = imagehash.hex_to_hash("ffffffffffffffff")
    assert hash_to_int64(h) == -1
    assert hash_to_int64(imagehash.hex_to_hash("0000000000000001")) == 1


# ------------------------------------------------------------------ LSH

def test_band_spec_covers_64_bits_with_k_plus_1_bands():
    for k in (0, 3, 6, 10, 31):
        spec = lsh.block_spec(k + 1)  # the plain pigeonhole: k + 1 single bands
        assert len(spec) == k + 1 and sum(w for _, w in spec) == 64
        assert [s for s, _ in spec] == list(np.cumsum([0] + [w for _, w in spec])[:-1])


def test_lsh_finds_exactly_the_brute_force_pairs():
    rng = np.random.default_rng(1)
    base = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    near = []
    for i in range(300):  # planted pairs at distance 0..8
        flips = rng.choice(64, size=i % 9, replace=False)
        mask = np.uint64(sum(1 << int(b) for b in flips))
        near.append((base[i].view(np.uint64) ^ mask).view(np.int64))
    h = np.concatenate([base, np.asarray(near, dtype=np.int64)])
    for k in (4, 8):
        brute = brute_force_pairs(h, k)
        assert lsh.lsh_pairs_local(h, k) == brute
        # the per-table path the Ray tasks run (each table alone, on the distinct values)
        uniq, first, counts, inverse = lsh.group_identical(h)
        via_tables = set()
        for blocks in lsh.plan_tables(k, len(uniq)):
            i, j, _, _ = lsh.table_pairs(uniq, blocks, k, cap=10**6)
            a, b = first[i], first[j]
            via_tables.update(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
        assert via_tables == {p for p in brute if h[p[0]] != h[p[1]]}
        assert sum(1 for i in range(300) if (i, 3000 + i) in brute) == sum(1 for i in range(300) if i % 9 <= k)


def test_identical_hashes_are_one_group_not_all_pairs():
    h = np.zeros(25, dtype=np.int64)  # 25 identical (flat) hashes
    assert lsh.lsh_pairs_local(h, 2) == {(i, j) for i in range(25) for j in range(i + 1, 25)}
    a, b, overflow = lsh.near_duplicate_edges(h, 2, cap=10)
    assert sorted(zip(a.tolist(), b.tolist())) == [(i, 0) for i in range(1, 25)]  # a star, no bucket
    assert overflow == {"buckets": 0, "rows": 0}


def test_star_contraction_matches_union_find():
    rng = random.Random(3)
    nodes = [f"n{i:03d}" for i in range(120)]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(90)]
    edges = [(a, b) for a, b in edges if a != b]
    parent = {n: n for n in nodes}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    t = pa.table({"a": [a for a, _ in edges], "b": [b for _, b in edges]})
    for _ in range(20):  # one partition holding every node: the vectorised steps the Ray tasks run
        large = dedup.large_star(dedup.both_directions(t))
        small = dedup.small_star(dedup.oriented(large))
        changed = sum(large["changed"].to_pylist()) + sum(small["changed"].to_pylist())
        t = small.select(["a", "b"])
        if not changed:
            break
    got = {a: b for a, b in zip(t["a"].to_pylist(), t["b"].to_pylist())}
    touched = {x for e in edges for x in e}
    want = {n: min(m for m in touched if find(m) == find(n)) for n in touched}
    assert {n: got.get(n, n) for n in touched} == want


def test_node_keys_sort_best_first():
    big = dedup.node_key(1000, 800, 100.0, 1.0, "b" * 32, "u" * 24, 5)
    small = dedup.node_key(500, 400, 100.0, 1.0, "a" * 32, "u" * 24, 1)
    big_enlarged = dedup.node_key(2000, 1600, 100.0, 2.0, "c" * 32, "u" * 24, 2)
    big_jpeg = dedup.node_key(1000, 800, 95.0, 1.0, "d" * 32, "u" * 24, 3)
    assert min(big, small, big_enlarged, big_jpeg) == big
    assert min(big_jpeg, small) == big_jpeg  # native pixels first
    assert min(big_enlarged, big_jpeg) == big_jpeg  # never raw pixels
    fields = {k: v[0].as_py() for k, v in dedup.key_fields(pa.array([big])).items()}
    assert fields == {"id": "b" * 32, "unit": "u" * 24, "row": 5}


# ------------------------------------------------------------------ sources

def test_list_sources_split_into_blocks_cover_each_row_once(tmp_path):
    urls = [f"http://example.com/img{i}.jpg" for i in range(103)]
    (tmp_path / "l.txt").write_text("\n".join(u + ("\tcat" + str(i % 3) if i % 2 else "")
                                             for i, u in enumerate(urls)) + "\n")
    (tmp_path / "l.csv").write_text("id,url,category\n" + "".join(f"{i},{u},c{i % 4}\n" for i, u in enumerate(urls)))
    pq.write_table(pa.table({"url": urls, "category": [f"p{i % 5}" for i in range(103)]}), tmp_path / "l.parquet",
                   row_group_size=17)
    for name in ("l.txt", "l.csv", "l.parquet"):
        units = plan_units([str(tmp_path / name)], 10)
        assert len(units) > 5
        got = [it for u in units for it in read_items(u)]
        assert [it.source for it in got] == urls, name
        assert all(it.category is not None for it in got) or name == "l.txt"
    with pytest.raises(ValueError, match="url"):
        (tmp_path / "bad.csv").write_text("link\nhttp://x\n")
        plan_units([str(tmp_path / "bad.csv")], 10)


# ------------------------------------------------------------------ crawl

def test_address_policy():
    assert not address_allowed("127.0.0.1") and not address_allowed("10.1.2.3")
    assert not address_allowed("169.254.169.254") and not address_allowed("::1")
    assert not address_allowed("::ffff:192.168.0.1") and address_allowed("8.8.8.8")
    assert parse_retry_after("2") == 2.0 and parse_retry_after("nonsense") is None


def test_crawl_reasons_retries_and_politeness(photos):
    with http_server(photos[:2], hang_s=3.0) as site:
        name = photos[0].name
        urls = {site.photo_url(name): "ok", site.url(f"/redirect/{name}"): "ok",
                site.url(f"/retry-after-once/{name}"): "ok", site.url(f"/flaky/{name}"): "ok",
                site.url(f"/noai/{name}"): "robots_noai", site.url(f"/noimageai/{name}"): "robots_noai",
                "ftp://127.0.0.1/x.jpg": "bad_url", "http://10.255.255.1/x.jpg": "blocked_address",
                "http://169.254.169.254/latest": "blocked_address"}
        for path, reason in site.hostile.items():
            if reason in ("http_404", "http_500", "http_429", "timeout", "too_many_redirects", "not_image",
                          "oversize"):
                urls[site.url(path)] = reason
        t0 = time.monotonic()
        res = fetch_urls(list(urls), crawl_cfg())
        took = time.monotonic() - t0
        assert [r.url for r in res] == list(urls)
        assert {r.url: r.reason for r in res} == urls
        by = {r.url: r for r in res}
        assert by[site.url(f"/retry-after-once/{name}")].attempts == 2
        assert by[site.url("/status/500")].attempts == 2  # one retry, bounded
        assert by[site.url("/status/404")].attempts == 1  # not retryable
        assert by[site.photo_url(name)].data == photos[0].read_bytes()
        assert took < 8.0  # timeouts are enforced (the hang endpoint sleeps 3 s per attempt)
        assert all(ua.startswith("vosr-curate/") for _, _, ua in site.requests)
        # refused by default: loopback is private
        before = len(site.requests)
        strict = fetch_urls([site.photo_url(name), site.url(f"/redirect/{name}")], crawl_cfg(allow_hosts=[]))
        assert [r.reason for r in strict] == ["blocked_address"] * 2
        assert len(site.requests) == before  # refused before any connection
        # a Retry-After above the limit is not waited for
        res = fetch_urls([site.url("/status/429")], crawl_cfg(max_retry_after_s=0.5))
        assert res[0].reason == "http_429" and res[0].attempts == 1


def test_per_domain_rate_limit(photos):
    with http_server(photos[:1]) as site:
        urls = [site.photo_url(photos[0].name)] * 6
        t0 = time.monotonic()
        res = fetch_urls(urls, crawl_cfg(per_domain_rps=10.0, per_domain_concurrency=2))
        assert all(r.reason == "ok" for r in res)
        assert time.monotonic() - t0 >= 0.45  # 6 starts spaced 0.1 s apart


def test_image_bytes_roundtrip_is_lossless():
    img = Image.new("RGB", (5, 4), (1, 2, 3))
    assert decode_image(encode(img), 100).tobytes() == img.tobytes()
    assert isinstance(io.BytesIO(encode(img)).getvalue(), bytes)


def test_rerun_retry_reasons_and_ledger_generations_after_a_kill(tmp_path):
    from pipelines.curation.crawl import retry_next_run
    from pipelines.curation.stage1 import ledger_uri, scan_stage1

    for reason in ("timeout", "http_429", "http_500", "http_503", "connect_error", "server_disconnected",
                   "incomplete_body"):
        assert retry_next_run(reason), reason
    for reason in ("http_404", "http_403", "not_image", "not_image_html", "unsupported_format", "truncated", "corrupt", "too_many_pixels", "oversize",
                   "blocked_address", "bad_url", "robots_noai", "too_small", "http_5xx"):
        assert not retry_next_run(reason), reason
    out = str(tmp_path)
    (tmp_path / "_stage1").mkdir()
    # block aa: a retry pass wrote generation 2 and was killed before deleting generation 1 and its marker;
    # block bb: finished, nothing to retry; block cc: killed after its marker, before its first ledger
    for uri in (ledger_uri(out, "aa", 1), ledger_uri(out, "aa", 2), ledger_uri(out, "bb")):
        pq.write_table(pa.table({"x": [1]}), uri)
    for name in ("aa.retry", "cc.retry", "aa.stats.json", "bb.stats.json"):
        (tmp_path / "_stage1" / name).write_text("")
    gens, retry, stale = scan_stage1(out)
    assert gens == {"aa": 2, "bb": 0} and retry == {"aa"} and stale == [ledger_uri(out, "aa", 1)]
    assert ledger_uri(out, "aa", 2).endswith("_stage1/aa.g2.parquet") and ledger_uri(out, "bb").endswith("bb.parquet")


def test_job_repeats_only_after_losing_part_of_the_cluster():
    """curate.run repeats its stages (max_attempts) for a lost node/worker/actor, also when Ray Data hands the
    error over wrapped, and never for an error of the job itself."""
    import ray.exceptions

    from pipelines.curate import lost_cluster_resource

    assert lost_cluster_resource(ray.exceptions.NodeDiedError("node 1 died"))
    wrapped = RuntimeError("Failed to deserialize exception. Original exception: ray.exceptions.ActorDiedError: "
                           "The actor died because its node has died.")
    assert lost_cluster_resource(wrapped)
    try:
        try:
            raise ray.exceptions.WorkerCrashedError()
        except ray.exceptions.WorkerCrashedError as inner:
            raise ValueError("stage failed") from inner
    except ValueError as outer:
        assert lost_cluster_resource(outer)
    assert not lost_cluster_resource(ValueError("curate.sources is empty"))
    assert not lost_cluster_resource(FileNotFoundError("no such folder"))
