"""In a real guest (tests/vm): a Debian 12 VM under qemu with its own kernel,
systemd and journald, synchook installed by install.sh as a newcomer would,
`--freeze all`: the guest's own `/` is frozen by its own kernel.

One guest is booted for the module (about 30 s under TCG, plus the image's
first build, about 2 min, cached outside the checkout).  The host talks to
synchook through the forwarded port, as XO would; commands in the guest run
through qemu-guest-agent, polled gently (its log lines go to the journal, which
waits while `/` is frozen), and what must wait for the thaw waits inside the
guest.  Outcomes are asserted, never timings; the times are printed (-s).
"""

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, http_get

sys.path.insert(0, ROOT + "/tests/vm")
import guest as vm  # noqa: E402

# In the guest: is / frozen?  A file is created in the background; a second later
# it is there (thawed), or its creation still waits (frozen; it ends at the thaw).
# The waiting `touch` keeps none of the agent's output pipes open.
ROOT_STATE = ("n=probe-$(cut -d. -f1 /proc/uptime)-$$; "
              "(touch /$n </dev/null >/dev/null 2>&1 &); sleep 1; "
              "if [ -e /$n ]; then echo thawed; else echo frozen; fi")

# In the guest: run CMD, then wait until / takes a write; print the seconds between.
UNTIL_WRITABLE = ("before=$(cut -d' ' -f1 /proc/uptime); %s; touch /writable-$$; "
                  "after=$(cut -d' ' -f1 /proc/uptime); echo \"$before $after\"")


DATA_DISKS = ("data-a", "data-b")           # two virtio disks, snapshotted one by one


@pytest.fixture(scope="module")
def guest():
    reason = vm.why_not()
    if reason:
        pytest.skip(reason)
    try:
        directory = vm.image()
    except (RuntimeError, OSError) as err:
        pytest.skip("no guest image could be built here: %s" % err)
    machine = vm.Guest(directory, data_disks=DATA_DISKS)
    try:
        machine.boot()
        print("\nguest: booted in %.0f s" % machine.booted_in)
        # The sync command: /run/sync-step when a test puts one there, else nothing
        # (/run is mounted noexec: run by sh).
        code, out = machine.run(
            "cd /src && sh install.sh --init systemd --freeze all "
            "--sync '[ ! -f /run/sync-step ] || sh /run/sync-step' "
            "--post-sync 'echo post >> /run/posts' 2>&1", timeout=300)
        assert code == 0, out
        yield machine
    finally:
        machine.stop()


def posts(machine):
    return int(machine.run("cat /run/posts 2>/dev/null | wc -l")[1].strip())


def seconds_until_writable(machine, command):
    code, out = machine.run(UNTIL_WRITABLE % command, timeout=240, poll=2.0)
    assert code == 0, out
    before, after = (float(word) for word in out.split()[-2:])
    return after - before


def test_unit_has_no_mount_namespace_and_continues_on_oom(guest):
    code, out = guest.run("systemctl show -p OOMPolicy -p OOMScoreAdjust -p ProtectSystem "
                          "-p ProtectKernelTunables -p ProtectControlGroups -p PrivateTmp "
                          "-p PrivateMounts synchook")
    assert code == 0, out
    shown = dict(line.split("=", 1) for line in out.split())
    assert shown["OOMPolicy"] == "continue" and shown["OOMScoreAdjust"] == "0", shown
    for name in ("ProtectKernelTunables", "ProtectControlGroups", "PrivateTmp",
                 "PrivateMounts"):
        assert shown[name] == "no", shown
    assert shown["ProtectSystem"] == "no", shown


def test_sync_freezes_the_guests_own_root_and_post_sync_thaws_it(guest):
    before = posts(guest)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    assert guest.run(ROOT_STATE, poll=2.0)[1].strip() == "frozen"
    assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")
    assert guest.run(ROOT_STATE)[1].strip() == "thawed"
    assert posts(guest) == before + 1
    # journald waited on the frozen root: the window's lines carry synchook's own time
    code, out = guest.run("journalctl -u synchook -o cat --no-pager | tail -n 40")
    assert re.search(r"\[\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d\] window opened by 10\.0\.2\.2",
                     out), out


def released_by(guest, command, what, settle=0):
    """/sync (the guest's / frozen), then command in the guest: / takes a write
    again, the post command ran exactly once, synchook runs (settle seconds
    after).  Prints how long until / was writable."""
    before = posts(guest)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    took = seconds_until_writable(guest, command)
    print("\nguest: %s with / frozen: writable %.2f s later" % (what, took))
    assert guest.run("sleep %d; systemctl is-active synchook" % settle)[1].strip() == "active"
    assert posts(guest) == before + 1


def test_sigkill_of_the_daemon_with_root_frozen_is_released_by_the_guardian(guest):
    released_by(guest, "kill -KILL $(systemctl show -p MainPID --value synchook)",
                "SIGKILL of the daemon", settle=4)    # and the restart found nothing owed


def test_systemctl_kill_of_the_whole_service_with_root_frozen_is_recovered(guest):
    """Daemon, guardian and all: only systemd's restart can release, and 1.4.0's
    unit (a mount namespace) made that restart wait on the frozen / for good."""
    released_by(guest, "systemctl kill -s SIGKILL synchook", "systemctl kill -s SIGKILL",
                settle=2)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")      # and serving
    assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")


def test_systemctl_restart_with_a_window_open_releases_once(guest):
    released_by(guest, "systemctl restart synchook", "systemctl restart")


