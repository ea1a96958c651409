"""The built-in freeze (--freeze), on loop-mounted ext4 and xfs images only.

Every daemon here freezes either an explicit list of the test's own loop mounts or
`all` restricted to the test's directory (--freeze-under): never a filesystem of
the machine itself. Selection for `all` is also checked on mountinfo samples.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import (SYNCHOOK, accepts, assert_frozen, assert_thawed, interpreters, read_marker,
                      read_text, run, wait_until)

sys.path.insert(0, os.path.dirname(SYNCHOOK))
import synchook  # noqa: E402

FSTYPES = [pytest.param("ext4", id="ext4"),
           pytest.param("xfs", id="xfs", marks=pytest.mark.skipif(
               shutil.which("mkfs.xfs") is None, reason="mkfs.xfs not installed "
               "(apt-get install xfsprogs)"))]


@pytest.mark.parametrize("fstype", FSTYPES)
@pytest.mark.slow
def test_freeze_then_thaw_first_on_post_sync(start, loops, fstype):
    a, b = loops.add(fstype), loops.add(fstype)
    # The post command writes into a frozen filesystem: it can only finish if the
    # thaw came first.
    d = start("--freeze", "%s,%s" % (a, b), "--sync", "true",
              "--post-sync", "echo post > %s/post" % a)
    assert d.get("/sync") == (200, "Ok")
    assert_frozen(a)
    assert_frozen(b)
    state = json.loads(d.get("/status")[1])
    assert [f["mount"] for f in state["frozen"]] == [b, a]          # last mounted first
    assert d.get("/post-sync") == (200, "Ok")
    assert open(os.path.join(a, "post")).read() == "post\n"
    assert_thawed(a)
    assert_thawed(b)
    assert json.loads(d.get("/status")[1])["frozen"] == []


def test_freeze_all_under_a_directory_skips_what_cannot_freeze(start, loops):
    a, b = loops.add(), loops.add()
    tmpfs = loops.base / "scratch"
    tmpfs.mkdir()
    assert run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)]).returncode == 0
    loops.points.append(str(tmpfs))                   # unmounted at teardown
    d = start("--freeze", "all", "--freeze-under", str(loops.base), "--sync", "true",
              "--log-level", "debug")
    assert d.get("/sync") == (200, "Ok")
    assert [f["mount"] for f in json.loads(d.get("/status")[1])["frozen"]] == [b, a]
    d.wait_log(r"freeze: %s skipped \(tmpfs: virtual, remote or read-only\)" % tmpfs)
    assert d.get("/post-sync") == (200, "Ok")
    assert_thawed(a)


@pytest.mark.slow
def test_max_hold_and_sigterm_thaw(start, loops):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--max-hold", "1")
    assert d.get("/sync") == (200, "Ok")
    assert_frozen(a)
    assert_thawed(a)                                   # by --max-hold
    d2 = start("--freeze", a, "--sync", "true")
    assert d2.get("/sync") == (200, "Ok")
    assert_frozen(a)
    d2.signal(signal.SIGTERM)
    assert d2.wait(20) == 0
    assert_thawed(a)


@pytest.mark.slow
def test_sigkill_while_frozen_restart_thaws_first(start, loops, rec):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"))
    assert d.get("/sync") == (200, "Ok")
    marker = read_marker(d.runtime)
    assert [entry["point"] for entry in marker["freeze"]] == [a]
    d.kill_all()                                      # the guardian too
    assert_frozen(a)                                  # nobody left to thaw it
    d2 = start("--freeze", a, "--sync", "true", "--post-sync", rec.cmd("post"),
               "--runtime-dir", d.runtime)
    d2.wait_log(r"recovery: %s \(device \d+:\d+\): thawed" % a)
    assert_thawed(a)
    assert rec.lines() == ["post"]


@pytest.mark.slow
def test_bind_mount_of_a_frozen_filesystem_counts_as_done(start, loops):
    a = loops.add()
    bind = loops.base / "bind"
    bind.mkdir()
    assert run(["mount", "--bind", a, str(bind)]).returncode == 0
    loops.points.append(str(bind))
    d = start("--freeze", "%s,%s" % (a, bind), "--sync", "true")
    assert d.get("/sync") == (200, "Ok")
    d.wait_log(r"already frozen \(a bind mount")
    assert_frozen(a)
    assert d.get("/post-sync") == (200, "Ok")
    assert_thawed(str(bind))


@pytest.mark.slow
def test_mount_gone_since_start_fails_and_freezes_the_others(start, loops):
    """XO snapshots whatever /sync answers: the mounts that can be frozen are,
    and the answer names what failed and what was frozen anyway."""
    a, b = loops.add(), loops.add()
    d = start("--freeze", "%s,%s" % (a, b), "--sync", "true")
    assert run(["umount", b]).returncode == 0
    loops.points.remove(b)
    status, text = d.get("/sync")
    assert (status, text) == (500, "freeze %s: not a mount point; frozen anyway: %s" % (b, a))
    assert_frozen(a)
    d.wait_log(r"warning: sync phase failed: freeze %s: not a mount point; frozen anyway: %s"
               % (b, a))
    assert d.get("/post-sync") == (200, "Ok")
    assert_thawed(a)


@pytest.mark.slow
def test_an_error_midway_freezes_the_rest_anyway(loops):
    """FIFREEZE failing (EIO) on the second filesystem, after the first froze:
    made to fail by a stand-in ioctl, the only way to get such an error here.
    The first stays frozen, the third is frozen too, the thaw thaws both."""
    a, b, c = loops.add(), loops.add(), loops.add()
    real = synchook.fcntl

    class FailSecond:
        calls = 0

        @staticmethod
        def ioctl(fd, request, arg):
            if request == synchook.FIFREEZE:
                FailSecond.calls += 1
                if FailSecond.calls == 2:
                    raise OSError(5, "Input/output error")
            return real.ioctl(fd, request, arg)

    freezer = synchook.Freezer([a, b, c])
    synchook.fcntl = FailSecond
    try:
        result = freezer.freeze()                       # c, b, a: the reverse of mount order
    finally:
        synchook.fcntl = real
    assert not result.ok and result.reason == "freeze %s: Input/output error" % b
    assert freezer.summary() == "frozen anyway: %s, %s" % (c, a)
    assert_frozen(c)
    assert_frozen(a)
    assert freezer.thaw().ok
    assert_thawed(c)
    assert_thawed(a)


def test_synchook_on_the_frozen_filesystem_still_thaws(loops, tmp_path):
    """Its own script and its log file on the filesystem it freezes."""
    a = loops.add()
    shutil.copy(SYNCHOOK, os.path.join(a, "synchook.py"))
    log_file = os.path.join(a, "synchook.log")
    from conftest import free_port
    port = free_port()
    proc = subprocess.Popen(["sh", "-c", "exec %s %s/synchook.py --port %d --listen 127.0.0.1 "
                             "--tls off --runtime-dir %s --freeze %s --sync true 2>>%s"
                             % (sys.executable, a, port, tmp_path / "run", a, log_file)])
    try:
        import http.client
        wait_until(lambda: accepts(port, proc) and "listening" in read_text(log_file), 20,
                   "synchook listening", 0.05)
        for path in ("/sync", "/status", "/post-sync"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            conn.request("GET", path)
            assert conn.getresponse().status == 200, path
            conn.close()
        assert_thawed(a)
        proc.terminate()
        assert proc.wait(20) == 0
        assert "window closed (/post-sync): Ok" in open(log_file).read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("python", interpreters())
@pytest.mark.slow
def test_freeze_under_every_interpreter(start, loops, python):
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--tls", "off", python=python)
    assert d.get("/sync") == (200, "Ok")
    assert_frozen(a)
    assert d.get("/post-sync") == (200, "Ok")
    assert_thawed(a)


@pytest.mark.slow
def test_thaw_command_rescues_whoever_froze(loops):
    if shutil.which("fsfreeze") is None:
        pytest.skip("fsfreeze not installed (apt-get install util-linux)")
    a = loops.add()
    assert run(["fsfreeze", "-f", a]).returncode == 0       # frozen by someone else
    assert_frozen(a)
    out = run([sys.executable, SYNCHOOK, "thaw", "--under", str(loops.base)])
    assert out.returncode == 0 and "thawed     %s" % a in out.stdout, out.stdout
    assert_thawed(a)


def test_check_lists_the_freeze_and_freezes_nothing(loops, tmp_path):
    a = loops.add()
    out = run([sys.executable, SYNCHOOK, "check", "--freeze", "all", "--freeze-under",
               str(loops.base), "--sync", "true", "--tls", "off", "--port", "0",
               "--runtime-dir", str(tmp_path / "run")])
    assert "--freeze: would freeze, in this order: %s (check itself freezes nothing)" % a \
        in out.stdout, out.stdout
    assert_thawed(a)


def test_bad_freeze_settings_exit_2(tmp_path):
    for args, shown in ((["--freeze", "data"], "a mount point is an absolute path"),
                        (["--freeze", str(tmp_path)], "not a mount point"),
                        (["--freeze", "/", "--freeze-under", "/x"], "goes with --freeze all")):
        out = run([sys.executable, SYNCHOOK, "--tls", "off", "--port", "0"] + args)
        assert out.returncode == 2 and shown in out.stderr, (args, out.stderr)


# Selection for --freeze all, on real mountinfo texts --------------------------------

DEBIAN = r"""22 27 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 27 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
24 27 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4012032k,nr_inodes=1003008,mode=755
25 24 0:23 / /dev/pts rw,nosuid,noexec,relatime shared:3 - devpts devpts rw,gid=5,mode=620,ptmxmode=000
26 27 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=806312k,mode=755
27 1 202:1 / / rw,relatime shared:1 - ext4 /dev/xvda1 rw,errors=remount-ro
28 22 0:6 / /sys/kernel/security rw,nosuid,nodev,noexec,relatime shared:8 - securityfs securityfs rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
60 27 202:17 / /data rw,relatime shared:31 - ext4 /dev/xvdb1 rw
61 27 202:33 / /srv/my\040files rw,relatime shared:32 - xfs /dev/xvdc1 rw,attr2,inode64
62 27 0:50 / /mnt/nfs rw,relatime shared:33 - nfs4 10.0.0.9:/export rw,vers=4.2
"""

RHEL = r"""22 1 253:0 / / rw,relatime shared:1 - xfs /dev/mapper/rhel-root rw,seclabel,attr2
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
41 22 8:1 / /boot rw,relatime shared:28 - xfs /dev/sda1 rw,seclabel
42 22 253:2 / /home rw,relatime shared:29 - xfs /dev/mapper/rhel-home rw,seclabel
43 22 253:3 / /var/lib/db rw,relatime shared:30 - ext4 /dev/mapper/luks-0f1e rw,seclabel
"""

ALPINE = r"""19 1 202:3 / / rw,relatime - ext4 /dev/xvda3 rw
20 19 0:5 / /dev rw,nosuid,noexec,relatime - devtmpfs devtmpfs rw,size=10240k
21 19 0:19 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
24 19 202:1 / /boot rw,relatime - ext4 /dev/xvda1 rw
25 19 0:22 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw
"""

BTRFS = r"""29 1 0:26 /@ / rw,relatime shared:1 - btrfs /dev/sda2 rw,ssd,space_cache=v2,subvolid=256,subvol=/@
30 29 0:26 /@home /home rw,relatime shared:2 - btrfs /dev/sda2 rw,ssd,space_cache=v2,subvolid=257,subvol=/@home
31 29 8:1 / /boot/efi rw,relatime shared:3 - vfat /dev/sda1 rw,fmask=0022
32 29 0:45 / /mnt/fuse rw,nosuid,nodev,relatime shared:4 - fuse.sshfs me@host:/ rw,user_id=0
"""

CONTAINER = r"""512 480 0:120 / / rw,relatime master:150 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/ABC,upperdir=/x,workdir=/y
513 512 0:123 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
520 512 202:1 /var/lib/docker/volumes/db/_data /var/lib/mysql rw,relatime - ext4 /dev/xvda1 rw
521 512 0:124 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k
"""


@pytest.mark.parametrize("text,frozen,skipped", [
    (DEBIAN, ["/srv/my files", "/data", "/"], {"/run", "/proc", "/sys", "/mnt/nfs", "/dev"}),
    (RHEL, ["/var/lib/db", "/home", "/boot", "/"], {"/proc"}),
    (ALPINE, ["/boot", "/"], {"/tmp", "/proc", "/dev"}),
    (BTRFS, ["/boot/efi", "/home", "/"], {"/mnt/fuse"}),
    (CONTAINER, ["/var/lib/mysql"], {"/", "/proc", "/dev/shm"}),
], ids=["debian", "rhel-lvm-luks", "alpine", "btrfs-subvolumes", "container"])
def test_freeze_all_selection_on_mountinfo_samples(text, frozen, skipped):
    plan, skips = synchook.freeze_plan(synchook.parse_mountinfo(text), "all")
    assert [mount.point for mount in plan] == frozen
    assert skipped <= {point for point, _ in skips}
    assert not set(frozen) & {point for point, _ in skips}


def test_freeze_under_restricts_the_selection():
    plan, _ = synchook.freeze_plan(synchook.parse_mountinfo(RHEL), "all", "/var")
    assert [mount.point for mount in plan] == ["/var/lib/db"]
    plan, _ = synchook.freeze_plan(synchook.parse_mountinfo(RHEL), "all", "/ho")
    assert plan == []


@pytest.mark.slow
def test_the_tools_work_with_a_freeze_mount_missing(start, loops, tmp_path):
    """status and tag are wanted exactly when something is wrong: a --freeze
    mount gone since start stops neither; check lists it as a FAIL line."""
    a = loops.add()
    d = start("--freeze", a, "--sync", "true", "--tls", "off")
    assert run(["umount", a]).returncode == 0
    loops.points.remove(a)
    common = ["--freeze", a, "--port", str(d.port), "--listen", "127.0.0.1", "--tls", "off",
              "--runtime-dir", str(tmp_path / "run-check")]
    out = run([sys.executable, SYNCHOOK, "status"] + common)
    assert out.returncode == 0 and "window:         idle" in out.stdout, out.stdout + out.stderr
    out = run([sys.executable, SYNCHOOK, "tag"] + common)
    assert out.returncode == 0, out.stderr
    out = run([sys.executable, SYNCHOOK, "check", "--no-run"] + common)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL --freeze %s: not a mount point" % a in out.stdout, out.stdout
    out = run([sys.executable, SYNCHOOK, "--sync", "true"] + common)     # the daemon: exit 2
    assert out.returncode == 2 and "not a mount point" in out.stderr, out.stderr
