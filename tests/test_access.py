"""Who may call, and what a hostile client may cost."""

import base64
import collections
import http.client
import json
import re
import resource
import socket
import ssl
import sys
import threading
import time

import pytest

from conftest import SYNCHOOK, client_context, run, wait_until


def bearer(secret):
    return {"Authorization": "Bearer " + base64.b64encode(secret.encode()).decode()}


def test_secret_as_query_token_or_bearer_header(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              env={"SYNCHOOK_SECRET": "s3 cr=t&"})
    assert d.get("/sync")[0] == 403
    assert d.get("/sync?token=wrong")[0] == 403
    assert d.get("/sync", headers=bearer("wrong"))[0] == 403
    assert d.get("/sync", headers={"Authorization": "Bearer s3 cr=t&"})[0] == 403  # not base64
    assert d.get("/status")[0] == 403
    assert rec.lines() == []
    assert d.get("/sync?token=s3%20cr%3Dt%26", tls=True) == (200, "Ok")
    assert d.get("/post-sync", headers=bearer("s3 cr=t&")) == (200, "Ok")
    assert d.get("/status", headers={"authorization": "bearer   " + bearer("s3 cr=t&")[
        "Authorization"].split()[1]})[0] == 200
    assert rec.lines() == ["sync", "post"]


def test_secret_file_and_warning_for_flag(start, tmp_path, rec):
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    d = start("--secret-file", str(path), "--sync", rec.cmd("sync"))
    assert d.get("/sync?token=from-file")[0] == 200
    assert "visible in ps" not in d.log()
    d2 = start("--secret", "on-the-command-line", "--sync", "true")
    d2.wait_log(r"warning: --secret on the command line is visible in ps")


def test_allow_list_ipv4(start, rec):
    d = start("--allow", "127.0.0.2", "--sync", rec.cmd("sync"))
    # A loopback client left out by --allow may read /status (synchook status), no more.
    assert d.get("/sync", source="127.0.0.1", timeout=5) == (
        403, "forbidden: not in --allow (loopback may read /status only)")
    assert d.get("/status", source="127.0.0.1")[0] == 200
    assert d.get("/sync", source="127.0.0.2") == (200, "Ok")
    assert rec.lines() == ["sync"]


