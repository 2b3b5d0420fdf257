"""Crawl and stage-1 pieces without Ray: the address policy's IPv6 special ranges and allow_hosts scope (real
loopback HTTP server), the final-shard commit order under an injected kill, Retry-After pausing a whole domain,
the crawl-wide domain limiter, stage-1 peak memory for a block of large bodies, and planning folders of URL lists.
(Politeness across parallel blocks on Ray and an s3:// prefix of lists: tests/integration/test_curate_scale.py.)"""

from __future__ import annotations

import contextlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobkit.config import config_from_dict
from pipelines.curate_schema import STAGE1_SCHEMA, shard_files
from pipelines.curation import writer
from pipelines.curation.crawl import _Policy, address_allowed
from pipelines.curation.stage1 import ledger_uri
from tests.helpers.curation import fetch_urls
from tests.helpers.http_fixture import free_port, http_server
from vosr import storage


def crawl_cfg(**kw):
    base = {"timeout_s": 2.0, "retries": 0, "max_bytes": 4 * 2**20, "allow_hosts": []}
    base.update(kw)
    return config_from_dict({"curate": {"crawl": base}}).curate.crawl


# ------------------------------------------------------------------ address policy

@pytest.mark.parametrize("ip", [
    "64:ff9b::808:808", "64:ff9b::a00:1", "64:ff9b:1::a00:1",   # NAT64 well-known / local-use (RFC 6052, 8215)
    "2002:808:808::1", "2002:a00:1::1", "2002:7f00:1::",        # 6to4 (RFC 3056), public and private relays
    "::8.8.8.8", "::10.0.0.1", "::127.0.0.1", "::", "::1",      # IPv4-compatible (deprecated) and its neighbours
    "fec0::1", "feff::1",                                        # site-local (RFC 3879)
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",                      # Teredo
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1",  # IPv4-mapped
    "fe80::1%eth0", "fc00::1", "ff02::1",                        # link-local, unique-local, multicast
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "192.0.0.8", "198.18.0.1",
])
def test_address_policy_refuses(ip):
    assert not address_allowed(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "::ffff:8.8.8.8", "2606:4700:4700::1111",
                                "2a00:1450:4001:80b::200e"])
def test_address_policy_allows_public(ip):
    assert address_allowed(ip)


def test_allow_hosts_entry_is_scoped_to_its_host_and_port():
    pol = _Policy(crawl_cfg(allow_hosts=["127.0.0.1:8080", "LocalHost", "[::1]:9000", "::1"]))
    assert pol.exempt("127.0.0.1", 8080) and not pol.exempt("127.0.0.1", 8081)
    assert pol.exempt("localhost", 1234) and pol.exempt("[::1]", 5) and pol.exempt("::1", 9000)
    assert not pol.exempt("evil.example", 8080)
    # an IP entry does not exempt a hostname whose answer is that IP
    pol = _Policy(crawl_cfg(allow_hosts=["127.0.0.1"]))
    with pytest.raises(OSError, match="non-public"):
        pol.check_addresses("rebind.example", ["127.0.0.1"], 80)
    pol.check_addresses("127.0.0.1", ["127.0.0.1"], 80)


def test_allow_hosts_over_http(photos):
    with http_server(photos[:1]) as site:
        port = int(site.base_url.rsplit(":", 1)[1])
        path = f"/photo/{photos[0].name}"
        by_ip, by_name = f"http://127.0.0.1:{port}{path}", f"http://localhost:{port}{path}"
        before = len(site.requests)
        # an IP entry: the IP itself is fetched, the hostname that resolves to it is refused
        res = fetch_urls([by_ip, by_name], crawl_cfg(allow_hosts=["127.0.0.1"]))
        assert [r.reason for r in res] == ["ok", "blocked_address"]
        # host:port entries: only that port
        other = free_port()
        res = fetch_urls([by_ip], crawl_cfg(allow_hosts=[f"127.0.0.1:{other}"]))
        assert res[0].reason == "blocked_address"
        res = fetch_urls([by_ip], crawl_cfg(allow_hosts=[f"127.0.0.1:{port}"]))
        assert res[0].reason == "ok"
        assert len(site.requests) == before + 2  # refused ones never connected


# ------------------------------------------------------------------ writer commit order

