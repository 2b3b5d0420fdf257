"""Async HTTP fetching for the curation job (aiohttp).

Per request: a total timeout, a byte cap, redirects followed by hand (each hop re-checked, at most
`max_redirects`), bounded retries with exponential backoff for timeouts, 429 and 5xx (Retry-After honoured up to
`max_retry_after_s`), a per-domain rate limit and concurrency cap (crawl-wide through the gate actors of
politeness.py when the curate job passes them, else per crawler; a 429/503 Retry-After pauses the whole domain), a
User-Agent, and img2dataset-style respect of `X-Robots-Tag: noai / noimageai`. Hosts that resolve to private,
loopback, link-local, IPv6 transition (NAT64, 6to4, IPv4-compatible, Teredo) or otherwise non-global addresses
are refused unless `allow_private` is set or the URL names a host (and port) listed in `allow_hosts`; the check
runs before each hop and again inside the connector's resolver (so a DNS answer that changes between the two
cannot slip past). iter_fetch streams results as they complete, holding at most `concurrency` bodies.

Every URL ends in exactly one FetchResult whose `reason` is "ok" or a failure code.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.resolver import ThreadedResolver

from pipelines.curation.politeness import GateUnavailable

REDIRECT_CODES = (301, 302, 303, 307, 308)
NOAI_DIRECTIVES = ("noai", "noimageai")  # img2dataset's X-Robots-Tag opt-outs for AI training


@dataclass
class FetchResult:
    url: str
    reason: str            # "ok" or a failure code (bad_url, blocked_address, timeout, http_404, ...)
    data: bytes | None = None
    detail: str = ""
    status: int = 0
    attempts: int = 0
    content_type: str = ""  # as the server declared it; recorded, never trusted (the bytes are sniffed)


class BlockedAddressError(OSError):
    """The host resolves to an address the crawl may not contact."""


class _Failure(Exception):
    def __init__(self, reason: str, detail: str = "", status: int = 0, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.status, self.retry_after = reason, detail, status, retry_after
        self.host = ""  # the host of the hop that failed (set by _one_attempt)


def _retryable(reason: str) -> bool:
    """Retried within the run, with backoff: timeouts, 429, dropped connections and 5xx answers (`http_<status>`)."""
    return reason in ("timeout", "http_429", "server_disconnected") or (reason.startswith("http_5")
                                                                          and reason[5:].isdigit())


# Outcomes that a later run of the job fetches again (transient: the server or the network may recover).
# 404 and other 4xx, non-images, refused addresses, oversize bodies and decode failures are final.
# Beyond what one run retries at once (_retryable), a re-run also tries hosts that were unreachable or cut the body.
RERUN_ONLY_REASONS = ("connect_error", "incomplete_body")


def retry_next_run(reason: str) -> bool:
    """Whether a URL that ended with `reason` is fetched again when the job is re-run (curate.retry_failed)."""
    return _retryable(reason) or reason in RERUN_ONLY_REASONS


# IPv6 ranges refused whatever they embed: IPv4-compatible ::a.b.c.d (RFC 4291 s2.5.5.1, deprecated; also :: and
# ::1), NAT64 well-known and local-use prefixes (RFC 6052, RFC 8215: a gateway translates them to IPv4 that may be
# internal), 6to4 (RFC 3056: embeds an IPv4 relay address), Teredo (RFC 4380), discard-only (RFC 6666) and
# site-local (RFC 3879, deprecated but still routed inside some networks). Python's is_global lets several of
# these through (3.11: 64:ff9b::/96, 2002::/16, ::/96 and fec0::/10 are "global").
_REFUSED_V6 = tuple(ipaddress.ip_network(n) for n in (
    "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "100::/64", "fec0::/10"))
# IPv4 ranges refused besides Python's non-global ones (its list varies across versions): IETF protocol
# assignments (RFC 6890), benchmarking (RFC 2544), reserved (RFC 1112).
_REFUSED_V4 = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4"))


def _text_body(head: bytearray) -> bool:
    """Whether a body's first bytes are a text document (HTML, SVG, JSON, XML, PDF) rather than a raster image."""
    from vosr.imageio import sniff

    return sniff(bytes(head[:4096])) in ("html", "svg", "json", "xml", "pdf")


