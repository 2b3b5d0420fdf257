"""A small photo web site on loopback for the demo's real crawl.

It serves the photos that ship with the project (assets/photos) under /photos/<name>, plus what a real crawl
meets on the web, planted on purpose so the curate job has something to count:

- near-duplicates under /dup/: a resized copy and a re-encoded (lower JPEG quality) copy of a few photos;
- bad URLs under /bad/: a 404, a JPEG cut short (truncated), and an HTML page served where an image was expected.

`PhotoServer` is a context manager (a ThreadingHTTPServer in a daemon thread on 127.0.0.1, port chosen by the OS
unless given); `write_url_list(path)` writes the crawl's URL list. Photos named in `exclude` are not served at all
(the demo holds them out of training to evaluate on). Run it alone to crawl it by hand:

    python demo/photo_server.py --port 8765 --urls outputs/demo/urls.txt
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIR = ROOT / "assets" / "photos"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".html": "text/html"}


@dataclass(frozen=True)
class Planted:
    """One URL path the server answers, what it is, and the outcome the crawl should report for it."""

    path: str
    kind: str  # photo | near_duplicate | not_found | truncated | html
    status: int
    content_type: str
    body: bytes
    original: str = ""  # for near-duplicates: the photo it copies


def list_photos(photo_dir: Path = PHOTO_DIR) -> list[Path]:
    return sorted(p for p in photo_dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_site(photo_dir: Path = PHOTO_DIR, exclude: tuple[str, ...] | list[str] = (), num_duplicates: int = 2,
               ) -> list[Planted]:
    """Every URL path of the site. Near-duplicates copy the largest served photos (so a 0.75x copy still passes
    a resolution filter and is caught by dedup rather than by the filter)."""
    excluded = set(exclude)
    unknown = excluded - {p.name for p in list_photos(photo_dir)}
    if unknown:
        raise ValueError(f"cannot exclude photos that do not exist in {photo_dir}: {sorted(unknown)}")
    photos = [p for p in list_photos(photo_dir) if p.name not in excluded]
    if not photos:
        raise ValueError(f"no photos to serve in {photo_dir}")
    site = [Planted(f"/photos/{p.name}", "photo", 200, CONTENT_TYPES[p.suffix.lower()], p.read_bytes())
            for p in photos]
    sizes = {}
    for p in photos:
        with Image.open(p) as im:
            sizes[p] = im.size[0] * im.size[1]
    largest = sorted(photos, key=lambda p: (-sizes[p], p.name))[: 2 * num_duplicates]
    for i, p in enumerate(largest):
        with Image.open(p) as im:
            im.load()
            if i % 2 == 0:  # resized to 3/4 and re-encoded
                small = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BICUBIC)
                site.append(Planted(f"/dup/{p.stem}-resized.jpg", "near_duplicate", 200, "image/jpeg",
                                    _jpeg(small, 90), original=p.name))
            else:  # same size, heavier JPEG
                site.append(Planted(f"/dup/{p.stem}-q60.jpg", "near_duplicate", 200, "image/jpeg",
                                    _jpeg(im, 60), original=p.name))
    first_jpeg = next((s for s in site if s.content_type == "image/jpeg"), site[0])
    site += [
        Planted("/bad/missing.jpg", "not_found", 404, "text/plain", b"not found"),
        Planted("/bad/truncated.jpg", "truncated", 200, "image/jpeg", first_jpeg.body[: len(first_jpeg.body) // 3]),
        Planted("/bad/page.jpg", "html", 200, "text/html",
                b"<!doctype html><html><body><h1>Not an image</h1><p>A gallery page.</p></body></html>"),
    ]
    return site


class _Handler(BaseHTTPRequestHandler):
    server_version = "vosr-demo-photos/1.0"
    routes: dict[str, Planted] = {}

    def log_message(self, fmt: str, *args) -> None:  # quiet: the crawl reports its own progress
        pass

    def _send(self, head_only: bool) -> None:
        item = self.routes.get(self.path.split("?", 1)[0])
        if item is None:
            item = Planted(self.path, "not_found", 404, "text/plain", b"not found")
        self.send_response(item.status)
        self.send_header("Content-Type", item.content_type)
        self.send_header("Content-Length", str(len(item.body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(item.body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._send(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(head_only=True)


class PhotoServer:
    """Serve the demo site on 127.0.0.1 in a background thread."""

    def __init__(self, photo_dir: Path | str = PHOTO_DIR, exclude: tuple[str, ...] | list[str] = (),
                 port: int = 0, num_duplicates: int = 2) -> None:
        self.site = build_site(Path(photo_dir), exclude, num_duplicates)
        handler = type("DemoPhotoHandler", (_Handler,), {"routes": {s.path: s for s in self.site}})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def urls(self) -> list[str]:
        return [self.base_url + s.path for s in self.site]

    def expected(self) -> dict[str, int]:
        """How many URLs of each planted kind the site holds."""
        out: dict[str, int] = {}
        for s in self.site:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def write_url_list(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(u + "\n" for u in self.urls()))
        return path

    def start(self) -> PhotoServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-photo-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PhotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve the shipped photos plus planted bad URLs and near-duplicates "
                                "on 127.0.0.1 for a crawl.")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--urls", default="outputs/demo/urls.txt", help="where to write the URL list")
    p.add_argument("--exclude", action="append", default=[], help="photo file name not to serve (repeatable)")
    args = p.parse_args(argv)
    with PhotoServer(exclude=args.exclude, port=args.port) as server:
        server.write_url_list(args.urls)
        print(f"serving {len(server.site)} URLs at {server.base_url} ({server.expected()}); list in {args.urls}; "
              "Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
