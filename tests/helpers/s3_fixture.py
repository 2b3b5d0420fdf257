"""A real moto S3 server on 127.0.0.1 (moto.server.ThreadedMotoServer) with one bucket, for s3:// tests.

    from tests.helpers.s3_fixture import s3_server
    with s3_server() as s3:          # sets AWS_* test credentials in os.environ while open
        s3.endpoint_url, s3.bucket, s3.uri("prefix/x"), s3.fs (s3fs), s3.client (boto3)
        s3.put_file(local_path, "prefix/name.png")

Start it BEFORE Ray (`ray_local`) when Ray workers must reach it: workers inherit the credentials from the
environment of the process that started Ray. pytest fixture: `s3` (module scope).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.env import restored_environ
from tests.helpers.http_fixture import free_port

TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@dataclass
class S3Site:
    endpoint_url: str
    bucket: str
    client: object
    fs: object

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def put_file(self, path: Path | str, key: str) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=Path(path).read_bytes())
        return self.uri(key)

    def put_bytes(self, data: bytes, key: str) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.uri(key)

    def keys(self, prefix: str = "") -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            resp = self.client.list_objects_v2(**kw)
            out += [o["Key"] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return sorted(out)
            token = resp["NextContinuationToken"]


@contextlib.contextmanager
def s3_server(bucket: str = "vosr-test"):
    """Start moto on a free loopback port, create `bucket`, yield an S3Site; restores the environment after."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    with restored_environ(TEST_ENV):
        os.environ.update(TEST_ENV)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        try:
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=bucket)
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            yield S3Site(endpoint, bucket, client, fs)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as site:
        yield site
