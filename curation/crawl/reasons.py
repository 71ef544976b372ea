"""Reject-reason vocabulary for the crawl ledger's ``reason`` column.

These strings are written to the ledger and compared across runs, so they must stay stable:
add new codes, never rename or reuse old ones.
"""

from __future__ import annotations

# Fetch: URL and address checks.
BAD_SCHEME = "bad_scheme"
PRIVATE_ADDRESS = "private_address"
DNS_ERROR = "dns_error"

# Fetch: transport.
CONNECTION_ERROR = "connection_error"
TIMEOUT = "timeout"

# Fetch: HTTP outcome. HTTP_ERROR covers any other non-2xx final status; the detail holds the status.
HTTP_ERROR = "http_error"
HTTP_404 = "http_404"
HTTP_429 = "http_429"
TOO_LARGE = "too_large"
REDIRECT_LOOP = "redirect_loop"
TOO_MANY_REDIRECTS = "too_many_redirects"
BAD_REDIRECT = "bad_redirect"
# The server's X-Robots-Tag header opts the file out of use (e.g. "noai"); honoured like img2dataset does.
ROBOTS_DISALLOWED = "robots_disallowed"

# Probe: what the bytes turned out to be.
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
NOT_A_VIDEO = "not_a_video"
NOT_AN_AUDIO = "not_an_audio"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_FORMAT = "unsupported_format"

ALL_REASONS: frozenset[str] = frozenset(
    {
        BAD_SCHEME,
        PRIVATE_ADDRESS,
        DNS_ERROR,
        CONNECTION_ERROR,
        TIMEOUT,
        HTTP_ERROR,
        HTTP_404,
        HTTP_429,
        TOO_LARGE,
        REDIRECT_LOOP,
        TOO_MANY_REDIRECTS,
        BAD_REDIRECT,
        ROBOTS_DISALLOWED,
        EMPTY,
        NOT_AN_IMAGE,
        NOT_A_VIDEO,
        NOT_AN_AUDIO,
        TRUNCATED,
        DECODE_ERROR,
        DECOMPRESSION_BOMB,
        UNSUPPORTED_FORMAT,
    }
)
