"""Which manifest URIs may be fetched: local roots, public addresses pinned per hop, allowed schemes."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import requests.adapters

from pipelines.config import FetchConfig

# Manifest URIs are untrusted (blocked_url otherwise): local paths only under the source's media_root / local
# url_rewrite targets (fetch.allow_local: anywhere); http(s) only to public addresses, checked on the resolved
# address of every redirect hop and pinned to it (fetch.allow_private_networks, fetch.allowed_hosts); other
# schemes only as listed in fetch.schemes.


class FetchError(Exception):
    """A fetch that failed for good; `reason` is the error row's reason (http_404, timeout, ...)."""

    def __init__(self, reason: str, detail: str, retry: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry = reason, detail, retry


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
