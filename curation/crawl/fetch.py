"""A bounded, SSRF-safe HTTP fetcher for crawling media URLs.

Every failure comes back as a :class:`FetchResult` whose ``error`` is a code from
:mod:`curation.crawl.reasons`; ``fetch`` never raises for network or HTTP problems.
"""

from __future__ import annotations

import email.utils
import heapq
import io
import ipaddress
import itertools
import math
import os
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import urllib3
import urllib3.connection
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    DecodeError,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from curation.crawl import reasons

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Bodies of unknown size are streamed in chunks of at most this size.
_CHUNK_BYTES = 64 * 1024
# Error and redirect bodies up to this size are drained so the keep-alive connection can be reused.
_DRAIN_LIMIT = 64 * 1024
# Bounds on shared caches: idle keep-alive sockets cost file descriptors, DNS entries cost memory.
_MAX_POOLS = 256
_DNS_TTL_S = 60.0
_DNS_CACHE_SIZE = 4096
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and behaviour of :class:`HttpFetcher`."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # per socket read; the whole body also has a wall-clock cap of 3x this
    max_bytes: int = 64 * 2**20  # enforced while streaming and early on Content-Length
    max_redirects: int = 5
    retries: int = 2  # extra attempts, only for timeouts, connection errors, 429 and 5xx
    backoff_base_s: float = 0.5  # base * 2**attempt with jitter, capped by backoff_max_s
    backoff_max_s: float = 30.0  # also caps an honoured Retry-After
    per_host_concurrency: int = 16  # max in-flight requests per host, across all threads of one fetcher
    allow_private_addresses: bool = False
    user_agent: str = "curation-crawler/0.1"


@dataclass
class FetchResult:
    """Outcome of one :meth:`HttpFetcher.fetch` call."""

    url: str
    data: bytes | None
    error: str | None
    detail: str | None
    status: int | None
    final_url: str
    content_type: str | None
    attempts: int  # HTTP requests made, redirect hops included
    # X-Robots-Tag header values of the final response, for opt-out checks by the caller.
    x_robots_tag: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.error is None and self.data is not None


@dataclass
class _Target:
    url: str  # normalised: lower-case scheme and host, no default port, no fragment
    scheme: str
    host: str  # ASCII (IDNA) host without brackets
    port: int
    path: str  # path and query sent in the request line
    host_header: str


@dataclass
class _Hop:
    """Result of one HTTP request (one attempt at one redirect hop)."""

    status: int | None = None
    data: bytes | None = None
    content_type: str | None = None
    location: str | None = None  # set for redirects
    error: str | None = None
    detail: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    x_robots_tag: tuple[str, ...] = ()