def _ledger_and_group(out: str, key: str):
    rows = [{"unit": key, "row": i, "source": f"s{i}", "reason": "ok", "detail": "", "id": f"id{i}",
             "image": b"img%d" % i, "format": "png", "width": 8, "height": 8, "sha256": f"h{i}", "phash": i,
             "dhash": i, "gradient": 1.0, "entropy": 1.0, "embedding": [0.0]} for i in range(2)]
    storage.write_bytes_atomic(ledger_uri(out, key), _parquet(pa.Table.from_pylist(rows, schema=STAGE1_SCHEMA)))

    def group(dup: bool) -> pa.Table:
        marker = {"unit": key, "row": -1, "kind": writer.KIND_MARKER, "id": None, "category": None,
                  "category_source": None, "duplicate_of": None, "drop_reason": None, "ledger_gen": 0}
        cats = [{**marker, "row": i, "kind": writer.KIND_DECISION, "id": f"id{i}", "category": "c",
                 "category_source": "list", "ledger_gen": None} for i in range(2)]
        if dup:
            cats[1] = {**cats[1], "duplicate_of": "id0", "drop_reason": "duplicate"}
        return pa.Table.from_pylist([marker, *cats], schema=writer.DECISION_SCHEMA)
    return group


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_writer_killed_between_shard_and_stats_never_leaves_an_accepted_stale_shard(tmp_path, monkeypatch):
    out, key = str(tmp_path / "out"), "ab12"
    group = _ledger_and_group(out, key)
    storage.write_bytes_atomic(storage.join(out, "_stage2.json"), b"{}")
    shard = writer.shard_uri(out, key)

    res = writer.write_unit_shard(group(dup=False), out, "", "fp-old")
    assert not res["skipped"][0].as_py() and pq.read_table(shard)["kept"].to_pylist() == [True, True]
    assert shard_files(out) == [shard]

    # a changed fingerprint (row 1 now a duplicate); the job is killed at the second of the writer's two writes
    # (the shard is streamed through storage.atomic_output, the stats written with storage.write_bytes_atomic)
    real, real_stream = storage.write_bytes_atomic, storage.atomic_output
    calls = []

    def killed_at_second_write(uri, data, endpoint_url=""):
        calls.append(uri)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(uri, data, endpoint_url)

    @contextlib.contextmanager
    def killed_at_second_stream(uri, endpoint_url=""):
        calls.append(uri)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        with real_stream(uri, endpoint_url) as f:
            yield f

    def kill_at_second_write(on: bool) -> None:
        monkeypatch.setattr(storage, "write_bytes_atomic", killed_at_second_write if on else real)
        monkeypatch.setattr(storage, "atomic_output", killed_at_second_stream if on else real_stream)

    kill_at_second_write(True)
    with pytest.raises(KeyboardInterrupt):
        writer.write_unit_shard(group(dup=True), out, "", "fp-new")
    kill_at_second_write(False)
    assert calls[0] == shard  # shard first, stats (the commit marker) second
    assert json.loads(storage.read_bytes(writer.shard_uri(out, key, ".stats.json")))["fingerprint"] == "fp-old"

    # the next run with the new fingerprint does not accept what it finds: it writes the shard again
    res = writer.write_unit_shard(group(dup=True), out, "", "fp-new")
    assert not res["skipped"][0].as_py()
    assert pq.read_table(shard)["kept"].to_pylist() == [True, False]
    assert json.loads(res["stats"][0].as_py())["fingerprint"] == "fp-new"
    assert writer.write_unit_shard(group(dup=True), out, "", "fp-new")["skipped"][0].as_py()

    # a first write killed before its marker: the shard is not listed for readers until committed
    group2 = _ledger_and_group(out, "cd34")
    kill_at_second_write(True)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        writer.write_unit_shard(group2(dup=False), out, "", "fp-new")
    kill_at_second_write(False)
    assert storage.exists(writer.shard_uri(out, "cd34")) and shard_files(out) == [shard]


# ------------------------------------------------------------------ politeness

def test_retry_after_pauses_the_whole_domain(photos):
    with http_server(photos[:1]) as site:
        name = photos[0].name
        urls = [site.url(f"/retry-after-once/{name}")] + [site.photo_url(name) + f"?i={i}" for i in range(4)]
        res = fetch_urls(urls, crawl_cfg(retries=1, per_domain_rps=100.0, per_domain_concurrency=1,
                                         allow_hosts=["127.0.0.1"]))
        assert [r.reason for r in res] == ["ok"] * 5 and res[0].attempts == 2
        first = site.requests.index(("GET", f"/retry-after-once/{name}", site.requests[0][2]))
        t429 = site.hit_times[first]
        later = [t - t429 for t in site.hit_times[first + 1:]]
        # the 429 said Retry-After 0.3: no other URL of the domain was asked in the meantime (10 ms spacing else)
        assert len(later) == 5 and min(later) >= 0.28, later


