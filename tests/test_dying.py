"""When synchook itself dies: SIGKILL or the OOM killer, with no supervisor, with
the filesystem under its own code, log and runtime dir frozen, with a restart
racing its guardian.  The guest must be released within 2 s, exactly once.

Freezes only the test's own loop devices (conftest.Loops): the "root" of these
tests is a loop-mounted ext4 with a tmpfs at its run/, as / and /run.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import synchook
from conftest import (SYNCHOOK, assert_frozen, assert_thawed, children, free_port, http_get,
                      interpreters, run, start_writer, wait_until, window_open)


def released_after_kill(d, rec, expected, what=None):
    """SIGKILL the daemon alone (its guardian stays) and return the seconds
    until the post phase has run (rec shows expected, what() is true)."""
    d.guardian_pid()
    began = time.monotonic()
    d.proc.kill()
    assert wait_until(lambda: rec.lines() == expected and (what is None or what()), 10), \
        (rec.lines(), d.log())
    took = time.monotonic() - began
    assert d.proc.wait(2) == -signal.SIGKILL          # and it died at once
    return took


# 1. No supervisor: the guardian releases -----------------------------------------------

@pytest.mark.parametrize("python", interpreters())
def test_sigkill_without_supervisor_runs_the_post_phase_within_2_s(start, rec, python):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off",
              python=python)
    assert d.get("/sync") == (200, "Ok")
    took = released_after_kill(d, rec, ["sync", "post"])
    assert took < 2.0, "post phase %.2f s after the SIGKILL" % took
    assert wait_until(lambda: not window_open(d.runtime), 5)
    d2 = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off",
               "--runtime-dir", d.runtime, python=python)
    assert "previous run ended" not in d2.log()        # nothing left for the restart
    assert rec.lines() == ["sync", "post"]


def test_sigkill_between_windows_the_guardian_runs_nothing(start, rec):
    """The marker stays, empty, between windows: the guardian reads that as no
    window, and exits without starting a recovery."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    assert d.get("/sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    guardian = d.guardian_pid()
    d.proc.kill()
    assert d.proc.wait(2) == -signal.SIGKILL
    assert wait_until(lambda: not os.path.exists("/proc/%d" % guardian) or
                      synchook_state(guardian) == "Z", 5)
    time.sleep(0.5)
    assert rec.lines() == ["sync", "post"]
    assert "recover" not in d.log()                    # no synchook recover was started


def synchook_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("python", interpreters())
@pytest.mark.slow
def test_sigkill_while_frozen_thaws_within_2_s(start, rec, loops, python):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"), "--tls", "off",
              python=python)
    assert d.get("/sync") == (200, "Ok")
    assert_frozen(a)
    writer = start_writer(a, "probe")
    took = released_after_kill(d, rec, ["post"], lambda: writer.is_set())
    assert took < 2.0, "thawed %.2f s after the SIGKILL" % took
    assert_thawed(a)


def new_guardian(d, old):
    """The guardian that replaced `old` (which the daemon has reaped by then)."""
    assert wait_until(lambda: d.guardian_pid() != old, 5), d.log()
    return d.guardian_pid()


def test_guardian_lost_while_serving_is_started_again_at_once(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    first = d.guardian_pid()
    os.kill(first, signal.SIGKILL)
    d.wait_log(r"the guardian \(process %d\) is gone \(command killed by signal 9\): "
               r"starting a new one" % first)       # at once, not at the next /sync
    new_guardian(d, first)
    assert d.get("/sync") == (200, "Ok")
    assert released_after_kill(d, rec, ["sync", "post"]) < 2.0


def guardians_of(runtime):
    """Every process left of the guardians of a runtime dir (their timers too),
    known by the runtime dir in their environment."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/environ" % name, "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue
        if b"SYNCHOOK_GUARDIAN_RUNTIME_DIR=" + runtime.encode() in environ:
            found.append(int(name))
    return found


@pytest.mark.slow
def test_guardian_lost_during_a_window_is_replaced_and_releases(start, rec):
    """The first guardian's timer, orphaned, must never act: it exits, and
    nothing of either guardian is left once the window is released."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off",
              "--max-hold", "1")
    assert d.get("/sync") == (200, "Ok")
    first = d.guardian_pid()
    os.kill(first, signal.SIGKILL)
    new_guardian(d, first)
    assert released_after_kill(d, rec, ["sync", "post"]) < 2.0
    assert wait_until(lambda: not guardians_of(d.runtime), 15), guardians_of(d.runtime)


