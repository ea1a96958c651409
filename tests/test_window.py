"""The sync window: opened once, closed exactly once, whatever happens."""

import json
import os
import re
import signal
import stat
import threading
import time

import pytest

import synchook
from conftest import read_marker, run, window_open


def parallel(n, fn):
    results = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_twenty_concurrent_syncs_run_once_one_post_releases(start, rec):
    d = start("--sync", "sleep 0.3; " + rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    results = parallel(20, lambda: d.get("/sync"))
    assert results == [(200, "Ok")] * 20
    assert rec.lines() == ["sync"]
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]
    status = json.loads(d.get("/status")[1])
    assert status["state"] == "idle"


@pytest.mark.slow
def test_commands_never_overlap(start, tmp_path):
    lock = tmp_path / "lock"
    overlap = tmp_path / "overlap"
    body = ("if ! mkdir %s 2>/dev/null; then touch %s; fi; sleep 0.1; rmdir %s"
            % (lock, overlap, lock))
    d = start("--sync", body, "--post-sync", body)
    results = parallel(6, lambda: (d.get("/sync"), d.get("/post-sync")))
    assert all(r[0][0] == 200 and r[1][0] == 200 for r in results)
    assert not overlap.exists()


@pytest.mark.slow
def test_sync_while_open_does_not_rerun_and_restarts_max_hold(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--max-hold", "2")
    assert d.get("/sync") == (200, "Ok")
    time.sleep(1.3)
    assert d.get("/sync") == (200, "Ok")      # XO: checkpoint falling back to snapshot
    time.sleep(1.3)                           # 2.6 s after the first /sync: still held
    assert rec.lines() == ["sync"]
    rec.wait_for(["sync", "post"], timeout=5)  # released 2 s after the second
    assert d.get("/post-sync") == (200, "Ok")  # late: not run again
    assert rec.lines() == ["sync", "post"]


def test_failed_sync_still_owes_post(start, rec):
    d = start("--sync", rec.cmd("sync") + "; exit 4", "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (500, "command failed (exit 4)")
    assert d.get("/sync") == (500, "command failed (exit 4)")   # same window, not re-run
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]


@pytest.mark.slow
def test_timed_out_sync_still_owes_post(start, rec):
    d = start("--sync", rec.cmd("sync") + "; sleep 30", "--timeout", "0.5",
              "--post-sync", rec.cmd("post"), "--max-hold", "1")
    assert d.get("/sync")[0] == 500
    rec.wait_for(["sync", "post"], timeout=5)      # by max-hold, since no /post-sync came


def test_post_sync_during_slow_sync_cuts_it_short(start, rec):
    d = start("--sync", rec.cmd("sync-start") + "; sleep 30; " + rec.cmd("sync-end"),
              "--post-sync", rec.cmd("post"))
    answers = {}
    t = threading.Thread(target=lambda: answers.update(sync=d.get("/sync")))
    t.start()
    rec.wait_for(["sync-start"])
    began = time.monotonic()
    assert d.get("/post-sync") == (200, "Ok")
    assert time.monotonic() - began < 5
    t.join(10)
    assert answers["sync"] == (500, "command ended early: /post-sync arrived")
    time.sleep(0.3)
    assert rec.lines() == ["sync-start", "post"]


@pytest.mark.slow
def test_max_hold_release_then_late_post_not_rerun(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--max-hold", "1")
    assert d.get("/sync") == (200, "Ok")
    rec.wait_for(["sync", "post"], timeout=5)
    d.wait_log(r"warning: no /post-sync within --max-hold 1 s")
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]
    assert d.get("/post-sync") == (200, "Ok")      # no window: released again, safe
    assert rec.lines() == ["sync", "post", "post"]


def test_post_sync_without_window_runs_post(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["post"]


def test_sigterm_with_open_window_runs_post_and_exits_0(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert rec.lines() == ["sync", "post"]
    assert not window_open(d.runtime)


@pytest.mark.slow
def test_sigint_lets_running_sync_finish_then_releases(start, rec):
    d = start("--sync", "sleep 1; " + rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    t = threading.Thread(target=lambda: d.get("/sync"))
    t.start()
    time.sleep(0.4)
    d.signal(signal.SIGINT)
    assert d.wait(20) == 0
    t.join(5)
    assert rec.lines() == ["sync", "post"]


def test_sigkill_then_restart_runs_post_from_marker(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    assert read_marker(d.runtime)["client"] == "127.0.0.1"
    d.kill_all()                                      # the guardian too: only a restart is left
    assert rec.lines() == ["sync"]
    d2 = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
               "--runtime-dir", d.runtime)
    assert rec.lines() == ["sync", "post"]            # before it served anything
    assert not window_open(d.runtime)
    d2.wait_log(r"previous run ended with a window open")
    assert d2.get("/sync") == (200, "Ok")
    assert d2.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post", "sync", "post"]


def test_marker_empty_when_idle(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    marker = os.path.join(d.runtime, "window.json")
    assert not window_open(d.runtime)
    assert d.get("/sync")[0] == 200
    assert window_open(d.runtime)
    assert d.get("/post-sync")[0] == 200
    assert not window_open(d.runtime)
    st = os.lstat(marker)                # kept, closed and its space allocated, for the next
    assert stat.S_ISREG(st.st_mode) and st.st_size == synchook.MARKER_SPACE   # window
    assert st.st_mode & 0o077 == 0 and open(marker, "rb").read(1) == b"\n"
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert not os.path.lexists(marker)                 # a clean stop leaves nothing


def test_status_reports_open_window(start):
    d = start("--sync", "true", "--post-sync", "true")
    d.get("/sync")
    status = json.loads(d.get("/status")[1])
    assert status["state"] == "open" and status["opened_by"] == "127.0.0.1"
    assert status["last_sync"]["status"] == 200
    assert status["last_sync"]["steps"][0]["exit"] == 0
    assert 0 < status["max_hold_left"] <= 300
    d.get("/post-sync")
    status = json.loads(d.get("/status")[1])
    assert status["state"] == "idle" and status["last_post_sync"]["reason"] == "Ok"
    assert status["version"] and status["uptime"] >= 0


@pytest.mark.slow
def test_idle_server_makes_no_wakeups(start):
    """No periodic polling: the process's context switches stay flat while idle."""
    d = start("--sync", "true", "--post-sync", "true")
    d.get("/sync")
    d.get("/post-sync")
    time.sleep(0.5)

    def switches():
        total = 0
        for tid in os.listdir("/proc/%d/task" % d.proc.pid):
            with open("/proc/%d/task/%s/status" % (d.proc.pid, tid)) as handle:
                for line in handle:
                    if "ctxt_switches" in line:
                        total += int(line.split()[1])
        return total

    before = switches()
    time.sleep(3)
    assert switches() - before <= 2
    run(["true"])


def test_sighup_does_not_kill_an_open_window(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    d.signal(signal.SIGHUP)
    d.wait_log(r"SIGHUP received: ignored")
    assert d.proc.poll() is None
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]


# The marker: one JSON object per line, kept empty between windows ------------------------

def test_empty_marker_at_start_is_no_window(start, rec, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (runtime / "window.json").write_text("")         # left by a run that died idle
    os.chmod(str(runtime / "window.json"), 0o600)
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              "--runtime-dir", str(runtime))
    assert d.get("/sync") == (200, "Ok")
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]            # no post phase of its own at start
    assert "previous run ended" not in d.log()


def test_marker_with_a_torn_last_line_is_recovered(start, rec, tmp_path):
    """A crash while a line is added: the lines before it still name the window."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    with open("/proc/sys/kernel/random/boot_id") as handle:
        boot = handle.read().strip()
    first = json.dumps({"pid": 1, "opened_at": 1764500000.5, "client": "192.0.2.7",
                        "boot_id": boot, "groups": [], "post_plan": [
                            ["post-sync", ["/bin/sh", "-c", rec.cmd("post")]]],
                        "timeout": 55, "post_done": []})
    (runtime / "window.json").write_text(first + '\n{"groups": [{"pgid": 12')
    os.chmod(str(runtime / "window.json"), 0o600)
    d = start("--sync", rec.cmd("sync"), "--post-sync", "true", "--runtime-dir", str(runtime))
    assert rec.lines() == ["post"]                    # the marker's post phase, not today's
    d.wait_log(r"window opened 20\d\d-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d by 192\.0\.2\.7, process 1")
    assert not window_open(runtime)


def test_a_marker_of_synchook_1_2_is_still_recovered(start, rec, tmp_path):
    """The decision on old markers: those of 1.2 and older (paths only, no post
    plan, no filesystem identities) are read until 2.0.  The marker lives on
    /run, a tmpfs: only an upgrade in place from 1.2 while a window was open
    meets one, and it must still be closed: its paths thawed, the post phase of
    today's settings run once."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    with open("/proc/sys/kernel/random/boot_id") as handle:
        boot = handle.read().strip()
    gone = str(tmp_path / "unmounted-since")
    (runtime / "window.json").write_text(json.dumps({
        "pid": 1, "opened_at": 1764500000.5, "client": "192.0.2.7", "boot_id": boot,
        "groups": [], "frozen": [gone]}) + "\n")
    os.chmod(str(runtime / "window.json"), 0o600)
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              "--runtime-dir", str(runtime))
    assert rec.lines() == ["post"]
    d.wait_log(r"recovery: %s: cannot open" % re.escape(gone))
    assert not window_open(runtime)
    assert d.get("/sync") == (200, "Ok") and d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["post", "sync", "post"]


def test_marker_lines_override_the_ones_before():
    import synchook
    assert synchook.parse_marker(['{"pid": 1, "groups": []}', '{"groups": [5]}',
                                  '{"frozen": ["/a"]}', '{"gro']) == {
        "pid": 1, "groups": [5], "frozen": ["/a"]}
    assert synchook.parse_marker(['{"pid": 1', '{"groups": [5]}']) == {}   # torn first: open
    assert synchook.parse_marker(["[1]"]) == {}


def test_marker_removed_between_windows_is_made_again(start, rec):
    """Someone cleans the runtime dir: the next window's marker is not written to
    the removed file, where no guardian or restart would find it."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok") and d.get("/post-sync") == (200, "Ok")
    os.unlink(os.path.join(d.runtime, "window.json"))
    assert d.get("/sync") == (200, "Ok")
    assert window_open(d.runtime)
    assert read_marker(d.runtime)["client"] == "127.0.0.1"
    d.wait_log(r"window marker .* was removed: making it again")
    assert d.get("/post-sync") == (200, "Ok")
    assert not window_open(d.runtime)


def test_marker_reads_every_line_however_long(tmp_path):
    """No size at which a line is lost: 3,000 process groups (about 150 KB, more
    than the space kept for the marker), then the freeze's line."""
    marker = synchook.Marker(str(tmp_path))
    marker.prepare()
    assert os.path.getsize(marker.path) == synchook.MARKER_SPACE
    assert marker.open_window("192.0.2.1", 1.0, [["thaw", None]], 55) is None
    for pgid in range(2, 3002):
        assert marker.add({"group": {"pgid": pgid, "start": [0, 1]}})
    data = synchook.Mount("/data", "ext4", "/dev/vdb", os.makedev(254, 16), 42)
    assert marker.freezing(data)
    info = marker.read()
    assert len(info["groups"]) == 3000 and info["freeze"][0]["point"] == "/data"
    marker.not_frozen(data)
    assert marker.read()["freeze"] == []
    marker.close_window()
    assert marker.read() is None
    assert marker.open_window("192.0.2.1", 2.0, [], 55) is None     # the next window:
    assert marker.read()["groups"] == []                            # none of the last's
