"""Never frozen, never silent: the freeze is the safety net, a window never opens
without its record and its guardian, the guardian enforces the window's ceiling,
and what was not verified thawed stays owed.

Freezes only the test's own loop devices (conftest.Loops).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import (SYNCHOOK, assert_frozen, assert_thawed, free_port, http_get, read_marker,
                      run, wait_until, window_open)
import synchook


def status(d):
    return json.loads(d.get("/status")[1])


# 1. A failed sync step never costs the freeze ------------------------------------------

@pytest.mark.parametrize("sync,failure", [
    ("exit 3", "command failed (exit 3)"),
    ("sleep 30", "command timed out after 1 s"),
])
@pytest.mark.slow
def test_a_failed_sync_step_still_freezes(start, loops, tmp_path, sync, failure):
    """XO snapshots whatever /sync answers (a CHECKPOINT that failed, a database
    that is down): the freeze still runs, /sync says what failed and what is
    frozen, and the post phase is owed and told the sync phase failed."""
    a, b = loops.add(), loops.add()
    result = tmp_path / "result"
    d = start("--freeze", "%s,%s" % (a, b), "--sync", sync, "--timeout", "1",
              "--post-sync", "echo $SYNCHOOK_SYNC_RESULT > %s" % result)
    assert d.get("/sync") == (500, "%s; frozen anyway: %s, %s" % (failure, b, a))
    assert_frozen(a)
    assert_frozen(b)
    d.wait_log(r"warning: sync phase failed: %s; frozen anyway: " % failure.replace("(", r"\(")
               .replace(")", r"\)"))
    state = status(d)
    assert state["state"] == "open" and [f["mount"] for f in state["frozen"]] == [b, a]
    assert d.get("/post-sync") == (200, "Ok")
    assert_thawed(a)
    assert_thawed(b)
    assert result.read_text().strip() == "failed"
    steps = [step["step"] for step in status(d)["last_post_sync"]["steps"]]
    assert steps == ["thaw", "post-sync"]


def test_skip_freeze_on_failure_keeps_the_old_way_and_reports_no_thaw(start, loops):
    a = loops.add()
    d = start("--freeze", a, "--sync", "exit 3", "--post-sync", "true",
              "--skip-freeze-on-failure")
    assert d.get("/sync") == (500, "command failed (exit 3); nothing frozen")
    assert_thawed(a)
    assert d.get("/post-sync") == (200, "Ok")
    steps = [step["step"] for step in status(d)["last_post_sync"]["steps"]]
    assert steps == ["post-sync"]                      # no thaw reported for nothing frozen
    out = run([sys.executable, SYNCHOOK, "status", "--port", str(d.port), "--listen",
               "127.0.0.1", "--tls", "auto"])
    assert "thaw" not in out.stdout, out.stdout


# 2. No window without a record and a guardian ------------------------------------------

@pytest.mark.slow
def test_runtime_dir_removed_between_windows_is_made_again_with_its_lock(start, loops, rec):
    """Someone cleans /run: the runtime dir, its lock and the marker are made
    again before the window opens, and a recovery by hand finds the window held
    by the running daemon (never runs its post phase behind its back)."""
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"))
    run(["rm", "-rf", d.runtime])
    assert d.get("/sync") == (200, "Ok")
    assert window_open(d.runtime)
    assert read_marker(d.runtime)["freeze"][0]["point"] == a
    out = run([sys.executable, SYNCHOOK, "recover", "--runtime-dir", d.runtime])
    assert out.returncode == 0 and "a running synchook holds" in out.stderr, out.stderr
    assert rec.lines() == []
    assert_frozen(a)
    d.kill_all()                                       # the new marker is a real record
    d2 = start("--sync", "true", "--post-sync", rec.cmd("post"), "--runtime-dir", d.runtime)
    d2.wait_log(r"previous run ended with a window open")
    assert_thawed(a)
    assert rec.lines() == ["post"]


@pytest.mark.slow
def test_full_run_cannot_refuse_the_marker(start, loops, tmp_path, rec):
    """The marker's space is allocated when it is made: with /run full, a window
    still has its record, and a crash in it is recovered."""
    small = str(tmp_path / "small")
    os.mkdir(small)
    if run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=755", "tmpfs", small]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        a = loops.add()
        runtime = os.path.join(small, "synchook")
        d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"),
                  "--runtime-dir", runtime)
        filler = os.open(os.path.join(small, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(filler, b"x" * 4096)
        except OSError:
            pass
        finally:
            os.close(filler)
        assert d.get("/sync") == (200, "Ok")
        assert read_marker(runtime)["freeze"][0]["point"] == a
        d.kill_all()
        assert_frozen(a)
        os.unlink(os.path.join(small, "filler"))
        d2 = start("--sync", "true", "--post-sync", rec.cmd("post"), "--runtime-dir", runtime)
        d2.wait_log(r"previous run ended with a window open")
        assert_thawed(a)
        assert rec.lines() == ["post"]
        d2.stop()
    finally:
        run(["umount", "-l", small])


def test_no_guardian_no_window(tmp_path, loops):
    """/bin/sh cannot be run (a private mount namespace): the guardian cannot
    start, so /sync freezes nothing and says why at once."""
    if run(["unshare", "-m", "true"]).returncode:
        pytest.skip("unshare -m is not allowed here")
    a = loops.add()
    blocker = tmp_path / "not-a-shell"
    blocker.write_text("")
    port = free_port()
    log_path = tmp_path / "log"
    command = ("mount --bind %s /bin/sh && exec %s %s --port %d --listen 127.0.0.1 --tls off "
               "--runtime-dir %s --freeze %s --sync ''"
               % (blocker, sys.executable, SYNCHOOK, port, tmp_path / "run", a))
    with open(str(log_path), "wb") as log:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", command], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: "listening on" in log_path.read_text(), 20), log_path.read_text()
        assert http_get(port, "/sync") == (500, "nothing run: no guardian could be started")
        assert_thawed(a)
        assert wait_until(lambda: "error: /sync refused, nothing run: no guardian could be "
                                  "started" in log_path.read_text(), 10), log_path.read_text()
        assert "window opened" not in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(20)


# 3. The guardian enforces the window's ceiling; a post step is never run twice ----------

@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGTSTP], ids=["SIGSTOP", "ctrl-z"])
@pytest.mark.slow
def test_stopped_daemon_is_killed_and_released_after_max_hold(start, loops, rec, stop):
    """Stopped (SIGSTOP, or ^Z's SIGTSTP) with a window open, synchook cannot
    run its watchdog: the guardian's timer, told the window's deadline, kills
    it at the window's ceiling (--max-hold, plus a grace), and the guardian
    releases the window.  synchook runs in a process group of its own, as a
    shell's job does: the kernel drops a SIGTSTP sent to an orphaned process
    group, which the test's own group can be (a CI started in the background
    by a shell that has exited), and synchook would then simply go on."""
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"),
              "--max-hold", "1", "--tls", "off", preexec_fn=os.setpgrp)
    assert d.get("/sync") == (200, "Ok")
    began = time.monotonic()
    d.signal(stop)
    try:
        released = wait_until(lambda: rec.lines() == ["post"], 30)
        took = time.monotonic() - began
    finally:
        if d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGCONT)
    assert released, d.log()
    assert d.proc.wait(5) == -signal.SIGKILL           # by its guardian
    assert_thawed(a)
    assert took < 1 + synchook.GUARDIAN_GRACE + 10, took
    time.sleep(0.5)
    assert rec.lines() == ["post"]
    assert re.search(r"the previous run ended with a window open, for \d+ s now", d.log())
    assert "had not released its window when due: killed by its guardian" in d.log()


@pytest.mark.slow
def test_post_step_running_when_the_daemon_dies_is_waited_for_not_run_twice(start, rec,
                                                                             tmp_path):
    post = "echo start >> %s; sleep 2; echo end >> %s" % (rec.file, rec.file)
    d = start("--sync", "true", "--post-sync", post, "--tls", "off")
    assert d.get("/sync") == (200, "Ok")
    def post_sync():
        try:
            d.get("/post-sync")
        except OSError:                                # the daemon is killed under it
            pass

    threading.Thread(target=post_sync, daemon=True).start()
    assert wait_until(lambda: rec.lines() == ["start"], 10)
    d.guardian_pid()
    d.proc.kill()
    assert wait_until(lambda: rec.lines() == ["start", "end"], 10), d.log()
    assert wait_until(lambda: not window_open(d.runtime), 10), d.log()
    time.sleep(0.5)
    assert rec.lines() == ["start", "end"]             # once, never twice at once
    assert "of the previous run is still running: waiting for it" in d.log()


@pytest.mark.slow
def test_a_freeze_made_by_someone_else_is_never_recorded_as_ours(start, loops, rec):
    """Two synchooks (two runtime dirs) freeze one filesystem: the second finds
    it frozen, and its crash recovery must not thaw it under the first's window."""
    a = loops.add()
    first = start("--freeze", a, "--sync", "true", "--tls", "off")
    second = start("--freeze", a, "--sync", "true", "--tls", "off")
    assert first.get("/sync") == (200, "Ok")
    assert second.get("/sync") == (200, "Ok")
    assert read_marker(second.runtime)["freeze"] == []
    second.kill_all()
    again = start("--sync", "true", "--runtime-dir", second.runtime)
    again.wait_log(r"previous run ended with a window open")
    assert_frozen(a)                                   # still the first one's
    assert first.get("/post-sync") == (200, "Ok")
    assert_thawed(a)