def test_pkill_f_synchook_spares_the_guardian(start, rec, tmp_path):
    """`pkill -9 -f synchook` (scoped here to this test's daemon): the guardian's
    command line names no synchook, so it survives and releases the window."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    assert d.get("/sync") == (200, "Ok")
    guardian = d.guardian_pid()
    mine = [d.proc.pid] + children(d.proc.pid)
    matched = [pid for pid in mine
               if b"synchook" in open("/proc/%d/cmdline" % pid, "rb").read()]
    assert d.proc.pid in matched and guardian not in matched, matched
    for pid in matched:                                # what pkill -9 -f synchook does
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: rec.lines() == ["sync", "post"], 10), d.log()
    assert wait_until(lambda: not window_open(d.runtime), 5)


def test_guardian_ignores_the_signals_that_stop_a_service(start, rec):
    """^C in a terminal, or a service manager's SIGTERM to every process: the
    daemon shuts down cleanly, the guardian carries on until it has gone."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    guardian = d.guardian_pid()
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
        os.kill(guardian, sig)
    time.sleep(0.2)
    assert d.guardian_pid() == guardian
    assert d.get("/sync") == (200, "Ok")
    assert released_after_kill(d, rec, ["sync", "post"]) < 2.0


def test_clean_stop_leaves_no_guardian_behind(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    guardian = d.guardian_pid()
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert rec.lines() == ["sync", "post"]
    assert wait_until(lambda: not os.path.exists("/proc/%d" % guardian) or
                      open("/proc/%d/stat" % guardian).read().split(") ")[1][0] == "Z", 5)
    time.sleep(0.3)
    assert rec.lines() == ["sync", "post"]             # and it ran nothing more


# 2. Exactly once: a restart racing the guardian ----------------------------------------

@pytest.mark.slow
def test_kill_and_immediate_restart_runs_the_post_phase_once(start, rec):
    args = ("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    d = start(*args)
    runtime = d.runtime
    for round_ in range(5):
        assert d.get("/sync") == (200, "Ok")
        d.guardian_pid()
        d.proc.kill()
        d.proc.wait(5)
        d = start(*(args + ("--runtime-dir", runtime)))    # at once: both race for the window
        expected = ["sync", "post"] * (round_ + 1)
        assert wait_until(lambda: rec.lines() == expected, 10), rec.lines()
        time.sleep(0.3)
        assert rec.lines() == expected, "round %d" % round_
    d.stop()


def test_recover_by_hand_with_nothing_owed(tmp_path):
    out = run([sys.executable, SYNCHOOK, "recover", "--runtime-dir", str(tmp_path / "none")])
    assert out.returncode == 0 and "no window is owed" in out.stderr, out.stderr


def test_second_daemon_on_the_same_runtime_dir_is_refused(start):
    d = start("--sync", "true", "--tls", "off")
    out = run([sys.executable, SYNCHOOK, "--tls", "off", "--port", "0", "--listen", "127.0.0.1",
               "--runtime-dir", d.runtime], timeout=20)
    assert out.returncode == 2, out.stderr
    assert "--runtime-dir %s is in use by process %d (synchook serve)" % (
        d.runtime, d.proc.pid) in out.stderr


# 3. The root frozen: script, stderr file and the runtime dir's parent on it -------------

class FrozenRoot:
    """A loop-mounted ext4 M standing for /, with a tmpfs at M/run standing for
    /run; synchook's script is copied onto M."""

    def __init__(self, loops, tmp_path):
        self.point = loops.add(name="root")
        self.run_dir = os.path.join(self.point, "run")
        os.mkdir(self.run_dir)
        assert run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", self.run_dir]
                   ).returncode == 0
        loops.points.append(self.run_dir)              # unmounted first at teardown
        self.script = os.path.join(self.point, "synchook.py")
        shutil.copy(SYNCHOOK, self.script)
        self.log = os.path.join(self.point, "synchook.log")
        self.rec = str(tmp_path / "rec")
        self.port = free_port()
        self.procs = []

    def start(self, extra="", stderr_on_root=True, log_level="info"):
        """synchook from M, its runtime dir in M/run (whose parent is M)."""
        stderr = self.log if stderr_on_root else self.rec + ".log"
        command = ("exec %s %s --port %d --listen 127.0.0.1 --tls off --runtime-dir "
                   "%s/synchook --freeze %s --sync true --post-sync 'echo post >> %s' "
                   "--log-level %s %s 2>>%s" % (sys.executable, self.script, self.port,
                                                self.run_dir, self.point, self.rec,
                                                log_level, extra, stderr))
        proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.stderr = stderr
        return proc

    def frozen_window(self, **kwargs):
        """A synchook started from M whose /sync froze M."""
        proc = self.start(**kwargs)
        self.wait_listening(proc)
        assert self.get("/sync") == (200, "Ok")
        assert_frozen(self.point)
        return proc

    def wait_listening(self, proc, timeout=20):
        def listening():
            assert proc.poll() is None, self.read_log()
            return " listening on " in self.read_log()
        assert wait_until(listening, timeout, step=0.05), self.read_log()

    def read_log(self):
        try:
            return open(self.stderr, errors="replace").read()
        except OSError:
            return ""

    def get(self, path):
        return http_get(self.port, path)

    def posts(self):
        return open(self.rec).read().split() if os.path.exists(self.rec) else []


def kill_guardian_and(proc):
    """SIGKILL the guardian (a child of the daemon, which is exec'd by sh), then the daemon."""
    for pid in children(proc.pid):
        if synchook.GUARDIAN_NAME.encode() in open("/proc/%d/cmdline" % pid, "rb").read():
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(5)


@pytest.fixture
def root(loops, tmp_path):
    made = FrozenRoot(loops, tmp_path)
    yield made
    for proc in made.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_frozen_root_sigkill_no_restart_thawed_within_2_s(root):
    m = root
    proc = m.frozen_window()
    writer = start_writer(m.point, "probe")
    began = time.monotonic()
    proc.kill()
    assert proc.wait(2) == -signal.SIGKILL             # dies at once: no thread waits on M
    assert writer.wait(2), "M still frozen 2 s after the SIGKILL"
    took = time.monotonic() - began
    assert took < 2.0
    assert wait_until(lambda: m.posts() == ["post"], 5)
    assert wait_until(lambda: "window closed (recover): Ok" in m.read_log(), 5), m.read_log()
    # and the daemon's port is free again: nothing of it lingers
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind(("127.0.0.1", m.port))
    probe.close()


@pytest.mark.slow
def test_frozen_root_restart_while_still_frozen_recovers(root):
    """The guardian lost too (a whole service SIGKILLed): the restart, started from
    M with its runtime dir's parent on M, must recover before it blocks on M."""
    m = root
    kill_guardian_and(m.frozen_window())
    time.sleep(0.3)
    assert_frozen(m.point)                             # nobody left to thaw it
    # The restart's stderr cannot be a file on M: opening it for writing would wait
    # in the shell, before synchook runs (the README says so); the rest is on M.
    restart = m.start(stderr_on_root=False)
    assert start_writer(m.point, "probe").wait(5), "restart did not thaw M:\n" + m.read_log()
    assert wait_until(lambda: m.posts() == ["post"], 5), m.read_log()
    m.wait_listening(restart)
    restart.send_signal(signal.SIGTERM)
    assert restart.wait(20) == 0


@pytest.mark.slow
def test_frozen_root_sigterm_with_many_lines_queued(root):
    m = root
    proc = m.frozen_window(extra="--hold 'seq 1 1500; cat >/dev/null'", log_level="debug")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - began < 5
    assert_thawed(m.point)
    text = m.read_log()
    assert "hold| 1000" in text and "window closed (shutdown): Ok" in text, text[-2000:]
    assert m.posts() == ["post"]


# 4. Thawed by identity, not by path ---------------------------------------------------

@pytest.mark.parametrize("how", ["restart", "recover"])
@pytest.mark.slow
def test_recovery_finds_the_frozen_filesystem_by_device(start, loops, rec, tmp_path, how):
    a = loops.add(name="x/data")
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    assert_frozen(a)
    d.kill_all()
    # The mount point's parent renamed, and a decoy planted at the old path.
    moved = str(loops.base / "y")
    os.rename(str(loops.base / "x"), moved)
    loops.points = [os.path.join(moved, "data")]
    decoy = tmp_path / "decoy"
    (decoy / "data").mkdir(parents=True)
    os.symlink(str(decoy), str(loops.base / "x"))
    if how == "restart":
        d2 = start("--sync", "true", "--post-sync", rec.cmd("post"), "--runtime-dir", d.runtime)
        log_text = d2.log()
    else:
        out = run([sys.executable, SYNCHOOK, "recover", "--runtime-dir", d.runtime])
        assert out.returncode == 0, out.stderr
        log_text = out.stderr
    assert "recovery: %s (device " % a in log_text and "): thawed" in log_text, log_text
    assert_thawed(os.path.join(moved, "data"))
    assert rec.lines() == ["post"]


def test_freeze_of_a_listed_mount_replaced_by_tmpfs_fails(start, loops):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true")
    assert run(["umount", a]).returncode == 0
    loops.points.remove(a)
    assert run(["mount", "-t", "tmpfs", "tmpfs", a]).returncode == 0   # a new mount there
    loops.points.append(a)
    status, text = d.get("/sync")
    assert status == 500 and text == "freeze %s: tmpfs cannot be frozen (the filesystem has " \
                                     "no freeze); nothing frozen" % a, text
    assert d.get("/post-sync") == (200, "Ok")


# 5. A freeze that would freeze nothing is refused -------------------------------------

def refused(*args):
    out = run([sys.executable, SYNCHOOK, "--tls", "off", "--port", "0", "--sync", "true"]
              + list(args))
    assert out.returncode == 2, (args, out.stderr)
    return out.stderr


def test_freeze_under_must_exist_without_symlinks(tmp_path):
    assert "--freeze-under %s: no such directory" % (tmp_path / "missing") in refused(
        "--freeze", "all", "--freeze-under", str(tmp_path / "missing"))
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "link"))
    assert "goes through a symbolic link" in refused(
        "--freeze", "all", "--freeze-under", str(tmp_path / "link"))
    assert "nothing to freeze" in refused("--freeze", "all", "--freeze-under",
                                          str(tmp_path / "real"))


