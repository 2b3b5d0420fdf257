"""The demo with `--storage s3://...` (demo/chain.py) puts its photo site's URL list on storage, where the curate
stage reads its sources from, against a real moto S3 server. The curate job itself and the demo's stages after the
jobs run on S3 in the suite's one full chain, tests/e2e/test_cluster_readme.py."""

from __future__ import annotations

import argparse

from demo.chain import Chain, read_holdout, serve_photos_and_curate
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture
from vosr import storage


class CurateRecorded(Chain):
    """The chain with its curate stage recorded instead of run: what the stage would read, at the moment it
    starts (the photo site is still up then), and its command line."""

    def run(self, stage, sets=None, key=None, config=None, extra_args=None):
        self.started = (stage, storage.read_bytes(self.data_uri("urls.txt")), self.command(stage, sets, config))


def test_the_url_list_is_on_storage_before_the_curate_stage_starts(s3, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)  # as the demo's S3 run sets it (no endpoint in argv)
    root = s3.uri("demo")
    chain = CurateRecorded(tmp_path, [], "", {}, storage_root=root)
    info = serve_photos_and_curate(chain, tmp_path, argparse.Namespace(max_photos=8, storage=root), read_holdout())
    stage, listed, command = chain.started
    assert stage == "curate" and s3.keys("demo/") == ["demo/urls.txt"]
    assert listed == (tmp_path / "urls.txt").read_bytes()
    assert len(listed.decode().split()) == info["urls"] == 15  # 8 photos and 7 planted copies of them
    assert f"curate.sources=[{root}/urls.txt]" in command and f"curate.output={root}/curated" in command
