"""A curate run over tar shards on S3 (the moto server), stopped by an injected fault after its first block and
then as a kill inside a shard leaves it, runs again to the same output as an uninterrupted run. The shards and
the source settings are tests/integration/test_curate_sources.py's."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from jobkit.config import config_from_dict
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture
from tests.integration.test_curate_sources import CRAWL, FILTERS, make_shards, small_photos


@pytest.fixture(scope="module")
def env(s3, ray_local):  # noqa: F811 - moto first, so Ray workers inherit its credentials
    return s3


def test_tar_source_on_s3_killed_mid_way_resumes_to_the_same_output(env, photos, tmp_path):
    from jobkit.faults import FaultInjected
    from pipelines import curate
    from pipelines.curate_schema import shard_files
    from tests.helpers.curation import read_kept_table

    s3site = env
    imgs = small_photos(photos, tmp_path / "img")
    expected = make_shards(tmp_path / "shards", imgs)
    for name in ("a-00000.tar", "b-00001.tar", "c-00002.tar"):
        s3site.put_file(tmp_path / "shards" / name, f"job/in/{name}")
    s3site.put_file(imgs[3], "job/in/loose/small3.jpg")
    section = {"sources": [s3site.uri("job/in")], "rows_per_shard": 8, "s3_endpoint_url": s3site.endpoint_url,
               "filters": FILTERS, "crawl": CRAWL, "columns": {"metadata": ["caption"]},
               "balance": {"enabled": False}}

    def run(out, **kw):
        return curate.run(config_from_dict({"run": {"output_root": str(tmp_path / "root"), "seed": 3},
                                            "curate": {**section, "output": s3site.uri(out), **kw}}))
    ref = run("job/ref")
    assert ref["blocks"] == 4 and ref["seen"] == len(expected) + 1
    assert ref["failed"] == {"no_image_member": 2, "not_image_html": 1, "tar_truncated": 1}
    assert ref["duplicates"] == 2  # the truncated shard's two samples are the first shard's images again
    with pytest.raises(FaultInjected):
        run("job/resumed", fail_after_blocks=1)
    # the job stopped after one block; the blocks already started finish on their own (all four, in flight)
    deadline = time.monotonic() + 120
    while True:
        ledgers = [k for k in s3site.keys("job/resumed/_stage1/") if k.endswith(".parquet")]
        if len(ledgers) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ledgers) == 4
    # then what a kill inside a shard leaves: no ledger for it, its partial ledger under a temporary name, and
    # the attempt marker (stage1.py)
    victim = next(k for k in ledgers if "b-00001.tar" in
                  str(pq.read_table(s3site.fs.open(f"{s3site.bucket}/{k}"), columns=["source"])["source"]))
    s3site.client.delete_object(Bucket=s3site.bucket, Key=victim)
    s3site.put_bytes(b"PAR1 partial", victim + ".tmp-killed")
    s3site.put_bytes(b"1", victim[:-len(".parquet")] + ".attempt")
    done = run("job/resumed")
    assert done["stage1_blocks_run"] == 1 and done["stage1_blocks_skipped"] == 3
    assert not [k for k in s3site.keys("job/resumed/_stage1/") if ".tmp-" in k or k.endswith(".attempt")]
    cols = ["id", "source", "kept", "duplicate_of", "category", "drop_reason", "sha256", "metadata"]
    a = read_kept_table(s3site.uri("job/ref"), s3site.endpoint_url, cols)
    b = read_kept_table(s3site.uri("job/resumed"), s3site.endpoint_url, cols)
    assert a.sort_by("id").to_pylist() == b.sort_by("id").to_pylist() and a.num_rows == ref["kept"]
    assert len(shard_files(s3site.uri("job/resumed"), s3site.endpoint_url)) == 4
    caps = {json.loads(r["metadata"])["caption"] for r in a.to_pylist() if r["metadata"]}
    assert caps >= {"cap 000010000"}
    assert s3site.keys("job/ref/_listing/files/")      # the loose image was listed into a manifest
