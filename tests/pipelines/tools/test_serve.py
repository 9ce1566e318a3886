"""The sample HTTP server: files served from the root only, 404s, loopback only, and the console script."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.tools.serve import serve_in_thread

CLI = str(Path(sys.executable).parent / "latentcrafter")


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "secret.txt").write_text("outside the root")
    server = serve_in_thread(str(root))
    yield server
    server.stop()


def status_of(server, path: str) -> int:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request("GET", path)  # sent as is: no client-side normalisation of ".."
    status = connection.getresponse().status
    connection.close()
    return status


def test_serves_files_with_length(served):
    assert served.url == f"http://127.0.0.1:{served.port}" and served.port > 0
    with urllib.request.urlopen(served.url + "/sub/a.bin", timeout=10) as response:
        body = response.read()
        assert body == bytes(range(256)) * 10
        assert int(response.headers["Content-Length"]) == 2560


def test_404_for_missing_files_folders_and_paths_outside_the_root(served):
    assert status_of(served, "/sub/nothing.jpg") == 404
    assert status_of(served, "/sub/") == 404  # no directory listing
    assert status_of(served, "/") == 404
    assert status_of(served, "/../secret.txt") == 404
    assert status_of(served, "/sub/../../secret.txt") == 404


def test_loopback_only_and_stop_releases_the_port(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        serve_in_thread(str(tmp_path), host="0.0.0.0")
    with pytest.raises(FileNotFoundError, match="sample-data"):
        serve_in_thread(str(tmp_path / "absent"))
    server = serve_in_thread(str(tmp_path))
    url = server.url
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/x", timeout=2)


def test_serve_sample_console_script(sample_data):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [CLI, "serve-sample", str(sample_data), "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert f"http://127.0.0.1:{port}/" in proc.stdout.readline()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/expected.json", timeout=5) as response:
                    body = response.read()
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "serve-sample did not answer within 30 s"
                time.sleep(0.2)
        assert body == (sample_data / "expected.json").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
