"""The fetch stage: media bytes through fsspec/HTTP with retries, backoff, timeouts and a size cap.

Which URIs may be fetched (blocked_url otherwise) is decided in pipelines.stages.url_safety."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin

import fsspec
import requests

from pipelines.config import FetchConfig
from pipelines.stages.rows import fail, failed, rows_of, table_of
from pipelines.stages.url_safety import (
    FetchError,
    PinnedAdapter,
    Resolver,
    _local_path,
    _Pinned,
    address_problem,
    check_http,
    check_local,
    check_uri,
    new_session,
)

# Names other modules import from here (the URL rules lived in this module before url_safety).
__all__ = [
    "FetchError",
    "FetchStage",
    "Fetched",
    "PinnedAdapter",
    "Resolver",
    "_Pinned",
    "address_problem",
    "check_http",
    "check_local",
    "check_uri",
    "fetch_one",
    "new_session",
]

_CHUNK = 1 << 20


@dataclass
class Fetched:
    """Where the media is: a local file to read in place, or the bytes themselves."""

    local_path: str | None = None
    data: bytes | None = None


def _fetch_local(uri: str, cfg: FetchConfig, local_roots: Iterable[str] = ()) -> Fetched:
    path = check_local(uri, cfg, local_roots)
    if not os.path.isfile(path):
        raise FetchError("not_found", f"no such file {_local_path(uri)}")
    size = os.path.getsize(path)
    if size > cfg.max_bytes:
        raise FetchError("too_large", f"{size} bytes > fetch.max_bytes={cfg.max_bytes}")
    return Fetched(local_path=path)


def _is_read_timeout(exc: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError, TimeoutError

    causes = [exc, *getattr(exc, "args", ())]
    return any(isinstance(c, (ReadTimeoutError, TimeoutError)) for c in causes) or "timed out" in str(exc)


def _fetch_http(uri: str, cfg: FetchConfig, session: requests.Session, resolve: Resolver | None) -> Fetched:
    """GET with redirects followed here (at most fetch.max_redirects), each hop checked and pinned."""
    deadline = time.monotonic() + cfg.total_timeout_s
    url = uri
    try:
        for _hop in range(cfg.max_redirects + 1):
            pinned = check_http(url, cfg, resolve)
            request = session.prepare_request(
                requests.Request("GET", url, headers={"Host": pinned.host_header})
            )
            request.pinned = pinned
            with session.send(
                request,
                stream=True,
                timeout=(cfg.connect_timeout_s, cfg.read_timeout_s),
                allow_redirects=False,
            ) as resp:
                if resp.is_redirect:
                    url = urljoin(url, session.get_redirect_target(resp))
                    continue
                return _read_body(resp, url, cfg, deadline)
    except requests.exceptions.Timeout as exc:
        raise FetchError("timeout", f"{type(exc).__name__}: {exc}", True) from exc
    except requests.exceptions.RequestException as exc:
        if _is_read_timeout(exc):  # a stalled body surfaces as ConnectionError(ReadTimeoutError)
            raise FetchError("timeout", f"{type(exc).__name__}: {exc}", True) from exc
        raise FetchError("fetch_failed", f"{type(exc).__name__}: {exc}", True) from exc
    raise FetchError(
        "fetch_failed", f"GET {uri}: more than fetch.max_redirects={cfg.max_redirects} redirects"
    )


def _read_body(resp: requests.Response, url: str, cfg: FetchConfig, deadline: float) -> Fetched:
    if resp.status_code != 200:
        retry = resp.status_code >= 500 or resp.status_code in (408, 429)
        raise FetchError(f"http_{resp.status_code}", f"GET {url} -> {resp.status_code}", retry)
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > fetch.max_bytes={cfg.max_bytes}")
    parts, total = [], 0
    for chunk in resp.iter_content(_CHUNK):
        total += len(chunk)
        if total > cfg.max_bytes:
            raise FetchError("too_large", f"more than fetch.max_bytes={cfg.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchError("timeout", f"over fetch.total_timeout_s={cfg.total_timeout_s}", True)
        parts.append(chunk)
    return Fetched(data=b"".join(parts))


def _fetch_fsspec(uri: str, cfg: FetchConfig) -> Fetched:
    """s3://, gs://, ... through the user's fsspec backends (a thread enforces total_timeout_s)."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        size = fs.size(path)
    except FileNotFoundError as exc:
        raise FetchError("not_found", str(exc)) from exc
    if size is not None and size > cfg.max_bytes:
        raise FetchError("too_large", f"{size} bytes > fetch.max_bytes={cfg.max_bytes}")
    with fs.open(path, "rb") as f:
        data = f.read(cfg.max_bytes + 1)
    if len(data) > cfg.max_bytes:
        raise FetchError("too_large", f"more than fetch.max_bytes={cfg.max_bytes} bytes")
    return Fetched(data=data)


