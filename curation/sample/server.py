"""Loopback HTTP server for the sample, with routes that misbehave on purpose, and URL-list writers.

Routes (paths are relative to the sample dir):

- ``/media/<rest>``: the file ``<root>/media/<rest>`` (403 for path traversal, 404 if missing)
- ``/dead/<rest>``: 404
- ``/slow/<rest>``: stalls ``slow_seconds`` before sending anything, then serves ``/media/<rest>`` if it exists,
  else an empty 200
- ``/oversized/<rest>``: 200 with ``Content-Length: oversized_bytes``, streaming zeros until done or the client
  hangs up
- ``/ratelimited/<rest>``: the first request per path gets 429 with ``Retry-After: 1``; later ones get
  ``/media/<rest>``
- ``/redirect/<n>/<rest>``: a chain of ``n`` 302s ending at ``/media/<rest>`` (``n = 0`` serves it directly)
- ``/loop/<rest>``: 302 to itself, forever
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".parquet": "application/vnd.apache.parquet",
}
_CHUNK = 256 * 1024
_ZEROS = bytes(_CHUNK)


def _content_type(name: str) -> str:
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower(), "application/octet-stream") if dot >= 0 else "application/octet-stream"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024  # crawlers open many connections at once; the default 5 drops SYNs

    def __init__(self, address, owner: SampleServer):
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "CurationSample/1.0"
    disable_nagle_algorithm = True  # headers and body go out as separate writes; don't let Nagle hold the body
    timeout = 60  # idle keep-alive connections release their thread eventually
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        # per-request logging costs more than serving a small file
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- routing --------------------------------------------------------------------------------------------

    def _route(self, head: bool) -> None:
        owner = self.server.owner
        owner._count()
        path = unquote(urlsplit(self.path).path)
        parts = path.split("/")
        # refuse traversal outright rather than normalising it: a sample server has no business resolving ".."
        if any(p in ("..", ".") for p in parts) or "\\" in path or "\x00" in path:
            self._send_empty(403)
            return
        route, _, rest = path.lstrip("/").partition("/")
        try:
            if route == "media":
                self._send_file(rest, head)
            elif route == "dead":
                self._send_empty(404)
            elif route == "slow":
                if owner._stopping.wait(owner.slow_seconds):
                    self.close_connection = True
                    return
                if owner._media_file(rest) is not None:
                    self._send_file(rest, head)
                else:
                    self._send_empty(200, _content_type(rest))
            elif route == "oversized":
                self._send_oversized(rest, head)
            elif route == "ratelimited":
                if owner.rate_limit_paths and owner._first_hit(rest):
                    self._send_empty(429, extra={"Retry-After": "1"})
                else:
                    self._send_file(rest, head)
            elif route == "redirect":
                hops, _, target = rest.partition("/")
                if not hops.isdigit():
                    self._send_empty(404)
                elif int(hops) == 0:
                    self._send_file(target, head)
                elif int(hops) == 1:
                    self._redirect(f"/media/{target}")
                else:
                    self._redirect(f"/redirect/{int(hops) - 1}/{target}")
            elif route == "loop":
                self._redirect(f"/loop/{rest}")
            else:
                self._send_empty(404)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True

    # -- responses ------------------------------------------------------------------------------------------

    def _send_empty(self, status: int, content_type: str = "text/plain", extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", "0")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _redirect(self, location: str) -> None:
        self._send_empty(302, extra={"Location": self.server.owner.base_url + location})

    def _send_file(self, rel: str, head: bool) -> None:
        file = self.server.owner._media_file(rel)
        if file is None:
            self._send_empty(404)
            return
        try:
            data = file.read_bytes()
        except OSError:
            self._send_empty(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", _content_type(file.name))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_oversized(self, rel: str, head: bool) -> None:
        owner = self.server.owner
        total = owner.oversized_bytes
        self.send_response(200)
        self.send_header("Content-Type", _content_type(rel))
        self.send_header("Content-Length", str(total))
        self.end_headers()
        if head:
            return
        sent = 0
        while sent < total and not owner._stopping.is_set():
            n = min(_CHUNK, total - sent)
            self.wfile.write(_ZEROS[:n] if n < _CHUNK else _ZEROS)
            sent += n
        if sent < total:
            self.close_connection = True


class SampleServer:
    """Serves a sample dir on loopback; context manager. Binds 127.0.0.1 only."""

    def __init__(
        self,
        root: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 30.0,
        oversized_bytes: int = 80 * 2**20,
        rate_limit_paths: bool = True,
    ):
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback or ":" in host:
            raise ValueError(f"SampleServer binds an IPv4 loopback address only, not {host!r}")
        self.root = Path(root)
        self.media_root = self.root / "media"
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.slow_seconds = slow_seconds
        self.oversized_bytes = oversized_bytes
        self.rate_limit_paths = rate_limit_paths
        self.base_url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._served = 0
        self._seen_paths: set[str] = set()

    @property
    def requests_served(self) -> int:
        with self._lock:
            return self._served

    def _count(self) -> None:
        with self._lock:
            self._served += 1

    def _first_hit(self, rel: str) -> bool:
        with self._lock:
            if rel in self._seen_paths:
                return False
            self._seen_paths.add(rel)
            return True

    def _media_file(self, rel: str) -> Path | None:
        if not rel or rel.startswith("/"):
            return None
        file = self.media_root / rel
        return file if file.is_file() else None

    def start(self) -> SampleServer:
        """Bind and serve in a background thread; sets ``base_url``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="sample-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: wake stalled handlers, close the listener and every open connection."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            conns = list(server.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._server = None
        self._thread = None

    def __enter__(self) -> SampleServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def write_url_lists(
    sample_dir: str | Path, base_url: str, formats: tuple[str, ...] = ("parquet", "csv", "jsonl")
) -> dict[str, Path]:
    """Write ``urls.<fmt>`` (columns url, caption, modality, id) from ``labels.parquet``; returns fmt -> path."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    sample_dir = Path(sample_dir)
    labels = pq.read_table(sample_dir / "labels.parquet", columns=["id", "modality", "path", "caption"])
    base = base_url.rstrip("/")
    table = pa.table(
        {
            "url": [f"{base}/{p}" for p in labels.column("path").to_pylist()],
            "caption": labels.column("caption"),
            "modality": labels.column("modality"),
            "id": labels.column("id"),
        }
    )
    out: dict[str, Path] = {}
    for fmt in formats:
        path = sample_dir / f"urls.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path)
        elif fmt == "csv":
            pacsv.write_csv(table, path)
        elif fmt == "jsonl":
            with path.open("w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            raise ValueError(f"unknown URL list format {fmt!r}")
        out[fmt] = path
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m curation.sample.server DIR --port N``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Serve a curation sample dir on 127.0.0.1.")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--url-lists", action="store_true", help="also write urls.parquet/csv/jsonl into DIR")
    args = parser.parse_args(argv)
    server = SampleServer(args.dir, port=args.port, slow_seconds=args.slow_seconds).start()
    if args.url_lists:
        write_url_lists(args.dir, server.base_url)
    print(f"serving {args.dir} at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