HOG = """#!/bin/sh
cat /proc/self/oom_score_adj > /run/score
exec python3 -c '
chunks = []
while True:
    chunks.append(bytearray(32 << 20))
'
"""


def test_a_sync_command_taken_by_the_oom_killer_costs_neither_synchook_nor_the_freeze(guest):
    """The sync command eats the service's memory (capped here at 256 MB, so that the
    OOM killer comes in seconds, not after minutes of thrashing under emulation).
    It has the OOM score it would have had (0, not synchook's -900), so the OOM
    killer takes it and nothing else; the unit's OOMPolicy=continue keeps synchook
    running; the freeze still runs."""
    guest.run("cat > /run/sync-step <<'EOF'\n%sEOF\n"
              "systemctl set-property --runtime synchook MemoryMax=256M" % HOG, check=True)
    try:
        before = posts(guest)
        status, text = http_get(guest.port, "/sync", timeout=120)
        assert status == 500 and text.endswith("; frozen anyway: /"), text
        assert "signal 9" in text or "exit 137" in text, text      # SIGKILL, the OOM killer
        assert guest.run(ROOT_STATE, poll=2.0)[1].strip() == "frozen"
        assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")
        assert guest.run(ROOT_STATE)[1].strip() == "thawed"
        assert posts(guest) == before + 1
        assert guest.run("cat /run/score")[1].strip() == "0"
        daemon = guest.run("cat /proc/$(systemctl show -p MainPID --value synchook)/"
                           "oom_score_adj")[1].strip()
        assert daemon == "-900", daemon
        code, out = guest.run("systemctl is-active synchook qemu-guest-agent "
                              "systemd-networkd; journalctl -k --no-pager | "
                              "grep -c 'Killed process'")
        lines = out.split()
        assert lines[:3] == ["active", "active", "active"], out
        assert lines[3] == "1", out                     # the hog, and nothing else
    finally:
        guest.run("rm -f /run/sync-step; "
                  "systemctl set-property --runtime synchook MemoryMax=infinity")


# Disk by disk, as XAPI snapshots a VM --------------------------------------------------

WRITER = """import os
fds = [os.open("/data/%s/seq" % name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
       for name in ("a", "b")]
i = 0
while True:
    for fd in fds:
        os.write(fd, b"%d\\n" % i)
        os.fsync(fd)
    i += 1
"""


def snapshot_pair(guest, round_, frozen):
    """Two ext4 disks written in lockstep (record i to a, then to b, each
    fsynced); the hypervisor snapshots one disk, then the other 2 s later, with
    synchook's window open or not.  Returns, per disk, (e2fsck -fn's exit code
    on the image as snapshotted, the last record once its journal is replayed)."""
    guest.run("for d in a b; do mkfs.ext4 -q -F /dev/disk/by-id/virtio-data-$d && "
              "mkdir -p /data/$d && mount /dev/disk/by-id/virtio-data-$d /data/$d; done",
              check=True)
    guest.run("cat > /run/writer.py <<'EOF'\n%sEOF\n"
              "setsid python3 /run/writer.py </dev/null >/dev/null 2>&1 & "
              "echo $! > /run/writer.pid; sleep 3" % WRITER,
              check=True)
    try:
        if frozen:
            assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
        images = {}
        for name in DATA_DISKS:
            images[name] = guest.active[name]
            guest.active[name] = os.path.join(guest.work, "%s-%d.qcow2" % (name, round_))
            guest.snapshot(name, guest.active[name])
            time.sleep(2)
        if frozen:
            assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")
    finally:
        guest.run("kill $(cat /run/writer.pid); sleep 1; umount /data/a /data/b", check=True)
    found = {}
    for name, image in images.items():
        raw = image + ".raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, raw], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", raw], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        # As a restore would: the journal replayed (a mount does it), then read.
        subprocess.run(["e2fsck", "-fy", raw], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        seq = subprocess.run(["debugfs", "-R", "cat /seq", raw], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        records = seq.stdout.split()
        found[name] = (fsck.returncode, int(records[-1]) if records else -1)
        os.unlink(raw)
    return found


def test_disks_snapshotted_one_after_the_other_agree_with_the_freeze(guest):
    """XAPI snapshots a VM's disks one after the other: with synchook's freeze
    both images are clean and their last records agree; without it (the
    control, which must be able to fail) the second disk is seconds ahead."""
    guest.active = {name: guest.disk(name) for name in DATA_DISKS}
    with_freeze = snapshot_pair(guest, 1, frozen=True)
    without = snapshot_pair(guest, 2, frozen=False)
    print("\nguest: disk by disk, with synchook: %s; without: %s" % (with_freeze, without))
    (fsck_a, last_a), (fsck_b, last_b) = with_freeze["data-a"], with_freeze["data-b"]
    assert fsck_a == 0 and fsck_b == 0, with_freeze
    assert last_a > 0 and last_b in (last_a, last_a - 1), with_freeze
    (_, last_a), (_, last_b) = without["data-a"], without["data-b"]
    assert last_b > last_a + 1, without                 # torn: b seconds ahead of a


# Last: the uninstall ----------------------------------------------------------------

def test_status_and_uninstall_as_the_readme_says(guest):
    code, out = guest.run("synchook status")
    assert code == 0 and "window:         idle" in out, out
    code, out = guest.run("cd /src && sh install.sh --uninstall 2>&1")
    assert code == 0, out
    assert guest.run("systemctl is-active synchook")[1].strip() != "active"
