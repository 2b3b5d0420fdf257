"""Reusable test fixtures: a real HTTP server on loopback (http_fixture) and a real moto S3 server (s3_fixture)."""
