"""A re-run of the curation job fetches again exactly the URLs that failed transiently (timeout, 429, 5xx) and
keeps everything else: real loopback HTTP server, real local Ray."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from jobkit.config import config_from_dict
from pipelines import curate
from pipelines.curate_schema import shard_files
from pipelines.curation.stage1 import scan_stage1
from tests.helpers.http_fixture import http_server
from vosr import storage


def _cfg(tmp, listing, out, **extra):
    return config_from_dict({
        "run": {"output_root": str(tmp / "root"), "seed": 3, "mlflow": {"enabled": False}},
        "curate": {"sources": [str(listing)], "output": str(out), "rows_per_shard": 3, "cpus_per_block": 0.5,
                   # no in-run retries: a transient failure ends the first run's attempt at once
                   "crawl": {"timeout_s": 0.5, "retries": 0, "allow_hosts": ["127.0.0.1"],
                             "per_domain_rps": 200.0},
                   "filters": {"min_short_side": 128, "max_upscale": 0},
                   # stage 2 reduced to the writer: retries are a stage-1 matter (fewer Ray Data runs, faster)
                   "dedup": {"enabled": False}, "balance": {"enabled": False}, **extra},
    })


def _ledger(out) -> dict[str, str]:
    files = storage.list_files(str(out / "_stage1"), ".parquet")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    sources = table["source"].to_pylist()
    assert len(sources) == len(set(sources))  # every URL exactly once, across all ledger files
    return dict(zip(sources, table["reason"].to_pylist()))


def test_rerun_retries_transient_failures_only(ray_local, photos, tmp_path):
    with http_server(photos[:3], hang_s=2.0) as site:
        a, b, c = (p.name for p in photos[:3])
        first = {  # url -> reason after the first run; blocks of ~3 lines in this order
            site.photo_url(a): "ok", site.photo_url(b): "ok", site.url("/status/404"): "http_404",
            site.url(f"/flaky/{c}"): "http_503", site.url("/status/500"): "http_500",
            site.url("/truncated.jpg"): "truncated",
            site.url("/html"): "not_image_html", site.url("/status/429"): "http_429", site.url("/hang"): "timeout",
        }
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(u + "\n" for u in first))
        out = tmp_path / "out"

        s1 = curate.run(_cfg(tmp_path, listing, out))
        assert _ledger(out) == first
        assert (s1["seen"], s1["ok"], s1["kept"], s1["urls_retried"]) == (9, 2, 2, 0)
        gens, retry, _ = scan_stage1(str(out))
        assert set(gens.values()) == {0}
        transient = {site.url(p) for p in (f"/flaky/{c}", "/status/500", "/status/429", "/hang")}
        with_transient = {k for k in gens
                          if transient & set(pq.read_table(out / "_stage1" / f"{k}.parquet")["source"].to_pylist())}
        assert retry == with_transient and len(retry) < len(gens)  # only blocks with transient failures

        s2 = curate.run(_cfg(tmp_path, listing, out))
        second = dict(first, **{site.url(f"/flaky/{c}"): "ok"})
        assert _ledger(out) == second
        assert s2["stage1_blocks_run"] == 0 and s2["stage1_blocks_retried"] == len(retry)
        assert s2["urls_retried"] == 4 and s2["retry_blocks_changed"] == 1
        assert (s2["seen"], s2["ok"], s2["kept"]) == (9, 3, 3)
        assert s2["ok"] + sum(s2["failed"].values()) + sum(s2["filtered"].values()) == 9
        assert s2["failed"] == {"http_404": 1, "http_500": 1, "http_429": 1, "timeout": 1, "not_image_html": 1,
                                "truncated": 1}
        assert s2["shards_skipped"] == 0  # a changed ledger changes stage 2 for every shard
        rows = [r for f in shard_files(str(out)) for r in pq.read_table(f).to_pylist()]
        got = [r for r in rows if r["source"] == site.url(f"/flaky/{c}")]
        assert len(got) == 1 and got[0]["kept"] and got[0]["image"] == photos[2].read_bytes()
        assert sorted(r["source"] for r in rows) == sorted(u for u, why in second.items() if why == "ok")

        # nothing recovers a third time: the transient ones are asked again, finished work is not redone
        s3 = curate.run(_cfg(tmp_path, listing, out))
        assert s3["urls_retried"] == 3 and s3["retry_blocks_changed"] == 0
        assert s3["shards_skipped"] == len(gens)  # unchanged ledgers: stage 2 output kept
        assert _ledger(out) == second and s3["kept"] == 3
        s4 = curate.run(_cfg(tmp_path, listing, out, retry_failed=False))
        assert s4["urls_retried"] == 0 and s4["shards_skipped"] == len(gens)

        hits = Counter(path for _, path, _ in site.requests)
        assert hits[f"/photo/{a}"] == hits[f"/photo/{b}"] == 1
        assert hits["/status/404"] == hits["/truncated.jpg"] == hits["/html"] == 1   # final on the first run
        assert hits[f"/flaky/{c}"] == 2                                               # failed once, then kept
        assert hits["/status/500"] == hits["/status/429"] == hits["/hang"] == 3       # each run but the last
