"""Async HTTP fetching for the curation job (aiohttp).

Per request: a total timeout, a byte cap, redirects followed by hand (each hop re-checked, at most
`max_redirects`), bounded retries with exponential backoff for timeouts, 429 and 5xx (Retry-After honoured up to
`max_retry_after_s`), a per-domain rate limit and concurrency cap, a User-Agent, and img2dataset-style respect of
`X-Robots-Tag: noai / noimageai`. Hosts that resolve to private, loopback, link-local or otherwise non-global
addresses are refused unless `allow_private` is set or the host is in `allow_hosts`; the check runs before each
hop and again inside the connector's resolver (so a DNS answer that changes between the two cannot slip past).

Every URL ends in exactly one FetchResult whose `reason` is "ok" or a failure code.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.resolver import ThreadedResolver

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
    final_url: str = ""
    content_type: str = ""  # as the server declared it; recorded, never trusted (the bytes are sniffed)


class BlockedAddressError(OSError):
    """The host resolves to an address the crawl may not contact."""


class _Failure(Exception):
    def __init__(self, reason: str, detail: str = "", status: int = 0, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.status, self.retry_after = reason, detail, status, retry_after


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


def _text_body(head: bytearray) -> bool:
    """Whether a body's first bytes are a text document (HTML, SVG, JSON, XML, PDF) rather than a raster image."""
    from vosr.imageio import sniff

    return sniff(bytes(head[:4096])) in ("html", "svg", "json", "xml", "pdf")


def address_allowed(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


class _Policy:
    def __init__(self, cfg):
        self.allow_private = bool(cfg.allow_private)
        self.allow_hosts = {h.lower() for h in cfg.allow_hosts}

    def exempt(self, host: str) -> bool:
        return self.allow_private or host.lower().strip("[]") in self.allow_hosts

    def check_addresses(self, host: str, addresses: list[str]) -> None:
        if self.exempt(host):
            return
        bad = [a for a in addresses if not address_allowed(a) and a.lower() not in self.allow_hosts]
        if bad:
            raise BlockedAddressError(f"{host} resolves to non-public address {bad[0]}")


class _GuardedResolver(ThreadedResolver):
    """The connector's resolver, refusing non-public answers (defence against DNS rebinding)."""

    def __init__(self, policy: _Policy):
        super().__init__()
        self._policy = policy

    async def resolve(self, host, port=0, family=socket.AF_INET):
        infos = await super().resolve(host, port, family)
        self._policy.check_addresses(host, [i["host"] for i in infos])
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

    def __init__(self, cfg):
        self.cfg = cfg
        self.policy = _Policy(cfg)
        self._gates: dict[str, _DomainGate] = {}

    def _gate(self, host: str) -> _DomainGate:
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = _DomainGate(self.cfg.per_domain_rps, self.cfg.per_domain_concurrency)
        return gate

    async def _precheck(self, host: str) -> None:
        if self.policy.exempt(host):
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
            self.policy.check_addresses(host, addrs)
        except BlockedAddressError as exc:
            raise _Failure("blocked_address", str(exc)) from exc

    async def _one_attempt(self, session: aiohttp.ClientSession, url: str) -> tuple[bytes, int, str, str]:
        cfg = self.cfg
        hops = 0
        while True:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _Failure("bad_url", f"unsupported URL {url[:200]!r}")
            host = parts.hostname
            await self._precheck(host)
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
                        return bytes(buf), status, url, ctype
                except _Failure:
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
                data, status, final, ctype = await self._one_attempt(session, url)
                return FetchResult(url, "ok", data, status=status, attempts=attempts, final_url=final,
                                   content_type=ctype)
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

    async def fetch_all(self, urls: list[str]) -> list[FetchResult]:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, resolver=_GuardedResolver(self.policy),
                                         ttl_dns_cache=300)
        total = asyncio.Semaphore(cfg.concurrency)

        async def bounded(u: str) -> FetchResult:
            async with total:
                try:
                    return await self.fetch(session, u)
                except Exception as exc:  # noqa: BLE001 - every URL must end in a counted reason
                    return FetchResult(u, "fetch_error", None, f"{type(exc).__name__}: {str(exc)[:200]}")

        async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": cfg.user_agent},
                                         auto_decompress=True) as session:
            return list(await asyncio.gather(*(bounded(u) for u in urls)))


def fetch_urls(urls: list[str], crawl_cfg) -> list[FetchResult]:
    """Fetch a list of URLs (blocking); results in input order, one per URL."""
    if not urls:
        return []
    return asyncio.run(Crawler(crawl_cfg).fetch_all(urls))
