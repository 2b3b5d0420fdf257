"""Curation at scale, on real local Ray: the per-domain politeness holds across stage-1 blocks running in
parallel (real loopback HTTP server counting hits), and the shipped cluster config runs as shipped against a real
moto S3 server holding a small prefix of URL lists where it names one."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from jobkit.config import config_from_dict, load_config
from pipelines import curate
from pipelines.curate_schema import shard_files
from pipelines.curation.sources import plan_units
from tests.helpers.curation import read_kept_table
from tests.helpers.http_fixture import http_server
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(s3, ray_local):  # noqa: F811 - moto first, so Ray workers inherit its credentials
    return s3


def test_politeness_holds_across_parallel_blocks(env, photos, tmp_path):
    rps, per_block = 8.0, 6
    with http_server(photos[:4]) as site:
        lists = []
        for b, p in enumerate(photos[:4]):  # one list (one block) per photo: the path tells the block
            lists.append(tmp_path / f"l{b}.txt")
            lists[-1].write_text("".join(f"{site.photo_url(p.name)}?i={i}\n" for i in range(per_block)))
        cfg = config_from_dict({"run": {"mlflow": {"enabled": False}}, "curate": {
            "sources": [str(x) for x in lists], "output": str(tmp_path / "out"), "cpus_per_block": 0.5,
            "crawl": {"allow_hosts": ["127.0.0.1"], "per_domain_rps": rps, "per_domain_concurrency": 2,
                      "timeout_s": 5.0},
            "filters": {"min_short_side": 16}}}).curate
        units = plan_units(cfg.sources, cfg.rows_per_shard)
        assert len(units) == 4
        counts = curate.stage_fetch_analyse(units, [u.key("polite") for u in units], cfg)
        assert counts["blocks_run"] == 4
        hits = list(zip(site.hit_times, (path for _, path, _ in site.requests)))
    assert len(hits) == 4 * per_block
    times = sorted(t for t, _ in hits)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate <= 1.1 * rps, rate
    for i in range(len(times)):  # no 1 s window holds more starts than the limit allows
        assert sum(1 for t in times[i:] if t - times[i] < 1.0) <= rps + 1
    # the blocks did run at the same time (their durations overlap): they shared the domain's budget
    seconds = [json.loads(f.read_text())["seconds"] for f in (tmp_path / "out" / "_stage1").glob("*.stats.json")]
    assert len(seconds) == 4 and sum(seconds) > 2 * (times[-1] - times[0])


def test_cluster_curate_config_runs_as_shipped_on_s3(env, photos, tmp_path):
    """configs/cluster/curate.yaml with only what a laptop must change: the S3 endpoint (moto), the loopback
    photo server allowed (the crawl refuses private addresses), MLflow off (no tracking server here); Ray is the
    test's local 2-CPU instance. Its source is a prefix holding URL lists; the lists planted there are crawled."""
    s3site = env
    path = ROOT / "configs" / "cluster" / "curate.yaml"
    shipped = load_config(path)
    prefix, output = shipped.curate.sources[0], shipped.curate.output
    assert prefix.startswith("s3://") and prefix.endswith("/")
    bucket, key_prefix = prefix[len("s3://"):].split("/", 1)
    s3site.client.create_bucket(Bucket=bucket)
    sizes = {p: min(Image.open(p).size) for p in photos}
    big = [p for p in photos if sizes[p] >= 600][:3]
    small = next(p for p in photos if sizes[p] < 512)
    with http_server(big + [small]) as site:
        s3site.client.put_object(Bucket=bucket, Key=key_prefix + "part-000.txt",
                                 Body="".join(site.photo_url(p.name) + "\n" for p in big[:2]).encode())
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["url", "category"])
        w.writerows([[site.photo_url(big[2].name), "landscape"], [site.photo_url(small.name), "landscape"]])
        s3site.client.put_object(Bucket=bucket, Key=key_prefix + "part-001.csv", Body=buf.getvalue().encode())
        overrides = [f"curate.s3_endpoint_url={s3site.endpoint_url}", 'curate.crawl.allow_hosts=["127.0.0.1"]',
                     "run.mlflow.enabled=false"]
        cfg = load_config(path, overrides)
        summary = curate.run(cfg)
    assert summary["blocks"] == 2 and summary["seen"] == 4
    assert summary["filtered"].get("too_small") == 1  # the shipped min_short_side 512 applies
    assert summary["ok"] + sum(summary["failed"].values()) + sum(summary["filtered"].values()) == 4
    assert summary["kept"] >= 1 and len(shard_files(output, s3site.endpoint_url)) == 2
    kept = read_kept_table(output, s3site.endpoint_url, columns=["source", "category"])
    assert kept.num_rows == summary["kept"]
    assert set(kept["source"].to_pylist()) <= {site.photo_url(p.name) for p in big}


def test_a_lost_domain_gate_fails_the_block_not_its_urls(env, photos):
    """When the crawl-wide gate cannot be reached (its actor gone, as on a lost node), the block's crawl raises
    GateUnavailable (curate retries the block) instead of writing every waiting URL off as a fetch error."""
    from pipelines.curation import politeness
    from tests.helpers.curation import fetch_urls

    ccfg = config_from_dict({"curate": {"crawl": {"allow_hosts": ["127.0.0.1"], "timeout_s": 5.0}}}).curate
    with http_server(photos[:1]) as site:
        urls = [site.photo_url(photos[0].name) + f"?i={i}" for i in range(3)]
        gates = politeness.start_gates(ccfg.crawl)
        assert [r.reason for r in fetch_urls(urls, ccfg.crawl, gates)] == ["ok"] * 3
        politeness.stop_gates(gates)  # ray.kill: no restart
        with pytest.raises(politeness.GateUnavailable, match="unreachable"):
            fetch_urls(urls, ccfg.crawl, gates)
