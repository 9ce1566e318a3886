"""The fetch stage against a real HTTP server on 127.0.0.1: 404, 5xx retries, slow and oversized responses."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.config import FetchConfig
from pipelines.stages.fetch import FetchError, FetchStage, fetch_one
from pipelines.stages.rows import new_row, rows_of, table_of

BODY = b"x" * 5000


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/ok":
            self._send(200, BODY)
        elif self.path == "/big":  # announces its size
            self._send(200, b"y" * 50_000)
        elif self.path == "/big-chunked":  # no Content-Length: the cap applies while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(20):
                    chunk = b"z" * 4096
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client hung up at the cap: expected
                pass
        elif self.path == "/slow":  # headers, then nothing for longer than the read timeout
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.flush()
            time.sleep(2.0)
            try:
                self.wfile.write(b"0123456789")
            except OSError:
                pass
        elif self.path == "/flaky" and Handler.hits[self.path] <= 2:
            self._send(503, b"try later")
        elif self.path == "/flaky":
            self._send(200, BODY)
        else:
            self._send(404, b"not here")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


CFG = FetchConfig(
    connect_timeout_s=2,
    read_timeout_s=0.5,
    total_timeout_s=5,
    retries=2,
    backoff_s=0.05,
    max_bytes=20_000,
    schemes=["http", "https", "memory"],
)


@pytest.fixture(scope="module")
def cfg(server):
    """CFG allowing the test server (loopback is refused unless allowed explicitly)."""
    return FetchConfig(**{**CFG.__dict__, "allowed_hosts": [server.removeprefix("http://")]})


def _reason(uri: str, cfg: FetchConfig = CFG, **kw) -> str:
    with pytest.raises(FetchError) as info:
        fetch_one(uri, cfg, **kw)
    return info.value.reason


def test_ok_and_404(server, cfg):
    assert fetch_one(f"{server}/ok", cfg).data == BODY
    Handler.hits.pop("/missing", None)
    assert _reason(f"{server}/missing", cfg) == "http_404"
    assert Handler.hits["/missing"] == 1, "a 404 is not retried"


def test_too_large_by_header_and_by_stream(server, cfg):
    assert _reason(f"{server}/big", cfg) == "too_large"
    assert _reason(f"{server}/big-chunked", cfg) == "too_large"


def test_slow_response_times_out_after_retries(server, cfg):
    Handler.hits.pop("/slow", None)
    start = time.monotonic()
    assert _reason(f"{server}/slow", cfg) == "timeout"
    assert Handler.hits["/slow"] == 3  # first try + fetch.retries
    assert time.monotonic() - start < 4 * 2.0


def test_server_errors_are_retried_with_backoff(server, cfg):
    Handler.hits.pop("/flaky", None)
    assert fetch_one(f"{server}/flaky", cfg).data == BODY
    assert Handler.hits["/flaky"] == 3
    Handler.hits.pop("/flaky", None)
    no_retry = FetchConfig(**{**cfg.__dict__, "retries": 0})
    assert _reason(f"{server}/flaky", no_retry) == "http_503"


def test_refused_connection_is_fetch_failed():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    allowed = FetchConfig(retries=0, allowed_hosts=[f"127.0.0.1:{port}"])
    assert _reason(f"http://127.0.0.1:{port}/x", allowed) == "fetch_failed"


def test_local_paths(tmp_path):
    media = tmp_path / "a.bin"
    media.write_bytes(b"abc")
    roots = [str(tmp_path)]  # local paths are fetched under a media_root only (or with fetch.allow_local)
    assert fetch_one(str(media), CFG, local_roots=roots).local_path == str(media)
    assert fetch_one(f"file://{media}", CFG, local_roots=roots).local_path == str(media)
    assert _reason(str(tmp_path / "nope.mp4"), local_roots=roots) == "not_found"
    (tmp_path / "big.bin").write_bytes(b"0" * 30_000)
    assert _reason(str(tmp_path / "big.bin"), local_roots=roots) == "too_large"
    memory = "memory://lc-test/x.bin"  # any other fsspec scheme goes through fsspec
    import fsspec

    with fsspec.open(memory, "wb") as f:
        f.write(b"hello")
    assert fetch_one(memory, CFG).data == b"hello"
    assert _reason("memory://lc-test/none.bin") == "not_found"


def test_stage_turns_failures_into_error_rows(server, cfg, tmp_path):
    rows = [
        new_row(
            key="a",
            source="laion_coco",
            uri=f"{server}/ok",
            kind="image",
            stage="256x256",
            shard=0,
            shard_rows=3,
        ),
        new_row(
            key="b",
            source="laion_coco",
            uri=f"{server}/missing",
            kind="image",
            stage="256x256",
            shard=0,
            shard_rows=3,
        ),
        new_row(
            key="c",
            source="laion_coco",
            uri=f"{server}/big",
            kind="image",
            stage="256x256",
            shard=0,
            shard_rows=3,
        ),
    ]
    out = rows_of(FetchStage(cfg)(table_of(rows)))
    assert [r["key"] for r in out] == ["a", "b", "c"]
    assert out[0]["data"] == BODY and out[0]["err_stage"] == ""
    assert (out[1]["err_stage"], out[1]["err_reason"]) == ("fetch", "http_404")
    assert (out[2]["err_stage"], out[2]["err_reason"]) == ("fetch", "too_large") and out[2]["data"] is None
