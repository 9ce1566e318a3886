"""The fetch stage: media bytes through fsspec/HTTP with retries, backoff, timeouts and a size cap."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from dataclasses import dataclass

import fsspec
import requests

from pipelines.config import FetchConfig
from pipelines.stages.rows import fail, failed, rows_of, table_of

_CHUNK = 1 << 20


class FetchError(Exception):
    """A fetch that failed for good; `reason` is the error row's reason (http_404, timeout, ...)."""

    def __init__(self, reason: str, detail: str, retry: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry = reason, detail, retry


@dataclass
class Fetched:
    """Where the media is: a local file to read in place, or the bytes themselves."""

    local_path: str | None = None
    data: bytes | None = None


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _fetch_local(uri: str, cfg: FetchConfig) -> Fetched:
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    if not os.path.isfile(path):
        raise FetchError("not_found", f"no such file {path}")
    size = os.path.getsize(path)
    if size > cfg.max_bytes:
        raise FetchError("too_large", f"{size} bytes > fetch.max_bytes={cfg.max_bytes}")
    return Fetched(local_path=os.path.abspath(path))


def _is_read_timeout(exc: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError, TimeoutError

    causes = [exc, *getattr(exc, "args", ())]
    return any(isinstance(c, (ReadTimeoutError, TimeoutError)) for c in causes) or "timed out" in str(exc)


def _fetch_http(uri: str, cfg: FetchConfig, session: requests.Session) -> Fetched:
    deadline = time.monotonic() + cfg.total_timeout_s
    try:
        with session.get(
            uri, stream=True, timeout=(cfg.connect_timeout_s, cfg.read_timeout_s), allow_redirects=True
        ) as resp:
            if resp.status_code != 200:
                retry = resp.status_code >= 500 or resp.status_code in (408, 429)
                raise FetchError(f"http_{resp.status_code}", f"GET {uri} -> {resp.status_code}", retry)
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
    except requests.exceptions.Timeout as exc:
        raise FetchError("timeout", f"{type(exc).__name__}: {exc}", True) from exc
    except requests.exceptions.RequestException as exc:
        if _is_read_timeout(exc):  # a stalled body surfaces as ConnectionError(ReadTimeoutError)
            raise FetchError("timeout", f"{type(exc).__name__}: {exc}", True) from exc
        raise FetchError("fetch_failed", f"{type(exc).__name__}: {exc}", True) from exc


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


def fetch_one(uri: str, cfg: FetchConfig, session: requests.Session | None = None) -> Fetched:
    """Fetch one URI with retries and exponential backoff; raises FetchError when it gives up."""
    if not uri:
        raise FetchError("not_found", "empty uri")
    if _is_local(uri):
        return _fetch_local(uri, cfg)
    session = session or requests.Session()
    wait = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            if uri.startswith(("http://", "https://")):
                return _fetch_http(uri, cfg, session)
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
    """`__init__(config)`; `__call__(batch)` fetches every row's uri concurrently (Ray actor or local)."""

    def __init__(self, config: FetchConfig | dict):
        self.config = config if isinstance(config, FetchConfig) else FetchConfig(**config)
        self.pool = cf.ThreadPoolExecutor(max_workers=self.config.threads, thread_name_prefix="fetch")
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.config.threads, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def fetch_row(self, row: dict) -> dict:
        if failed(row):
            return row
        try:
            got = fetch_one(row["uri"] or "", self.config, self.session)
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