def test_domain_limiter_spacing_leases_and_backoff():
    """One gate actor's answers (DomainLimiter.grant, many permits per call): starts 1/rps apart, (-1, 0) while
    the domain's leases are all out, a lease given back on the next call frees a permit, Retry-After backoff,
    and a lease whose holder died expires after lease_s."""
    import asyncio

    from pipelines.curation.politeness import DomainLimiter

    async def scenario():
        lim = DomainLimiter()
        (d1, l1), (d2, l2), (d3, _), (db, _) = await lim.grant(["a.example"] * 3 + ["b.example"], [], 10.0, 2, 30.0)
        assert d1 == 0 and 0.09 < d2 <= 0.1 + 1e-9 and d3 == -1  # spaced 1/rps; the third finds both leases out
        assert db == 0  # other domains are independent, in the same call
        (d, lease), = await lim.grant(["a.example"], [("a.example", l1)], 10.0, 2, 30.0)
        assert 0.1 < d <= 0.2 and lease > l2
        await lim.backoff("b.example", 2.0)
        (d, _), = await lim.grant(["b.example"], [], 10.0, 2, 30.0)
        assert 1.9 < d <= 2.0
        await lim.grant(["c.example"], [], 1000.0, 1, 0.1)
        assert (await lim.grant(["c.example"], [], 1000.0, 1, 0.1))[0][0] == -1
        await asyncio.sleep(0.12)
        (d, _), = await lim.grant(["c.example"], [], 1000.0, 1, 0.1)
        assert 0 <= d < 0.01
        assert (await lim.stats())["granted"] == 7

    asyncio.run(scenario())


def test_a_block_mostly_of_one_domain_keeps_fetching_the_others(photos):
    """40 URLs, 90% on one host (127.0.0.1) at 8 requests/s, then 4 on another (localhost), 4 slots: the other
    host's URLs start at once instead of after the 36 slow ones (round-robin over hosts, at most
    per_domain_concurrency of one host at a time)."""
    with http_server(photos[:1]) as site:
        slow = [site.photo_url(photos[0].name) + f"?i={i}" for i in range(36)]
        fast = [u.replace("127.0.0.1", "localhost") + "&other=1" for u in slow[:4]]
        order = []
        from pipelines.curation.crawl import iter_fetch

        cfg = crawl_cfg(per_domain_rps=8.0, per_domain_concurrency=2, concurrency=4,
                        allow_hosts=["127.0.0.1", "localhost"])
        for i, res in iter_fetch(slow + fast, cfg):
            assert res.reason == "ok", res
            order.append(i)
    assert len(order) == 40
    # the 4 other-host URLs are among the first 12 results (listed last: in list order they would end last)
    assert max(order.index(36 + k) for k in range(4)) < 12, order


# ------------------------------------------------------------------ stage-1 memory

_MEMORY_PROBE = r"""
import json, resource, sys, time
from pipelines.curation.sources import plan_units
from pipelines.curation.stage1 import run_unit
from jobkit.config import config_from_dict
listing, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = config_from_dict({"curate": {"sources": [listing], "output": out, "rows_per_shard": rows, "stage1_buffer_mb": 4,
    "crawl": {"concurrency": 4, "max_bytes": 3 * 2**20, "allow_hosts": ["127.0.0.1"], "per_domain_rps": 1000.0},
    "filters": {"min_short_side": 16, "max_pixels": 2**20}}}).curate
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
unit, = plan_units([listing], 2 * rows)
run_unit(plan_units([listing], 2)[0], "warmup", cfg)  # imports, thread pools, first allocations
before = rss()
# reset the high-water mark so the peak is the block's own, not one left by imports or the warm-up (Linux: "5"
# to clear_refs resets VmHWM, proc(5)); the lifetime ru_maxrss made the test depend on what came before
open("/proc/self/clear_refs", "w").write("5")
res = run_unit(unit, "probe", cfg)
peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) * 1024
print(json.dumps({"before": before, "peak": peak, "stats": json.loads(res["stats"])}))
"""