# 4. What is not verified thawed stays owed ---------------------------------------------

def test_a_thaw_that_fails_stays_owed_and_listed(loops):
    """FITHAW failing (EIO), made so by a stand-in ioctl (the only way to get
    such an error here): the filesystem stays listed and the step owed (not
    started), and the next try thaws it."""
    a = loops.add()
    freezer = synchook.Freezer([a])
    assert freezer.freeze().ok
    real = synchook.fcntl

    class FailThaw:
        @staticmethod
        def ioctl(fd, request, arg):
            if request == synchook.FITHAW:
                raise OSError(5, "Input/output error")
            return real.ioctl(fd, request, arg)

    synchook.fcntl = FailThaw
    try:
        result = freezer.thaw()
    finally:
        synchook.fcntl = real
    assert not result.ok and not result.started
    assert result.reason == "still frozen: thaw %s: cannot thaw: Input/output error" % a
    assert [entry["mount"] for entry in freezer.status()] == [a]
    assert_frozen(a)
    assert freezer.thaw().ok
    assert_thawed(a)
    assert freezer.thaw() is None                      # nothing frozen: no step


@pytest.mark.slow
def test_recovery_reaches_a_mount_whose_path_is_past_path_max(start, loops, rec, tmp_path):
    """A user who owns a directory above a frozen mount moves it so deep that its
    path is longer than PATH_MAX, then synchook dies: the recovery walks to it
    one component at a time and thaws it, and `synchook thaw` does too."""
    a = loops.add(name="x/data")
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    d.kill_all()
    assert_frozen(a)
    deep = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for index in range(20):
            name = ("%02d" % index) * 125
            os.mkdir(name, dir_fd=deep)
            names.append(name)
            deep, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep), deep
            os.close(parent)
        os.rename(str(loops.base / "x"), "x", dst_dir_fd=deep)
        long_path = os.path.join(str(tmp_path), *names + ["x", "data"])
        assert len(long_path) > 4096
        assert long_path in open("/proc/self/mountinfo").read()
        out = run([sys.executable, SYNCHOOK, "recover", "--runtime-dir", d.runtime])
        assert out.returncode == 0, out.stderr
        assert "(device " in out.stderr and "): thawed" in out.stderr, out.stderr
        assert rec.lines() == ["post"]
        fd = os.open("x/data", os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
        try:
            probe = os.open("probe", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
            os.close(probe)                            # writable: thawed
        finally:
            os.close(fd)
    finally:
        try:
            os.rename("x", str(loops.base / "x"), src_dir_fd=deep)
        finally:
            os.close(deep)


@pytest.mark.slow
def test_a_long_marker_keeps_its_freeze(start, loops, rec, tmp_path):
    """Sixty hooks: the marker grows past 64 KB in 1.4.0's format; every line
    must still be read, the freeze included."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for index in range(60):
        hook = hooks / ("%02d-hook" % index)
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o755)
    a = loops.add()
    d = start("--freeze", a, "--hooks-dir", str(hooks), "--sync", "", "--post-sync",
              rec.cmd("post"), "--tls", "off")
    assert d.get("/sync") == (200, "Ok")
    assert len(read_marker(d.runtime)["groups"]) == 60
    d.kill_all()
    d2 = start("--sync", "", "--post-sync", rec.cmd("post"), "--runtime-dir", d.runtime)
    d2.wait_log(r"previous run ended with a window open")
    assert_thawed(a)
    assert rec.lines() == ["post"]


# 5. No core dump; SIGQUIT is a stop ----------------------------------------------------

def test_sigquit_is_a_clean_stop(start, loops, rec):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGQUIT)
    assert d.wait(20) == 0
    assert_thawed(a)
    assert rec.lines() == ["post"]


@pytest.mark.slow
def test_no_core_dump_and_commands_get_the_limit_back(start, loops, rec, tmp_path):
    """With core dumps on (ulimit -c unlimited), a SIGABRT in a window leaves no
    core (it would be written where the window may have frozen, and hang):
    the daemon dies at once and its guardian releases.  Commands get the
    limit synchook was started with."""
    import resource

    def unlimited():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                  resource.RLIM_INFINITY))

    a = loops.add()
    limits = tmp_path / "limits"
    # (the limit is given back just after the spawn: read it a moment later)
    d = start("--freeze", a, "--sync", "sleep 0.2; grep 'core file' /proc/self/limits > %s"
              % limits,
              "--post-sync", rec.cmd("post"), preexec_fn=unlimited)
    own = [line for line in open("/proc/%d/limits" % d.proc.pid) if "core file" in line][0]
    assert own.split()[4] == "1", own                 # the daemon's own soft limit
    pattern = open("/proc/sys/kernel/core_pattern").read().strip()
    core = os.path.join("/", pattern) if pattern and not pattern.startswith("|") else None
    existed = core is not None and os.path.exists(core)
    assert d.get("/sync") == (200, "Ok")
    assert limits.read_text().split()[4] == "unlimited", limits.read_text()
    d.guardian_pid()
    d.signal(signal.SIGABRT)
    assert d.wait(5) == -signal.SIGABRT
    assert wait_until(lambda: rec.lines() == ["post"], 10), d.log()
    assert_thawed(a)
    if core is not None and not existed and os.path.exists(core):
        os.unlink(core)
        pytest.fail("a core was dumped to %s" % core)


# 6. Say it at once: frozen filesystems synchook did not record ----------------------------

@pytest.mark.slow
def test_status_shows_a_frozen_filesystem_synchook_did_not_record(start, loops):
    a = loops.add()
    d = start("--sync", "true", "--tls", "off")
    try:
        assert run(["fsfreeze", "-f", a]).returncode == 0
        out = run([sys.executable, SYNCHOOK, "status", "--port", str(d.port), "--listen",
                   "127.0.0.1", "--tls", "off"])
        assert out.returncode == 1, out.stdout
        assert "FROZEN          %s: frozen now, and no window of this synchook's says so" % a \
            in out.stdout, out.stdout
        assert "window:         idle" in out.stdout
    finally:
        run([sys.executable, SYNCHOOK, "thaw", "--under", a])
    out = run([sys.executable, SYNCHOOK, "status", "--port", str(d.port), "--listen",
               "127.0.0.1", "--tls", "off"])
    assert out.returncode == 0 and "FROZEN" not in out.stdout, out.stdout
