"""Crawl-wide politeness: per-domain rate and concurrency limits that hold across every stage-1 block and node.

A few async Ray actors (`crawl.gate_actors`) each own the domains whose crc32 falls to them. A crawler asks its
domain's actor for a permit: the actor answers with the delay until the permit's start time (starts of one
domain are spaced 1/per_domain_rps apart, on the actor's clock) and a concurrency lease (at most
per_domain_concurrency leases per domain; a lease ends when the request ends or, should its task die, after
`lease_s`), or, when the domain has no free lease, with when to ask again. A 429/503 with Retry-After pushes the
domain's next start time out for every block at once.

No actor call per request: each crawl process (each block's event loop) keeps one client per actor that sends
everything it has waiting -- the permits asked for by any of its requests, on any domain, and the leases its
finished requests give back -- in one call (`DomainLimiter.grant`), and sends the next call as soon as the
previous answer is in. Under load a call carries many permits, so the actors' call rate is bounded by the number
of crawl processes over the call's round trip, not by the request rate (benchmarks/bench_gate.py simulates N
client processes against the gate: permits per second and the wait per permit). Politeness stays global: every
start time and lease is still handed out by the one actor that owns the domain.

Why actors rather than planning blocks by domain: planning by domain needs a shuffle of every URL before stage 1
(the plan reads only list sizes and footers now, and block keys name the resumable ledgers), and one big domain
would become one straggler task; with the limiter the plan, the keys and the resumption stay as they are. Within
a block the crawler (crawl.fetch_stream) takes URLs round-robin over their domains, at most
per_domain_concurrency of one domain at a time, so a block dominated by one slow domain keeps fetching the others'.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import weakref
import zlib


class _Domain:
    __slots__ = ("next", "leases", "touched")

    def __init__(self) -> None:
        self.next = 0.0
        self.leases: dict[int, float] = {}  # lease id -> expiry (monotonic seconds)
        self.touched = 0.0


class DomainLimiter:
    """Start-time spacing and concurrency leases per domain (the body of one gate actor; no awaits: each call is
    answered at once, so one actor call can carry any number of permits)."""

    PRUNE_EVERY = 4096

    def __init__(self) -> None:
        self._domains: dict[str, _Domain] = {}
        self._ids = itertools.count(1)
        self._calls = 0
        self.granted = 0

    def _get(self, host: str, now: float) -> _Domain:
        d = self._domains.get(host)
        if d is None:
            d = self._domains[host] = _Domain()
        d.touched = now
        self._calls += 1
        if self._calls % self.PRUNE_EVERY == 0:
            self._prune(now)
        return d

    def _prune(self, now: float) -> None:
        for host in [h for h, d in self._domains.items() if not d.leases and d.next < now and now - d.touched > 60]:
            del self._domains[host]

    def _one(self, host: str, rps: float, concurrency: int, lease_s: float, now: float) -> tuple[float, int]:
        d = self._get(host, now)
        if d.leases:
            for lid in [k for k, exp in d.leases.items() if exp <= now]:
                del d.leases[lid]
        if len(d.leases) >= concurrency:
            return -1.0, 0  # no free lease: ask again later
        start = max(now, d.next)
        d.next = start + 1.0 / rps
        lease = next(self._ids)
        d.leases[lease] = start + lease_s
        self.granted += 1
        return start - now, lease

    async def grant(self, hosts: list[str], releases: list[tuple[str, int]], rps: float, concurrency: int,
                    lease_s: float) -> list[tuple[float, int]]:
        """Release the given (host, lease) pairs, then answer each host in order with (seconds to wait before
        starting, lease id), or (-1, 0) when the domain has all its leases out (ask again). Never awaits: an
        async method so that the actor is an async actor (its calls run one at a time on its event loop)."""
        for host, lease in releases:
            d = self._domains.get(host)
            if d is not None:
                d.leases.pop(lease, None)
        now = time.monotonic()
        return [self._one(h, rps, concurrency, lease_s, now) for h in hosts]

    async def backoff(self, host: str, seconds: float) -> None:
        now = time.monotonic()
        d = self._get(host, now)
        d.next = max(d.next, now + seconds)

    async def domains(self) -> int:
        return len(self._domains)

    async def stats(self) -> dict:
        return {"calls": self._calls, "granted": self.granted, "domains": len(self._domains)}


def shard_of(host: str, n: int) -> int:
    return zlib.crc32(host.lower().encode()) % n


class GateUnavailable(RuntimeError):
    """The crawl-wide limiter could not be reached (its actor, or this worker's own Ray connection, is gone).

    Not a property of the URL: the block fails and Ray runs it again (curate._run_blocks retries this exception),
    rather than recording every URL waiting on the gate as a fetch error. Seen when a worker node is lost: its
    dying block tasks' gate calls failed and, before this, 6 of 9 URLs of a block were written off as
    `fetch_error` (tests/e2e/test_multinode.py, CI run of 2026-12-01)."""


# A request that found its domain's leases all out asks again after this long (or sooner, when a lease expires).
RETRY_FULL_S = 0.05
# Leases given back while no call is in flight ride on the next call, sent at the latest this long after.
RELEASE_FLUSH_S = 0.005
# A gate actor that is restarting (its node was lost; the actors restart without limit) is asked again for this
# long, with backoff from 0.2 s to 5 s, before the block gives up with GateUnavailable.
GATE_RESTART_WAIT_S = 90.0


class _GateClient:
    """One crawl event loop's link to one gate actor: permits asked for and leases given back are queued and
    sent together, one call in flight at a time (the next leaves when the previous answer is in)."""

    def __init__(self, gates: SharedGates, actor) -> None:
        self.gates, self.actor = gates, actor
        self.asks: list[tuple[str, asyncio.Future]] = []
        self.releases: list[tuple[str, int]] = []
        self.busy = False
        self.flush_timer = None
        self.calls = 0

    def ask(self, host: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.asks.append((host, fut))
        self._send()
        return fut

    def give_back(self, host: str, lease: int) -> None:
        self.releases.append((host, lease))
        if not self.busy and self.flush_timer is None:
            self.flush_timer = asyncio.get_running_loop().call_later(RELEASE_FLUSH_S, self._flush)

    def _flush(self) -> None:
        self.flush_timer = None
        self._send()

    def _send(self) -> None:
        if self.busy or not (self.asks or self.releases):
            return
        asks, self.asks = self.asks, []
        releases, self.releases = self.releases, []
        self.busy = True
        self.calls += 1
        asyncio.ensure_future(self._call(asks, releases))

    async def _call(self, asks: list[tuple[str, asyncio.Future]], releases: list[tuple[str, int]]) -> None:
        try:
            answers = await self._grant([h for h, _ in asks], releases)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the gate is the block's, not the URL's
            hosts = sorted({h for h, _ in asks})[:3]
            err = GateUnavailable(f"domain gate for {', '.join(map(repr, hosts)) or 'releases'} unreachable: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}")
            for _, fut in asks:
                if not fut.done():
                    fut.set_exception(err)
        else:
            loop = asyncio.get_running_loop()
            for (host, fut), (delay, lease) in zip(asks, answers):
                if delay < 0:  # the domain's leases are all out: ask again shortly
                    loop.call_later(RETRY_FULL_S, self._again, host, fut)
                elif fut.done():  # the asking request was cancelled meanwhile: give the lease back
                    self.releases.append((host, lease))
                else:
                    fut.set_result((delay, lease))
        finally:
            self.busy = False
            self._send()

    async def _grant(self, hosts: list[str], releases: list[tuple[str, int]]):
        """The actor's answer; while the actor is restarting on another node (ActorUnavailableError), asked again
        with backoff for up to GATE_RESTART_WAIT_S. A restarted actor starts with no leases out, so the
        releases resent to it are harmless."""
        from ray.exceptions import ActorUnavailableError

        g = self.gates
        deadline = time.monotonic() + GATE_RESTART_WAIT_S
        pause = 0.2
        while True:
            try:
                return await self.actor.grant.remote(hosts, releases, g.rps, g.concurrency, g.lease_s)
            except ActorUnavailableError:
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(5.0, 2 * pause)

    def _again(self, host: str, fut: asyncio.Future) -> None:
        if not fut.done():
            self.asks.append((host, fut))
            self._send()


class SharedGates:
    """Client side, picklable (a list of actor handles plus the limits); used by crawl.Crawler. Each event loop
    that uses it gets its own batching clients (_GateClient), made on first use."""

    def __init__(self, actors: list, rps: float, concurrency: int, lease_s: float):
        self.actors, self.rps, self.concurrency, self.lease_s = list(actors), rps, concurrency, lease_s
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_clients"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._clients = weakref.WeakKeyDictionary()

    def _index(self, host: str) -> int:
        return shard_of(host, len(self.actors))

    def _client(self, host: str) -> _GateClient:
        loop = asyncio.get_running_loop()
        clients = self._clients.get(loop)
        if clients is None:
            clients = self._clients[loop] = [_GateClient(self, a) for a in self.actors]
        return clients[self._index(host)]

    def calls(self) -> int:
        """Actor calls this process's clients made (on the running loop)."""
        return sum(c.calls for c in self._clients.get(asyncio.get_running_loop(), []))

    async def acquire(self, host: str) -> int:
        # cancelled while waiting for the answer: the client gives the lease back when the answer comes
        delay, lease = await self._client(host).ask(host)
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.release(host, lease)
                raise
        return lease

    def release(self, host: str, lease: int) -> None:
        self._client(host).give_back(host, lease)

    def backoff(self, host: str, seconds: float) -> None:
        self.actors[self._index(host)].backoff.remote(host, seconds)


def start_gates(crawl_cfg) -> SharedGates:
    """Start the crawl's gate actors (no CPU reserved: they only keep time); they end with the driver or with
    stop_gates. They live on the driver's node: a worker node lost mid-crawl would otherwise take them along and
    every fetch waiting on them would fail (found by tests/e2e/test_multinode.py); the driver's node outlives the job."""
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
