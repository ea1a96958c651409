"""Where logs go: syslog (never blocking), and systemd readiness."""

import contextlib
import json
import os
import shlex
import shutil
import socket
import signal
import subprocess
import sys
import time

import pytest

from conftest import SYNCHOOK, accepts, free_port, http_get, read_text, run, wait_until


def test_notify_socket_gets_ready(start, tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        d = start("--sync", "true", env={"NOTIFY_SOCKET": path})
        message = sock.recv(4096).decode()
        assert message.startswith("READY=1")
        assert "port %d" % d.port in message
        d.stop()
        assert sock.recv(4096).decode() == "STOPPING=1"


def test_a_restart_in_place_is_a_reload_to_systemd(start, tmp_path):
    """SIGUSR2 under systemd: RELOADING=1, then READY=1 from the same pid.  1.6.0
    said STOPPING=1, and systemd, waiting for an exit that never came, killed the
    restarted synchook after TimeoutStopSec (seen in the real guest)."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        d = start("--sync", "true", env={"NOTIFY_SOCKET": path})
        assert sock.recv(4096).startswith(b"READY=1")
        d.signal(signal.SIGUSR2)
        reloading = sock.recv(4096).decode()
        assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC="), reloading
        assert sock.recv(4096).startswith(b"READY=1")
        assert d.proc.poll() is None and http_get(d.port, "/status")[0] == 200
        d.stop()
        assert sock.recv(4096).decode() == "STOPPING=1"


@pytest.mark.root
def test_abstract_notify_socket(start):
    name = "synchook-test-%d" % os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(20)
        start("--sync", "true", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096).startswith(b"READY=1")


def in_private_dev(tmp_path, with_log):
    """Run synchook in a mount namespace whose /dev has null, urandom and maybe log."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (apt-get install util-linux) to give synchook its own /dev/log")
    dev = tmp_path / "dev"
    dev.mkdir()
    os.mknod(str(dev / "null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(str(dev / "urandom"), 0o666 | 0o020000, os.makedev(1, 9))
    receiver = None
    if with_log:
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(dev / "log"))
    probe = run(["unshare", "-m", "sh", "-c", "mount --bind %s /dev && ls /dev" % dev])
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here: " + probe.stderr.strip())
    return dev, receiver


@contextlib.contextmanager
def daemon_in_namespace(tmp_path, with_log, sync):
    """synchook --syslog in its own mount namespace: yields (port, receiver or None)."""
    dev, receiver = in_private_dev(tmp_path, with_log)
    port = free_port()
    log = open(str(tmp_path / "stderr"), "wb")
    cmd = ("mount --bind %s /dev && mount -t tmpfs tmpfs /var/log && "
           "exec %s %s --syslog --listen 127.0.0.1 --port %d "
           "--tls off --runtime-dir %s --sync %s" % (dev, sys.executable, SYNCHOOK, port,
                                                     tmp_path / "run", shlex.quote(sync)))
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], stdout=log, stderr=log)
    try:
        wait_until(lambda: accepts(port, proc), 20, "synchook listening", 0.05)
        yield port, receiver, proc.pid
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        log.close()
        if receiver is not None:
            receiver.close()


def read_datagrams(sock, until, timeout=15):
    sock.settimeout(0.2)
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(65536).decode())
        except socket.timeout:
            if any(until in m for m in got):
                return got
    return got


def http(port, path):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read().decode()


def wait_for_drops(port, timeout=10):
    """The writer thread gets to the full socket shortly after the request."""
    wait_until(lambda: json.loads(http(port, "/status")[1])["log_lines_dropped"], timeout,
               "a log line dropped", 0.1)


@pytest.mark.root
def test_syslog_messages_arrive_with_priority(tmp_path):
    with daemon_in_namespace(tmp_path, True, "exit 3") as (port, receiver, _):
        messages = read_datagrams(receiver, "listening on")
        assert http(port, "/sync")[0] == 500
        messages += read_datagrams(receiver, "GET /sync 500")
        assert any(m.startswith("<28>") and "synchook[" in m and "command failed (exit 3)" in m
                   for m in messages), messages          # daemon.warning = 3*8+4
        assert any(m.startswith("<30>") and "listening on" in m for m in messages)  # info
        stderr = open(str(tmp_path / "stderr")).read()     # start-up lines only
        assert "listening on" in stderr and "command failed" not in stderr, stderr


@pytest.mark.root
@pytest.mark.slow
def test_syslog_full_socket_drops_and_counts(tmp_path):
    with daemon_in_namespace(tmp_path, True, "seq 1 3000") as (port, receiver, _):
        read_datagrams(receiver, "listening on")
        # Nobody reads /dev/log now: the socket fills and the daemon must not block.
        began = time.monotonic()
        assert http(port, "/sync") == (200, "Ok\n")
        assert http(port, "/post-sync")[0] == 200
        assert time.monotonic() - began < 10
        wait_for_drops(port)
        receiver.settimeout(0.5)
        messages = []
        try:
            while True:                          # empty the socket, as syslogd would
                messages.append(receiver.recv(65536).decode())
        except socket.timeout:
            pass
        if not any("log lines dropped" in m for m in messages):
            http(port, "/status")                # the next line carries the report
            messages += read_datagrams(receiver, "log lines dropped")
        assert any("log lines dropped" in m for m in messages), messages[-5:]