def host_address():
    """A non-loopback IPv4 address of this machine, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))          # no packet is sent
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_allow_none_refuses_everyone_until_configured(start, rec):
    """--allow none (a package's closed start): a remote client's connection is
    closed unanswered, loopback gets /status and a 403 that says how to open it;
    nothing runs; the start says so too."""
    d = start("--allow", "none", "--listen", "0.0.0.0", "--sync", rec.cmd("sync"))
    d.wait_log(r"warning: --allow none: every client is refused, XO included; closed until "
               r"configured: synchook configure --allow XO_ADDRESS")
    status, body = d.get("/sync", timeout=5)
    assert status == 403 and "--allow none, closed until configured" in body, body
    status, body = d.get("/status")
    assert status == 200 and json.loads(body)["client_allowed"] is False
    remote = host_address()
    if remote is not None:
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            d.get("/sync", host=remote, timeout=5)
        d.wait_log(r"%s: connection refused: --allow none, closed until configured"
                   % re.escape(remote))
    assert rec.lines() == []
    for bad in ("none,10.0.0.1", "10.0.0.1,none"):
        result = run([sys.executable, SYNCHOOK, "check", "--parse-only", "--allow", bad])
        assert result.returncode == 2 and "'none' lets no one in" in result.stderr, result.stderr


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_allow_list_ipv6_and_ipv4_mapped(start, rec):
    d = start("--listen", "::", "--allow", "::1,127.0.0.2/32", "--sync", rec.cmd("sync"))
    assert d.get("/sync", host="::1") == (200, "Ok")
    # 127.0.0.2 reaches the dual-stack socket as ::ffff:127.0.0.2: its IPv4 entry matches
    assert d.get("/sync", host="127.0.0.1", source="127.0.0.2") == (200, "Ok")
    assert d.get("/sync", host="127.0.0.1", source="127.0.0.1", timeout=5)[0] == 403
    assert rec.lines() == ["sync"]


@pytest.mark.slow
def test_slowloris_dropped_after_header_timeout(start, rec):
    d = start("--header-timeout", "1", "--sync", rec.cmd("sync"))
    sock = socket.create_connection(("127.0.0.1", d.port))
    began = time.monotonic()
    closed_after = None
    try:
        for byte in b"GET /sync HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            sock.send(bytes([byte]))
            time.sleep(0.2)          # each byte well within any per-read timeout
    except OSError:
        closed_after = time.monotonic() - began
    sock.close()
    assert closed_after is not None and closed_after < 4
    assert rec.lines() == []


def read_all(sock):
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


@pytest.mark.parametrize("payload,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET /sync HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET /sync HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100)) + b"\r\n",
     b"431"),
    (b"GET /sync HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 4000)
                                         for i in range(20)) + b"\r\n", b"431"),
])
@pytest.mark.slow
def test_oversized_heads_refused(start, rec, payload, status):
    d = start("--sync", rec.cmd("sync"))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass
        assert read_all(sock).split(b" ")[1] == status
    assert rec.lines() == []


def test_tls_garbage_dropped(start, rec):
    d = start("--sync", rec.cmd("sync"))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x10" + b"\xff" * 64)
        assert read_all(sock)[:5] != b"HTTP/"
    assert d.get("/sync", tls=True) == (200, "Ok")
    assert rec.lines() == ["sync"]


@pytest.mark.slow
def test_silent_connection_dropped(start):
    d = start("--header-timeout", "1", "--sync", "true")
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        began = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - began < 4


def thread_count(pid):
    with open("/proc/%d/status" % pid) as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


@pytest.mark.slow
def test_thousand_stalled_connections_do_not_starve_sync(start, rec):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2200 and hard != resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_NOFILE hard limit %d is below 2200" % hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    stalled = []
    kinds = [b"", b"GET /sync HTT", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
    try:
        for i in range(1000):
            sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            if kinds[i % 3]:
                sock.sendall(kinds[i % 3])
            stalled.append(sock)
        time.sleep(0.5)
        threads, rss = thread_count(d.proc.pid)
        took = {}
        for tls in (False, True):
            began = time.monotonic()
            assert d.get("/sync", tls=tls, timeout=10) == (200, "Ok")
            took[tls] = time.monotonic() - began
            assert took[tls] < 2.0, "/sync took %.2f s behind 1,000 stalled connections" % took[tls]
        assert d.get("/post-sync", timeout=10) == (200, "Ok")
        print("\n1000 stalled: server threads %d, RSS %d kB; /sync answered in %.1f ms (HTTP), "
              "%.1f ms (HTTPS)" % (threads, rss, took[False] * 1000, took[True] * 1000))
        assert threads <= 256 + 40         # the cap, and spares on a loaded 2-core machine
    finally:
        for sock in stalled:
            sock.close()
    assert rec.lines() == ["sync", "post"]


@pytest.mark.slow
def test_connections_busy_with_real_requests_are_not_evicted(start, rec):
    d = start("--max-connections", "4", "--log-level", "debug", "--sync",
              "sleep 1; " + rec.cmd("sync"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(d.get("/sync")))
               for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    flood = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(20)]
    for t in threads:
        t.join(20)
    for sock in flood:
        sock.close()
    assert results == [(200, "Ok")] * 3
    d.wait_log(r"connection limit: dropped the oldest (new|idle) connection|wait on a command")


def client_hello():
    """The first flight of a real TLS client, made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@pytest.mark.slow
def test_slow_tls_handshake_dropped_after_header_timeout(start, rec):
    d = start("--header-timeout", "1", "--sync", rec.cmd("sync"))
    hello = client_hello()
    sock = socket.create_connection(("127.0.0.1", d.port))
    began = time.monotonic()
    closed_after = None
    try:
        for i in range(len(hello)):
            sock.send(hello[i:i + 1])
            time.sleep(0.2)
            if i > 40:
                break
        sock.settimeout(10)
        while sock.recv(65536):
            pass
        closed_after = time.monotonic() - began
    except OSError:
        closed_after = time.monotonic() - began
    sock.close()
    assert closed_after is not None and closed_after < 4
    assert d.get("/sync", tls=True) == (200, "Ok")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_default_listen_is_dual_stack(start, rec):
    d = start("--listen", "", "--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    d.wait_log(r"listening on \[::\] port")
    assert d.get("/sync", host="127.0.0.1") == (200, "Ok")
    assert d.get("/post-sync", host="::1", tls=True) == (200, "Ok")
    assert rec.lines() == ["sync", "post"]
    d.wait_log(r"127\.0\.0\.1 GET /sync 200")         # mapped address logged as IPv4


@pytest.mark.slow
def test_a_flood_of_idle_connections_never_pushes_xo_out(start, rec):
    """A small cap, no --allow: strangers (127.0.0.2) open idle connections as
    fast as they can; XO (127.0.0.1, known by an earlier valid request) still
    gets every /sync and /post-sync through.  1.4.0 dropped XO's connection
    to make room for the next idle one."""
    d = start("--max-connections", "8", "--log-level", "debug",
              "--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    stop = threading.Event()
    opened = []

    def flood():
        held = collections.deque()
        while not stop.is_set():
            try:
                sock = socket.socket()
                sock.bind(("127.0.0.2", 0))
                sock.connect(("127.0.0.1", d.port))
                held.append(sock)
                opened.append(1)
            except OSError:
                sock.close()
            while len(held) > 40:
                held.popleft().close()
        for sock in held:
            sock.close()

    flooders = [threading.Thread(target=flood) for _ in range(4)]
    for t in flooders:
        t.start()
    try:
        wait_until(lambda: len(opened) > 200, 10)
        for _ in range(5):                # HTTPS, as XO: a handshake to push out
            assert d.get("/sync", tls=True, timeout=10) == (200, "Ok")
            assert d.get("/post-sync", tls=True, timeout=10) == (200, "Ok")
    finally:
        stop.set()
        for t in flooders:
            t.join(10)
    assert rec.lines() == ["sync", "post"] * 6