@pytest.mark.root
def test_a_named_mount_that_cannot_freeze_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    point = tmp_path / "scratch"
    point.mkdir()
    assert run(["mount", "-t", "tmpfs", "tmpfs", str(point)]).returncode == 0
    try:
        assert "--freeze %s: cannot be frozen (tmpfs: virtual, remote or read-only)" % point \
            in refused("--freeze", str(point))
    finally:
        run(["umount", str(point)])


def test_runtime_dir_on_a_frozen_filesystem_is_refused(loops):
    a = loops.add()
    os.mkdir(os.path.join(a, "run"), 0o700)
    assert "which --freeze freezes" in refused("--freeze", a, "--runtime-dir",
                                               os.path.join(a, "run"))


# 6. Orphaned zombies count as gone ----------------------------------------------------

SUBREAPER = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)        # PR_SET_CHILD_SUBREAPER: orphans come here
child = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
sys.exit(child.wait())                          # reaps the daemon alone: orphans stay zombies
"""


def test_cancelled_sync_with_orphaned_zombies_answers_post_sync_in_1_s(start, rec, tmp_path):
    """Its shell and its children die together; the orphans' new parent (here a
    subreaper that never reaps them, as a busy pid 1) leaves them zombies."""
    wrapper = tmp_path / "subreaper.py"
    wrapper.write_text(SUBREAPER)
    d = start("--sync", rec.cmd("sync") + "; sleep 30 & sleep 30 & wait",
              "--post-sync", rec.cmd("post"), "--tls", "off",
              command=[sys.executable, str(wrapper), sys.executable, SYNCHOOK])
    threading.Thread(target=lambda: d.get("/sync"), daemon=True).start()
    rec.wait_for(["sync"])
    time.sleep(0.3)
    began = time.monotonic()
    assert d.get("/post-sync") == (200, "Ok")
    took = time.monotonic() - began
    assert took < 1.0, "/post-sync took %.2f s" % took
    assert rec.lines() == ["sync", "post"]
    zombies = [pid for pid in children(d.proc.pid)
               if open("/proc/%d/stat" % pid).read().split(") ")[1][0] == "Z"]
    assert zombies, "the test made no orphaned zombie: it proves nothing"


# 7. The OOM killer and inherited signals ----------------------------------------------

@pytest.mark.root
def test_oom_scores_daemon_guardian_and_commands(start, rec, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (lowering oom_score_adj)")
    lowered = run(["sh", "-c", "echo -1 > /proc/self/oom_score_adj"])
    if lowered.returncode:
        pytest.skip("this machine does not let root lower oom_score_adj (no CAP_SYS_RESOURCE: "
                    "a container): %s" % lowered.stderr.strip())
    out = tmp_path / "score"
    d = start("--sync", "cat /proc/self/oom_score_adj > %s" % out, "--tls", "off")
    guardian = d.guardian_pid()
    assert open("/proc/%d/oom_score_adj" % d.proc.pid).read().strip() == "-900"
    assert open("/proc/%d/oom_score_adj" % guardian).read().strip() == "-1000"
    assert d.get("/sync") == (200, "Ok")
    assert out.read_text().strip() == open("/proc/self/oom_score_adj").read().strip()
    assert d.get("/post-sync") == (200, "Ok")


def test_signals_ignored_by_whoever_started_synchook_are_default_for_commands(start, tmp_path):
    out = tmp_path / "sigign"

    def ignore():
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    d = start("--sync", "grep SigIgn /proc/self/status > %s" % out, "--tls", "off",
              preexec_fn=ignore)
    assert d.get("/sync") == (200, "Ok")
    ignored = int(out.read_text().split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), signal.Signals(sig).name
    assert d.get("/post-sync") == (200, "Ok")


# 8. XO's kept-alive connection is never closed under a request --------------------------

def raw_head(port, request):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode("latin-1")


def test_keep_alive_timeout_is_announced(start):
    d = start("--sync", "true", "--tls", "off", "--header-timeout", "2.5")
    head = raw_head(d.port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "\r\nKeep-Alive: timeout=2\r\n" in head
    head = raw_head(d.port, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert "Keep-Alive" not in head and "Connection: close" in head


def counting_server(keep_alive):
    """An HTTP/1.1 server counting the connections it is given."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            http.server.BaseHTTPRequestHandler.setup(self)
            server.connections += 1

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "3")
            if keep_alive:
                self.send_header("Keep-Alive", keep_alive)
            self.end_headers()
            self.wfile.write(b"Ok\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.connections = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("keep_alive,pause,connections", [
    (None, 0.3, 1),              # undici keeps an idle connection 4 s by default
    ("timeout=5", 0.5, 1),       # 5 s less undici's 2 s
    ("timeout=3", 1.5, 2),       # 3 s less 2 s: gone after 1 s, a new one
    ("timeout=2", 0.1, 2),       # 2 s less 2 s: never reused
])
@pytest.mark.slow
def test_call_as_xo_reuses_a_connection_as_undici_does(keep_alive, pause, connections):
    server = counting_server(keep_alive)
    try:
        out = run([sys.executable, SYNCHOOK, "call", "http://127.0.0.1:%d/" % server.server_port,
                   "--as-xo", "--pause", str(pause)])
        assert out.returncode == 0, out.stdout + out.stderr
        assert server.connections == connections
    finally:
        server.shutdown()
        server.server_close()