@pytest.mark.root
def test_syslog_missing_socket_logs_to_the_fallback_file(tmp_path):
    """Busybox guests often run no syslog daemon: --syslog then writes the file."""
    with daemon_in_namespace(tmp_path, False, "echo from-the-hook") as (port, _, pid):
        assert http(port, "/sync") == (200, "Ok\n")
        path = "/proc/%d/root/var/log/synchook.log" % pid
        time.sleep(0.3)
        # Held while the window is open (the file's filesystem may be the frozen one)...
        assert "sync| from-the-hook" not in open(path).read()
        assert http(port, "/post-sync") == (200, "Ok\n")
        wait_until(lambda: "sync| from-the-hook" in read_text(path), 10, step=0.05)
        text = read_text(path)
        assert "no syslog socket at /dev/log: logging to /var/log/synchook.log" in text, text
        assert "sync| from-the-hook" in text and "listening on" in text
        assert json.loads(http(port, "/status")[1])["log_lines_dropped"] == 0


@pytest.mark.root
def test_syslog_start_up_lines_also_on_stderr_until_listening(tmp_path):
    """An init script keeps stderr: a failed start's own error line is there."""
    with daemon_in_namespace(tmp_path, True, "echo later") as (port, receiver, _):
        read_datagrams(receiver, "listening on")
        assert http(port, "/sync") == (200, "Ok\n")
        read_datagrams(receiver, "sync| later")
        stderr = open(str(tmp_path / "stderr")).read()
        assert "listening on" in stderr and "sync| later" not in stderr, stderr


@pytest.mark.root
def test_syslog_gets_a_bad_setting_too(tmp_path):
    dev, receiver = in_private_dev(tmp_path, True)
    try:
        out = run(["unshare", "-m", "sh", "-c", "mount --bind %s /dev && exec %s %s --syslog "
                   "--timeout never" % (dev, sys.executable, SYNCHOOK)])
        assert out.returncode == 2
        assert "--timeout never: not a number of seconds" in out.stderr
        messages = read_datagrams(receiver, "not a number of seconds", timeout=5)
        assert any(m.startswith("<27>") and "--timeout never" in m for m in messages), messages
    finally:
        receiver.close()


# The log in a file: held while a window is open, never stopped -------------------------

def daemon_logging_to_file(tmp_path, *args):
    """synchook with its stderr in a file (as under SysV or rc.local): (proc, port, path)."""
    port = free_port()
    path = tmp_path / "synchook.log"
    with open(str(path), "ab") as log:
        proc = subprocess.Popen([sys.executable, SYNCHOOK, "--port", str(port), "--listen",
                                 "127.0.0.1", "--tls", "off", "--runtime-dir",
                                 str(tmp_path / "run")] + list(args),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    wait_until(lambda: accepts(port, proc) and "listening on" in path.read_text(), 20,
               path.read_text, 0.02)
    return proc, port, path


@pytest.mark.slow
def test_log_in_a_file_never_stops_with_windows_back_to_back(tmp_path):
    """XO snapshots twice in a row: the second /sync arrives while the first
    window's post phase runs (a hold() right after a release()).  1.4.0's
    writer ended there in about one round in three, and every later line was
    lost."""
    import threading
    running = tmp_path / "post-running"
    proc, port, path = daemon_logging_to_file(tmp_path, "--sync", "true", "--post-sync",
                                              "touch %s; sleep 0.05" % running)
    try:
        for round_ in range(25):
            assert http_get(port, "/sync")[0] == 200
            second = threading.Thread(target=lambda: http_get(port, "/sync"))
            post = threading.Thread(target=lambda: http_get(port, "/post-sync"))
            if running.exists():
                running.unlink()                       # the last round's final post phase
            post.start()
            # The post phase runs: now the next /sync, as XO's second snapshot.
            wait_until(running.exists, 10, "the post phase running", 0.002)
            second.start()
            post.join(10)
            second.join(10)
            assert http_get(port, "/post-sync")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = path.read_text()
    assert text.count("window closed (/post-sync): Ok") == 50, text[-3000:]
    assert "SIGTERM received: shutting down" in text and text.rstrip().endswith("stopped"), \
        text[-2000:]


def test_lines_held_in_a_window_survive_a_sigkill(tmp_path):
    """The log in a file is held while a window is open; the lines wait in the
    runtime dir (tmpfs), so the guardian's recovery writes them out after a
    SIGKILL."""
    proc, port, path = daemon_logging_to_file(tmp_path, "--sync", "echo held-line-marker",
                                              "--post-sync", "true")
    try:
        assert http_get(port, "/sync") == (200, "Ok")
        time.sleep(0.3)
        assert "sync| held-line-marker" not in path.read_text()    # held: a window is open
        proc.kill()
        proc.wait(5)
        wait_until(lambda: "window closed (recover): Ok" in path.read_text(), 10,
                   path.read_text, 0.05)
        text = path.read_text()
        assert "sync| held-line-marker" in text, text
        assert "(the lines above were held by a synchook that ended before it could write " \
               "them)" in text
        assert text.index("sync| held-line-marker") < text.index("window closed (recover)")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_journal_lines_of_a_window_carry_their_own_time(start):
    """journald blocks on a frozen / and stamps lines when it reads them, after the
    thaw: the lines logged while a window is open carry synchook's own time."""
    d = start("--sync", "true", "--post-sync", "true", env={"JOURNAL_STREAM": "8:1234"})
    assert d.get("/sync") == (200, "Ok")
    d.wait_log(r"(?m)^<6>\[\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d\] window opened by 127\.0\.0\.1$")
    assert d.get("/post-sync") == (200, "Ok")
    d.wait_log(r"(?m)^<6>127\.0\.0\.1 GET /post-sync 200")        # released: plain again
