"""The Ray Serve application on loopback with a tiny random student loaded from the MLflow registry (sqlite)."""

from __future__ import annotations

import asyncio
import io
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from test_upscale import make_checkpoint

pytestmark = pytest.mark.slow

API_KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def register_in_mlflow(folder: str, root) -> tuple[str, str]:
    """Log the checkpoint folder as run artifacts and register it: a real models:/ URI on a sqlite store."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=str(root / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, folder, "checkpoint")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("vosr-student")
    mv = client.create_model_version("vosr-student", source=f"{run.info.artifact_uri}/checkpoint",
                                     run_id=run.info.run_id)
    return uri, f"models:/vosr-student/{mv.version}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Register the tiny student in a background thread, so that it overlaps with Ray starting up."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("serve")
    folder = make_checkpoint(root / "student", student=True)
    pool = ThreadPoolExecutor(1)
    future = pool.submit(register_in_mlflow, folder, root)
    yield root, folder, future
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def service(registered, ray_local):
    """One application with an API key, its student loaded through models:/ from the MLflow registry."""
    from ray import serve

    from inference.serve import start
    from vosr.config import config_from_dict

    root, folder, future = registered
    tracking, model_uri = future.result(timeout=300)
    port = free_port()
    cfg = config_from_dict({}, [
        f"serve.port={port}", "serve.max_body_bytes=150000", "serve.max_pixels=200000", "serve.max_batch_size=8",
        "serve.batch_wait_timeout_s=0.05", "serve.replica_cpus=1", f"serve.api_key={API_KEY}",
        "inference.device=cpu", f"inference.checkpoint={model_uri}", f"run.mlflow.tracking_uri={tracking}",
        f"run.output_root={root}"])
    url = start(cfg)
    yield {"url": url, "folder": folder, "client": httpx.Client(headers={"X-API-Key": API_KEY}, timeout=60)}
    serve.shutdown()


@pytest.fixture(scope="module")
def small(photos):
    return Image.open(photos[1]).convert("RGB").resize((33, 21), Image.BICUBIC)


def test_valid_request_returns_png_of_the_right_size(service, small):
    http = service["client"]
    r = http.post(f"{service['url']}/upscale", content=png_bytes(small))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(r.content)).size == (132, 84)
    # multipart upload to POST /, JPEG input
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=90)
    r = http.post(f"{service['url']}/", files={"file": ("x.jpg", buf.getvalue(), "image/jpeg")},
                  params={"seed": 3, "color_fix": "wavelet"})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (132, 84)
    health = http.get(f"{service['url']}/healthz").json()
    assert health["status"] == "ok" and health["model"]["student"] is True
    assert health["model"]["checkpoint"] != service["folder"]          # loaded from the MLflow download


def test_bad_inputs_get_status_and_json_and_service_keeps_serving(service, small):
    http = service["client"]
    url = f"{service['url']}/upscale"
    good = png_bytes(small)
    big_pixels = png_bytes(Image.new("RGB", (600, 400), (10, 120, 200)))      # 240000 px > 200000
    noise = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    cases = [
        (big_pixels, {}, 413, "too_many_pixels"),
        (noise, {}, 413, "too_large"),
        (b"hello, not an image", {}, 415, "not_an_image"),
        (b"", {}, 415, "not_an_image"),
        (good[: len(good) // 2], {}, 400, "bad_image"),
        (good, {"steps": "abc"}, 422, "bad_option"),
        (good, {"steps": "0"}, 422, "bad_option"),
        (good, {"steps": "5000"}, 422, "bad_option"),
        (good, {"guidance": "nan"}, 422, "bad_option"),
        (good, {"color_fix": "sepia"}, 422, "bad_option"),
        (good, {"tile": "5"}, 422, "bad_option"),
        (good, {"mode": "multistep"}, 422, "bad_option"),      # the student has no guided multi-step mode
        (good, {"upscale_factor": "8"}, 422, "bad_option"),
    ]
    for body, params, status, code in cases:
        r = http.post(url, content=body, params=params)
        assert r.status_code == status, (params, r.status_code, r.text)
        err = r.json()
        assert err["error"] == code and err["message"], err
    r = http.post(url, content=good, params={"steps": 2, "tile": 64, "seed": 1})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (132, 84)
    counts = http.get(f"{service['url']}/healthz").json()["requests"]
    assert counts["http_413"] >= 2 and counts["http_415"] >= 2 and counts["http_422"] >= 7


def test_api_key_is_enforced_on_every_request(service, small):
    url = f"{service['url']}/upscale"
    body = png_bytes(small)
    for method, target, kw in (("POST", url, {"content": body}), ("POST", f"{service['url']}/", {"content": body}),
                               ("GET", f"{service['url']}/healthz", {})):
        r = httpx.request(method, target, timeout=60, **kw)
        assert r.status_code == 401 and r.json()["error"] == "missing_api_key", (target, r.text)
        r = httpx.request(method, target, headers={"X-API-Key": "wrong"}, timeout=60, **kw)
        assert r.status_code == 401 and r.json()["error"] == "bad_api_key"
    # bad input without a key is refused for the key first
    assert httpx.post(url, content=b"junk", timeout=60).status_code == 401
    r = service["client"].post(url, content=body)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (132, 84)
    # the static upload page holds no data and asks for the key itself
    assert httpx.get(f"{service['url']}/", timeout=60).status_code == 200


def test_200_concurrent_requests_without_errors(service, photos):
    images = [png_bytes(Image.open(p).convert("RGB").resize(size, Image.BICUBIC))
              for p, size in zip(photos[:3], [(16, 16), (16, 16), (20, 12)])]
    sizes = [(64, 64), (64, 64), (80, 48)]
    url = f"{service['url']}/upscale"
    # the answer to one request alone, to check that batching does not change results
    alone = service["client"].post(url, content=images[0], params={"seed": 5}).content

    async def run_all():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16),
                                     headers={"X-API-Key": API_KEY}) as client:
            async def one(i):
                async with sem:
                    k = i % 3
                    r = await client.post(url, content=images[k], params={"seed": 5 if k == 0 else i})
                    return k, r.status_code, r.content

            return await asyncio.gather(*(one(i) for i in range(200)))

    t0 = time.perf_counter()
    results = asyncio.run(run_all())
    elapsed = time.perf_counter() - t0
    errors = [(k, s) for k, s, _ in results if s != 200]
    assert not errors, errors[:5]
    for k, _, content in results:
        assert Image.open(io.BytesIO(content)).size == sizes[k]
    assert all(c == alone for k, _, c in results if k == 0)
    assert elapsed < 120, elapsed
    batches = service["client"].get(f"{service['url']}/healthz").json()["batch_sizes"]
    assert max(int(b) for b in batches) > 1, batches                   # requests were really batched
