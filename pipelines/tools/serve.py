"""`latentcrafter serve-sample`: serve a folder (the sample data) over HTTP on 127.0.0.1, quietly, no listings."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class QuietFileHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of files under the served root; 404 for anything else (missing files and folders)."""

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "directory listing is disabled")
        return None

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass


class Server:
    """A ThreadingHTTPServer running in a daemon thread; `.url` is "http://127.0.0.1:PORT"."""

    def __init__(self, root: str, host: str = "127.0.0.1", port: int = 0):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(
                f"serve host {host!r} is not a loopback address; the sample server binds 127.0.0.1 only"
            )
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"cannot serve {root!r}: not a folder (write one with `latentcrafter sample-data`)"
            )
        handler = functools.partial(QuietFileHandler, directory=str(Path(root).resolve()))
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.root, self.host, self.port = root, host, self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"serve-{self.port}",
            daemon=True,
        )

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(root: str, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Serve the files under `root` in a background thread (port 0: any free port); call `.stop()` when done."""
    return Server(root, host, port).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="latentcrafter serve-sample",
        description="Serve a sample-data folder over HTTP on 127.0.0.1 so its manifests' URLs resolve.",
    )
    parser.add_argument("out", help="the folder `latentcrafter sample-data` wrote")
    parser.add_argument("--port", type=int, default=8765, help="port (the sample manifests' URLs use 8765)")
    args = parser.parse_args(argv)
    server = Server(args.out, "127.0.0.1", args.port)
    print(f"serving {args.out} at {server.url}/ (Ctrl-C stops)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
