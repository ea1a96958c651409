"""The port is never free while synchook restarts: socket activation
(LISTEN_FDS, as systemd's synchook.socket passes it) and the restart in place
(SIGUSR2: the init scripts' restart), which keeps the listening socket."""

import os
import shutil
import signal
import socket
import sys
import threading
import time

import pytest

from conftest import SYNCHOOK, free_port, wait_until


def hammer(d, stop, results):
    """/status again and again, each on a new connection, until stop."""
    while not stop.is_set():
        try:
            results.append(d.get("/status", timeout=10)[0])
        except OSError as err:
            results.append(repr(err))


def port_thief(port, stop, taken):
    """A local user binding the port in a loop, as fast as it can."""
    while not stop.is_set():
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            taken.append(True)
        except OSError:
            pass
        finally:
            sock.close()


@pytest.mark.slow
def test_restart_in_place_keeps_the_port_and_every_connection(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    pid = d.proc.pid
    stop, results, taken = threading.Event(), [], []
    workers = [threading.Thread(target=hammer, args=(d, stop, results)) for _ in range(3)]
    workers.append(threading.Thread(target=port_thief, args=(d.port, stop, taken)))
    for t in workers:
        t.start()
    try:
        for restarts in range(1, 4):
            time.sleep(0.3)
            d.signal(signal.SIGUSR2)
            wait_until(lambda: d.log().count("listening on") == restarts + 1, 20)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in workers:
            t.join(20)
    assert d.proc.pid == pid and d.proc.poll() is None       # the same process
    assert len(results) > 20 and set(results) == {200}, set(map(str, results))
    assert not taken, "another program bound the port during a restart"
    assert d.get("/sync") == (200, "Ok") and d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]


@pytest.mark.slow
def test_restart_in_place_waits_for_the_open_window(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGUSR2)
    d.wait_log(r"SIGUSR2 received: restarting in place, once no window is open")
    time.sleep(1.5)
    assert d.log().count("listening on") == 1           # not yet: XO is snapshotting
    assert '"state": "open"' in d.get("/status")[1]
    assert d.get("/post-sync") == (200, "Ok")
    wait_until(lambda: d.log().count("listening on") == 2, 20)
    assert rec.lines() == ["sync", "post"]              # the post phase ran once


def test_restart_in_place_reads_the_settings_anew(start, rec, tmp_path):
    config = tmp_path / "synchook.conf"
    config.write_text("SYNCHOOK_SYNC='%s'\n" % rec.cmd("old"))
    os.chmod(str(config), 0o600)
    d = start("--config", str(config))
    assert d.get("/sync") == (200, "Ok") and d.get("/post-sync") == (200, "Ok")
    config.write_text("SYNCHOOK_SYNC='%s'\n" % rec.cmd("new"))
    d.signal(signal.SIGUSR2)
    wait_until(lambda: d.log().count("listening on") == 2, 20)
    assert d.get("/sync") == (200, "Ok") and d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["old", "new"]


ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="no systemd-socket-activate "
                                    "(Debian's systemd package ships it)")


def activated(start, port, *args):
    """synchook under systemd-socket-activate, which binds the port and starts
    the program at the first connection (as a socket unit would at boot)."""
    python = os.environ.get("SYNCHOOK_TEST_PYTHON") or sys.executable
    d = start("--port", str(port), *args, wait=False,
              command=[ACTIVATE, "-l", "127.0.0.1:%d" % port, python, SYNCHOOK])
    wait_until(lambda: "Listening on" in d.log(), 10)
    d.port = port
    assert d.get("/status")[0] == 200          # waited in the socket's queue
    d.wait_listening()
    return d


@needs_activate
def test_socket_activation_serves_on_the_socket_systemd_passes(start, rec, tmp_path):
    port = free_port()
    env_file = tmp_path / "env"
    d = activated(start, port, "--sync", "env > %s; ls /proc/self/fd > %s.fds; %s"
                  % (env_file, env_file, rec.cmd("sync")), "--post-sync", rec.cmd("post"))
    assert d.port == port
    assert d.get("/sync") == (200, "Ok") and d.get("/post-sync") == (200, "Ok")
    assert "LISTEN_" not in env_file.read_text()        # the socket is not the commands'
    assert sorted(int(fd) for fd in (tmp_path / "env.fds").read_text().split()) == [0, 1, 2, 3]
    assert rec.lines() == ["sync", "post"]


@needs_activate
def test_a_passed_socket_on_another_port_is_used_and_said(start, rec):
    port = free_port()
    python = os.environ.get("SYNCHOOK_TEST_PYTHON") or sys.executable
    d = start("--port", "1727", "--sync", rec.cmd("sync"), wait=False,
              command=[ACTIVATE, "-l", "127.0.0.1:%d" % port, python, SYNCHOOK])
    wait_until(lambda: "Listening on" in d.log(), 10)
    d.port = port
    assert d.get("/status")[0] == 200
    d.wait_log(r"listening on port %d, the socket systemd passed \(synchook.socket\), not on "
               r"--port 1727" % port)
    assert d.get("/sync") == (200, "Ok")


@needs_activate
def test_two_passed_sockets_are_refused(start, tmp_path):
    python = os.environ.get("SYNCHOOK_TEST_PYTHON") or sys.executable
    first = free_port()
    d = start("--port", str(first),
              command=[ACTIVATE, "-l", "127.0.0.1:%d" % first, "-l",
                       "127.0.0.1:%d" % free_port(), python, SYNCHOOK], wait=False)
    wait_until(lambda: "Listening on" in d.log(), 10)
    socket.create_connection(("127.0.0.1", first)).close()
    assert d.proc.wait(20) == 2
    assert "error: LISTEN_FDS=2: synchook takes one socket" in d.log()


def test_the_socket_passed_stays_listening_after_synchook_stops(start, rec):
    """As systemd holds synchook.socket: this test keeps the listening socket,
    passes it (LISTEN_FDS, descriptor 3) to a synchook that is then stopped, and
    to the next one.  The socket must still listen in between (1.6.0's first
    build shut it down for everyone: systemd's restart then failed), and a
    connection made in between is answered by the next synchook."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(16)
    port = held.getsockname()[1]
    python = os.environ.get("SYNCHOOK_TEST_PYTHON") or sys.executable

    def activated_here():
        wrapper = [python, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); "
                   "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                   "os.execv(sys.argv[2], sys.argv[2:])", str(held.fileno()), python, SYNCHOOK]
        return start("--port", str(port), "--sync", rec.cmd("sync"), command=wrapper,
                     pass_fds=(held.fileno(),))

    first = activated_here()
    assert first.get("/status")[0] == 200
    first.signal(signal.SIGTERM)
    assert first.proc.wait(20) == 0
    assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    waiting = socket.create_connection(("127.0.0.1", port), timeout=30)   # queued meanwhile
    second = activated_here()
    waiting.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert waiting.recv(100).startswith(b"HTTP/1.1 200")
    waiting.close()
    assert second.get("/sync") == (200, "Ok")
    # A restart in place keeps the socket systemd's: the stop after it leaves it
    # listening too (1.6.0 then took it for its own, and systemd's socket unit
    # failed: "Got POLLHUP on a listening socket", seen in the real guest).
    assert second.get("/post-sync") == (200, "Ok")
    second.signal(signal.SIGUSR2)
    assert wait_until(lambda: second.log().count(" listening on ") == 2, 20), second.log()
    second.signal(signal.SIGTERM)
    assert second.proc.wait(20) == 0
    assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    held.close()