def address_allowed(ip: str) -> bool:
    """Whether the crawl may connect to `ip`: a global unicast address, IPv4-mapped IPv6 judged by its IPv4,
    and none of the IPv6 transition / deprecated ranges above (which embed an IPv4 address or reach inside)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif any(addr in net for net in _REFUSED_V6):
            return False
    if isinstance(addr, ipaddress.IPv4Address) and any(addr in net for net in _REFUSED_V4):
        return False
    return addr.is_global and not addr.is_multicast


def _host_port(entry: str) -> tuple[str, int | None]:
    """An allow_hosts entry: "host", "host:port", "[v6]" or "[v6]:port" (a bare IPv6 address has no port)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


class _Policy:
    """Address policy. `allow_hosts` entries exempt the named host only (as written in the URL), on the given
    port or any port when none is given; an IP entry never exempts other hostnames that resolve to it."""

    def __init__(self, cfg):
        self.allow_private = bool(cfg.allow_private)
        self.allow_hosts = {_host_port(h) for h in cfg.allow_hosts}

    def exempt(self, host: str, port: int | None = None) -> bool:
        if self.allow_private:
            return True
        host = host.lower().strip("[]")
        return (host, None) in self.allow_hosts or (port is not None and (host, port) in self.allow_hosts)

    def check_addresses(self, host: str, addresses: list[str], port: int | None = None) -> None:
        if self.exempt(host, port):
            return
        bad = [a for a in addresses if not address_allowed(a)]
        if bad:
            raise BlockedAddressError(f"{host} resolves to non-public address {bad[0]}")


class _GuardedResolver(ThreadedResolver):
    """The connector's resolver, refusing non-public answers (defence against DNS rebinding)."""

    def __init__(self, policy: _Policy):
        super().__init__()
        self._policy = policy

    async def resolve(self, host, port=0, family=socket.AF_INET):
        infos = await super().resolve(host, port, family)
        self._policy.check_addresses(host, [i["host"] for i in infos], port or None)
        return infos


class _DomainGate:
    """Per-domain concurrency cap plus a minimum spacing of request starts (rate limit)."""

    def __init__(self, rps: float, concurrency: int):
        self._sem = asyncio.Semaphore(concurrency)
        self._interval = 1.0 / rps
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def __aenter__(self):
        await self._sem.acquire()
        async with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)
        return self

    async def __aexit__(self, *exc):
        self._sem.release()

    def backoff(self, seconds: float) -> None:
        """No request starts for `seconds` (a Retry-After from the domain)."""
        self._next = max(self._next, time.monotonic() + seconds)


class _SharedLease:
    """One request's slot from the crawl-wide per-domain limiter (pipelines/curation/politeness.py): waits for
    the start time the limiter assigns, holds one of the domain's concurrency leases until the request ends."""

    def __init__(self, gates, host: str):
        self._gates, self._host, self._lease = gates, host, None

    async def __aenter__(self):
        self._lease = await self._gates.acquire(self._host)
        return self

    async def __aexit__(self, *exc):
        self._gates.release(self._host, self._lease)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _robots_noai(headers) -> bool:
    for value in headers.getall("X-Robots-Tag", []):
        for part in value.lower().split(","):
            directive = part.split(":", 1)[-1].strip() if ":" in part else part.strip()
            if directive in NOAI_DIRECTIVES:
                return True
    return False


def _blocked_in_chain(exc: BaseException) -> BlockedAddressError | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, BlockedAddressError):
            return cur
        os_err = getattr(cur, "os_error", None)
        if isinstance(os_err, BlockedAddressError):
            return os_err
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


