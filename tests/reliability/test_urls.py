"""Untrusted manifest URLs (issue #13): local paths, private/metadata addresses, redirects, DNS rebinding.

Traffic goes to loopback only, even when the code under test is broken: address rules are tested as pure
functions, names resolve through an injected resolver, and an autouse guard makes socket connects and DNS
lookups to anything but 127.0.0.1/::1 fail the test (they raise, and are recorded) instead of going out.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from pipelines.config import FetchConfig
from pipelines.stages.fetch import (
    FetchError,
    FetchStage,
    PinnedAdapter,
    _Pinned,
    address_problem,
    check_uri,
    fetch_one,
    new_session,
)
from pipelines.stages.rows import new_row, rows_of, table_of

IMAGE = b"\x89PNG\r\n\x1a\n" + b"i" * 100
CFG = FetchConfig(connect_timeout_s=2, read_timeout_s=2, total_timeout_s=5, retries=0, backoff_s=0.01)


def _loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """Connects and DNS lookups to anything but loopback literals raise (and are recorded: asserted empty)."""
    outside: list = []
    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def check(address):
        host = address[0] if isinstance(address, tuple) else address
        if not _loopback(host):
            outside.append(address)
            raise ConnectionRefusedError(f"test guard: connection to {address!r} refused (loopback only)")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            outside.append(("dns", host))
            raise socket.gaierror(f"test guard: no DNS lookup of {host!r} (loopback literals only)")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield outside
    assert outside == [], f"traffic left loopback: {outside}"


def resolver(answers: dict[str, list[str]], calls: list | None = None):
    """A fake getaddrinfo: name -> its answers (one per call, the last one repeats)."""
    served: dict[str, int] = {}

    def resolve(host, port, *args, **kwargs):
        if calls is not None:
            calls.append(host)
        if host not in answers:  # an IP literal answers itself, as getaddrinfo does
            try:
                ip = str(ipaddress.ip_address(host))
            except ValueError:
                raise socket.gaierror(f"unknown test host {host}") from None
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (ip, port))]
        i = served.get(host, 0)
        served[host] = i + 1
        ip = answers[host][min(i, len(answers[host]) - 1)]
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (ip, port))]

    return resolve


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.seen.append((self.path, self.headers.get("Host")))
        routes = self.server.routes
        if self.path in routes:
            self.send_response(302)
            self.send_header("Location", routes[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/img":
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


def _serve():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.seen, httpd.routes = [], {}
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    httpd.hostport = f"127.0.0.1:{httpd.server_address[1]}"
    httpd.url = f"http://{httpd.hostport}"
    return httpd


@pytest.fixture(scope="module")
def servers():
    a, b = _serve(), _serve()
    yield a, b
    for httpd in (a, b):
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(servers):
    for httpd in servers:
        httpd.seen.clear()
    return servers


def cfg(**kw) -> FetchConfig:
    return FetchConfig(**{**CFG.__dict__, **kw})


def blocked(uri: str, config: FetchConfig = CFG, **kw) -> str:
    with pytest.raises(FetchError) as info:
        fetch_one(uri, config, **kw)
    assert info.value.reason == "blocked_url", info.value
    return info.value.detail


# --- address rules: pure functions on IP strings ----------------------------------------------------------


@pytest.mark.parametrize(
    "ip, rule",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud instance metadata
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6 (ULA)
        ("fc00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.100.100.200", "non-global"),  # shared address space (Alibaba metadata)
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.1.2.3", "private"),
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ],
)
def test_non_public_addresses_are_named(ip, rule):
    problem = address_problem(ip)
    assert problem is not None and problem.startswith(f"{rule} address {ip}"), problem


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(ip):
    assert address_problem(ip) is None


# --- http(s): resolved addresses, every redirect hop, pinning ------------------------------------------------


def test_loopback_server_refused_by_default_and_fetched_when_allowed(server):
    a, _ = server
    detail = blocked(f"{a.url}/img")
    assert "loopback address 127.0.0.1" in detail and "fetch.allow_private_networks" in detail
    assert a.seen == []
    assert fetch_one(f"{a.url}/img", cfg(allowed_hosts=[a.hostport])).data == IMAGE
    assert a.seen == [("/img", a.hostport)]
    assert blocked(f"{a.url}/img", cfg(allowed_hosts=["127.0.0.1:1"]))  # another port is not this host


@pytest.mark.parametrize(
    "ip", ["169.254.169.254", "10.0.0.1", "192.168.0.10", "::ffff:169.254.169.254", "0.0.0.0"]
)
def test_names_resolving_to_private_addresses_are_refused(ip):
    calls: list = []
    resolve = resolver({"meta.example": [ip]}, calls)
    detail = blocked("http://meta.example/latest/meta-data/", resolve=resolve)
    assert ip in detail and "meta.example" in detail and "fetch.allow_private_networks" in detail
    assert calls == ["meta.example"]


def test_any_bad_address_among_the_answers_refuses():
    def resolve(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port)),
        ]

    assert "link-local address 169.254.169.254" in blocked("https://mixed.example/x.jpg", resolve=resolve)


def test_redirect_to_metadata_is_refused_at_the_hop(server):
    a, _ = server
    a.routes["/to-meta"] = "http://localhost.example/latest/meta-data/"
    resolve = resolver({"localhost.example": ["169.254.169.254"]})
    detail = blocked(f"{a.url}/to-meta", cfg(allowed_hosts=[a.hostport]), resolve=resolve)
    assert "link-local address 169.254.169.254" in detail
    assert a.seen == [("/to-meta", a.hostport)]


def test_redirect_to_another_loopback_port_is_refused(server):
    a, b = server
    a.routes["/to-b"] = f"{b.url}/img"
    detail = blocked(f"{a.url}/to-b", cfg(allowed_hosts=[a.hostport]))
    assert "loopback address 127.0.0.1" in detail
    assert b.seen == []
    both = cfg(allowed_hosts=[a.hostport, b.hostport])
    assert fetch_one(f"{a.url}/to-b", both).data == IMAGE  # allowed hop: followed
    assert b.seen == [("/img", b.hostport)]


def test_redirect_to_other_schemes_is_refused(server):
    a, _ = server
    a.routes["/to-file"] = "file:///etc/hostname"
    a.routes["/to-ftp"] = "ftp://example.com/x"
    allowed = cfg(allowed_hosts=[a.hostport])
    assert "file" in blocked(f"{a.url}/to-file", allowed)
    assert "ftp" in blocked(f"{a.url}/to-ftp", allowed)


def test_redirects_are_capped(server):
    a, _ = server
    a.routes["/loop"] = "/loop"
    with pytest.raises(FetchError) as info:
        fetch_one(f"{a.url}/loop", cfg(allowed_hosts=[a.hostport], max_redirects=2))
    assert info.value.reason == "fetch_failed" and "fetch.max_redirects=2" in info.value.detail
    assert len(a.seen) == 3


def test_dns_rebinding_connection_stays_on_the_checked_address(server):
    a, _ = server
    port = a.server_address[1]
    calls: list = []
    resolve = resolver({"rebind.example": ["127.0.0.1", "10.0.0.1"]}, calls)  # a second lookup: private
    config = cfg(allow_private_networks=False, allowed_hosts=["rebind.example"])
    got = fetch_one(f"http://rebind.example:{port}/img", config, resolve=resolve)
    assert got.data == IMAGE
    assert a.seen == [("/img", f"rebind.example:{port}")]  # the checked address got it, Host kept the name
    assert calls == ["rebind.example"]  # resolved once; the guard proves nothing went to 10.0.0.1


def test_rebinding_across_a_redirect_is_checked_again(server):
    a, _ = server
    port = a.server_address[1]
    a.routes["/again"] = f"http://rebind2.example:{port}/img"
    resolve = resolver({"rebind2.example": ["10.0.0.1"]})
    detail = blocked(f"{a.url}/again", cfg(allowed_hosts=[a.hostport]), resolve=resolve)
    assert "private address 10.0.0.1" in detail


def test_adapter_refuses_unpinned_requests_and_pins_https(server):
    a, _ = server
    with pytest.raises(requests.exceptions.InvalidURL):
        new_session().get(f"{a.url}/img", timeout=2)  # not through fetch_one: no checked address
    assert a.seen == []
    adapter = PinnedAdapter()
    request = requests.Request("GET", "https://img.example/x.jpg").prepare()
    request.pinned = _Pinned(request.url, "https", "img.example", 443, "93.184.216.34", "img.example")
    host_params, pool_kwargs = adapter.build_connection_pool_key_attributes(request, True)
    assert (host_params["host"], host_params["port"]) == ("93.184.216.34", 443)
    assert pool_kwargs["server_hostname"] == pool_kwargs["assert_hostname"] == "img.example"


# --- local paths ----------------------------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"inside")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"outside")
    os.symlink(outside, root / "link.jpg")
    return root, outside


def test_local_paths_only_under_media_root(media):
    root, outside = media
    roots = [str(root)]
    assert fetch_one(str(root / "sub" / "a.jpg"), CFG, local_roots=roots).local_path == str(
        root / "sub" / "a.jpg"
    )
    assert fetch_one(f"file://{root}/sub/a.jpg", CFG, local_roots=roots).local_path == str(
        root / "sub" / "a.jpg"
    )
    for uri in (
        "/etc/hostname",
        "file:///etc/hostname",
        "file://localhost/etc/hostname",
        "file://evil.example/etc/hostname",
        f"{root}/../outside.jpg",
        f"{root}/sub/../../outside.jpg",
        str(root / "link.jpg"),  # a symlink inside pointing outside
        str(outside),
        f"{root}-other/x.jpg",  # a sibling sharing the prefix
    ):
        detail = blocked(uri, local_roots=roots)
        assert "fetch.allow_local" in detail or "file:// URL with host" in detail, (uri, detail)
    assert "fetch.allow_local" in blocked(str(root / "sub" / "a.jpg"))  # no media_root: nothing local


def test_allow_local_allows_any_path(media):
    root, outside = media
    anywhere = cfg(allow_local=True)
    assert fetch_one(str(outside), anywhere).local_path == str(outside)
    assert fetch_one(str(root / "link.jpg"), anywhere).local_path == str(outside)
    assert fetch_one(f"{root}/../outside.jpg", anywhere).local_path == str(outside)
    try:  # allowed: fetched, or not_found where the file is missing
        assert fetch_one("/etc/hostname", anywhere).local_path == os.path.realpath("/etc/hostname")
    except FetchError as exc:
        assert exc.reason == "not_found", exc


# --- schemes --------------------------------------------------------------------------------------------------


def test_other_schemes_only_when_listed(media):
    root, outside = media
    assert blocked("ftp://x") == "scheme ftp not in fetch.schemes"
    assert blocked("s3://bucket/k") == "scheme s3 not in fetch.schemes"
    assert blocked("gs://bucket/k") == "scheme gs not in fetch.schemes"
    assert "https not in fetch.schemes" in blocked("https://example.com/x", cfg(schemes=["http"]))
    assert (
        check_uri("s3://bucket/k", cfg(schemes=["http", "https", "s3"])) == "fsspec"
    )  # decided, not fetched
    import fsspec

    with fsspec.open("memory://lc-urls/x.bin", "wb") as f:
        f.write(b"mem")
    assert blocked("memory://lc-urls/x.bin") == "scheme memory not in fetch.schemes"
    assert fetch_one("memory://lc-urls/x.bin", cfg(schemes=["http", "https", "memory"])).data == b"mem"
    # fsspec chains are judged by what they wrap
    assert check_uri(f"tar://a.jpg::{root}/000.tgz", CFG, [str(root)]) == "fsspec"
    assert "fetch.allow_local" in blocked(f"tar://a.jpg::{outside}", local_roots=[str(root)])
    assert "fetch.allow_private_networks" in blocked("tar://a.jpg::http://169.254.169.254/x.tgz")
    assert blocked("simplecache::s3://b/k") == "scheme simplecache not in fetch.schemes"


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match="fetch.schemes"):
        FetchConfig(schemes=["file"])
    with pytest.raises(ValueError, match="fetch.schemes"):
        FetchConfig(schemes=["s3://bad/"])
    with pytest.raises(ValueError, match="fetch.allowed_hosts"):
        FetchConfig(allowed_hosts=["http://example.com/"])
    with pytest.raises(ValueError, match="fetch.max_redirects"):
        FetchConfig(max_redirects=-1)
    with pytest.raises(ValueError, match="fetch.allow_local"):
        FetchConfig(allow_local="yes")
    assert FetchConfig(allowed_hosts=["LocalHost.", "[::1]:80", "127.0.0.1:8765"]).allowed_hosts == [
        "localhost",
        "[::1]:80",
        "127.0.0.1:8765",
    ]
    assert FetchConfig(schemes=["HTTP", "s3://"]).schemes == ["http", "s3"]


# --- the stage and the job ------------------------------------------------------------------------------------


def test_stage_turns_each_refusal_into_one_blocked_url_row(server, media):
    a, _ = server
    root, outside = media
    a.routes["/to-meta2"] = "http://localhost.example/"
    uris = {
        "ok_http": f"{a.url}/img",
        "ok_local": str(root / "sub" / "a.jpg"),
        "meta": "http://169.254.169.254/latest/meta-data/",
        "meta_name": "http://meta.example/",
        "hop": f"{a.url}/to-meta2",
        "etc": "/etc/hostname",
        "file": "file:///etc/hostname",
        "dotdot": f"{root}/../outside.jpg",
        "link": str(root / "link.jpg"),
        "ftp": "ftp://x",
        "s3": "s3://bucket/k",
        "v6": "http://[::ffff:169.254.169.254]/",
    }
    rows = [
        new_row(
            key=k, source="laion_coco", uri=u, kind="image", stage="256x256", shard=0, shard_rows=len(uris)
        )
        for k, u in uris.items()
    ]
    resolve = resolver({"meta.example": ["169.254.169.254"], "localhost.example": ["169.254.169.254"]})
    stage = FetchStage(
        cfg(allowed_hosts=[a.hostport]),
        local_roots={"laion_coco": [str(root)], "jdb": ["/"]},
        resolve=resolve,
    )
    out = rows_of(stage(table_of(rows)))
    assert [r["key"] for r in out] == list(uris)
    assert out[0]["data"] == IMAGE and out[0]["err_stage"] == ""
    assert out[1]["local_path"] == str(root / "sub" / "a.jpg") and out[1]["err_stage"] == ""
    for row in out[2:]:
        assert (row["err_stage"], row["err_reason"]) == ("fetch", "blocked_url"), row
        assert row["err_detail"] and row["data"] is None
    # the roots are per source: a jdb root does not open up laion_coco rows
    assert sum(r["err_reason"] == "blocked_url" for r in out) == len(uris) - 2


def test_job_local_roots_and_own_server(tmp_path):
    from encoders.models import ModelsConfig
    from pipelines.config import PipelineConfig, SourceConfig
    from pipelines.job.run import _allow_servers, _local_roots

    manifest = tmp_path / "jdb" / "anno.jsonl"
    config = PipelineConfig(
        out_dir=str(tmp_path / "out"),
        models=ModelsConfig(model_dir=str(tmp_path / "models")),
        sources=[
            SourceConfig(name="webvid", manifest="m.csv", media_root=str(tmp_path / "videos")),
            SourceConfig(
                name="laion_coco",
                manifest="m.parquet",
                url_rewrite={"http://a/": "file:///data/laion/", "http://b/": "http://mirror/"},
            ),
            SourceConfig(name="jdb", manifest=str(manifest)),
        ],
    )
    roots = _local_roots(config)
    assert roots == {
        "webvid": [str(tmp_path / "videos")],
        "laion_coco": ["/data/laion"],
        "jdb": [str(tmp_path / "jdb" / "imgs")],
    }

    class _Server:
        url = "http://127.0.0.1:4321"

    allowed = _allow_servers(config, [_Server()])
    assert allowed.fetch.allowed_hosts == ["127.0.0.1:4321"] and config.fetch.allowed_hosts == []