def test_call_with_stdout_on_the_frozen_filesystem_still_sends_post_sync(start, loops, rec):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"), "--tls", "off")
    with open(os.path.join(a, "call.out"), "w") as stdout:
        out = subprocess.run([sys.executable, SYNCHOOK, "call", "http://127.0.0.1:%d/" % d.port,
                              "--as-xo", "--pause", "0.2"], stdout=stdout,
                             stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr
    text = open(os.path.join(a, "call.out")).read()
    assert text.startswith("sync      200 Ok") and "post-sync 200 Ok" in text, text
    assert rec.lines() == ["post"]


@pytest.mark.slow
def test_loopback_status_readers_never_evict_xos_connection(start, rec):
    d = start("--allow", "127.0.0.2", "--max-connections", "8", "--sync", rec.cmd("sync"),
              "--post-sync", rec.cmd("post"), "--tls", "off")
    xo = d.connection(source="127.0.0.2")
    crowd = []
    try:
        xo.request("GET", "/sync")
        response = xo.getresponse()
        assert (response.status, response.read()) == (200, b"Ok\n")
        for _ in range(30):        # loopback, not in --allow: may read /status, idle here
            crowd.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
        time.sleep(0.5)
        xo.request("GET", "/post-sync")            # on XO's kept-alive connection
        response = xo.getresponse()
        assert (response.status, response.read()) == (200, b"Ok\n")
        still_open = 0
        for sock in crowd:
            sock.settimeout(0.2)
            try:
                still_open += sock.recv(1) != b""
            except socket.timeout:
                still_open += 1
            except OSError:
                pass
        assert still_open <= 4, still_open
    finally:
        xo.close()
        for sock in crowd:
            sock.close()
    assert rec.lines() == ["sync", "post"]
    assert json.loads(d.get("/status")[1])["state"] == "idle"


# The guardian's timer, on its own: a torn read of the deadline kills no one ----------

FAKE_DAEMON = r"""
import os, subprocess, sys
timer_read, timer_write = os.pipe()
guardian = subprocess.Popen(["sh", "-c", os.environ["GUARDIAN_SCRIPT"], "window-guardian"],
                            stdin=subprocess.PIPE, stdout=timer_read)
os.close(timer_read)
print(guardian.pid, flush=True)
for line in sys.stdin:                  # each line: wake the timer, as Guardian.open_window
    os.write(timer_write, b"\n")
"""


def test_guardian_timer_kills_only_for_a_deadline_read_past_twice(tmp_path):
    """synchook rewrites the deadline file in place, and the timer's read can
    meet a rewrite: "3" of "39653" over "0" (seen with two synchooks under 8,000
    windows a second, bench/ab: killed by its guardian).  A deadline read past
    due is believed only if a second read, a second later, says the same."""
    deadline = tmp_path / "deadline"
    deadline.write_text("0\n")
    env = dict(os.environ, GUARDIAN_SCRIPT=synchook.GUARDIAN_SCRIPT,
               SYNCHOOK_GUARDIAN_DEADLINE=str(deadline),
               SYNCHOOK_GUARDIAN_SPILL=str(tmp_path / "spill"),
               SYNCHOOK_GUARDIAN_MARKER=str(tmp_path / "no-marker"))
    daemon = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              universal_newlines=True)
    try:
        daemon.stdout.readline()                         # the guardian runs
        deadline.write_text("3\n")                       # a torn read: past due ...
        daemon.stdin.write("wake\n")
        daemon.stdin.flush()
        time.sleep(0.3)
        deadline.write_text("0\n")                       # ... and gone a moment later
        time.sleep(2)
        assert daemon.poll() is None, "killed on one read of the deadline"
        deadline.write_text("3\n")                       # past due for real
        daemon.stdin.write("wake\n")
        daemon.stdin.flush()
        assert daemon.wait(10) == -signal.SIGKILL
        assert "had not released its window when due" in (tmp_path / "spill").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
