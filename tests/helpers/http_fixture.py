"""A real HTTP server on 127.0.0.1 (aiohttp, in a background thread) serving real photos, planted
near-duplicates and hostile endpoints, for crawl tests of any helper.

Use as a context manager or the pytest fixture `http_site` (module scope):

    from tests.helpers.http_fixture import http_server
    with http_server(photo_paths) as site:
        site.url("/photo/<name>")            # real photo bytes
        site.planted                          # {"resized": [(orig_name, path)], "reencoded": [...], "cropped": [...]}
        site.hostile                          # {path: expected reason code for the curate crawl}
        site.requests                         # [(method, path, user_agent)] seen by the server
        site.hit_times                        # time.monotonic() of each of those requests

Hostile endpoints: /status/404, /status/500, /status/429 (Retry-After: 1), /retry-after-once/<name> (429 with
Retry-After 0.3 once, then the photo), /flaky/<name> (503 once, then the photo), /hang (sleeps `hang_s`),
/drip (slow body, one byte per 0.2 s), /loop (redirect loop), /redirect/<name> (one redirect to a photo),
/html (HTML body), /truncated.jpg, /bomb.png (header claims 30000x30000), /bomb-real.png (a genuinely
12000x12000 1-bit PNG of ~20 KB), /oversize (declared body over the cap), /oversize-chunked (no length),
/noai/<name> (X-Robots-Tag: noai), /noimageai/<name> (X-Robots-Tag: otherbot: noimageai), /tiny.png (64x64),
/flat.png (512x512 constant grey), /empty (200 with no body).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png_header_only(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims a huge size (its data is nonsense)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def bomb_png_real(side: int = 12000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side zeros: ~20 KB on disk, side^2 pixels when decoded."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    raw = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def planted_copies(path: Path) -> dict[str, bytes]:
    """Near-duplicates of one photo: 3/4 resize, JPEG q=70 re-encode, 1% crop on each side."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    return {
        "resized": encode(img.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS)),
        "reencoded": encode(img, "JPEG", quality=70),
        "cropped": encode(img.crop((w // 100, h // 100, w - w // 100, h - h // 100))),
    }


@dataclass
class HttpSite:
    base_url: str
    photos: dict[str, Path]
    planted: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind -> [(orig name, path)]
    hostile: dict[str, str] = field(default_factory=dict)                    # path -> expected reason
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    hit_times: list[float] = field(default_factory=list)                     # monotonic time of each request

    def url(self, path: str) -> str:
        return self.base_url + path

    def photo_url(self, name: str) -> str:
        return self.url(f"/photo/{name}")


class _Server:
    def __init__(self, photos: list[Path], plant: list[Path], hang_s: float, oversize_bytes: int,
                 latency_s: float = 0.0):
        self.photos = {p.name: p for p in photos}
        self.latency_s = latency_s
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.planted: dict[str, list[tuple[str, str]]] = {"resized": [], "reencoded": [], "cropped": []}
        for p in plant:
            for kind, data in planted_copies(p).items():
                ext = ".jpg" if kind == "reencoded" else ".png"
                path = f"/planted/{kind}-{p.stem}{ext}"
                self.blobs[path] = (data, CONTENT_TYPES[ext])
                self.planted[kind].append((p.name, path))
        first = next(iter(self.photos.values()))
        jpeg = encode(Image.open(first).convert("RGB"), "JPEG", quality=90)
        self.blobs["/truncated.jpg"] = (jpeg[: len(jpeg) // 2], "image/jpeg")
        self.blobs["/bomb.png"] = (bomb_png_header_only(), "image/png")
        self.blobs["/bomb-real.png"] = (bomb_png_real(), "image/png")
        self.blobs["/tiny.png"] = (encode(Image.new("RGB", (64, 64), (10, 200, 30))), "image/png")
        self.blobs["/flat.png"] = (encode(Image.new("RGB", (512, 512), (128, 128, 128))), "image/png")
        self.hang_s = hang_s
        self.oversize_bytes = oversize_bytes
        self.requests: list[tuple[str, str, str]] = []
        self.hit_times: list[float] = []  # time.monotonic() of each request, in arrival order
        self.once: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    # ------------------------------------------------------------------ handlers
    def _photo(self, name: str) -> web.Response:
        p = self.photos.get(name)
        if p is None:
            raise web.HTTPNotFound()
        return web.Response(body=p.read_bytes(), content_type=CONTENT_TYPES.get(p.suffix.lower(), "image/png"))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hit_times.append(time.monotonic())
        self.requests.append((request.method, path, request.headers.get("User-Agent", "")))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if path.startswith("/photo/"):
            return self._photo(path[len("/photo/"):])
        if path in self.blobs:
            data, ctype = self.blobs[path]
            return web.Response(body=data, content_type=ctype)
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            headers = {"Retry-After": "1"} if code == 429 else {}
            return web.Response(status=code, text="no", headers=headers)
        if path.startswith("/retry-after-once/") or path.startswith("/flaky/"):
            if path not in self.once:
                self.once.add(path)
                if path.startswith("/flaky/"):
                    return web.Response(status=503, text="busy")
                return web.Response(status=429, text="slow down", headers={"Retry-After": "0.3"})
            return self._photo(path.rsplit("/", 1)[1])
        if path == "/hang":
            await asyncio.sleep(self.hang_s)
            return web.Response(text="late")
        if path == "/drip":
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                for _ in range(int(self.hang_s / 0.2) + 1):
                    await resp.write(b"\xff")
                    await asyncio.sleep(0.2)
            return resp
        if path in ("/loop", "/loop2"):
            raise web.HTTPFound("/loop2" if path == "/loop" else "/loop")
        if path.startswith("/redirect/"):
            raise web.HTTPFound("/photo/" + path.rsplit("/", 1)[1])
        if path == "/html":
            return web.Response(text="<html><body>not an image</body></html>", content_type="text/html")
        if path.startswith("/mislabelled/"):  # /mislabelled/<type>/<subtype>/<photo>: a photo under a wrong type
            _, _, major, minor, name = path.split("/", 4)
            resp = self._photo(name)
            resp.content_type = f"{major}/{minor}"
            return resp
        if path == "/svg.png":
            return web.Response(text='<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
                                content_type="image/png")
        if path == "/json.jpg":
            return web.Response(text='{"error": "no such image"}', content_type="image/jpeg")
        if path == "/oversize":
            return web.Response(body=b"\xff" * self.oversize_bytes, content_type="image/jpeg")
        if path == "/oversize-chunked":
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError):
                for _ in range(self.oversize_bytes // 65536 + 1):
                    await resp.write(b"\xff" * 65536)
            return resp
        if path.startswith("/noai/"):
            resp = self._photo(path.rsplit("/", 1)[1])
            resp.headers["X-Robots-Tag"] = "noai"
            return resp
        if path.startswith("/noimageai/"):
            resp = self._photo(path.rsplit("/", 1)[1])
            resp.headers["X-Robots-Tag"] = "otherbot: noimageai"
            return resp
        if path == "/empty":
            return web.Response(body=b"", content_type="image/png")
        raise web.HTTPNotFound()

    # ------------------------------------------------------------------ lifecycle
    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        fut.result(timeout=30)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


# Expected curate reasons for the hostile endpoints (crawl settings: retries >= 1, timeout < hang_s,
# max_bytes < oversize_bytes, max_pixels < 144M, min_short_side > 64, entropy/gradient thresholds > 0).
HOSTILE_REASONS = {
    "/status/404": "http_404", "/status/500": "http_500", "/status/429": "http_429", "/hang": "timeout",
    "/drip": "timeout", "/loop": "too_many_redirects", "/html": "not_image_html", "/truncated.jpg": "truncated",
    "/bomb.png": "too_many_pixels", "/bomb-real.png": "too_many_pixels", "/oversize": "oversize",
    "/oversize-chunked": "oversize", "/tiny.png": "too_small", "/flat.png": "low_gradient", "/empty": "empty",
    "/does-not-exist": "http_404",
}


@contextlib.contextmanager
def http_server(photos: list[Path], plant: list[Path] | None = None, hang_s: float = 4.0,
                oversize_bytes: int = 3 * 2**20, latency_s: float = 0.0):
    """Serve `photos` (and near-duplicates of `plant`) on 127.0.0.1; yields an HttpSite. latency_s delays every
    answer (a stand-in for the network in benchmarks)."""
    server = _Server(list(photos), list(plant or []), hang_s, oversize_bytes, latency_s)
    server.start()
    site = HttpSite(f"http://127.0.0.1:{server.port}", dict(server.photos), server.planted, dict(HOSTILE_REASONS))
    site.requests = server.requests
    site.hit_times = server.hit_times
    try:
        yield site
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http_site(photos):
    """Module-scoped HTTP site over the real test photos, with near-duplicates of the first three."""
    with http_server(photos, plant=photos[:3]) as site:
        yield site
