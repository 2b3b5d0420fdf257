"""The curation job end to end on real local Ray: a real loopback HTTP server with hostile endpoints and
planted near-duplicates, a real moto S3 server for s3:// input and output, kill-and-resume."""

from __future__ import annotations

import csv
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobkit.config import config_from_dict
from jobkit.faults import FaultInjected
from pipelines import curate
from pipelines.curate_schema import CURATED_SCHEMA, read_kept, shard_files
from tests.helpers.curation import read_kept_table
from tests.helpers.http_fixture import encode, http_site  # noqa: F401 - pytest fixture
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture
from vosr import storage


@pytest.fixture(scope="module")
def env(s3, ray_local):  # noqa: F811 - moto first, so Ray workers inherit its credentials
    return s3


def _cfg(tmp, curate_section: dict, mlflow: bool = False):
    return config_from_dict({"run": {"output_root": str(tmp / "root"), "seed": 7,
                                     "mlflow": {"enabled": mlflow}},
                             "curate": curate_section})


def _read_all(files: list[str], endpoint: str = "") -> pa.Table:
    tables = []
    for f in files:
        fs, path = storage.open_fs(f, endpoint)
        with fs.open_input_file(path) as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def test_url_list_every_url_accounted_dups_found_private_refused(env, http_site, photos,  # noqa: F811
                                                                 tmp_path):
    site = http_site
    expected: dict[str, str] = {}
    for p in photos:
        expected[site.photo_url(p.name)] = "ok"
    for pairs in site.planted.values():
        for _, path in pairs:
            expected[site.url(path)] = "ok"
    exact_src = photos[5].name
    expected[site.url(f"/redirect/{exact_src}")] = "ok"          # the same bytes from a second URL
    expected[site.url(f"/noai/{photos[6].name}")] = "robots_noai"
    for path, reason in site.hostile.items():
        expected[site.url(path)] = reason
    expected["http://10.255.255.1/private.jpg"] = "blocked_address"   # private: refused by default
    expected["http://169.254.169.254/latest/meta-data"] = "blocked_address"
    expected["not a url"] = "bad_url"
    urls = list(expected)
    listing = tmp_path / "urls.csv"
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "category"])
        for i, u in enumerate(urls):
            w.writerow([u, f"c{i % 3}"])
    out = tmp_path / "out"
    # a cap that binds whichever photo set the fixture gives (44 dev photos -> 12, 31 shipped photos -> 8)
    cap = max(2, len(photos) // 3 - 2)
    cfg = _cfg(tmp_path, {
        "sources": [str(listing)], "output": str(out), "rows_per_shard": 16, "cpus_per_block": 0.5,
        "crawl": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05, "max_bytes": 2 * 2**20,
                  "max_redirects": 3, "allow_hosts": ["127.0.0.1"], "per_domain_rps": 200.0,
                  "per_domain_concurrency": 8},
        "filters": {"min_short_side": 256, "min_gradient": 0.5, "min_entropy": 2.0, "max_pixels": 50_000_000,
                    "max_upscale": 0},  # off: upscaling has its own tests (test_curate_native.py)
        "dedup": {"hamming": 10, "max_bucket": 100},
        "balance": {"per_category_cap": cap},
    }, mlflow=True)
    summary = curate.run(cfg)

    # every URL exactly once, with the expected reason
    ledger = _read_all(storage.list_files(str(out / "_stage1"), ".parquet"))
    assert sorted(ledger["source"].to_pylist()) == sorted(urls)
    assert dict(zip(ledger["source"].to_pylist(), ledger["reason"].to_pylist())) == expected
    assert summary["seen"] == len(urls)
    assert summary["ok"] + sum(summary["failed"].values()) + sum(summary["filtered"].values()) == len(urls)
    assert summary["failed"]["blocked_address"] == 2 and summary["filtered"]["too_small"] == 1

    final = _read_all(shard_files(str(out)))
    assert final.schema.equals(CURATED_SCHEMA, check_metadata=False)
    rows = {r["source"]: r for r in final.to_pylist()}
    assert len(rows) == summary["ok"]
    def rep(r):  # the kept representative of a row's group
        return r["duplicate_of"] or r["id"]

    by_id = {r["id"]: r for r in rows.values()}
    # planted near-duplicates join their original's group; smaller copies never represent it
    for kind, pairs in site.planted.items():
        for orig, path in pairs:
            a, b = rows[site.url(path)], rows[site.photo_url(orig)]
            assert rep(a) == rep(b), (kind, orig)
            assert by_id[rep(a)]["duplicate_of"] is None
            if kind in ("resized", "cropped"):
                assert a["drop_reason"] == "duplicate" and a["image"] is None
    x, y = rows[site.url(f"/redirect/{exact_src}")], rows[site.photo_url(exact_src)]
    assert x["sha256"] == y["sha256"] and x["id"] != y["id"] and rep(x) == rep(y)
    assert (x["duplicate_of"] is None) != (y["duplicate_of"] is None)
    # no false merges among the distinct photos
    originals = {o for pairs in site.planted.values() for o, _ in pairs} | {exact_src}
    for p in photos:
        r = rows[site.photo_url(p.name)]
        if p.name not in originals:
            assert r["drop_reason"] != "duplicate", p.name
    n_dup = sum(r["drop_reason"] == "duplicate" for r in rows.values())
    assert summary["duplicates"] == n_dup == 3 * len(site.planted["resized"]) + 1
    # category cap t = cap, categories from the list, seeded
    kept = [r for r in rows.values() if r["kept"]]
    assert all(r["category_source"] == "list" for r in rows.values())
    single = [r for r in rows.values() if r["drop_reason"] != "duplicate"]
    before = {c: sum(r["category"] == c for r in single) for c in ("c0", "c1", "c2")}
    per_cat = {c: sum(r["category"] == c for r in kept) for c in ("c0", "c1", "c2")}
    assert per_cat == {c: min(n, cap) for c, n in before.items()} and max(before.values()) > cap
    assert summary["capped"] == sum(max(0, n - cap) for n in before.values())
    assert summary["kept_by_category"] == per_cat
    assert summary["kept"] == len(kept) == summary["ok"] - summary["duplicates"] - summary["capped"]
    assert all(r["image"] is not None and r["duplicate_of"] is None for r in kept)
    assert read_kept_table(str(out)).num_rows == len(kept)
    # MLflow run with the counts
    import mlflow

    from jobkit.tracking import setup_mlflow
    setup_mlflow(cfg)
    runs = mlflow.search_runs(experiment_names=[cfg.run.mlflow.experiment])
    assert float(runs.iloc[0]["metrics.kept"]) == summary["kept"]


