"""The endpoint's one error format: JSON {"error": code, "message": ..., "request_id": ...} with the HTTP status,
never FastAPI's {"detail": [...]} nor an exception's text."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse


class ServeError(Exception):
    """An answer other than 200, raised anywhere before or around the model run (also inside the model's
    replica: it crosses the DeploymentHandle as itself, so __reduce__ keeps every field)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra

    def __reduce__(self):
        return _rebuild, (self.status, self.code, self.message, self.headers, self.extra)

    def response(self, request_id: str = "") -> JSONResponse:
        body = {"error": self.code, "message": self.message, **self.extra}
        if request_id:
            body["request_id"] = request_id   # Ray Serve's proxy sends the same id as X-Request-Id
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _rebuild(status: int, code: str, message: str, headers: dict[str, str], extra: dict[str, Any]) -> ServeError:
    return ServeError(status, code, message, headers, **extra)


class ServeStartError(RuntimeError):
    """The service refuses to start with this configuration (e.g. a public bind without a key)."""


_REQUEST_ID_OK = frozenset("0123456789abcdefABCDEF-")


def request_id(request: Request) -> str:
    """The id Ray Serve's proxy gave this request (its X-Request-Id answer header and its replica log lines), or
    a fresh one when the header is missing or not a plain hex/uuid token (it may come from the client)."""
    rid = request.headers.get("x-request-id", "")
    if 8 <= len(rid) <= 64 and set(rid) <= _REQUEST_ID_OK:
        return rid
    return uuid.uuid4().hex