def test_stage1_memory_is_bounded_per_block_whatever_its_rows(tmp_path):
    """A block of 160 bodies of 1.5 MiB (240 MiB) streams through stage 1 with a peak RSS growth under the stated
    bound plus a fixed allowance, far below the block's size (holding its bodies once would exceed it)."""
    import random
    import subprocess
    import sys

    import numpy as np
    from PIL import Image, PngImagePlugin

    rng = np.random.default_rng(0)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("pad", random.Random(0).randbytes(3 * 2**19).hex()[: 3 * 2**19])  # 1.5 MiB, decoded lazily
    photo = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo, pnginfo=meta)
    body = photo.stat().st_size
    assert body > 3 * 2**19
    rows = 160
    with http_server([photo]) as site:
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(f"{site.photo_url('big.png')}?i={i}\n" for i in range(rows)))
        env = {**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(listing), str(tmp_path / "out"), str(rows)],
                              capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["stats"]["ok"] == rows
    ledger = pq.ParquetFile(tmp_path / "out" / "_stage1" / "probe.parquet")
    assert ledger.metadata.num_rows == rows and ledger.metadata.num_row_groups > 10  # streamed in row groups
    from pipelines.curation.stage1 import stage1_peak_bytes

    cfg = config_from_dict({"curate": {"stage1_buffer_mb": 4, "crawl": {"concurrency": 4, "max_bytes": 3 * 2**20},
                                       "filters": {"max_pixels": 2**20}}}).curate
    bound = stage1_peak_bytes(cfg) + 32 * 2**20   # stated bound + allowance for allocator and library caches
    growth = got["peak"] - got["before"]
    assert rows * body > 2.5 * bound
    print(f"stage-1 peak RSS growth {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, block {rows * body / 2**20:.0f} MiB")
    assert growth < bound, (growth / 2**20, bound / 2**20)


# ------------------------------------------------------------------ planning

def test_folder_of_url_lists_is_planned_in_a_stable_order_and_zero_blocks_is_an_error(tmp_path):
    from pipelines.curation.sources import SourceError, plan_units, read_items

    d = tmp_path / "lists"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("http://x.example/1\nhttp://x.example/2\thouses\n")
    (d / "a.csv").write_text("url,category\nhttp://y.example/1,cats\n")
    pq.write_table(pa.table({"url": [f"http://z.example/{i}" for i in range(3)]}), d / "sub" / "c.parquet")
    (d / "README.md").write_text("not a list")
    units = plan_units([str(d)], 2)
    got = [(it.source, it.category) for u in units for it in read_items(u)]
    assert got == [("http://y.example/1", "cats"), ("http://x.example/1", None), ("http://x.example/2", "houses"),
                   ("http://z.example/0", None), ("http://z.example/1", None), ("http://z.example/2", None)]
    assert [u.key() for u in plan_units([str(d)], 2)] == [u.key() for u in units]  # stable
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "header-only.csv").write_text("url,category\n")
    for name in ("empty", "empty.txt", "header-only.csv"):
        with pytest.raises(SourceError, match=f"{name}.*plans no input blocks"):
            plan_units([str(d), str(tmp_path / name)], 2)



def test_a_block_killed_mid_way_runs_lighter_next_time(tmp_path, photos):
    """A kill (e.g. for memory) leaves the block's attempt marker and partial ledger; the next attempt removes the
    partial file, halves the crawl concurrency and row-group buffer, finishes, and clears the marker."""
    from pipelines.curation.sources import plan_units
    from pipelines.curation.stage1 import run_unit, stage1_uri

    folder = tmp_path / "in"
    folder.mkdir()
    for p in photos[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cfg = config_from_dict({"curate": {"sources": [str(folder)], "output": str(out), "stage1_buffer_mb": 8,
                                       "filters": {"min_short_side": 16}}}).curate
    unit, = plan_units(cfg.sources, 16)
    attempt = stage1_uri(str(out), "k1", ".attempt")
    storage.write_bytes_atomic(attempt, b"1")                      # what a killed attempt leaves behind
    partial = out / "_stage1" / "k1.parquet.tmp-0123"
    partial.write_bytes(b"partial")
    res = run_unit(unit, "k1", cfg)
    assert res["scale"] == 2 and json.loads(res["stats"])["ok"] == 2
    assert not storage.exists(attempt) and not partial.exists()
    assert run_unit(unit, "k2", cfg)["scale"] == 1                 # a fresh block runs at full settings
