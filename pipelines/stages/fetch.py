"""The fetch stage: media bytes through fsspec/HTTP with retries, backoff, timeouts and a size cap.

Manifest URIs are untrusted (blocked_url otherwise): local paths only under the source's media_root / local
url_rewrite targets (fetch.allow_local: anywhere); http(s) only to public addresses, checked on the resolved
address of every redirect hop and pinned to it (fetch.allow_private_networks, fetch.allowed_hosts); other
schemes only as listed in fetch.schemes."""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import fsspec
import requests
import requests.adapters

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


# --- what a manifest URI may point at (manifests are untrusted: web scrapes) --------------------------------

Resolver = Callable[..., list]  # socket.getaddrinfo's signature: (host, port, type=...) -> [(.., sockaddr)]
_ARCHIVES = ("tar", "zip")  # fsspec wrappers over another URL (tar://member::TARGET): TARGET is checked
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _blocked(detail: str) -> FetchError:
    return FetchError("blocked_url", detail)


def address_problem(ip: str) -> str | None:
    """Why fetching from this IP address is refused ("link-local address 169.254.169.254"), None if public.

    Pure: no sockets. IPv4-mapped (::ffff:a.b.c.d), 6to4 and NAT64 IPv6 addresses are judged by the IPv4
    address inside them too."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 scope id (fe80::1%eth0)
    except ValueError:
        return f"unparsable address {ip!r}"
    inner = []
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            inner.append(addr.ipv4_mapped)
        if addr.sixtofour is not None:
            inner.append(addr.sixtofour)
        if addr in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the last 32 bits are the IPv4 address
            inner.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    candidates = inner if addr.version == 6 and addr.ipv4_mapped is not None else [*inner, addr]
    for candidate in candidates:
        for rule, hit in (
            ("unspecified", candidate.is_unspecified),
            ("loopback", candidate.is_loopback),
            ("link-local", candidate.is_link_local),
            ("multicast", candidate.is_multicast),
            ("reserved", candidate.is_reserved),
            ("private", candidate.is_private),
            ("site-local", getattr(candidate, "is_site_local", False)),
            ("non-global", not candidate.is_global),
        ):
            if hit:
                shown = ip if candidate is addr else f"{ip} ({candidate})"
                return f"{rule} address {shown}"
    return None


def _host_key(host: str) -> str:
    host = host.lower().rstrip(".")
    return f"[{host}]" if ":" in host else host


def _host_allowed(host: str, port: int, cfg: FetchConfig) -> bool:
    key = _host_key(host)
    return key in cfg.allowed_hosts or f"{key}:{port}" in cfg.allowed_hosts


@dataclass
class _Pinned:
    """An http(s) URL checked for fetching: connect to `address`:`port`, send `Host: host_header`."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    host_header: str


