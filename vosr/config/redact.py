"""One redaction for everything a configuration goes to: MLflow params, checkpoint and registry metadata, printed
configs, logs and summaries.

`redact(obj)` returns a copy of a config (a `Config`, a dict, a flattened dict, a list or a string) in which
- every value of a key declared `option(..., secret=True)` or named like a credential (api_key, password, token,
  secret, access_key, ...; not the *_env / *_file keys that only say where a secret lives) becomes "***";
- credentials inside URIs (`scheme://user:password@host` -> `scheme://user:***@host`, `scheme://token@host` ->
  `scheme://***@host`, signed-URL query parameters such as X-Amz-Signature / X-Amz-Credential / token / key),
  AWS access key ids and `NAME_SECRET=value` pairs inside any string become "***".
`secret_paths(root)` lists the dotted keys declared secret, which `config_from_dict` refuses as overrides (argv).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"(?:^|[_.\-])(?:api_?keys?|apikeys?|password|passwd|pwd|secret|secret_key|secret_access_key|access_key|"
    r"access_key_id|session_token|token|auth_token|bearer|private_key|credentials?)$", re.I)
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s]+)@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:signature|credential|token|secret|password|api_?key|sig|key)[^=&#\s]*)="
    r"(?P<val>[^&#\s]+)", re.I)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_ENV_PAIR = re.compile(r"\b(?P<name>[A-Za-z0-9_]*(?:SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY)[A-Za-z0-9_]*)"
                       r"(?P<sep>\s*[=:]\s*)(?P<val>[^\s,;'\"}]+)", re.I)


def is_secret_key(key: str) -> bool:
    """True for a (possibly dotted) key that names a credential itself."""
    return bool(_SECRET_KEY.search(str(key)))


def _userinfo(m: re.Match) -> str:
    info = m.group("userinfo")
    user, sep, _ = info.partition(":")
    return f"{m.group('scheme')}{user}:{REDACTED}@" if sep else f"{m.group('scheme')}{REDACTED}@"


def redact_text(text: str) -> str:
    """Credentials inside a free string (URIs, signed URLs, access key ids, NAME_SECRET=value) -> ***."""
    if not text:
        return text
    out = _URI_USERINFO.sub(_userinfo, text)
    out = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}={REDACTED}", out)
    out = _AWS_KEY_ID.sub(REDACTED, out)
    return _ENV_PAIR.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", out)


def redact(obj: Any, key: str = "") -> Any:
    """A redacted copy of `obj` (Config / dataclass, dict, list, str); see the module doc."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("secret") and value:
                out[f.name] = REDACTED
            else:
                out[f.name] = redact(value, f.name)
        return out
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str):
        if key and obj and is_secret_key(key):
            return REDACTED
        return redact_text(obj)
    if isinstance(obj, bytes):
        return REDACTED if key and is_secret_key(key) else obj
    return obj


def secret_paths(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys of the configuration root `cls` declared `secret=True`."""
    import typing

    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.metadata.get("secret"):
            out.add(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= secret_paths(hints[f.name], key)
    return out


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (attach to a handler or logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it is
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True
