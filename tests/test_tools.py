"""Operator tools: call (act as XO), check (dry run), --hold, --hooks-dir, /status."""

import json
import os
import signal
import socket
import sys
import time

import pytest

from conftest import free_port, run, wait_until, SYNCHOOK


def hold_cmd(rec, delay=0.0):
    """A stand-in for `mysql` holding FLUSH TABLES WITH READ LOCK until stdin closes."""
    return ("%s; sleep %s; echo locked; cat >/dev/null; %s"
            % (rec.cmd("hold-start"), delay, rec.cmd("hold-end")))


def hold_pid(d):
    status = json.loads(d.get("/status")[1])
    return status


@pytest.mark.slow
def test_hold_runs_for_the_whole_window(start, rec):
    d = start("--hold", hold_cmd(rec, 0.5), "--sync", rec.cmd("sync"),
              "--post-sync", rec.cmd("post"))
    began = time.monotonic()
    assert d.get("/sync") == (200, "Ok")
    assert time.monotonic() - began >= 0.5          # waited for its first line
    assert rec.lines() == ["hold-start", "sync"]    # started before the sync command
    time.sleep(0.5)
    assert rec.lines() == ["hold-start", "sync"]    # still holding during the window
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["hold-start", "sync", "post", "hold-end"]
    d.wait_log(r"hold\| locked")


@pytest.mark.slow
def test_hold_ended_at_max_hold(start, rec):
    d = start("--hold", hold_cmd(rec), "--sync", rec.cmd("sync"), "--max-hold", "1")
    assert d.get("/sync") == (200, "Ok")
    rec.wait_for(["hold-start", "sync", "hold-end"], timeout=6)


def test_hold_ended_at_shutdown(start, rec):
    d = start("--hold", hold_cmd(rec), "--sync", rec.cmd("sync"))
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert rec.lines() == ["hold-start", "sync", "hold-end"]


def test_hold_ends_when_synchook_is_killed(start, rec):
    d = start("--hold", hold_cmd(rec), "--sync", rec.cmd("sync"))
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGKILL)
    d.wait()
    rec.wait_for(["hold-start", "sync", "hold-end"], timeout=5)   # its stdin closed


@pytest.mark.slow
def test_hold_that_never_prints_fails_sync_within_timeout(start, rec, tmp_path):
    pidfile = tmp_path / "hold.pid"
    d = start("--hold", "echo $$ > %s; exec sleep 600" % pidfile, "--timeout", "1",
              "--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    began = time.monotonic()
    assert d.get("/sync") == (500, "hold command not ready after 1 s")
    took = time.monotonic() - began                  # 1 s, then 2 s of grace, then TERM
    assert took < 10, took
    assert rec.lines() == []                         # later sync steps skipped
    pid = int(pidfile.read_text())

    def alive():
        try:
            with open("/proc/%d/stat" % pid) as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    wait_until(lambda: not alive(), 5, "the hold ended with its window", 0.05)
    assert d.get("/post-sync") == (200, "Ok")        # the post phase still runs
    assert rec.lines() == ["post"]


def test_hold_that_exits_early_fails_sync(start, rec):
    d = start("--hold", "exit 7", "--sync", rec.cmd("sync"))
    assert d.get("/sync") == (500, "hold command exited before it was ready "
                                   "(command failed (exit 7))")
    assert rec.lines() == []


def make_hook(directory, name, body, mode=0o755):
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(str(path), mode)
    return path


@pytest.fixture
def hooks_dir(tmp_path, rec):
    directory = tmp_path / "hooks.d"
    directory.mkdir()
    os.chmod(str(directory), 0o755)
    line = 'echo "$(basename "$0")-$1-$SYNCHOOK_PHASE" >> %s' % rec.file
    for name in ("10-a", "20-b", "30-c~", ".hidden", "40-d.dpkg-old", "50-e.rpmnew",
                 "has space"):
        make_hook(directory, name, line)
    make_hook(directory, "README", "exit 1", mode=0o644)          # not executable
    return directory, line


def test_hooks_dir_order_arguments_and_skipped_names(start, rec, hooks_dir):
    directory, _ = hooks_dir
    d = start("--hooks-dir", str(directory), "--sync", rec.cmd("sync"),
              "--post-sync", rec.cmd("post"), "--hold", hold_cmd(rec))
    assert d.get("/sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["hold-start", "10-a-sync-sync", "20-b-sync-sync", "sync",
                           "post", "20-b-post-sync-post-sync", "10-a-post-sync-post-sync",
                           "hold-end"]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="permission checks apply when running as root")
