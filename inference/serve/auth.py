"""API keys: read where the app is built, from the environment variable serve.api_key_env, the file
serve.api_key_file (one per line) or a config file's serve.api_key, never from argv; only their SHA-256 digests
reach the replicas, compared in constant time. Binding a non-loopback host without a key refuses to start unless
serve.allow_anonymous."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from inference.serve.errors import ServeError, ServeStartError


def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_digest(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def load_api_keys(scfg, environ: dict[str, str] | None = None) -> list[str]:
    """The raw API keys from serve.api_key_env (environment), serve.api_key_file (one per line, # comments) and a
    config file's serve.api_key; in the process that builds the app only."""
    env = os.environ if environ is None else environ
    keys: list[str] = []
    if scfg.api_key:
        keys.append(scfg.api_key)
    if scfg.api_key_env and env.get(scfg.api_key_env, "").strip():
        keys.append(env[scfg.api_key_env].strip())
    if scfg.api_key_file:
        path = Path(scfg.api_key_file).expanduser()
        if not path.is_file():
            raise ServeStartError(f"serve.api_key_file {path} does not exist")
        lines = [x.strip() for x in path.read_text().splitlines()]
        file_keys = [x for x in lines if x and not x.startswith("#")]
        if not file_keys:
            raise ServeStartError(f"serve.api_key_file {path} holds no key")
        keys += file_keys
    for k in keys:
        if len(k) < 16:
            raise ServeStartError("an API key must have at least 16 characters")
    return keys


def access_digests(cfg, environ: dict[str, str] | None = None) -> list[str]:
    """SHA-256 digests of the API keys; refuses a non-loopback bind without a key (serve.allow_anonymous opts out)."""
    s = cfg.serve
    digests = sorted({key_digest(k) for k in load_api_keys(s, environ)})
    if not digests and not is_loopback(s.host) and not s.allow_anonymous:
        raise ServeStartError(
            f"refusing to serve on {s.host!r} (not loopback) without an API key: set the environment variable "
            f"{s.api_key_env or 'named by serve.api_key_env'} or serve.api_key_file (a Kubernetes Secret), or opt "
            "out explicitly with serve.allow_anonymous: true")
    return digests


class KeyCheck:
    """The replica's side: the digests it was given; check() raises ServeError(401) for a missing or wrong
    X-API-Key header (every digest compared, in constant time). No digests: every request passes."""

    def __init__(self, digests: list[str] | None):
        self.digests = [bytes.fromhex(d) for d in (digests or [])]

    def check(self, headers) -> None:
        if not self.digests:
            return
        sent = headers.get("x-api-key", "")
        if not sent:
            raise ServeError(401, "missing_api_key", "this service needs an X-API-Key header")
        digest = hashlib.sha256(sent.encode()).digest()
        ok = False
        for known in self.digests:
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise ServeError(401, "bad_api_key", "the X-API-Key header is not valid")
