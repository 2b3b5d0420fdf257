"""The endpoint's limits without Ray: the cost plan against the real tile geometry and the Upscaler, and
the streaming body reader on a real starlette Request fed by an ASGI receive channel."""

from __future__ import annotations

import pytest
from fastapi import Request
from test_upscale import make_checkpoint

from inference.serve import ServeError, check_cost, parse_query, read_body
from jobkit.config import config_from_dict
from vosr.tiling import tile_count, tile_grid
from vosr.upscaler import Upscaler


@pytest.mark.parametrize("lh,lw,tile,ov,factor", [(34, 22, 64, 32, 4), (500, 500, 512, 64, 8), (128, 96, 64, 8192, 4),
                                                  (20, 36, 512, 4000, 8), (8, 8, 64, 0, 4)])
def test_tile_count_matches_the_grid_and_overlap_is_at_most_half(lh, lw, tile, ov, factor):
    grid = tile_grid(lh, lw, tile, ov, factor)
    assert tile_count(lh, lw, tile, ov, factor) == (len(grid.tiles), grid.size)
    assert grid.overlap <= grid.size // 2


def test_the_issue_attack_is_bounded():
    # tile=64 px with an 8192 px overlap on a 128 px image (tiny preset, f = 4): tiles stepped by one
    # latent before (a 113 x 113 grid); the half-tile cap leaves 15 x 15 and the cost check refuses even that
    n, lt = tile_count(128, 128, 64, 8192, 4)
    assert (n, lt) == (225, 16)


def test_cost_plan_and_refusals(tmp_path):
    up = Upscaler(make_checkpoint(tmp_path / "s", student=True), device="cpu")
    scfg = config_from_dict({}, ["serve.max_evaluations=40"]).serve
    d = up.resolve(up.defaults)
    base = up.plan((33, 21), d)
    assert (base.tiles, base.steps, base.passes, base.area) == (1, 1, 1, 34 * 22)
    assert check_cost(up.plan((33, 21), d.replace(steps=3)), base, scfg)["ratio"] == 3.0
    with pytest.raises(ServeError) as exc:
        check_cost(up.plan((33, 21), d.replace(tile_size=64, tile_overlap=32)), base, scfg)
    assert exc.value.status == 422 and exc.value.extra["cost"]["tiles"] == 8
    # a tile larger than the default evaluation counts by its area: default 64 px tiles on 100 px, request 128 px
    tiled = d.replace(tile_size=64)
    ref = up.plan((100, 100), tiled)
    big = up.plan((100, 100), d.replace(tile_size=128, tile_overlap=64))
    assert big.cost(ref.area) == big.evaluations * (32 * 32) / (16 * 16)
    with pytest.raises(ServeError) as exc:
        check_cost(ref, ref, scfg)                                       # 7 x 7 tiles > 40 evaluations
    assert exc.value.status == 413 and exc.value.code == "over_budget"


def test_query_bounds():
    scfg = config_from_dict({}, ["serve.max_tile=512"]).serve
    assert parse_query({"tile": "256", "tile_overlap": "128"}, scfg) == {"tile_size": 256, "tile_overlap": 128}
    for bad in ({"tile": "256", "tile_overlap": "129"}, {"tile": "1024"}, {"tile": "32"}, {"tile_overlap": "300"},
                {"steps": "51"}, {"steps": "abc"}, {"steps": "0"}, {"guidance": "nan"}, {"weak_strength": "1.5"},
                {"seed": "-1"}, {"upscale_factor": "8"}):
        with pytest.raises(ServeError) as exc:
            parse_query(bad, scfg)
        assert exc.value.status == 422 and exc.value.code == "bad_option"
        assert any(str(exc.value).startswith(f"{k}=") for k in bad), str(exc.value)   # it names the option


def _pull(first: bytes, ctype: str, chunk: int = 4096, total: int = 60 * 2**20, rest: bytes | None = None):
    """read_body over a real starlette Request fed by an ASGI receive channel of `chunk`-byte messages; returns
    (result or ServeError, bytes the reader pulled)."""
    import asyncio

    pulled = 0

    async def receive():
        nonlocal pulled
        if rest is not None:
            body, more = (first + rest), False
        else:
            body = first if pulled == 0 else b"\0" * chunk
            more = pulled + len(body) < total
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": more}

    scope = {"type": "http", "method": "POST", "path": "/r", "query_string": b"", "http_version": "1.1",
             "headers": [(b"content-type", ctype.encode()), (b"transfer-encoding", b"chunked")]}

    async def run():
        try:
            return await read_body(Request(scope, receive), 10_000, 2.0)
        except ServeError as exc:
            return exc

    return asyncio.run(run()), pulled


def test_streaming_cap_raw_and_multipart():
    err, pulled = _pull(b"RAW!", "image/png")
    assert err.status == 413 and err.extra["bytes_read"] == pulled <= 10_000 + 4096 and err.extra["last_chunk"] == 4096
    head = (b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    err, pulled = _pull(head, "multipart/form-data; boundary=bnd")
    assert err.status == 413 and err.extra["bytes_read"] == pulled <= len(head) + 10_000 + 4096
    # a small multipart upload: the first file field, whatever other fields come first
    note = b"--bnd\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
    data, _ = _pull(note, "multipart/form-data; boundary=bnd", rest=head + b"PNG!data\r\n--bnd--\r\n")
    assert data == b"PNG!data"
    err, _ = _pull(note, "multipart/form-data; boundary=bnd", rest=b"--bnd--\r\n")
    assert err.status == 415


def test_slow_body_gets_408():
    import asyncio

    async def run():
        async def receive():
            await asyncio.sleep(0.3)
            return {"type": "http.request", "body": b"x" * 16, "more_body": True}

        scope = {"type": "http", "method": "POST", "path": "/r", "query_string": b"", "headers": []}
        try:
            await read_body(Request(scope, receive), 10_000, 1.0)
        except ServeError as exc:
            return exc

    err = asyncio.run(run())
    assert err.status == 408 and err.code == "body_timeout"