def check_http(url: str, cfg: FetchConfig, resolve: Resolver | None = None) -> _Pinned:
    """Resolve `url`'s host once and check every address it got; the first is where the request goes.

    Refused (blocked_url) unless fetch.allow_private_networks or the host is in fetch.allowed_hosts: any
    loopback, private, link-local, multicast, reserved, unspecified or otherwise non-global address."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError as exc:
        raise _blocked(f"not a valid URL {url!r}: {exc}") from None
    if scheme not in _DEFAULT_PORTS:
        raise _blocked(f"scheme {scheme or '(none)'} of {url!r} is not http(s)")
    if scheme not in cfg.schemes:
        raise _blocked(f"scheme {scheme} not in fetch.schemes")
    if not host:
        raise _blocked(f"no host in {url!r}")
    host = host.rstrip(".")
    port = port or _DEFAULT_PORTS[scheme]
    try:
        infos = (resolve or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror: name not known, DNS down (retried)
        raise FetchError("fetch_failed", f"cannot resolve {host}: {exc}", True) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError("fetch_failed", f"cannot resolve {host}: no addresses", True)
    if not (cfg.allow_private_networks or _host_allowed(host, port, cfg)):
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise _blocked(
                    f"{problem} of host {host} (fetch.allow_private_networks, fetch.allowed_hosts)"
                )
    shown = _host_key(host)
    header = shown if parts.port is None or parts.port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    return _Pinned(url, scheme, host, port, addresses[0].split("%", 1)[0], header)


class PinnedAdapter(requests.adapters.HTTPAdapter):
    """Sends a request to the address it was checked against (`request.pinned`, a _Pinned), never to a new
    DNS answer: the connection pool's host is that IP; the Host header, TLS SNI (server_hostname) and the
    certificate's hostname check (assert_hostname) stay the URL's host. No proxies (they would resolve the
    name themselves). A request without `pinned` is refused."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        pinned = getattr(request, "pinned", None)
        if not isinstance(pinned, _Pinned):
            raise ValueError("latentcrafter fetch: request without a checked (pinned) address")
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] != pinned.scheme:
            raise ValueError(f"scheme {host_params['scheme']} != checked scheme {pinned.scheme}")
        host_params["host"], host_params["port"] = pinned.address, pinned.port
        if pinned.scheme == "https":
            pool_kwargs["server_hostname"] = pinned.host
            pool_kwargs["assert_hostname"] = pinned.host
        return host_params, pool_kwargs

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies={})


def new_session(pool_size: int = 10) -> requests.Session:
    """A requests session whose http(s) requests go through PinnedAdapter; no environment proxies/netrc."""
    session = requests.Session()
    session.trust_env = False
    adapter = PinnedAdapter(pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _local_path(uri: str) -> str:
    if not uri.startswith("file://"):
        return uri
    rest = uri[len("file://") :]
    if not rest.startswith("/"):  # file://HOST/path
        host, _, path = rest.partition("/")
        if host.lower() != "localhost":
            raise _blocked(f"file:// URL with host {host!r}")
        rest = "/" + path
    return rest


def check_local(uri: str, cfg: FetchConfig, local_roots: Iterable[str] = ()) -> str:
    """The real path (symlinks and .. resolved) of a local uri, if allowed: under one of `local_roots` (the
    source's media_root / local url_rewrite targets), or anywhere with fetch.allow_local."""
    path = _local_path(uri)
    real = os.path.realpath(path)
    if cfg.allow_local:
        return real
    for root in local_roots:
        top = os.path.realpath(_local_path(root))
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return real
    where = "outside media_root" if local_roots else "with no media_root"
    raise _blocked(f"local path {path} {where} (fetch.allow_local)")


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def check_uri(uri: str, cfg: FetchConfig, local_roots: Iterable[str] = ()) -> str:
    """How `uri` is fetched ("local", "http", "fsspec"), or FetchError blocked_url (http hosts are checked
    later, per hop, by check_http)."""
    if _is_local(uri):
        check_local(uri, cfg, local_roots)
        return "local"
    if "::" in uri:  # fsspec chaining: tar://member::/media_root/000.tgz
        *outer, target = uri.split("::")
        for part in outer:
            scheme = (part.split("://", 1)[0] if "://" in part else part).lower()
            if scheme not in _ARCHIVES and scheme not in cfg.schemes:
                raise _blocked(f"scheme {scheme} not in fetch.schemes")
        if _is_local(target):
            check_local(target, cfg, local_roots)
            return "fsspec"
        scheme = target.split("://", 1)[0].lower()
        if scheme in _DEFAULT_PORTS and not cfg.allow_private_networks:
            raise _blocked(
                f"{scheme} inside a chained URL is not checked per address (fetch.allow_private_networks)"
            )
        if scheme not in cfg.schemes:
            raise _blocked(f"scheme {scheme} not in fetch.schemes")
        return "fsspec"
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in cfg.schemes:
        raise _blocked(f"scheme {scheme} not in fetch.schemes")
    return "http" if scheme in _DEFAULT_PORTS else "fsspec"


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
