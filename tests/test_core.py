"""Requests and answers: what runs, what is refused, what reaches the log."""

import os
import signal
import socket
import time

import pytest

from conftest import SYNCHOOK, read_text, wait_until


def test_sync_runs_command_before_answering(start, rec, tmp_path):
    d = start("--sync", "sleep 0.3; " + rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    assert rec.lines() == ["sync"]          # already there when the answer came
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]


def test_query_string_ignored_for_routing(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync?token=abc&x=1") == (200, "Ok")
    assert d.get("/post-sync?") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]


def test_failing_command_is_500_with_exit_code(start):
    d = start("--sync", "exit 3", "--post-sync", "true")
    assert d.get("/sync") == (500, "command failed (exit 3)")
    assert d.get("/post-sync") == (200, "Ok")


def test_missing_command_is_500_not_found(start):
    d = start("--sync", "no-such-command-xyz", "--post-sync", "true")
    assert d.get("/sync") == (500, "command not found")


@pytest.mark.slow
def test_timeout_with_grandchild_holding_pipe(start, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    # The grandchild ignores SIGTERM and keeps stdout open.
    cmd = "sh -c 'trap \"\" TERM; echo $$ > %s; exec sleep 600' & wait" % pidfile
    d = start("--sync", cmd, "--timeout", "1", "--post-sync", "true")
    began = time.monotonic()
    assert d.get("/sync") == (500, "command timed out after 1 s")
    assert time.monotonic() - began < 8
    pid = int(pidfile.read_text())
    stat = "/proc/%d/stat" % pid                 # gone, or a zombie
    wait_until(lambda: read_text(stat).split(")")[-1].split()[:1] in ([], ["Z"]), 5,
               "grandchild %d ended by the timeout" % pid, 0.05)
    assert d.get("/post-sync") == (200, "Ok")   # the server is still serving


def test_background_grandchild_does_not_hold_request(start, tmp_path):
    # exit 0 at once, but leave a child with our stdout for 600 s
    pidfile = tmp_path / "grandchild.pid"
    d = start("--sync", "sleep 600 & echo $! > %s" % pidfile, "--post-sync", "true")
    began = time.monotonic()
    assert d.get("/sync") == (200, "Ok")
    assert time.monotonic() - began < 5
    os.kill(int(pidfile.read_text()), signal.SIGKILL)   # this test's alone (never pkill -f)


def test_output_goes_to_log_not_client(start):
    d = start("--sync", "echo secret-output; echo to-stderr >&2", "--post-sync", "true")
    status, body = d.get("/sync")
    assert (status, body) == (200, "Ok")
    d.wait_log(r"sync\| secret-output")
    d.wait_log(r"sync\| to-stderr")


def test_huge_output_bounded(start):
    # 100 MB of output: memory stays bounded, the log is cut, the answer comes.
    d = start("--sync", "head -c 100000000 /dev/zero | tr '\\0' 'a'; "
                        "seq 1 5000", "--post-sync", "true", "--timeout", "60")
    assert d.get("/sync", timeout=90) == (200, "Ok")
    d.wait_log(r"more output lines not logged")
    rss_kb = int([l for l in open("/proc/%d/status" % d.proc.pid) if l.startswith("VmHWM")][0]
                 .split()[1])
    assert rss_kb < 100000, "peak RSS %d kB while reading 100 MB of output" % rss_kb
    assert len(d.log()) < 5000000


def test_environment_of_commands(start, tmp_path):
    out = tmp_path / "env"
    d = start("--sync", "echo $SYNCHOOK_PHASE $SYNCHOOK_CLIENT $SYNCHOOK_SECRET. >> %s" % out,
              "--post-sync", "echo $SYNCHOOK_PHASE >> %s; [ ! -t 0 ] && read x || echo eof >> %s"
              % (out, out), env={"SYNCHOOK_SECRET": "hush"})
    assert d.get("/sync?token=hush")[0] == 200
    assert d.get("/post-sync?token=hush")[0] == 200
    assert out.read_text().split() == ["sync", "127.0.0.1", ".", "post-sync", "eof"]


def test_command_runs_in_own_process_group(start, tmp_path):
    out = tmp_path / "pg"
    d = start("--sync", "ps -o pgid= -p $$ > %s; echo $$ >> %s" % (out, out),
              "--post-sync", "true")
    assert d.get("/sync")[0] == 200
    pgid, pid = out.read_text().split()
    assert pgid == pid                          # leader of its own group
    assert int(pgid) != os.getpgid(d.proc.pid)


@pytest.mark.parametrize("path", ["/", "/sync/", "/SYNC", "/%73ync", "/sync;touch", "/status/x"])
def test_unknown_path_404(start, rec, path):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get(path)[0] == 404
    assert rec.lines() == []


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_405(start, rec, method):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    for path in ("/sync", "/post-sync"):
        conn = d.connection()
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        assert response.status == 405
        assert response.getheader("Allow") == "GET"
        conn.close()
    assert rec.lines() == []


def raw(d, data, read=True):
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("request_bytes", [
    b"GET /sync;touch x HTTP/1.1\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /sync HTTP/9.9\r\n\r\n",
    b"GET /sync HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"GET /sync HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /sync HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
])
@pytest.mark.slow
def test_malformed_requests_400_nothing_runs(start, rec, request_bytes):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    answer = raw(d, request_bytes)
    assert answer.split(b" ")[1] in (b"400", b"505"), answer
    assert rec.lines() == []


def test_no_request_data_reaches_a_shell(start, rec, tmp_path):
    marker = tmp_path / "pwned"
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--log-level", "debug")
    evil = "$(touch %s)`touch %s`;touch %s" % (marker, marker, marker)
    from urllib.parse import quote
    assert d.get("/sync?" + quote(evil))[0] == 200
    assert d.get("/sync?x=" + quote(evil), headers={"X-Evil": evil, "User-Agent": evil,
                                                       "Authorization": evil})[0] == 200
    assert d.get("/post-sync;" + quote(evil))[0] == 404
    raw(d, b"GET /sync?$(touch " + str(marker).encode() + b") HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close\r\n\r\n")
    assert d.get("/post-sync")[0] == 200
    assert not marker.exists()
    assert rec.lines() == ["sync", "post"]


def test_log_line_per_request_without_query(start):
    d = start("--sync", "true", "--post-sync", "true")
    d.get("/sync?token=supersecret")
    d.get("/nope")
    d.wait_log(r"127\.0\.0\.1 GET /sync 200 \d+\.\d+s")
    d.wait_log(r"127\.0\.0\.1 GET /nope 404 \d+\.\d+s")
    d.wait_log(r"sync: exit 0 in \d+\.\d+ s")
    assert "supersecret" not in d.log()


def test_control_characters_escaped_in_log(start):
    d = start("--sync", "printf 'a\\033[31mred\\n'", "--post-sync", "true")
    d.get("/sync")
    d.wait_log(r"sync\| a\\x1b\[31mred")
    assert "\x1b" not in d.log()


def test_journal_priority_prefixes(start):
    d = start("--sync", "exit 1", "--post-sync", "true", env={"JOURNAL_STREAM": "8:1234"})
    d.get("/sync")
    # (a line of an open window carries its own time: see tests/test_logging.py)
    d.wait_log(r"(?m)^<4>\[[^]]+\] sync: command failed \(exit 1\)")
    assert "<6>" in d.log()
    assert not any(line[:4].isdigit() for line in d.log().splitlines())


def test_keep_alive_connection_reused(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    conn = d.connection()
    for path in ("/sync", "/post-sync", "/sync", "/post-sync"):
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"Ok\n"
    conn.close()
    assert rec.lines() == ["sync", "post", "sync", "post"]


def test_server_header_hides_python(start):
    d = start("--sync", "true")
    conn = d.connection()
    conn.request("GET", "/nope")
    response = conn.getresponse()
    assert response.getheader("Server").startswith("synchook/")
    assert "Python" not in response.getheader("Server")


def test_output_past_the_cap_is_counted_not_lost():
    """Past 1,000 lines the output is only counted (in C): the count stays exact."""
    import synchook
    for text in (b"y\n" * 5000, b"a" * 3000 + b"\n" + b"b\n" * 1500 + b"tail",
                 b"\n" * 2500):
        logger = synchook.OutputLogger("t")
        old_level, synchook.log.level = synchook.log.level, 100
        try:
            for i in range(0, len(text), 777):
                logger.feed(text[i:i + 777])
            logger.close()
        finally:
            synchook.log.level = old_level
        lines = text.count(b"\n") + (0 if text.endswith(b"\n") else 1)
        assert logger.lines == 1000 and logger.lines + logger.suppressed == lines, text[:20]


def test_commands_get_stdin_stdout_stderr_only_and_default_signals(start):
    """A command sees no descriptor of the daemon's, not even one the daemon was
    started with, and starts with SIGPIPE and SIGXFSZ at their defaults (Python
    ignores both; a `yes | head` pipeline needs SIGPIPE) and no signal blocked.
    (glibc's posix_spawn leaves its own internal signals 32 and 33 ignored:
    they are not looked at.)"""
    import sys
    python = os.environ.get("SYNCHOOK_TEST_PYTHON") or sys.executable
    d = start("--sync", "ls /proc/$$/fd; awk '/^Sig(Ign|Blk)/ {print $1, $2}' /proc/$$/status",
              "--post-sync", "true",
              command=["sh", "-c", 'exec 7</dev/null 8>&2; exec "$0" "$@"', python, SYNCHOOK])
    assert d.get("/sync") == (200, "Ok")
    d.wait_log(r"GET /sync 200")
    seen = [line.split("sync| ", 1)[1] for line in d.log().splitlines() if "sync| " in line]
    assert seen[:3] == ["0", "1", "2"] and len(seen) == 5
    masks = dict(line.split(": ") for line in seen[3:])
    assert int(masks["SigBlk"], 16) == 0
    ignored = int(masks["SigIgn"], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), "signal %d ignored" % sig


def test_a_timeout_past_xos_wait_is_warned_about(start):
    d = start("--sync", "true", "--timeout", "56")
    d.wait_log(r"warning: --timeout 56 s: XO waits 60 s for /sync, then snapshots without "
               r"waiting for the sync phase and its freeze")
    d2 = start("--sync", "true", "--timeout", "55")
    d2.wait_log(r"anyone who can reach port")          # logged after that warning's place
    assert "XO waits" not in d2.log()