def test_unsafe_hooks_skipped_with_warning(start, rec, hooks_dir):
    directory, line = hooks_dir
    make_hook(directory, "60-writable", line, mode=0o777)
    foreign = make_hook(directory, "70-foreign", line)
    os.chown(str(foreign), 1000, 1000)
    d = start("--hooks-dir", str(directory), "--sync", "", "--post-sync", "")
    assert d.get("/sync") == (200, "Ok")
    assert rec.lines() == ["10-a-sync-sync", "20-b-sync-sync"]
    d.wait_log(r"warning: hooks dir: .*60-writable: not owned by root or writable")
    d.wait_log(r"warning: hooks dir: .*70-foreign: not owned by root")


# As qemu-guest-agent's own sample fsfreeze-hook.d/mysql-flush.sh is written.
QEMU_GA_HOOK = """
case "$1" in
    freeze) echo "ga-freeze" >> "$REC" ;;
    thaw) echo "ga-thaw" >> "$REC" ;;
    *) echo "ga-unknown-$1" >> "$REC"; exit 1 ;;
esac"""


def test_qemu_ga_fsfreeze_hooks_run_unchanged_with_hook_words(start, rec, tmp_path):
    directory = tmp_path / "fsfreeze-hook.d"
    directory.mkdir()
    os.chmod(str(directory), 0o755)
    make_hook(directory, "mysql-flush.sh", QEMU_GA_HOOK)
    d = start("--hooks-dir", str(directory), "--hook-words", "freeze,thaw", "--sync",
              rec.cmd("sync"), "--post-sync", rec.cmd("post"), env={"REC": rec.file})
    assert d.get("/sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["ga-freeze", "sync", "post", "ga-thaw"]


def test_bad_hook_words_exit_2(tmp_path):
    for words in ("freeze", "a,b,c", "fr eeze,thaw", "$(x),thaw"):
        out = run([sys.executable, SYNCHOOK, "--hook-words", words, "--tls", "off"])
        assert out.returncode == 2 and "--hook-words" in out.stderr, (words, out.stderr)


def test_post_steps_are_told_how_the_sync_phase_went(start, rec, tmp_path):
    post = "echo post-$SYNCHOOK_SYNC_RESULT >> %s" % rec.file
    d = start("--sync", "[ -e %s/fail ] && exit 3; true" % tmp_path, "--post-sync", post)
    assert d.get("/sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    (tmp_path / "fail").write_text("")
    assert d.get("/sync")[0] == 500
    assert d.get("/post-sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")         # no window open
    assert rec.lines() == ["post-ok", "post-failed", "post-none"]
    assert d.get("/sync")[0] == 500
    d.kill_all()                                      # a restart closes it: it cannot know
    start("--sync", "true", "--post-sync", post, "--runtime-dir", d.runtime)
    assert rec.lines() == ["post-ok", "post-failed", "post-none", "post-unknown"]


def test_failing_hook_skips_later_sync_steps_post_runs_all(start, rec, hooks_dir):
    directory, line = hooks_dir
    make_hook(directory, "15-fail", '[ "$1" = sync ] && exit 1; ' + line)
    d = start("--hooks-dir", str(directory), "--sync", rec.cmd("sync"),
              "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (500, "sync hook 15-fail: command failed (exit 1)")
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["10-a-sync-sync", "post", "20-b-post-sync-post-sync",
                           "15-fail-post-sync-post-sync", "10-a-post-sync-post-sync"]


def test_status_requires_secret_and_runs_nothing(start, rec):
    d = start("--sync", rec.cmd("sync"), env={"SYNCHOOK_SECRET": "k"})
    assert d.get("/status")[0] == 403
    status = json.loads(d.get("/status?token=k")[1])
    assert status["state"] == "idle" and status["last_sync"] is None
    assert rec.lines() == []


# --- call -------------------------------------------------------------------

def call(*args, timeout=60):
    return run([sys.executable, SYNCHOOK, "call"] + list(args), timeout=timeout)


def test_call_over_https_url_with_query_and_secret(start, rec, tmp_path):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              env={"SYNCHOOK_SECRET": "t0k"})
    secret = tmp_path / "s"
    secret.write_text("t0k\n")
    out = call("https://127.0.0.1:%d/anything?token=t0k" % d.port, "--pause", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert rec.lines() == ["sync", "post"]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("sync      200 Ok (") and lines[1].startswith("post-sync 200 Ok")
    out = call("http://127.0.0.1:%d" % d.port, "--secret-file", str(secret), "--pause", "0")
    assert out.returncode == 0, out.stdout
    out = call("http://127.0.0.1:%d" % d.port, "--secret", "wrong", "--pause", "0")
    assert out.returncode == 1 and "403 forbidden" in out.stdout
    assert rec.lines() == ["sync", "post", "sync", "post"]


def test_call_bare_address_means_https_1727(start, rec):
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 1727))
        except OSError:
            pytest.skip("port 1727 is busy on this machine")
    start("--port", "1727", "--tls", "on", "--sync", rec.cmd("sync"))
    out = call("127.0.0.1", "--pause", "0.1")
    assert out.returncode == 0, out.stdout
    assert rec.lines() == ["sync"]


def test_call_reports_failing_hook(start):
    d = start("--sync", "exit 1", "--post-sync", "true")
    out = call("http://127.0.0.1:%d" % d.port, "--pause", "0")
    assert out.returncode == 1
    assert "sync      500 command failed (exit 1)" in out.stdout
    assert "post-sync 200 Ok" in out.stdout


@pytest.mark.slow
def test_call_says_refused_dropped_or_slow():
    """Three failures an admin must tell apart: nothing listens (refused), the
    packets vanish (dropped: here a full accept queue, where the kernel drops
    the SYN, as a dropping firewall does), or the guest takes its time (slow)."""
    port = free_port()
    out = call("https://127.0.0.1:%d" % port, "--pause", "0", "--timeout", "3")
    assert out.returncode == 1
    assert "sync      failed: refused: nothing listens on 127.0.0.1 port %d" % port \
        in out.stdout, out.stdout
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = []
    for _ in range(3):                       # fills the accept queue (never accepted)
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(full.getsockname())
        queued.append(sock)
    time.sleep(0.2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                         # accepts (the kernel does), never answers
    try:
        out = call("http://127.0.0.1:%d" % full.getsockname()[1], "--pause", "0",
                   "--timeout", "1")
        assert "sync      failed: dropped: no connection within 1 s" in out.stdout, out.stdout
        out = call("http://127.0.0.1:%d" % silent.getsockname()[1], "--pause", "0",
                   "--timeout", "1")
        assert "sync      failed: slow: connected, but no answer within 1 s" in out.stdout, \
            out.stdout
    finally:
        for sock in queued + [full, silent]:
            sock.close()


@pytest.mark.parametrize("args", [["ftp://x/"], ["not an address!"], ["1.2.3.4", "--timeout", "-1"],
                                  []])
def test_call_bad_usage_exit_2(args):
    out = call(*args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


# --- check -------------------------------------------------------------------

def check(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
    full["SYNCHOOK_CONFIG"] = ""       # never this machine's /etc/synchook.conf
    full.update(env or {})
    return run([sys.executable, SYNCHOOK, "check"] + list(args), env=full)


def test_check_good_configuration(tmp_path, rec, shared_cert, hooks_dir):
    directory, _ = hooks_dir
    out = check("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--hold",
                hold_cmd(rec), "--hooks-dir", str(directory), "--port", str(free_port()),
                "--state-dir", str(shared_cert), "--runtime-dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("all good")
    assert "ok   stored certificate" in out.stdout and "is free" in out.stdout
    assert rec.lines() == ["hold-start", "10-a-sync-sync", "20-b-sync-sync", "sync", "post",
                           "20-b-post-sync-post-sync", "10-a-post-sync-post-sync", "hold-end"]
    assert "ok     sync: ok (" in out.stdout


@pytest.mark.slow
def test_check_bad_configuration(tmp_path, rec):
    bad_cert = tmp_path / "bad.pem"
    bad_cert.write_text("garbage")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        out = check("--sync", "exit 3", "--post-sync", rec.cmd("post"), "--listen",
                    "127.0.0.1", "--port", str(port), "--tls-cert", str(bad_cert),
                    "--tls-key", str(bad_cert), "--runtime-dir", str(tmp_path / "r"))
    assert out.returncode == 1
    assert "FAIL certificate" in out.stdout
    assert "FAIL port %d is already in use by another program" % port in out.stdout
    assert "FAIL   sync: command failed (exit 3)" in out.stdout
    assert rec.lines() == ["post"]                   # post phase ran all the same
    assert out.stdout.rstrip().endswith("3 problem(s)")


def test_check_recognises_running_daemon(start, tmp_path):
    d = start("--sync", "true")
    out = check("--sync", "true", "--listen", "127.0.0.1", "--port", str(d.port), "--tls", "off",
                "--runtime-dir", str(tmp_path / "r"))
    assert "ok   port %d is served by a running synchook" % d.port in out.stdout
    assert out.returncode == 0, out.stdout


FAKE_MYSQL = """#!/bin/sh
# A stand-in for `mysql -N --unbuffered`: the lock lives as long as its input.
while IFS= read -r line; do
    case $line in
        "FLUSH TABLES WITH READ LOCK;") echo lock >> "$REC" ;;
        'SELECT "locked";') echo locked ;;
    esac
done
echo unlock >> "$REC"
"""


def test_readme_mysql_recipe_with_stand_in(start, rec, tmp_path):
    import re
    readme = open(os.path.join(os.path.dirname(SYNCHOOK), "README.md")).read()
    hold = re.search(r"    --hold '(.+)' \\\n    --freeze /var/lib/mysql", readme).group(1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mysql").write_text(FAKE_MYSQL)
    os.chmod(str(bin_dir / "mysql"), 0o755)
    d = start("--hold", hold, "--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              env={"PATH": "%s:%s" % (bin_dir, os.environ["PATH"]), "REC": rec.file})
    assert d.get("/sync") == (200, "Ok")
    assert rec.lines() == ["lock", "sync"]          # locked before the sync command
    time.sleep(0.5)
    assert rec.lines() == ["lock", "sync"]          # and still locked
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["lock", "sync", "post", "unlock"]


@pytest.mark.slow
def test_check_no_run_checks_like_a_start_and_runs_nothing(rec, tmp_path):
    out = check("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--no-run",
                "--tls", "off", "--port", "0", "--runtime-dir", str(tmp_path / "r"))
    assert out.returncode == 0 and "all good (no command run)" in out.stdout, out.stdout
    assert rec.lines() == []
    out = check("--no-run", "--tls", "off", "--port", "0", "--secret-file",
                str(tmp_path / "missing"))
    assert out.returncode == 2 and "--secret-file %s" % (tmp_path / "missing") in out.stderr
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        out = check("--no-run", "--tls", "off", "--listen", "127.0.0.1", "--port", str(port),
                    "--sync", rec.cmd("sync"))
    assert out.returncode == 1 and "FAIL port %d is already in use" % port in out.stdout
    assert rec.lines() == []