class Crawler:
    """Fetches URLs with the configured politeness and safety rules (one event loop, one session)."""

    def __init__(self, cfg, shared_gates=None):
        """shared_gates: a crawl-wide per-domain limiter client (politeness.SharedGates) so that the rate and
        concurrency limits hold across every block and node; None: limits hold within this crawler only."""
        self.cfg = cfg
        self.policy = _Policy(cfg)
        self.shared = shared_gates
        self._gates: dict[str, _DomainGate] = {}

    def _gate(self, host: str):
        if self.shared is not None:
            return _SharedLease(self.shared, host)
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = _DomainGate(self.cfg.per_domain_rps, self.cfg.per_domain_concurrency)
        return gate

    def _backoff(self, host: str, seconds: float) -> None:
        """A 429/503 with Retry-After: the whole domain waits, not only the URL that got the answer."""
        if not host or seconds <= 0:
            return
        if self.shared is not None:
            self.shared.backoff(host, seconds)
        else:
            self._gate(host).backoff(seconds)

    async def _precheck(self, host: str, port: int) -> None:
        if self.policy.exempt(host, port):
            return
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            addrs = [host.strip("[]")]
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise _Failure("dns_error", str(exc)[:200]) from exc
            addrs = [i[4][0] for i in infos]
        try:
            self.policy.check_addresses(host, addrs, port)
        except BlockedAddressError as exc:
            raise _Failure("blocked_address", str(exc)) from exc

    async def _one_attempt(self, session: aiohttp.ClientSession, url: str) -> tuple[bytes, int, str]:
        cfg = self.cfg
        hops = 0
        while True:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _Failure("bad_url", f"unsupported URL {url[:200]!r}")
            host = parts.hostname
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError as exc:
                raise _Failure("bad_url", f"bad port in {url[:200]!r}") from exc
            await self._precheck(host, port)
            async with self._gate(host):
                try:
                    async with session.get(url, allow_redirects=False,
                                           timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as resp:
                        status = resp.status
                        if status in REDIRECT_CODES and "Location" in resp.headers:
                            hops += 1
                            if hops > cfg.max_redirects:
                                raise _Failure("too_many_redirects", f"more than {cfg.max_redirects}", status)
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if status == 429 or status >= 500:
                            raise _Failure(f"http_{status}", resp.reason or "", status,
                                           parse_retry_after(resp.headers.get("Retry-After")))
                        if not 200 <= status < 300:
                            raise _Failure(f"http_{status}", resp.reason or "", status)
                        if cfg.respect_noai and _robots_noai(resp.headers):
                            raise _Failure("robots_noai", "X-Robots-Tag opts out of AI use", status)
                        # The declared type is recorded, not trusted: servers send PNGs as text/plain or
                        # octet-stream; stage 1 sniffs the bytes (vosr.imageio.sniff) and refuses non-images.
                        ctype = resp.headers.get("Content-Type", "")[:200]
                        length = resp.content_length
                        if length is not None and length > cfg.max_bytes:
                            raise _Failure("oversize", f"Content-Length {length} > {cfg.max_bytes}", status)
                        buf = bytearray()
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            buf.extend(chunk)
                            if len(buf) > cfg.max_bytes:
                                raise _Failure("oversize", f"body > {cfg.max_bytes} bytes", status)
                            if len(buf) - len(chunk) < 1 << 16 <= len(buf) and _text_body(buf):
                                break  # an HTML / JSON / XML page: its start is enough to refuse it
                        return bytes(buf), status, ctype
                except _Failure as f:
                    f.host = host
                    if f.retry_after is not None and f.status in (429, 503):  # before the gate lets the next in
                        self._backoff(host, min(f.retry_after, cfg.max_retry_after_s))
                    raise
                except asyncio.TimeoutError as exc:
                    raise _Failure("timeout", f"no complete answer in {cfg.timeout_s}s") from exc
                except aiohttp.TooManyRedirects as exc:
                    raise _Failure("too_many_redirects", str(exc)[:200]) from exc
                except aiohttp.ServerDisconnectedError as exc:
                    raise _Failure("server_disconnected", str(exc)[:200]) from exc
                except aiohttp.ClientPayloadError as exc:
                    raise _Failure("incomplete_body", str(exc)[:200]) from exc
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    blocked = _blocked_in_chain(exc)
                    if blocked is not None:
                        raise _Failure("blocked_address", str(blocked)) from exc
                    if isinstance(exc, aiohttp.ClientConnectorDNSError):
                        raise _Failure("dns_error", str(exc)[:200]) from exc
                    if isinstance(exc, (aiohttp.InvalidURL, ValueError)):
                        raise _Failure("bad_url", str(exc)[:200]) from exc
                    raise _Failure("connect_error", f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    async def fetch(self, session: aiohttp.ClientSession, url: str) -> FetchResult:
        cfg = self.cfg
        attempts = 0
        while True:
            attempts += 1
            try:
                data, status, ctype = await self._one_attempt(session, url)
                return FetchResult(url, "ok", data, status=status, attempts=attempts, content_type=ctype)
            except _Failure as f:
                if not _retryable(f.reason) or attempts > cfg.retries:
                    return FetchResult(url, f.reason, None, f.detail, f.status, attempts)
                wait = cfg.backoff_s * (2 ** (attempts - 1))
                if f.retry_after is not None:
                    if f.retry_after > cfg.max_retry_after_s:
                        detail = f"Retry-After {f.retry_after:.0f}s > {cfg.max_retry_after_s}s"
                        return FetchResult(url, f.reason, None, detail, f.status, attempts)
                    wait = f.retry_after
                await asyncio.sleep(wait)

    async def fetch_stream(self, urls: list[str], emit, slots: asyncio.Semaphore) -> None:
        """Fetch every URL, calling emit(index, result) as each ends (completion order). A URL starts only after
        taking one of `slots` (size crawl.concurrency), which the consumer gives back once it has taken the
        result: at most `concurrency` bodies exist at once, in flight or waiting, whatever the number of URLs.

        URLs start round-robin over their hosts (list order within a host), at most per_domain_concurrency of
        one host at a time: the others could only wait for the host's permits while holding slots, so a block
        whose URLs are mostly one domain keeps fetching the other domains' URLs at their own pace meanwhile."""
        cfg = self.cfg
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, resolver=_GuardedResolver(self.policy),
                                         ttl_dns_cache=300)
        queues: dict[str, collections.deque] = {}
        for i, u in enumerate(urls):
            queues.setdefault(_host_of(u), collections.deque()).append(i)
        ready = collections.deque(queues)  # hosts with URLs left and room for one more in flight
        active = dict.fromkeys(queues, 0)
        per_host = max(1, int(cfg.per_domain_concurrency))
        wake = asyncio.Event()
        failed: list[BaseException] = []

        async def one(i: int, u: str) -> None:
            try:
                res = await self.fetch(session, u)
            except GateUnavailable as exc:  # the block's failure, not the URL's: the block runs again
                failed.append(exc)
                slots.release()  # no result will take it back
                wake.set()
                raise
            except Exception as exc:  # noqa: BLE001 - every URL must end in a counted reason
                res = FetchResult(u, "fetch_error", None, f"{type(exc).__name__}: {str(exc)[:200]}")
            emit(i, res)

        def done(host: str) -> None:
            active[host] -= 1
            if queues[host] and active[host] == per_host - 1:
                ready.append(host)
            wake.set()

        async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": cfg.user_agent},
                                         auto_decompress=True) as session:
            running: set[asyncio.Task] = set()
            try:
                left = len(urls)
                while left:
                    if failed:
                        raise failed[0]
                    if not ready:  # every host with URLs left is at its limit: wait for one to finish
                        wake.clear()
                        await wake.wait()
                        continue
                    await slots.acquire()
                    if failed:
                        raise failed[0]
                    host = ready.popleft()
                    i = queues[host].popleft()
                    active[host] += 1
                    if queues[host] and active[host] < per_host:
                        ready.append(host)
                    left -= 1
                    task = asyncio.create_task(one(i, urls[i]))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(lambda _, h=host: done(h))
                while running:
                    await asyncio.gather(*list(running))
            except BaseException:  # the consumer stopped early, or the block failed (GateUnavailable)
                for task in list(running):
                    task.cancel()
                await asyncio.gather(*list(running), return_exceptions=True)
                raise


