"""A real ext4 on a loop device, frozen by the hook: writers block, then resume."""

import os
import shutil
import subprocess
import re

import pytest

from conftest import read_text, run, start_writer, wait_until, waits_on_freeze

NEEDED = ["losetup", "mkfs.ext4", "mount", "umount", "fsfreeze"]


def _why_not():
    if os.geteuid() != 0:
        return "needs root (loop devices, mount, fsfreeze)"
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return "missing tools: %s (apt-get install util-linux e2fsprogs)" % ", ".join(missing)
    return None


@pytest.fixture
def frozen_fs(tmp_path):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    image = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(str(image), "wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    made = run(["mkfs.ext4", "-q", "-F", str(image)])
    if made.returncode:
        pytest.skip("mkfs.ext4 failed: " + made.stderr.strip())
    loop = run(["losetup", "--find", "--show", str(image)])
    if loop.returncode:
        pytest.skip("no loop device here: " + loop.stderr.strip())
    device = loop.stdout.strip()
    mounted = run(["mount", device, str(mnt)])
    if mounted.returncode:
        run(["losetup", "-d", device])
        pytest.skip("cannot mount a loop device here: " + mounted.stderr.strip())
    try:
        yield str(mnt)
    finally:
        run(["fsfreeze", "-u", str(mnt)])          # always thaw, even if a test failed
        run(["umount", str(mnt)])
        run(["losetup", "-d", device])


@pytest.mark.slow
def test_fsfreeze_blocks_writer_until_post_sync(start, frozen_fs):
    d = start("--sync", "fsfreeze -f %s" % frozen_fs, "--post-sync", "fsfreeze -u %s" % frozen_fs)
    assert d.get("/sync") == (200, "Ok")
    done = start_writer(frozen_fs)
    assert waits_on_freeze(done, 1.0), "write went through a frozen filesystem"
    assert d.get("/post-sync") == (200, "Ok")
    assert done.wait(10), "writer still blocked after /post-sync"


@pytest.mark.slow
def test_fsfreeze_thawed_by_max_hold(start, frozen_fs):
    d = start("--sync", "fsfreeze -f %s" % frozen_fs, "--post-sync", "fsfreeze -u %s" % frozen_fs,
              "--max-hold", "2")
    assert d.get("/sync") == (200, "Ok")
    done = start_writer(frozen_fs)
    assert waits_on_freeze(done, 1.0), "write went through a frozen filesystem"
    assert done.wait(10), "max-hold did not thaw the filesystem"
    d.wait_log(r"no /post-sync within --max-hold")


def test_logging_to_frozen_filesystem_does_not_deadlock(start, frozen_fs, tmp_path):
    """stderr is a file on the frozen filesystem: the thaw must still happen."""
    log_file = os.path.join(frozen_fs, "synchook.log")
    script = ("exec %s %s --port 0 --listen 127.0.0.1 --runtime-dir %s --tls off "
              "--sync 'fsfreeze -f %s; echo frozen' --post-sync 'fsfreeze -u %s; echo thawed' "
              "2>>%s" % (__import__("sys").executable, __import__("conftest").SYNCHOOK,
                         tmp_path / "run2", frozen_fs, frozen_fs, log_file))
    proc = subprocess.Popen(["sh", "-c", script])
    try:
        match = wait_until(lambda: re.search(r"listening on \S+ port (\d+)",
                                             read_text(log_file)), 20, "synchook listening", 0.05)
        port = int(match.group(1))
        import http.client
        for path in ("/sync", "/post-sync"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            conn.request("GET", path)
            assert conn.getresponse().status == 200
            conn.close()
        done = start_writer(frozen_fs)
        assert done.wait(10)
    finally:
        run(["fsfreeze", "-u", frozen_fs])
        proc.terminate()
        proc.wait(20)