def test_s3_in_and_out_kill_and_resume_same_kept_set(env, photos, tmp_path):
    s3site = env
    for p in photos[:10]:
        s3site.put_file(p, f"in/{p.name}")
    from PIL import Image
    img = Image.open(photos[0]).convert("RGB")
    s3site.put_bytes(photos[0].read_bytes(), "in/zz-copy-" + photos[0].name)
    s3site.put_bytes(encode(img.resize((img.width * 3 // 4, img.height * 3 // 4))), "in/zz-small.png")
    s3site.put_bytes(encode(img, "JPEG", quality=80), "in/zz-re.jpg")
    section = {"sources": [s3site.uri("in")], "rows_per_shard": 4, "s3_endpoint_url": s3site.endpoint_url,
               "filters": {"min_short_side": 128, "min_gradient": 0.5, "min_entropy": 2.0,
                           "max_upscale": 0},
               "dedup": {"hamming": 10, "max_bucket": 3}, "balance": {"num_clusters": 3, "per_category_cap": 3}}
    ref = curate.run(_cfg(tmp_path, {**section, "output": s3site.uri("ref")}))
    assert ref["seen"] == 13 and ref["duplicates"] == 3 and ref["capped"] > 0
    assert ref["bucket_overflow"]["buckets"] >= 1 and ref["bucket_overflow"]["rows"] >= 4  # 4 look-alikes, cap 3

    out = s3site.uri("resumed")
    with pytest.raises(FaultInjected):
        curate.run(_cfg(tmp_path, {**section, "output": out, "fail_after_blocks": 1}))
    n_stage1 = len(s3site.keys("resumed/_stage1/"))
    assert 0 < n_stage1 and not s3site.keys("resumed/shards/")
    with pytest.raises(FaultInjected):
        curate.run(_cfg(tmp_path, {**section, "output": out, "fail_after_shards": 1}))
    assert not s3site.keys("resumed/summary.json")
    done = curate.run(_cfg(tmp_path, {**section, "output": out}))
    assert done["stage1_blocks_run"] == 0 and done["shards_skipped"] >= 1

    cols = ["id", "source", "kept", "duplicate_of", "category", "drop_reason", "sha256", "phash"]
    a = _read_all(shard_files(s3site.uri("ref"), s3site.endpoint_url), s3site.endpoint_url).select(cols)
    b = _read_all(shard_files(out, s3site.endpoint_url), s3site.endpoint_url).select(cols)
    assert a.sort_by("id").to_pylist() == b.sort_by("id").to_pylist()
    assert {k: done[k] for k in ("seen", "ok", "duplicates", "capped", "kept")} == \
        {k: ref[k] for k in ("seen", "ok", "duplicates", "capped", "kept")}
    # a changed stage-2 setting rewrites every shard (none skipped as stale) and keeps stage 1
    again = curate.run(_cfg(tmp_path, {**section, "output": out, "balance": {"num_clusters": 3,
                                                                             "per_category_cap": 1}}))
    assert again["stage1_blocks_run"] == 0 and again["shards_skipped"] == 0 and again["shards_written"] == 4
    assert set(again["kept_by_category"].values()) == {1} and again["kept"] == len(again["kept_by_category"])
    assert again["capped"] == done["kept"] + done["capped"] - again["kept"]
    done = curate.run(_cfg(tmp_path, {**section, "output": out}))
    assert done["kept"] == ref["kept"]
    ds = read_kept(out, s3site.endpoint_url, columns=["id", "image"])
    assert ds.count() == done["kept"]
    row = ds.take(1)[0]
    assert Image.open(io.BytesIO(row["image"])).size[0] > 0