def _host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def iter_fetch(urls: list[str], crawl_cfg, shared_gates=None) -> Iterator[tuple[int, FetchResult]]:
    """Fetch URLs on an event loop in a background thread; yields (index, result) in completion order, one per
    URL. The caller's work on a result (decode, analysis, writing) overlaps the fetching of the next ones, and
    at most crawl.concurrency bodies are held at any time (fetching or waiting to be taken)."""
    if not urls:
        return
    results: queue.Queue = queue.Queue()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="vosr-crawl", daemon=True)
    thread.start()
    slots = asyncio.Semaphore(crawl_cfg.concurrency)
    emit = lambda i, r: results.put((i, r))  # noqa: E731
    fut = asyncio.run_coroutine_threadsafe(Crawler(crawl_cfg, shared_gates).fetch_stream(urls, emit, slots), loop)
    fut.add_done_callback(lambda f: results.put((None, f)))
    taken = 0
    try:
        while True:
            i, res = results.get()
            if i is None:
                if res.exception() is not None:
                    raise res.exception()
                if taken != len(urls):
                    raise RuntimeError(f"crawler ended after {taken} of {len(urls)} URLs")
                return
            taken += 1
            loop.call_soon_threadsafe(slots.release)
            yield i, res
    finally:
        if not fut.done():  # the consumer stopped early: cancel what is left
            fut.cancel()
            concurrent.futures.wait([fut], timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()