class _UrlError(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _parse_target(url: str) -> _Target:
    """Split and normalise a URL; raises _UrlError for anything we will not fetch."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise _UrlError(reasons.BAD_SCHEME, f"unsupported scheme in {url[:200]!r}")
        hostname = parts.hostname
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:  # bad port, unbalanced IPv6 brackets, ...
        raise _UrlError(reasons.BAD_SCHEME, f"invalid URL {url[:200]!r}: {exc}") from None
    if not hostname:
        raise _UrlError(reasons.BAD_SCHEME, f"no host in URL {url[:200]!r}")
    try:
        host = hostname if hostname.isascii() else hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise _UrlError(reasons.DNS_ERROR, f"invalid hostname {hostname!r}: {exc}") from None
    if any(c in host for c in " \t\r\n/\\"):
        raise _UrlError(reasons.DNS_ERROR, f"invalid hostname {hostname!r}")
    bracketed = f"[{host}]" if ":" in host else host
    netloc = bracketed if port == _DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return _Target(
        url=urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")),
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        host_header=netloc,
    )


def _non_global_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be fetched from (e.g. "loopback"), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Most specific first: 127.0.0.1 is also "private" but "loopback" says more.
    for attr, kind in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return kind
    if not ip.is_global:
        return "non-global"
    return None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition
        import datetime

        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _content_length(resp: urllib3.BaseHTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value.split(",")[0].strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Finish with a response whose body we do not need, keeping the connection when that is cheap."""
    length = _content_length(resp)
    if length is not None and length <= _DRAIN_LIMIT:
        resp.drain_conn()
    else:
        resp.close()
    resp.release_conn()


def _body_timeout(resp: urllib3.BaseHTTPResponse, status: int, content_type: str | None, cap_s: float) -> _Hop:
    """The watchdog cut a body off: drop the connection (its stream is mid-body) and report a retryable timeout."""
    resp.close()
    resp.release_conn()
    return _Hop(
        status=status,
        content_type=content_type,
        error=reasons.TIMEOUT,
        retryable=True,
        detail=f"body not complete after {cap_s:g} s",
    )


def _describe_cause(exc: BaseException) -> str:
    """The most useful message in an exception chain (urllib3's own str() embeds object reprs)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, OSError) and item.strerror:
            return item.strerror  # e.g. "Connection refused"
    deepest = chain[-1]
    if deepest is not exc:
        return f"{type(deepest).__name__}: {deepest}"
    return str(exc) or type(exc).__name__


class _QuickAckMixin:
    """Ask the kernel to ACK the response headers at once.

    A server that writes headers and body in separate send() calls without TCP_NODELAY (Python's http.server
    does) stalls its body behind Nagle until our delayed ACK fires, ~40 ms per request on a reused
    keep-alive connection. Fresh connections start in quick-ACK mode, so only pooled ones suffer.
    """

    sock: socket.socket | None
    # http.client drops .sock when a response will close the connection; the watchdog still needs it.
    request_sock: socket.socket | None = None

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        self.request_sock = sock = self.sock
        if _TCP_QUICKACK is not None and sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass


class _HTTPConnection(_QuickAckMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_QuickAckMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Watchdog:
    """Shuts down the socket of a download that outlives its deadline, so the blocked read returns.

    Socket timeouts bound each read, not the whole body: a server dripping a byte per second would
    otherwise hold a thread forever. One daemon thread serves every fetcher in the process.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, list[Any]]] = []  # (deadline, seq, [sock or None, fired])
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the watchdog thread will next look; waking it costs a context switch

    def arm(self, deadline: float, sock: socket.socket | None) -> list[Any] | None:
        if sock is None:
            return None
        entry: list[Any] = [sock, False]
        with self._cond:
            heap = self._heap
            while heap and heap[0][2][0] is None:  # drop finished downloads; keeps the heap small
                heapq.heappop(heap)
            heapq.heappush(heap, (deadline, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()
        return entry

    def disarm(self, entry: list[Any] | None) -> bool:
        """Forget a download; True when its deadline already fired."""
        if entry is None:
            return False
        with self._cond:
            entry[0] = None
            return bool(entry[1])

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                heap = self._heap
                while heap and (heap[0][2][0] is None or heap[0][0] <= now):
                    entry = heapq.heappop(heap)[2]
                    sock = entry[0]
                    if sock is not None:
                        entry[0], entry[1] = None, True
                        try:
                            # The plain-socket method: SSLSocket.shutdown would also drop its TLS state,
                            # which the reading thread is still using.
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)
                        except OSError:
                            pass
                self._wake_at = heap[0][0] if heap else math.inf
                self._cond.wait(self._wake_at - now if heap else None)


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    # A forked child has no watchdog thread and may have inherited the lock mid-use: start afresh.
    os.register_at_fork(after_in_child=_WATCHDOG.__init__)


class _HostSlots:
    """Per-host semaphores that exist only while the host has requests in flight (hosts are unbounded)."""

    def __init__(self, limit: int):
        self._limit = max(1, limit)
        self._lock = threading.Lock()
        self._slots: dict[str, list[Any]] = {}  # host -> [semaphore, users]

    def acquire(self, host: str) -> threading.Semaphore:
        with self._lock:
            entry = self._slots.get(host)
            if entry is None:
                entry = self._slots[host] = [threading.Semaphore(self._limit), 0]
            entry[1] += 1
        entry[0].acquire()
        return entry[0]

    def release(self, host: str, sem: threading.Semaphore) -> None:
        sem.release()
        with self._lock:
            entry = self._slots[host]
            entry[1] -= 1
            if entry[1] == 0:
                del self._slots[host]


class HttpFetcher:
    """Thread-safe; one per process/shard, used from many threads."""

    def __init__(self, policy: FetchPolicy | None = None):
        self.policy = policy or FetchPolicy()
        self._timeout = urllib3.Timeout(connect=self.policy.connect_timeout_s, read=self.policy.read_timeout_s)
        self._headers_base = {"User-Agent": self.policy.user_agent, "Accept": "*/*"}
        self._slots = _HostSlots(self.policy.per_host_concurrency)
        self._pools: OrderedDict[tuple[str, str, str, int], urllib3.HTTPConnectionPool] = OrderedDict()
        self._pools_lock = threading.Lock()
        self._dns: dict[tuple[str, int], tuple[float, str]] = {}
        self._dns_lock = threading.Lock()

    # -- public API ----------------------------------------------------------------------------------------------

    def fetch(self, url: str) -> FetchResult:
        """Download ``url``; never raises for network or HTTP problems."""
        policy = self.policy
        attempts = 0  # HTTP requests made, over all hops
        tries = 0  # requests made for the current hop
        retries_left = policy.retries
        redirects = 0
        status: int | None = None
        current = url
        seen: set[str] = set()
        try:
            target = _parse_target(url)
        except _UrlError as exc:
            return FetchResult(url, None, exc.code, exc.detail, None, url, None, 0)
        seen.add(target.url)
        while True:
            try:
                ip = self._resolve(target)
            except _UrlError as exc:
                return FetchResult(url, None, exc.code, exc.detail, status, current, None, attempts)
            attempts += 1
            tries += 1
            hop = self._request(target, ip)
            if hop.status is not None:
                status = hop.status
            if hop.retryable and retries_left > 0:
                time.sleep(self._backoff_s(policy.retries - retries_left, hop.retry_after))
                retries_left -= 1
                continue
            if hop.location is not None or hop.status in _REDIRECT_STATUSES:
                try:
                    target, current = self._follow(target, hop, seen, redirects)
                except _UrlError as exc:
                    return FetchResult(url, None, exc.code, exc.detail, status, current, None, attempts)
                redirects += 1
                tries = 0
                continue
            if hop.error is not None:
                detail = hop.detail if tries == 1 else f"{hop.detail} after {tries} attempts"
                return FetchResult(url, None, hop.error, detail, status, current, hop.content_type, attempts)
            return FetchResult(url, hop.data, None, None, status, current, hop.content_type, attempts, hop.x_robots_tag)

    def close(self) -> None:
        """Close idle pooled connections (the fetcher stays usable)."""
        with self._pools_lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()

    # -- steps -----------------------------------------------------------------------------------------------------

    def _follow(self, target: _Target, hop: _Hop, seen: set[str], redirects: int) -> tuple[_Target, str]:
        """Validate a redirect and return the next target; raises _UrlError with the reject reason."""
        location = (hop.location or "").strip()
        if not location:
            raise _UrlError(reasons.BAD_REDIRECT, f"HTTP {hop.status} without a Location header")
        try:
            next_url = urljoin(target.url, location)
        except ValueError as exc:
            raise _UrlError(reasons.BAD_REDIRECT, f"invalid Location {location[:200]!r}: {exc}") from None
        if urlsplit(next_url).scheme.lower() not in _DEFAULT_PORTS:
            raise _UrlError(reasons.BAD_SCHEME, f"redirect to {next_url[:200]}")
        try:
            nxt = _parse_target(next_url)
        except _UrlError as exc:
            raise _UrlError(reasons.BAD_REDIRECT, f"redirect to {next_url[:200]!r}: {exc.detail}") from None
        if nxt.url in seen:
            raise _UrlError(reasons.REDIRECT_LOOP, f"redirect loop back to {nxt.url[:200]}")
        if redirects + 1 > self.policy.max_redirects:
            raise _UrlError(reasons.TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects} redirects")
        seen.add(nxt.url)
        return nxt, next_url

    def _resolve(self, target: _Target) -> str:
        """The checked address to connect to; raises _UrlError (dns_error / private_address)."""
        try:
            ip = ipaddress.ip_address(target.host)
        except ValueError:
            ip = ipaddress.ip_address(self._lookup(target.host, target.port))
        if not self.policy.allow_private_addresses:
            kind = _non_global_kind(ip)
            if kind is not None:
                shown = target.host if str(ip) == target.host else f"{target.host} ({ip})"
                raise _UrlError(reasons.PRIVATE_ADDRESS, f"{shown} is a {kind} address")
        return str(ip)

    def _lookup(self, host: str, port: int) -> str:
        key = (host, port)
        now = time.monotonic()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _UrlError(reasons.DNS_ERROR, f"cannot resolve {host}: {exc}") from None
        # Prefer IPv4: many crawl hosts have no IPv6 route, and we connect to exactly one address.
        addresses = [info[4][0] for info in infos if info[0] == socket.AF_INET]
        addresses += [info[4][0] for info in infos if info[0] == socket.AF_INET6]
        if not addresses:
            raise _UrlError(reasons.DNS_ERROR, f"no address for {host}")
        address = addresses[0].split("%", 1)[0]
        with self._dns_lock:
            if len(self._dns) >= _DNS_CACHE_SIZE:
                self._dns.clear()
            self._dns[key] = (now + _DNS_TTL_S, address)
        return address

    def _pool(self, target: _Target, ip: str) -> urllib3.HTTPConnectionPool:
        # The host is part of the key so that a pool never holds more connections than one host's slots,
        # and because TLS connections are bound to the SNI name.
        key = (target.scheme, target.host, ip, target.port)
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            kwargs: dict[str, Any] = {
                "maxsize": max(1, self.policy.per_host_concurrency),
                "block": False,
                "timeout": self._timeout,
                "retries": False,
            }
            if target.scheme == "https":
                pool = _HTTPSPool(ip, target.port, server_hostname=target.host, **kwargs)
            else:
                pool = _HTTPPool(ip, target.port, **kwargs)
            self._pools[key] = pool
            evicted = self._pools.popitem(last=False)[1] if len(self._pools) > _MAX_POOLS else None
        if evicted is not None:
            evicted.close()
        return pool

    def _request(self, target: _Target, ip: str) -> _Hop:
        sem = self._slots.acquire(target.host)
        try:
            return self._request_in_slot(target, ip)
        finally:
            self._slots.release(target.host, sem)

    def _request_in_slot(self, target: _Target, ip: str) -> _Hop:
        started = time.monotonic()
        opened = self._open(target, ip)
        if isinstance(opened, _Hop):
            return opened
        try:
            return self._handle_response(opened, started)
        except Exception as exc:  # noqa: BLE001 - a crawler must survive any one bad server
            opened.close()
            opened.release_conn()
            return self._transport_error(exc, target, ip)

    def _open(self, target: _Target, ip: str) -> urllib3.BaseHTTPResponse | _Hop:
        """Send the request and read the status line and headers."""
        headers = dict(self._headers_base)
        headers["Host"] = target.host_header
        # One free immediate retry: a pooled keep-alive connection may have been closed by the server,
        # or the pool evicted by another thread; neither says anything about the URL.
        for free_retry in (True, False):
            reused = False
            try:
                pool = self._pool(target, ip)
                reused = pool.num_connections > 0
                return pool.urlopen(
                    "GET",
                    target.path,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    release_conn=False,
                    assert_same_host=False,
                    timeout=self._timeout,
                )
            except ClosedPoolError:
                if not free_retry:
                    return _Hop(error=reasons.CONNECTION_ERROR, detail="connection pool closed", retryable=True)
            except ProtocolError as exc:
                if not (free_retry and reused):
                    return self._transport_error(exc, target, ip)
            except Exception as exc:  # noqa: BLE001 - a crawler must survive any one bad server
                return self._transport_error(exc, target, ip)
        raise AssertionError("unreachable")

    def _handle_response(self, resp: urllib3.BaseHTTPResponse, started: float) -> _Hop:
        status = resp.status
        content_type = resp.headers.get("Content-Type")
        if status in _REDIRECT_STATUSES:
            location = resp.headers.get("Location")
            _discard(resp)
            return _Hop(status=status, location=location or "")
        if 200 <= status < 300:
            return self._read_body(resp, status, content_type, started)
        retry_after = _parse_retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
        _discard(resp)
        if status == 404:
            return _Hop(status=status, content_type=content_type, error=reasons.HTTP_404, detail="HTTP 404")
        if status == 429:
            return _Hop(
                status=status, error=reasons.HTTP_429, detail="HTTP 429", retryable=True, retry_after=retry_after
            )
        return _Hop(
            status=status,
            content_type=content_type,
            error=reasons.HTTP_ERROR,
            detail=f"HTTP {status}",
            retryable=status >= 500,
            retry_after=retry_after,
        )

    def _read_body(self, resp: urllib3.BaseHTTPResponse, status: int, content_type: str | None, started: float) -> _Hop:
        limit = self.policy.max_bytes
        # With chunked framing a Content-Length header is meaningless (RFC 9112 6.3); trusting it could
        # leave unread bytes on a pooled connection.
        length = None if resp.chunked else _content_length(resp)
        if length is not None and length > limit:
            resp.close()
            resp.release_conn()
            return _Hop(
                status=status,
                content_type=content_type,
                error=reasons.TOO_LARGE,
                detail=f"Content-Length {length} exceeds {limit} bytes",
            )
        cap_s = 3 * self.policy.read_timeout_s
        alarm = _WATCHDOG.arm(started + cap_s, getattr(resp.connection, "request_sock", None))
        try:
            data = self._read_limited(resp, length, limit)
        except Exception:
            if _WATCHDOG.disarm(alarm):
                return _body_timeout(resp, status, content_type, cap_s)
            raise
        if _WATCHDOG.disarm(alarm):
            # A shut-down socket also reads as a clean end of a close-delimited body: never trust it.
            return _body_timeout(resp, status, content_type, cap_s)
        if data is None:
            resp.close()
            resp.release_conn()
            return _Hop(
                status=status, content_type=content_type, error=reasons.TOO_LARGE, detail=f"body exceeds {limit} bytes"
            )
        resp.release_conn()
        robots = tuple(resp.headers.getlist("X-Robots-Tag"))
        if not data:
            return _Hop(
                status=status,
                content_type=content_type,
                error=reasons.EMPTY,
                detail=f"HTTP {status} with an empty body",
                x_robots_tag=robots,
            )
        return _Hop(status=status, data=data, content_type=content_type, x_robots_tag=robots)

    @staticmethod
    def _read_limited(resp: urllib3.BaseHTTPResponse, length: int | None, limit: int) -> bytes | None:
        """The whole body, or None when it is longer than ``limit`` (never reading more than limit + 1 bytes)."""
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if length is not None and encoding in ("", "identity"):
            # Known size: let the buffered reader fill one buffer in C; far cheaper than a Python loop
            # over socket-sized chunks. A short read means the peer closed early; urllib3 raises on the
            # next read.
            chunks = []
            total = 0
            while total < length:
                chunk = resp.read(length - total)
                if not chunk:
                    resp.read(1)  # raises IncompleteRead through urllib3's content-length check
                    break
                chunks.append(chunk)
                total += len(chunk)
        else:
            # Unknown (or encoded) size: stream, and never ask for more than limit + 1 bytes in total.
            chunks = []
            total = 0
            while total <= limit:
                chunk = resp.read1(min(_CHUNK_BYTES, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            if total > limit:
                return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _transport_error(self, exc: Exception, target: _Target, ip: str) -> _Hop:
        where = f"{target.host_header}" if target.host == ip else f"{target.host_header} ({ip})"
        if isinstance(exc, NewConnectionError):  # subclass of ConnectTimeoutError: test it first
            return _Hop(
                error=reasons.CONNECTION_ERROR,
                detail=f"cannot connect to {where}: {_describe_cause(exc)}",
                retryable=True,
            )
        if isinstance(exc, ConnectTimeoutError):
            return _Hop(
                error=reasons.TIMEOUT,
                detail=f"connect timed out after {self.policy.connect_timeout_s:g} s",
                retryable=True,
            )
        if isinstance(exc, ReadTimeoutError):
            return _Hop(
                error=reasons.TIMEOUT, detail=f"read timed out after {self.policy.read_timeout_s:g} s", retryable=True
            )
        if isinstance(exc, SSLError):
            return _Hop(error=reasons.CONNECTION_ERROR, detail=f"TLS error with {where}: {_describe_cause(exc)}")
        if isinstance(exc, ProtocolError):
            return _Hop(
                error=reasons.CONNECTION_ERROR, detail=f"connection broken: {_describe_cause(exc)}", retryable=True
            )
        if isinstance(exc, DecodeError):
            return _Hop(error=reasons.CONNECTION_ERROR, detail=f"content decoding failed: {_describe_cause(exc)}")
        if isinstance(exc, LocationValueError):
            return _Hop(error=reasons.BAD_SCHEME, detail=f"invalid URL: {exc}")
        if isinstance(exc, socket.timeout):
            return _Hop(error=reasons.TIMEOUT, detail=f"timed out: {exc}", retryable=True)
        if isinstance(exc, OSError):
            return _Hop(error=reasons.CONNECTION_ERROR, detail=f"{type(exc).__name__}: {exc}", retryable=True)
        return _Hop(error=reasons.CONNECTION_ERROR, detail=f"{type(exc).__name__}: {exc}")

    def _backoff_s(self, retry_index: int, retry_after: float | None) -> float:
        cap = self.policy.backoff_max_s
        if retry_after is not None:
            return min(retry_after, cap)
        delay = min(cap, self.policy.backoff_base_s * 2**retry_index)
        # "Equal jitter": keeps at least half the delay while de-synchronising threads that failed together.
        return delay * (0.5 + 0.5 * random.random())


# -- img2dataset adapter ---------------------------------------------------------------------------------------------


def format_error_message(code: str, detail: str | None) -> str:
    """The ``"code: detail"`` form that :func:`split_error_message` reverses."""
    return f"{code}: {detail or code}"


def split_error_message(msg: str) -> tuple[str, str]:
    """Recover ``(code, detail)`` from an error message; foreign messages map to connection_error."""
    code, sep, detail = msg.partition(": ")
    if sep and code in reasons.ALL_REASONS:
        return code, detail
    if msg in reasons.ALL_REASONS:
        return msg, msg
    return reasons.CONNECTION_ERROR, msg


# X-Robots-Tag directives that carry a value after a colon, so "name:" is not a user-agent prefix.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-image-preview", "max-snippet", "max-video-preview"})


def robots_disallowed(values: Iterable[str], user_agent_token: str | None, directives: Iterable[str]) -> str | None:
    """The X-Robots-Tag value that forbids use for ``user_agent_token``, or None.

    A value is either ``"noai, noindex"`` (applies to every agent) or ``"agent: noai"`` (applies to that agent).
    """
    wanted = {d.strip().lower() for d in directives}
    token = (user_agent_token or "").strip().lower()
    for value in values:
        head, sep, rest = value.partition(":")
        head = head.strip().lower()
        if sep and head and "," not in head and head not in _VALUED_DIRECTIVES:
            if head != token:
                continue
            body = rest
        else:
            body = value
        names = {item.split(":", 1)[0].strip().lower() for item in body.split(",")}
        if names & wanted:
            return value
    return None


def img2dataset_fetch_function(
    fetcher: HttpFetcher,
) -> Callable[..., tuple[Any, io.BytesIO | None, str | None]]:
    """Returns fn(row, timeout, retries, user_agent_token, disallowed_header_directives, ignore_ssl_certificate)
    -> (key, io.BytesIO | None, error_message | None), a drop-in for img2dataset's download_image_with_retry.

    ``timeout``, ``retries`` and ``ignore_ssl_certificate`` are accepted for signature compatibility only;
    the fetcher's :class:`FetchPolicy` governs them.
    """

    def fetch_row(
        row: tuple[Any, str],
        timeout: float | None = None,
        retries: int | None = None,
        user_agent_token: str | None = None,
        disallowed_header_directives: Iterable[str] | None = None,
        ignore_ssl_certificate: bool = False,
    ) -> tuple[Any, io.BytesIO | None, str | None]:
        key, url = row
        result = fetcher.fetch(url)
        if not result.ok:
            return key, None, format_error_message(result.error or reasons.CONNECTION_ERROR, result.detail)
        if disallowed_header_directives and result.x_robots_tag:
            value = robots_disallowed(result.x_robots_tag, user_agent_token, disallowed_header_directives)
            if value is not None:
                return key, None, format_error_message(reasons.ROBOTS_DISALLOWED, f"X-Robots-Tag: {value}")
        return key, io.BytesIO(result.data), None

    return fetch_row
