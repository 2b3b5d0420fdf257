"""The streaming body reader: a raw image or the first file of a multipart/form-data body, refused with 413 while
it arrives (raw and multipart alike) and with 408 when it is not read within the body deadline."""

from __future__ import annotations

import asyncio

from fastapi import Request

from inference.serve.errors import ServeError

MULTIPART_SLACK = 64 * 1024  # multipart framing and non-file fields allowed on top of the file's max_body_bytes


class MultipartFile:
    """Streaming multipart/form-data: the first part with a filename (else the first part), capped while it
    arrives."""

    def __init__(self, boundary: bytes, cap: int):
        from python_multipart.multipart import MultipartParser

        self.cap = cap
        self.parts: list[tuple[bool, bytearray]] = []
        self._field = bytearray()
        self._value = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_header_field": self._hfield,
            "on_header_value": self._hvalue, "on_header_end": self._hend})

    def _begin(self):
        self.parts.append((False, bytearray()))

    def _hfield(self, data, start, end):
        self._field += data[start:end]

    def _hvalue(self, data, start, end):
        self._value += data[start:end]

    def _hend(self):
        if self._field.lower() == b"content-disposition" and b"filename=" in self._value.lower():
            self.parts[-1] = (True, self.parts[-1][1])
        self._field, self._value = bytearray(), bytearray()

    def _data(self, data, start, end):
        buf = self.parts[-1][1]
        buf += data[start:end]
        if len(buf) > self.cap:
            raise ServeError(413, "too_large", f"a multipart field exceeds {self.cap} bytes")

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def file(self) -> bytes:
        self.parser.finalize()
        files = [bytes(b) for is_file, b in self.parts if is_file]
        if not files:
            raise ServeError(415, "not_an_image", "the multipart body holds no file field")
        return files[0]


async def read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body (a raw image, or the first file of a multipart form), refused with 413 as soon as more
    than `cap` bytes (file) / `cap` + MULTIPART_SLACK (whole multipart body) have arrived, and with 408 when the
    body has not arrived within `timeout_s`. The 413 says how many bytes were read and the size of the last chunk
    (uvicorn hands over what arrived since the last read, at most about its 64 KiB flow-control mark plus a recv)."""
    from python_multipart.multipart import parse_options_header

    ctype = request.headers.get("content-type", "")
    multipart = None
    limit = cap
    if ctype.lower().startswith("multipart/form-data"):
        boundary = parse_options_header(ctype)[1].get(b"boundary")
        if not boundary:
            raise ServeError(400, "bad_multipart", "multipart/form-data without a boundary")
        multipart, limit = MultipartFile(boundary, cap), cap + MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, "too_large", f"body of {declared} bytes exceeds {limit} bytes", bytes_read=0)
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ServeError(413, "too_large", f"body exceeds {limit} bytes", bytes_read=total,
                                     last_chunk=len(chunk))
                if multipart is not None:
                    try:
                        multipart.feed(chunk)
                    except ServeError as exc:
                        exc.extra.update(bytes_read=total, last_chunk=len(chunk))
                        raise
                    except Exception as exc:  # noqa: BLE001 - the parser raises several error types
                        raise ServeError(400, "bad_multipart", f"could not parse the multipart body: "
                                         f"{type(exc).__name__}") from None
                else:
                    chunks.append(chunk)
    except TimeoutError:
        raise ServeError(408, "body_timeout", f"the body did not arrive within {timeout_s} s "
                         f"({total} bytes read)") from None
    if multipart is not None:
        try:
            return multipart.file()
        except ServeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ServeError(400, "bad_multipart", f"could not parse the multipart body: {type(exc).__name__}") \
                from None
    return b"".join(chunks)
