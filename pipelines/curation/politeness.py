"""Crawl-wide politeness: per-domain rate and concurrency limits that hold across every stage-1 block and node.

A few async Ray actors (`crawl.gate_actors`) each own the domains whose crc32 falls to them. Before each request
a crawler asks its domain's actor for a slot; the actor answers with the delay until the slot's start time (starts
of one domain are spaced 1/per_domain_rps apart, on the actor's clock) and a concurrency lease (at most
per_domain_concurrency leases per domain; a lease ends when the request ends or, should its task die, after
`lease_s`). A 429/503 with Retry-After pushes the domain's next start time out for every block at once.

Why actors rather than planning blocks by domain: planning by domain needs a shuffle of every URL before stage 1
(the plan reads only list sizes and footers now, and block keys name the resumable ledgers), and one big domain
would become one straggler task; with the limiter the plan, the keys and the resumption stay as they are. Cost:
one actor round trip per request (the release is fire-and-forget), well under a millisecond of actor time, so a
handful of actors serves thousands of requests per second; each actor holds state only for domains seen recently.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib


class _Domain:
    __slots__ = ("next", "leases", "cond", "touched")

    def __init__(self) -> None:
        self.next = 0.0
        self.leases: dict[int, float] = {}  # lease id -> expiry (monotonic seconds)
        self.cond = asyncio.Condition()
        self.touched = 0.0


class DomainLimiter:
    """Start-time spacing and concurrency leases per domain (the body of one gate actor; plain asyncio)."""

    PRUNE_EVERY = 4096

    def __init__(self) -> None:
        self._domains: dict[str, _Domain] = {}
        self._ids = itertools.count(1)
        self._calls = 0

    def _get(self, host: str) -> _Domain:
        d = self._domains.get(host)
        if d is None:
            d = self._domains[host] = _Domain()
        d.touched = time.monotonic()
        self._calls += 1
        if self._calls % self.PRUNE_EVERY == 0:
            self._prune()
        return d

    def _prune(self) -> None:
        now = time.monotonic()
        for host in [h for h, d in self._domains.items()
                     if not d.leases and d.next < now and now - d.touched > 60 and not d.cond._waiters]:
            del self._domains[host]

    async def acquire(self, host: str, rps: float, concurrency: int, lease_s: float) -> tuple[float, int]:
        """(seconds to wait before starting, lease id). Waits here while the domain has no free lease."""
        d = self._get(host)
        async with d.cond:
            while True:
                now = time.monotonic()
                for lid in [k for k, exp in d.leases.items() if exp <= now]:
                    del d.leases[lid]
                if len(d.leases) < concurrency:
                    break
                wait = min(d.leases.values()) - now
                try:
                    await asyncio.wait_for(d.cond.wait(), timeout=max(wait, 1e-3))
                except asyncio.TimeoutError:
                    pass
            start = max(now, d.next)
            d.next = start + 1.0 / rps
            lease = next(self._ids)
            d.leases[lease] = start + lease_s
            return start - now, lease

    async def release(self, host: str, lease: int) -> None:
        d = self._domains.get(host)
        if d is None:
            return
        async with d.cond:
            if d.leases.pop(lease, None) is not None:
                d.cond.notify()

    def backoff(self, host: str, seconds: float) -> None:
        d = self._get(host)
        d.next = max(d.next, time.monotonic() + seconds)

    def domains(self) -> int:
        return len(self._domains)


def shard_of(host: str, n: int) -> int:
    return zlib.crc32(host.lower().encode()) % n


class GateUnavailable(RuntimeError):
    """The crawl-wide limiter could not be reached (its actor, or this worker's own Ray connection, is gone).

    Not a property of the URL: the block fails and Ray runs it again (curate._run_blocks retries this exception),
    rather than recording every URL waiting on the gate as a fetch error. Seen when a worker node is lost: its
    dying block tasks' gate calls failed and, before this, 6 of 9 URLs of a block were written off as
    `fetch_error` (tests/test_multinode.py, CI run of 2026-12-01)."""


class SharedGates:
    """Client side, picklable (a list of actor handles plus the limits); used by crawl.Crawler."""

    def __init__(self, actors: list, rps: float, concurrency: int, lease_s: float):
        self.actors, self.rps, self.concurrency, self.lease_s = list(actors), rps, concurrency, lease_s

    def _actor(self, host: str):
        return self.actors[shard_of(host, len(self.actors))]

    async def acquire(self, host: str) -> int:
        try:
            delay, lease = await self._actor(host).acquire.remote(host, self.rps, self.concurrency, self.lease_s)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the gate is the block's, not the URL's
            raise GateUnavailable(f"domain gate for {host!r} unreachable: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}") from exc
        if delay > 0:
            await asyncio.sleep(delay)
        return lease

    def release(self, host: str, lease: int) -> None:
        self._actor(host).release.remote(host, lease)

    def backoff(self, host: str, seconds: float) -> None:
        self._actor(host).backoff.remote(host, seconds)


def start_gates(crawl_cfg) -> SharedGates:
    """Start the crawl's gate actors (no CPU reserved: they only keep time); they end with the driver or with
    stop_gates. They live on the driver's node: a worker node lost mid-crawl would otherwise take them along and
    every fetch waiting on them would fail (found by tests/test_multinode.py); the driver's node outlives the job."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_concurrency=100_000, max_restarts=-1, max_task_retries=3,
                       scheduling_strategy=here)(DomainLimiter)
    actors = [actor.remote() for _ in range(crawl_cfg.gate_actors)]
    # a request holds its lease for at most its timeout per attempt; the slack covers the body and a dead task
    lease_s = crawl_cfg.timeout_s + 5.0
    return SharedGates(actors, crawl_cfg.per_domain_rps, crawl_cfg.per_domain_concurrency, lease_s)


def stop_gates(gates: SharedGates | None) -> None:
    if gates is None:
        return
    import ray

    for a in gates.actors:
        ray.kill(a)
