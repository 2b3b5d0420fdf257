"""Crawler safety and stage-1 / writer robustness without Ray: the address policy's IPv6 special ranges and
allow_hosts scope (real loopback HTTP server), and the final-shard commit order under an injected kill."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.curate_schema import STAGE1_SCHEMA, shard_files
from pipelines.curation import writer
from pipelines.curation.crawl import _Policy, address_allowed, fetch_urls
from pipelines.curation.stage1 import ledger_uri
from tests.helpers.http_fixture import free_port, http_server
from vosr import storage
from vosr.config import config_from_dict


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
    real = storage.write_bytes_atomic
    calls = []

    def killed_at_second_write(uri, data, endpoint_url=""):
        calls.append(uri)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(uri, data, endpoint_url)

    monkeypatch.setattr(storage, "write_bytes_atomic", killed_at_second_write)
    with pytest.raises(KeyboardInterrupt):
        writer.write_unit_shard(group(dup=True), out, "", "fp-new")
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
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
    monkeypatch.setattr(storage, "write_bytes_atomic", killed_at_second_write)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        writer.write_unit_shard(group2(dup=False), out, "", "fp-new")
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    assert storage.exists(writer.shard_uri(out, "cd34")) and shard_files(out) == [shard]