def fetch_one(
    uri: str,
    cfg: FetchConfig,
    session: requests.Session | None = None,
    *,
    local_roots: Iterable[str] = (),
    resolve: Resolver | None = None,
) -> Fetched:
    """Fetch one URI with retries and exponential backoff; raises FetchError when it gives up.

    local_roots: folders local paths may be under (the source's media_root, local url_rewrite targets);
    resolve: the DNS lookup (socket.getaddrinfo's signature; tests inject one). A URI that the fetch rules
    refuse raises FetchError("blocked_url", detail naming the option), never retried."""
    if not uri:
        raise FetchError("not_found", "empty uri")
    how = check_uri(uri, cfg, local_roots)
    if how == "local":
        return _fetch_local(uri, cfg, local_roots)
    if how == "http":
        if session is None or not isinstance(session.get_adapter("http://x"), PinnedAdapter):
            session = new_session()
    wait = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            if how == "http":
                return _fetch_http(uri, cfg, session, resolve)
            return _run_with_timeout(_fetch_fsspec, uri, cfg)
        except FetchError as exc:
            if not exc.retry or attempt == cfg.retries:
                raise
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


_TIMEOUT_POOL = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch-timeout")


def _run_with_timeout(fn, uri: str, cfg: FetchConfig) -> Fetched:
    future = _TIMEOUT_POOL.submit(fn, uri, cfg)
    try:
        return future.result(timeout=cfg.total_timeout_s)
    except cf.TimeoutError as exc:
        raise FetchError("timeout", f"over fetch.total_timeout_s={cfg.total_timeout_s}", True) from exc
    except FetchError:
        raise
    except FileNotFoundError as exc:
        raise FetchError("not_found", str(exc)) from exc
    except Exception as exc:  # backend errors (credentials, network): retried, then fetch_failed
        raise FetchError("fetch_failed", f"{type(exc).__name__}: {exc}", True) from exc


class FetchStage:
    """`__init__(config, local_roots)`; `__call__(batch)` fetches every row's uri concurrently (Ray actor or
    local). local_roots: folders local paths may be under, for every row (a list) or per source (a dict
    source name -> list, the row's `source` picks); resolve: the DNS lookup (tests)."""

    def __init__(
        self,
        config: FetchConfig | dict,
        local_roots: Iterable[str] | dict[str, list[str]] | None = None,
        resolve: Resolver | None = None,
    ):
        self.config = config if isinstance(config, FetchConfig) else FetchConfig(**config)
        self.local_roots = dict(local_roots) if isinstance(local_roots, dict) else list(local_roots or ())
        self.resolve = resolve
        self.pool = cf.ThreadPoolExecutor(max_workers=self.config.threads, thread_name_prefix="fetch")
        self.session = new_session(self.config.threads)

    def _roots(self, row: dict) -> list[str]:
        if isinstance(self.local_roots, dict):
            return list(self.local_roots.get(row.get("source") or "", ()))
        return self.local_roots

    def fetch_row(self, row: dict) -> dict:
        if failed(row):
            return row
        try:
            got = fetch_one(
                row["uri"] or "",
                self.config,
                self.session,
                local_roots=self._roots(row),
                resolve=self.resolve,
            )
        except FetchError as exc:
            return fail(row, "fetch", exc.reason, exc.detail)
        except Exception as exc:  # never let one URI kill the job
            return fail(row, "fetch", "fetch_failed", f"{type(exc).__name__}: {exc}")
        row["local_path"] = got.local_path or ""
        row["data"] = got.data
        return row

    def __call__(self, batch):
        rows = list(self.pool.map(self.fetch_row, rows_of(batch)))
        return table_of(rows)
