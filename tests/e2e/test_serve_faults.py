"""The Ray Serve application under faults: its only model replica killed, a redeploy under load, no model replica
before the deadline, readiness while the model loads. A second application (/faults) on the Serve instance of
tests/integration/test_serve.py's `service`, whose fixtures this module reuses."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.integration import test_serve
from tests.integration.test_serve import RAISE_SEED, png_bytes

# the module-scoped fixtures of the Serve tests, instantiated again for this module
registered, service, small = test_serve.registered, test_serve.service, test_serve.small

HELD_SEED = 7_000_001     # the /faults app's model replica holds a request with this seed for 3 s before its batch
# The proxy's timeout is the module service's (12 s; one per Serve instance); the /faults app's clients lift it the
# way Ray Serve offers, so that the ingress's own deadline (65 s) is the one that counts.
PATIENT = {"X-Request-Timeout-Seconds": "90"}


def _model_replicas(app: str) -> list[str]:
    """Names of the live replica actors of the application's model deployment (Ray's named-actor API)."""
    import ray

    from inference.serve import MODEL_DEPLOYMENT

    prefix = f"SERVE_REPLICA::{app}#{MODEL_DEPLOYMENT}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


@pytest.fixture(scope="module")
def faults_app(service, registered, small, tmp_path_factory):
    """The application deployed again as /faults (one model replica, half a CPU; a 60 s deadline; health checks
    every second; no batching, so that every answer is bit-exact whatever else runs), with /readyz polled while
    it deploys. Its model replicas log when their model has loaded."""
    import threading

    from ray import serve

    from inference.serve import build_app
    from jobkit.config import config_from_dict
    from tests.helpers.serve_faults import SeedFaults

    root, folder, _ = registered
    load_log = tmp_path_factory.mktemp("faults") / "loads.txt"
    sets = [f"serve.port={service['port']}", "serve.replica_cpus=0.5", "serve.ingress_cpus=0.1",
            "serve.min_replicas=1", "serve.max_replicas=1", "serve.request_timeout_s=60", "serve.body_timeout_s=5",
            "serve.retry_after_s=2", "serve.health_check_period_s=1", "serve.max_batch_size=1",
            "serve.app_name=faults", "serve.route_prefix=/faults", "inference.device=cpu",
            f"inference.checkpoint={folder}", f"run.output_root={root}"]
    hooks = SeedFaults(RAISE_SEED, HELD_SEED, sleep_s=3, load_delay_s=1, load_log=str(load_log))

    def deploy(*extra: str, hooks=hooks) -> None:
        serve.run(build_app(config_from_dict({}, [*sets, *extra]), hooks), name="faults", route_prefix="/faults")

    url = f"http://127.0.0.1:{service['port']}/faults"
    deploying = threading.Thread(target=deploy)
    deploying.start()
    readiness: list[tuple[float, int, httpx.Response | None]] = []
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=10)
            readiness.append((time.time(), r.status_code, r))
        except httpx.HTTPError:
            readiness.append((time.time(), 0, None))
        if readiness[-1][1] == 200:
            break
        time.sleep(0.1)
    first = httpx.post(f"{url}/upscale", content=png_bytes(small), timeout=60)   # right after the first 200
    deploying.join(timeout=240)
    yield {"url": url, "deploy": deploy, "readiness": readiness, "first_upscale": first, "load_log": load_log}
    serve.delete("faults")


def test_readyz_is_ok_only_once_a_model_replica_has_loaded(faults_app):
    readiness = faults_app["readiness"]
    assert readiness and readiness[-1][1] == 200, [s for _, s, _ in readiness][-10:]
    loaded = [float(x) for x in faults_app["load_log"].read_text().split()]
    assert readiness[-1][0] >= loaded[0], "ready before the model had loaded"
    for _, status, r in readiness[:-1]:
        assert status in (0, 404, 503), status                  # not routed yet, or routed without a model
        if status == 503:
            assert r.json()["status"] == "not_ready" and r.headers["retry-after"] == "2", r.text
    assert faults_app["first_upscale"].status_code == 200, faults_app["first_upscale"].text   # routed when ready


def test_a_killed_model_replica_loses_no_request(faults_app, small):
    """Requests the only model replica holds when the test kills it (ray.kill) are sent again by the ingress and
    answered 200 with the image an undisturbed request gets; requests arriving while there is no model replica get
    200 or 503 with Retry-After, never 500; /readyz says not ready until the replacement has loaded."""
    import threading

    import ray

    url = faults_app["url"]
    body = png_bytes(small)
    reference = httpx.post(f"{url}/upscale", content=body, params={"seed": HELD_SEED}, timeout=60)
    assert reference.status_code == 200 and "x-retries" not in reference.headers
    [victim] = _model_replicas("faults")
    results: dict[str, list] = {"held": [], "during": [], "ready": []}

    def post(kind: str, seed: int) -> None:
        r = httpx.post(f"{url}/upscale", content=body, params={"seed": seed}, headers=PATIENT, timeout=120)
        results[kind].append(r)

    held = [threading.Thread(target=post, args=("held", HELD_SEED)) for _ in range(3)]
    for t in held:
        t.start()
    time.sleep(1.5)                               # the replica now holds them (3 s each before their batch)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    during = [threading.Thread(target=post, args=("during", 11 + i)) for i in range(3)]
    for t in during:
        t.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        r = httpx.get(f"{url}/readyz", timeout=10)
        results["ready"].append(r.status_code)
        if r.status_code == 200 and 503 in results["ready"]:
            break
        time.sleep(0.2)
    for t in held + during:
        t.join(timeout=150)
    assert 503 in results["ready"] and results["ready"][-1] == 200, results["ready"]
    for r in results["held"]:
        assert r.status_code == 200, r.text
        assert int(r.headers["x-retries"]) >= 1                 # it was really sent again
        assert r.content == reference.content                   # the same image, byte for byte
    assert len(results["held"]) == 3 and len(results["during"]) == 3
    for r in results["during"]:
        assert r.status_code == 200 or (r.status_code == 503 and r.headers["retry-after"] == "2"), r.text
    replicas = _model_replicas("faults")
    assert replicas and victim not in replicas                  # Serve started a replacement
    counts = httpx.get(f"{url}/healthz", timeout=30).json()["requests"]
    assert counts["model_retries"] >= 3 and "http_500" not in counts, counts


def test_a_redeploy_under_load_fails_no_request(faults_app, small):
    """A redeploy with a changed config (Serve replaces the model replica) while 32 requests run at concurrency 8:
    every one answered 200 with the image of its seed."""
    import threading

    url = faults_app["url"]
    body = png_bytes(small)
    reference = {s: httpx.post(f"{url}/upscale", content=body, params={"seed": s}, timeout=60).content
                 for s in range(4)}
    before = _model_replicas("faults")

    async def load():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=150, headers=PATIENT) as client:
            async def one(i):
                async with sem:
                    await asyncio.sleep(0.05 * i)               # spread over the redeploy
                    return i % 4, await client.post(f"{url}/upscale", content=body, params={"seed": i % 4})

            return await asyncio.gather(*(one(i) for i in range(32)))

    redeploy = threading.Thread(target=faults_app["deploy"], args=("serve.batch_wait_timeout_s=0.03",))
    redeploy.start()
    results = asyncio.run(load())
    redeploy.join(timeout=240)
    failed = [(seed, r.status_code, r.text[:200]) for seed, r in results if r.status_code != 200]
    assert not failed, failed
    assert all(r.content == reference[seed] for seed, r in results)
    after = _model_replicas("faults")
    assert after and not set(after) & set(before), (before, after)      # the replica was really replaced


def test_no_model_replica_before_the_deadline_is_a_503_with_retry_after(faults_app, small, tmp_path):
    """With a 4 s deadline and a replacement model replica that takes 30 s to load, requests sent after the test
    kills the only model replica are answered 503 with Retry-After at their deadline, never 500 or 504."""
    import ray

    from tests.helpers.serve_faults import SeedFaults

    url = faults_app["url"]
    slow_reload = SeedFaults(RAISE_SEED, HELD_SEED, sleep_s=3, load_log=str(tmp_path / "loads.txt"),
                             reload_delay_s=30)
    faults_app["deploy"]("serve.request_timeout_s=3", "serve.body_timeout_s=1", hooks=slow_reload)
    assert httpx.post(f"{url}/upscale", content=png_bytes(small), timeout=30).status_code == 200
    [victim] = _model_replicas("faults")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    async def during():
        async with httpx.AsyncClient(timeout=30, headers=PATIENT) as client:
            return await asyncio.gather(*(client.post(f"{url}/upscale", content=png_bytes(small),
                                                      params={"seed": i}) for i in range(3)))

    t0 = time.perf_counter()
    answers = asyncio.run(during())
    elapsed = time.perf_counter() - t0
    for r in answers:
        assert r.status_code == 503 and r.headers["retry-after"] == "2", (r.status_code, r.text)
        assert r.json()["error"] == "unavailable" and r.json()["request_id"], r.text
    assert elapsed < 15, elapsed                                   # at the 4 s deadline, not the proxy's
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready", ready.text
