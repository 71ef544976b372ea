"""Tests for curation.crawl.fetch against a local threaded HTTP server."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from curation.crawl import reasons
from curation.crawl.fetch import (
    FetchPolicy,
    HttpFetcher,
    _non_global_kind,
    _parse_retry_after,
    img2dataset_fetch_function,
    robots_disallowed,
    split_error_message,
)

BODY = bytes(range(256)) * 64  # 16 KiB


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self.bytes_sent: dict[str, int] = {}
        self.user_agents: list[str] = []


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is exercised
    state: _State

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.state.connections += 1

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _redirect(self, location: str | None, status: int = 302) -> None:
        self._send(status, b"moved", {"Location": location} if location is not None else None)

    def do_GET(self) -> None:  # noqa: C901 - one branch per route keeps the fixture readable
        st = self.state
        path = self.path
        route = path.split("?", 1)[0]
        with st.lock:
            st.hits[path] += 1
            hits = st.hits[path]
            st.user_agents.append(self.headers.get("User-Agent", ""))
        try:
            if route == "/ok":
                self._send(200, BODY, {"Content-Type": "image/png"})
            elif route == "/404":
                self._send(404, b"not found")
            elif route == "/403":
                self._send(403, b"forbidden")
            elif route == "/500-then-ok":
                if hits == 1:
                    self._send(500, b"oops")
                else:
                    self._send(200, BODY)
            elif route == "/always-503":
                self._send(503, b"busy")
            elif route == "/429-then-ok":
                if hits == 1:
                    self._send(429, b"slow down", {"Retry-After": "1"})
                else:
                    self._send(200, BODY)
            elif route == "/always-429":
                self._send(429, b"slow down", {"Retry-After": "0"})
            elif route.startswith("/chain/"):
                n = int(route.rsplit("/", 1)[1])
                self._redirect("/ok" if n == 0 else f"/chain/{n - 1}")
            elif route == "/loop-a":
                self._redirect("/loop-b", 301)
            elif route == "/loop-b":
                self._redirect("http://{}/loop-a".format(self.headers["Host"]), 307)
            elif route == "/to-ftp":
                self._redirect("ftp://example.com/x")
            elif route == "/to-503":
                self._redirect("/always-503?from=redirect")
            elif route == "/chunked-with-length":
                # Both framings at once: chunked wins, and the bogus length must not be trusted.
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
            elif route == "/to-loopback":
                self._redirect(f"http://127.0.0.1:{self.server.server_address[1]}/ok")
            elif route == "/no-location":
                self._redirect(None)
            elif route == "/relative":
                self._redirect("ok?x=1", 303)
            elif route == "/big-cl":
                self._send(200, b"x" * (2 * 2**20))
            elif route == "/big-chunked":
                self._big_chunked(path)
            elif route == "/slow-headers":
                time.sleep(1.5)
                self._send(200, BODY)
            elif route == "/slow-body":
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY[:100])
                self.wfile.flush()
                time.sleep(1.5)
                self.wfile.write(BODY[100:])
            elif route == "/drip":
                # Each byte arrives well within the read timeout, but the whole body never does.
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif route == "/drip-no-length":
                # Body delimited by closing the connection: a cut-off must not pass for the end.
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif route == "/empty":
                self._send(200, b"")
            elif route == "/short":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"x" * 10)
                self.close_connection = True
            elif route == "/robots":
                self._send(200, BODY, {"X-Robots-Tag": "noai, noimageai"})
            elif route == "/concurrency":
                with st.lock:
                    st.in_flight += 1
                    st.max_in_flight = max(st.max_in_flight, st.in_flight)
                time.sleep(0.1)
                with st.lock:
                    st.in_flight -= 1
                self._send(200, BODY)
            else:
                self._send(400, b"unknown route")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _big_chunked(self, path: str) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"y" * 65536
        sent = 0
        try:
            for _ in range(4000):  # 250 MiB if nobody stops us
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                with self.state.lock:
                    self.state.bytes_sent[path] = sent
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.close_connection = True


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-response is what several tests do on purpose


@pytest.fixture(scope="module")
def server():
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, state
    httpd.shutdown()
    httpd.server_close()


def _fetcher(**overrides) -> HttpFetcher:
    params = {
        "allow_private_addresses": True,
        "backoff_base_s": 0.01,
        "backoff_max_s": 5.0,
        "read_timeout_s": 0.5,
        "connect_timeout_s": 0.5,
    }
    params.update(overrides)
    return HttpFetcher(FetchPolicy(**params))


@pytest.mark.quick
def test_ok_and_connection_reuse(server):
    base, state = server
    fetcher = _fetcher()
    before = state.connections
    for _ in range(20):
        result = fetcher.fetch(f"{base}/ok")
        assert result.ok, result
        assert result.data == BODY
        assert result.status == 200
        assert result.content_type == "image/png"
        assert result.attempts == 1
        assert result.error is None and result.detail is None
    assert state.connections - before <= 2  # keep-alive connections are pooled
    assert state.user_agents[-1] == "curation-crawler/0.1"


@pytest.mark.quick
def test_404_not_retried(server):
    base, state = server
    result = _fetcher().fetch(f"{base}/404?t=1")
    assert not result.ok
    assert result.error == reasons.HTTP_404
    assert result.status == 404
    assert result.attempts == 1
    assert state.hits["/404?t=1"] == 1


@pytest.mark.quick
def test_other_4xx_is_http_error(server):
    base, _ = server
    result = _fetcher().fetch(f"{base}/403")
    assert result.error == reasons.HTTP_ERROR
    assert "403" in result.detail
    assert result.attempts == 1


@pytest.mark.quick
def test_500_then_ok_is_retried(server):
    base, state = server
    result = _fetcher().fetch(f"{base}/500-then-ok?t=1")
    assert result.ok, result
    assert result.attempts == 2
    assert state.hits["/500-then-ok?t=1"] == 2


@pytest.mark.quick
def test_5xx_gives_up_after_retries(server):
    base, state = server
    result = _fetcher(retries=2).fetch(f"{base}/always-503?t=1")
    assert result.error == reasons.HTTP_ERROR
    assert result.detail == "HTTP 503 after 3 attempts"
    assert result.attempts == 3
    assert state.hits["/always-503?t=1"] == 3


@pytest.mark.quick
def test_429_honours_retry_after(server):
    base, _ = server
    start = time.monotonic()
    result = _fetcher(backoff_max_s=5.0).fetch(f"{base}/429-then-ok?t=1")
    elapsed = time.monotonic() - start
    assert result.ok, result
    assert result.attempts == 2
    assert elapsed >= 0.95


@pytest.mark.quick
def test_retry_after_is_capped(server):
    base, _ = server
    start = time.monotonic()
    result = _fetcher(backoff_max_s=0.05).fetch(f"{base}/429-then-ok?t=2")
    assert result.ok, result
    assert time.monotonic() - start < 0.8


@pytest.mark.quick
def test_retries_counted_per_hop(server):
    base, _ = server
    result = _fetcher(retries=2).fetch(f"{base}/to-503")
    assert result.error == reasons.HTTP_ERROR
    assert result.detail == "HTTP 503 after 3 attempts"
    assert result.attempts == 4  # the redirect hop, then three tries
    assert result.final_url.endswith("/always-503?from=redirect")


@pytest.mark.quick
def test_chunked_body_ignores_content_length(server):
    base, _ = server
    fetcher = _fetcher(per_host_concurrency=1)  # one pooled connection, so the next request reuses it
    result = fetcher.fetch(f"{base}/chunked-with-length")
    assert result.ok and result.data == BODY, result
    assert fetcher.fetch(f"{base}/ok").data == BODY


@pytest.mark.quick
def test_always_429(server):
    base, state = server
    result = _fetcher(retries=2).fetch(f"{base}/always-429?t=1")
    assert result.error == reasons.HTTP_429
    assert result.status == 429
    assert result.attempts == 3
    assert state.hits["/always-429?t=1"] == 3


@pytest.mark.quick
def test_redirect_chain(server):
    base, _ = server
    result = _fetcher(max_redirects=5).fetch(f"{base}/chain/3")
    assert result.ok, result
    assert result.final_url == f"{base}/ok"
    assert result.data == BODY


@pytest.mark.quick
def test_relative_redirect(server):
    base, _ = server
    result = _fetcher().fetch(f"{base}/relative")
    assert result.ok, result
    assert result.final_url == f"{base}/ok?x=1"


@pytest.mark.quick
def test_too_many_redirects(server):
    base, _ = server
    result = _fetcher(max_redirects=5).fetch(f"{base}/chain/7")
    assert result.error == reasons.TOO_MANY_REDIRECTS
    assert result.status == 302


@pytest.mark.quick
def test_redirect_loop(server):
    base, _ = server
    result = _fetcher().fetch(f"{base}/loop-a")
    assert result.error == reasons.REDIRECT_LOOP
    assert "/loop-a" in result.detail


@pytest.mark.quick
def test_redirect_to_ftp(server):
    base, _ = server
    result = _fetcher().fetch(f"{base}/to-ftp")
    assert result.error == reasons.BAD_SCHEME
    assert result.detail == "redirect to ftp://example.com/x"


@pytest.mark.quick
def test_redirect_without_location(server):
    base, _ = server
    result = _fetcher().fetch(f"{base}/no-location")
    assert result.error == reasons.BAD_REDIRECT


@pytest.mark.quick
def test_redirect_to_private_address_refused(server):
    # "public.test" stands in for a public host that redirects to an internal address:
    # every hop must be checked, not just the first.
    base, _ = server

    class FakeDns(HttpFetcher):
        def _resolve(self, target):
            if target.host == "public.test":
                return "127.0.0.1"
            return super()._resolve(target)

    port = base.rsplit(":", 1)[1]
    fetcher = FakeDns(FetchPolicy(allow_private_addresses=False))
    result = fetcher.fetch(f"http://public.test:{port}/to-loopback")
    assert result.error == reasons.PRIVATE_ADDRESS
    assert result.detail == "127.0.0.1 is a loopback address"
    assert result.status == 302
    assert result.final_url == f"http://127.0.0.1:{port}/ok"
    assert fetcher.fetch(f"http://[::1]:{port}/ok").detail == "::1 is a loopback address"


@pytest.mark.quick
def test_oversized_content_length(server):
    base, _ = server
    start = time.monotonic()
    result = _fetcher(max_bytes=2**20).fetch(f"{base}/big-cl")
    assert result.error == reasons.TOO_LARGE
    assert "Content-Length" in result.detail
    assert time.monotonic() - start < 2


@pytest.mark.quick
def test_oversized_chunked_stops_streaming(server):
    base, state = server
    start = time.monotonic()
    result = _fetcher(max_bytes=2**20).fetch(f"{base}/big-chunked?t=1")
    assert result.error == reasons.TOO_LARGE
    assert result.detail == f"body exceeds {2**20} bytes"
    assert time.monotonic() - start < 3
    # The server stops once we hang up; kernel socket buffers may absorb a few MiB more than we read.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        sent = state.bytes_sent.get("/big-chunked?t=1", 0)
        time.sleep(0.1)
        if state.bytes_sent.get("/big-chunked?t=1", 0) == sent:
            break
    assert state.bytes_sent["/big-chunked?t=1"] < 64 * 2**20


@pytest.mark.quick
def test_slow_headers_timeout(server):
    base, _ = server
    start = time.monotonic()
    result = _fetcher(read_timeout_s=0.5, retries=0).fetch(f"{base}/slow-headers")
    assert result.error == reasons.TIMEOUT
    assert result.detail == "read timed out after 0.5 s"
    assert time.monotonic() - start < 1.4


@pytest.mark.quick
def test_slow_body_timeout(server):
    base, _ = server
    result = _fetcher(read_timeout_s=0.5, retries=0).fetch(f"{base}/slow-body")
    assert result.error == reasons.TIMEOUT
    assert "read timed out" in result.detail


@pytest.mark.quick
def test_total_body_deadline(server):
    base, _ = server
    start = time.monotonic()
    result = _fetcher(read_timeout_s=0.2, retries=0).fetch(f"{base}/drip")
    assert result.error == reasons.TIMEOUT
    assert "not complete after 0.6 s" in result.detail
    assert time.monotonic() - start < 1.5


@pytest.mark.quick
def test_total_body_deadline_without_length(server):
    base, _ = server
    start = time.monotonic()
    result = _fetcher(read_timeout_s=0.2, retries=0).fetch(f"{base}/drip-no-length")
    assert result.error == reasons.TIMEOUT
    assert time.monotonic() - start < 1.5


@pytest.mark.quick
def test_empty_body(server):
    base, _ = server
    result = _fetcher().fetch(f"{base}/empty")
    assert result.error == reasons.EMPTY
    assert result.status == 200


@pytest.mark.quick
def test_short_body_is_connection_error(server):
    base, _ = server
    result = _fetcher(retries=0).fetch(f"{base}/short")
    assert result.error == reasons.CONNECTION_ERROR
    assert "IncompleteRead" in result.detail


@pytest.mark.quick
def test_private_addresses_refused_by_default(server):
    base, state = server
    before = sum(state.hits.values())
    fetcher = HttpFetcher(FetchPolicy())
    result = fetcher.fetch(f"{base}/ok")
    assert result.error == reasons.PRIVATE_ADDRESS
    assert result.detail == "127.0.0.1 is a loopback address"
    assert result.attempts == 0
    port = base.rsplit(":", 1)[1]
    result = fetcher.fetch(f"http://localhost:{port}/ok")
    assert result.error == reasons.PRIVATE_ADDRESS
    assert "loopback" in result.detail
    assert sum(state.hits.values()) == before  # nothing reached the server


@pytest.mark.quick
def test_private_addresses_allowed_when_configured(server):
    base, _ = server
    port = base.rsplit(":", 1)[1]
    assert _fetcher().fetch(f"http://localhost:{port}/ok").ok


@pytest.mark.quick
@pytest.mark.parametrize(
    "address,kind",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.4", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "non-global"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classification(address, kind):
    assert _non_global_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.quick
def test_reserved_addresses_refused():
    assert _non_global_kind(ipaddress.ip_address("240.0.0.1")) is not None
    assert _non_global_kind(ipaddress.ip_address("255.255.255.255")) is not None


@pytest.mark.quick
@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "data:image/png;base64,AAAA", "x"])
def test_bad_scheme(url):
    result = HttpFetcher(FetchPolicy()).fetch(url)
    assert result.error == reasons.BAD_SCHEME
    assert result.attempts == 0


@pytest.mark.quick
def test_dns_error(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    result = HttpFetcher(FetchPolicy()).fetch("http://no-such-host.example/a.jpg")
    assert result.error == reasons.DNS_ERROR
    assert "no-such-host.example" in result.detail


@pytest.mark.quick
def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _fetcher(retries=1).fetch(f"http://127.0.0.1:{port}/x")
    assert result.error == reasons.CONNECTION_ERROR
    assert "refused" in result.detail.lower()
    assert result.attempts == 2


@pytest.mark.quick
def test_per_host_concurrency_is_bounded(server):
    base, state = server
    fetcher = _fetcher(per_host_concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: fetcher.fetch(f"{base}/concurrency?i={i}"), range(10)))
    assert all(r.ok for r in results)
    assert state.max_in_flight == 2


@pytest.mark.quick
def test_many_threads_one_fetcher(server):
    base, _ = server
    fetcher = _fetcher()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: fetcher.fetch(f"{base}/ok?i={i}"), range(200)))
    assert all(r.ok and r.data == BODY for r in results)


@pytest.mark.quick
def test_retry_after_parsing():
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
    assert 90 < _parse_retry_after(future) <= 100


@pytest.mark.quick
def test_img2dataset_adapter_shape(server):
    base, _ = server
    fn = img2dataset_fetch_function(_fetcher())
    key, stream, err = fn(
        (7, f"{base}/ok"), timeout=10, retries=0, user_agent_token=None, disallowed_header_directives=None
    )
    assert key == 7 and err is None and stream.read() == BODY
    key, stream, err = fn((8, f"{base}/404"), 10, 0, None, None, False)
    assert key == 8 and stream is None
    assert err == "http_404: HTTP 404"
    assert split_error_message(err) == (reasons.HTTP_404, "HTTP 404")
    key, stream, err = fn((9, f"{base}/robots"), 10, 0, "img2dataset", ["noai", "noindex"])
    assert stream is None
    assert split_error_message(err)[0] == reasons.ROBOTS_DISALLOWED
    _, stream, err = fn((10, f"{base}/robots"), 10, 0, "img2dataset", [])
    assert err is None and stream is not None


@pytest.mark.quick
def test_split_error_message():
    assert split_error_message("timeout: read timed out after 2 s") == ("timeout", "read timed out after 2 s")
    assert split_error_message("too_large: body exceeds 10: bytes") == ("too_large", "body exceeds 10: bytes")
    assert split_error_message("HTTP Error 404: Not Found") == ("connection_error", "HTTP Error 404: Not Found")
    assert split_error_message("<urlopen error timed out>") == ("connection_error", "<urlopen error timed out>")


@pytest.mark.quick
def test_robots_directives():
    assert robots_disallowed(["noai"], "img2dataset", ["noai"]) == "noai"
    assert robots_disallowed(["NoIndex, nofollow"], None, ["noindex"]) == "NoIndex, nofollow"
    assert robots_disallowed(["otherbot: noai"], "img2dataset", ["noai"]) is None
    assert robots_disallowed(["img2dataset: noai"], "img2dataset", ["noai"]) == "img2dataset: noai"
    assert robots_disallowed(["noai, max-image-preview: large"], "x", ["noai"]) is not None
    assert robots_disallowed(["max-image-preview: large"], "x", ["noai"]) is None
    assert robots_disallowed(["unavailable_after: 25 Jun 2010 15:00:00 PST"], "x", ["noai"]) is None


@pytest.mark.quick
def test_reason_vocabulary():
    assert reasons.TIMEOUT == "timeout"
    assert reasons.HTTP_404 in reasons.ALL_REASONS
    assert all(code == code.lower() for code in reasons.ALL_REASONS)
