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

import http.client
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, build_packages, http_get

sys.path.insert(0, ROOT + "/tests/vm")
import guest as vm  # noqa: E402
import synchook  # noqa: E402

pytestmark = pytest.mark.slow

# In the guest: is / frozen?  A file is created in the background; a second later
# it is there (thawed), or its creation still waits (frozen; it ends at the thaw).
# The waiting `touch` keeps none of the agent's output pipes open.
ROOT_STATE = ("n=probe-$(cut -d. -f1 /proc/uptime)-$$; "
              "(touch /$n </dev/null >/dev/null 2>&1 &); sleep 1; "
              "if [ -e /$n ]; then echo thawed; else echo frozen; fi")

# In the guest: run CMD, then wait until / takes a write; print the seconds between.
UNTIL_WRITABLE = ("before=$(cut -d' ' -f1 /proc/uptime); { %s; } >/run/until.out 2>&1; "
                  "touch /writable-$$; "
                  "after=$(cut -d' ' -f1 /proc/uptime); cat /run/until.out; "
                  "echo \"$before $after\"")


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
    # Each data disk's current image: a snapshot moves the guest to a new overlay.
    machine.active = {name: machine.disk(name) for name in DATA_DISKS}
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


def a_window_freezes_and_thaws_root(guest):
    """XO's /sync freezes the guest's `/`, /post-sync thaws it, the post command once."""
    before = posts(guest)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    assert guest.run(ROOT_STATE, poll=2.0)[1].strip() == "frozen"
    assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")
    assert guest.run(ROOT_STATE)[1].strip() == "thawed"
    assert posts(guest) == before + 1


def test_sync_freezes_the_guests_own_root_and_post_sync_thaws_it(guest):
    a_window_freezes_and_thaws_root(guest)
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
    state = guest.run("sleep %d; systemctl is-active synchook" % settle)[1].strip()
    assert state == "active", guest.run("systemctl status synchook synchook.socket; journalctl -u synchook -n 30 --no-pager")[1]
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


def test_the_oom_killer_taking_synchook_itself_is_released_by_the_guardian(guest):
    """The kernel's OOM killer, made to choose the daemon (its score raised to the
    top, then a manual OOM kill: sysrq f): the guardian releases the window, and
    systemd (OOMPolicy=continue, Restart=on-failure) starts synchook again."""
    code, pid = guest.run("systemctl show -p MainPID --value synchook")
    released_by(guest, "echo 1000 > /proc/%s/oom_score_adj; echo f > /proc/sysrq-trigger; "
                "while kill -0 %s 2>/dev/null; do sleep 0.2; done" % (pid.strip(), pid.strip()),
                "the OOM killer taking synchook", settle=6)
    code, out = guest.run("journalctl -k --no-pager | grep 'Killed process %s '" % pid.strip())
    assert code == 0 and "python3" in out, out


# The port: systemd holds it (synchook.socket) --------------------------------------------

THIEF = """import socket, sys, time
end, took = time.time() + float(sys.argv[1]), 0
while time.time() < end:
    sock = socket.socket(socket.AF_INET6)
    try:
        sock.bind(("::", 1727))
        took += 1
    except OSError:
        pass
    finally:
        sock.close()
print(took)
"""


def test_the_port_stays_bound_across_restart_and_crash(guest):
    """A local user binding 1727 in a loop while synchook restarts and is
    SIGKILLed never gets it (1.5.0's unit freed it each time); XO's requests
    made meanwhile wait in the socket's queue and are answered."""
    assert guest.run("systemctl is-active synchook.socket")[1].strip() == "active"
    guest.run("cat > /run/thief.py <<'EOF'\n%sEOF\n" % THIEF, check=True)
    guest.run("setpriv --reuid=65534 --regid=65534 --clear-groups python3 /run/thief.py 25 "
              ">/run/thief.out 2>&1 </dev/null & sleep 2; systemctl restart synchook; "
              "sleep 3; kill -KILL $(systemctl show -p MainPID --value synchook)", check=True)
    answers = [http_get(guest.port, "/status", timeout=60)[0] for _ in range(3)]
    assert answers == [200] * 3
    code, out = guest.run("sleep 22; cat /run/thief.out; systemctl show -p NRestarts "
                          "--value synchook", timeout=60)
    took, restarts = out.split()
    assert took == "0", "a local user bound synchook's port %s times" % took
    assert int(restarts) >= 1, out
    assert guest.run("systemctl is-active synchook")[1].strip() == "active"


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
    killed = "journalctl -k --no-pager | grep -c 'Killed process'"
    try:
        before, kills = posts(guest), int(guest.run(killed)[1].strip())
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
                              "systemd-networkd; " + killed)
        lines = out.split()
        assert lines[:3] == ["active", "active", "active"], out
        assert int(lines[3]) == kills + 1, out          # the hog, and nothing else
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


def snapshot_disks(guest, names, tag, frozen, gap=2, between=None):
    """The hypervisor snapshots the disks one after the other, gap seconds
    apart, inside synchook's window (frozen) or not: {name: the image as it
    was snapshotted}.  The guest goes on on new overlays.  between, a shell
    command, runs in the guest before each snapshot but the first (a control
    uses it to make certain that something changed in between)."""
    if frozen:
        assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    images = {}
    for index, name in enumerate(names):
        if between and index:
            guest.run(between, check=True, timeout=120)
        images[name] = guest.active[name]
        guest.active[name] = os.path.join(guest.work, "%s-%s.qcow2" % (name, tag))
        guest.snapshot(name, guest.active[name])
        time.sleep(gap)
    if frozen:
        assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")
    return images


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
        images = snapshot_disks(guest, DATA_DISKS, str(round_), frozen)
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
    with_freeze = snapshot_pair(guest, 1, frozen=True)
    without = snapshot_pair(guest, 2, frozen=False)
    print("\nguest: disk by disk, with synchook: %s; without: %s" % (with_freeze, without))
    (fsck_a, last_a), (fsck_b, last_b) = with_freeze["data-a"], with_freeze["data-b"]
    assert fsck_a == 0 and fsck_b == 0, with_freeze
    assert last_a > 0 and last_b in (last_a, last_a - 1), with_freeze
    (_, last_a), (_, last_b) = without["data-a"], without["data-b"]
    assert last_b > last_a + 1, without                 # torn: b seconds ahead of a


# PostgreSQL across two disks, restored in a second VM --------------------------------

PG = "/usr/lib/postgresql/15/bin"
PG_RUN = "runuser -u postgres -- "

PG_CHECKPOINT = PG_RUN + "psql -h /run/pg -qc CHECKPOINT postgres"

PG_START = ("mkdir -p /run/pg && chown postgres /run/pg && " + PG_RUN + PG +
            "/pg_ctl -D /data/a/pg -l /run/pg/log -w -t 240 start >/dev/null 2>&1")

# pgbench's invariant: every transaction adds the same delta to an account, its
# teller, its branch, and writes it to the history.
PG_BALANCES = (PG_RUN + "psql -h /run/pg -Atc \"select (select sum(abalance) from "
               "pgbench_accounts) = (select sum(bbalance) from pgbench_branches) and "
               "(select sum(bbalance) from pgbench_branches) = (select sum(tbalance) from "
               "pgbench_tellers) and (select sum(tbalance) from pgbench_tellers) = "
               "(select coalesce(sum(delta), 0) from pgbench_history)\" postgres")


def pg_workload(guest):
    """PGDATA on data-a, its WAL on data-b; pgbench running, a CHECKPOINT every
    0.5 s (each one writes data files and moves pg_control forward)."""
    guest.run("for d in a b; do mkfs.ext4 -q -F /dev/disk/by-id/virtio-data-$d && "
              "mkdir -p /data/$d && mount /dev/disk/by-id/virtio-data-$d /data/$d; done && "
              "mkdir -p /data/a/pg /data/b/wal && chown postgres /data/a/pg /data/b/wal && " +
              PG_RUN + PG + "/initdb -D /data/a/pg --waldir=/data/b/wal/pg_wal >/dev/null && "
              "printf \"listen_addresses = ''\\nunix_socket_directories = '/run/pg'\\n\" "
              ">> /data/a/pg/postgresql.conf && " + PG_START + " && " +
              PG_RUN + PG + "/pgbench -q -h /run/pg -i -s 1 postgres >/dev/null 2>&1",
              check=True, timeout=400)
    guest.run("setsid " + PG_RUN + PG + "/pgbench -h /run/pg -c 2 -T 3600 postgres "
              "</dev/null >/dev/null 2>&1 & echo $! > /run/pgbench.pid; "
              "setsid sh -c 'while :; do " + PG_CHECKPOINT + "; "
              "sleep 0.5; done' </dev/null >/dev/null 2>&1 & echo $! > /run/checkpoints.pid; "
              "sleep 5", check=True)


def test_postgresql_on_two_disks_restored_from_disk_by_disk_snapshots(guest):
    """The restore an admin does: a second VM boots from the hypervisor's
    snapshots of the two disks, taken one after the other (the WAL's first,
    the data's 3 s later, checkpoints running).  With synchook's freeze
    PostgreSQL starts and pgbench's balances agree; without it (the control,
    a CHECKPOINT forced between the two snapshots, and still able to fail)
    it does not start, or they disagree."""
    pg_workload(guest)
    images = {}
    try:
        for round_, frozen in ((1, True), (2, False)):
            # The WAL's disk first; without synchook a CHECKPOINT between the
            # two makes the torn pair certain (pg_control then names a
            # checkpoint the WAL's copy does not have).
            taken = snapshot_disks(guest, ("data-b", "data-a"), "pg%d" % round_, frozen,
                                   gap=3, between=None if frozen else PG_CHECKPOINT)
            images.update(("%s-%d" % (name, round_), image) for name, image in taken.items())
    finally:
        guest.run("kill $(cat /run/checkpoints.pid) $(cat /run/pgbench.pid); sleep 1; " + PG_RUN + PG +
                  "/pg_ctl -D /data/a/pg -m fast stop; umount /data/a /data/b", timeout=120)
    restored = vm.Guest(guest.image_dir, restored=images)
    outcomes = {}
    try:
        restored.boot()
        for round_ in (1, 2):
            code, out = restored.run(
                "mkdir -p /data/a /data/b && "
                "mount /dev/disk/by-id/virtio-data-a-%d /data/a && "
                "mount /dev/disk/by-id/virtio-data-b-%d /data/b && " % (round_, round_) +
                "if " + PG_START + "; then " + PG_BALANCES + "; " + PG_RUN + PG +
                "/pg_ctl -D /data/a/pg -m fast stop >/dev/null; else echo 'no start:'; "
                "grep -m1 -e PANIC -e FATAL /run/pg/log; fi; umount /data/a /data/b; "
                "rm -f /run/pg/log", timeout=400)
            outcomes[round_] = out.strip()
    finally:
        restored.stop()
    print("\nguest: PostgreSQL restored from disk-by-disk snapshots: with synchook %r; "
          "without %r" % (outcomes[1], outcomes[2]))
    assert outcomes[1] == "t", outcomes
    assert outcomes[2] != "t", outcomes                   # torn: no start, or balances off


# One LVM volume group spanning both disks ------------------------------------------------

# One file of 200 MB on one ext4 over a linear LV (about 248 MB over two 128 MB
# disks), written whole: its first blocks and its last ones lie on different
# disks (the test checks where, with filefrag).  Record i (its number, 8 bytes)
# is written in place at 8 i in the file's first region, then in its last one,
# each fsynced: no allocation, no metadata, the records stay where they are.
LVM_SETUP = """set -e
pvcreate -qq -ff -y /dev/disk/by-id/virtio-data-a /dev/disk/by-id/virtio-data-b
vgcreate -qq span /dev/disk/by-id/virtio-data-a /dev/disk/by-id/virtio-data-b
lvcreate -qq -y -l 100%FREE -n lv span
mkfs.ext4 -q -b 4096 /dev/span/lv
mkdir -p /span && mount /dev/span/lv /span
dd if=/dev/zero of=/span/big bs=1M count=200 conv=fsync status=none
pvs --noheadings --units b --nosuffix -o pv_name,pe_start
lvs --noheadings --units b --nosuffix -o seg_start,seg_size,devices span/lv
filefrag -v -b4096 /span/big | grep -E '^ +[0-9]+:'
"""

LAST_REGION = (200 - 8) << 20              # the file offset of the second region

IN_PLACE_WRITER = """import os
fd = os.open("/span/big", os.O_WRONLY)
i = 1
while i < 1000000:
    for base in (0, %d):
        os.pwrite(fd, b"%%08d" %% i, base + 8 * i)
        os.fsync(fd)
    i += 1
""" % LAST_REGION


def lv_image(layout, images, out):
    """The LV as its two disks' images hold it, put together on this machine
    without LVM: each segment of the linear LV from its disk at its offset."""
    with open(out, "wb") as target:
        for seg_start, seg_size, disk, disk_offset in layout:
            with open(images[disk], "rb") as source:
                source.seek(disk_offset)
                target.seek(seg_start)
                left = seg_size
                while left:
                    chunk = source.read(min(left, 1 << 20))
                    target.write(chunk)
                    left -= len(chunk)


def last_record(raw, offset):
    """The highest record number in the 8 MB of raw at offset."""
    with open(raw, "rb") as handle:
        handle.seek(offset)
        data = handle.read(8 << 20)
    records = [data[i:i + 8] for i in range(0, len(data), 8)]
    return max((int(r) for r in records if r.strip(b"\0").isdigit()), default=-1)


def lv_offset(extents, file_offset):
    """The LV offset of a file offset, from filefrag's extents (4 KiB blocks)."""
    block = file_offset // 4096
    for logical, last, physical in extents:
        if logical <= block <= last:
            return (physical + block - logical) * 4096 + file_offset % 4096
    raise AssertionError("file offset %d in no extent: %s" % (file_offset, extents))


def disk_of(segments, offset):
    return [disk for start, size, disk, _ in segments if start <= offset < start + size][0]


def test_an_lvm_volume_spanning_both_disks_is_whole_with_the_freeze(guest):
    """A common layout: one volume group over both virtio disks, one ext4 on it.
    XAPI snapshots the disks one after the other (the second here 2 s later):
    with the freeze the two halves of the volume agree; without it (the
    control) the half on the disk snapshotted second is ahead."""
    code, out = guest.run(LVM_SETUP, timeout=300)
    assert code == 0, out
    pv_start, layout, extents = {}, [], []
    for line in out.splitlines():
        words = line.replace("(", " ").replace(")", " ").split()
        if len(words) == 2 and words[0].startswith("/dev/"):
            pv_start[words[0]] = int(words[1])
        elif len(words) == 4 and words[2].startswith("/dev/"):
            layout.append((int(words[0]), int(words[1]), words[2], int(words[3])))
        elif re.match(r"^ +\d+:", line):
            fields = line.split(":")
            logical, last = (int(x) for x in fields[1].split(".."))
            extents.append((logical, last, int(fields[2].split("..")[0])))
    extent_size = int(guest.run("vgs --noheadings --units b --nosuffix -o vg_extent_size "
                                "span")[1].strip())
    code, disks = guest.run("for d in a b; do readlink -f /dev/disk/by-id/virtio-data-$d; done")
    names = dict(zip(disks.split(), DATA_DISKS))      # as pvs names them: /dev/vdb, /dev/vdc
    names.update(("/dev/disk/by-id/virtio-" + name, name) for name in DATA_DISKS)
    segments = [(start, size, names[device], pv_start[device] + extent * extent_size)
                for start, size, device, extent in layout]
    regions = {"first": lv_offset(extents, 0), "last": lv_offset(extents, LAST_REGION)}
    on = {name: disk_of(segments, offset) for name, offset in regions.items()}
    assert sorted(on.values()) == sorted(DATA_DISKS), (on, segments, extents)
    guest.run("cat > /run/lvwriter.py <<'EOF'\n%sEOF\n"
              "setsid python3 /run/lvwriter.py </dev/null >/dev/null 2>&1 & "
              "echo $! > /run/lvwriter.pid; sleep 3" % IN_PLACE_WRITER, check=True)
    found = {}
    try:
        for round_, frozen in ((1, True), (2, False)):
            images = snapshot_disks(guest, DATA_DISKS, "lv%d" % round_, frozen)
            raws = {}
            for name, image in images.items():
                raws[name] = image + ".raw"
                subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, raws[name]],
                               check=True)
            lv = os.path.join(guest.work, "lv-%d.raw" % round_)
            lv_image(segments, raws, lv)
            found[round_] = {name: last_record(lv, offset) for name, offset in regions.items()}
            for path in list(raws.values()) + [lv]:
                os.unlink(path)
    finally:
        guest.run("kill $(cat /run/lvwriter.pid); sleep 1; umount /span; "
                  "vgchange -qq -an span", timeout=120)
    print("\nguest: LVM over both disks (first region on %s), last records: with synchook %s, "
          "without %s" % (on["first"], found[1], found[2]))
    first, last = found[1]["first"], found[1]["last"]
    assert first > 0 and last in (first, first - 1), found   # whole: written in order
    later = [name for name in regions if on[name] == DATA_DISKS[1]][0]   # snapshotted 2nd
    other = "first" if later == "last" else "last"
    assert found[2][later] > found[2][other] + 1, found       # torn: that disk ahead


# Last: the README's quick start, as a newcomer runs it -----------------------------------

def readme_line(start):
    """The README's command that starts with `start` (its comment cut off)."""
    with open(os.path.join(ROOT, "README.md")) as handle:
        for line in handle:
            if line.strip().startswith(start):
                return line.strip().split("  #")[0].strip()
    raise AssertionError("README.md has no command starting %r" % start)


def test_the_readme_quick_start_in_the_guest(guest):
    """The module's install goes first (--uninstall, as the README says), then
    the README's own step 1 with /data a disk of the guest and XO's address the
    one the guest sees for this machine (10.0.2.2), step 3's status, and XO's
    hook code-path from here: /sync freezes /data, /post-sync thaws it."""
    code, out = guest.run("cd /src && sh install.sh --uninstall 2>&1")
    assert code == 0, out
    assert guest.run("systemctl is-active synchook synchook.socket")[1].split() == [
        "inactive", "inactive"]
    install = readme_line("sh install.sh --freeze /data --allow")
    status = readme_line("synchook status --config /etc/synchook.conf")
    guest.run("mkfs.ext4 -q -F /dev/disk/by-id/virtio-data-a && mkdir -p /data && "
              "mount /dev/disk/by-id/virtio-data-a /data", check=True)
    try:
        code, out = guest.run("cd /src && %s 2>&1" % install.replace("192.0.2.10", "10.0.2.2"),
                              timeout=300)
        assert code == 0, out
        assert "xo:notify-on-snapshot" in out, out          # the tag to set
        assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
        code, out = guest.run("(touch /data/probe </dev/null >/dev/null 2>&1 &); sleep 1; "
                              "[ -e /data/probe ] && "
                              "echo thawed || echo frozen")
        assert out.strip() == "frozen", out
        code, out = guest.run(status)
        assert code == 0 and "window:         OPEN since" in out, out
        assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")
        code, out = guest.run("sleep 1; [ -e /data/probe ] && echo thawed")
        assert out.strip() == "thawed", out
        code, out = guest.run("cd /src && sh install.sh --purge 2>&1")
        assert code == 0, out
        assert guest.run("systemctl is-active synchook")[1].strip() != "active"
    finally:
        guest.run("umount /data")


# After it: the .deb, as an admin's tools install it -----------------------------------

@pytest.fixture(scope="module")
def debs(guest, tmp_path_factory):
    """(previous, current): the .deb of an earlier release (this one, ~rc1, which
    dpkg orders before it) and of this checkout, put in the guest's /root."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("no dpkg-deb here: the .deb cannot be built")
    built = []
    for name, version in (("previous", synchook.__version__ + "~rc1"), ("current", None)):
        path = build_packages(tmp_path_factory.mktemp(name), version=version)["deb"]
        with open(path, "rb") as handle:
            guest.put("/root/%s.deb" % name, handle.read())
        built.append("/root/%s.deb" % name)
    return built


def dpkg(guest, args):
    code, out = guest.run("DEBIAN_FRONTEND=noninteractive dpkg %s 2>&1" % args, timeout=300)
    assert code == 0, out
    return out


def main_pid(guest):
    return guest.run("systemctl show -p MainPID --value synchook")[1].strip()


def status_version(guest):
    code, out = guest.run("synchook status --json 2>/dev/null | sed -n "
                          "'s/.*\"version\": \"\\(.*\\)\".*/\\1/p'")
    return out.strip()


# The synchook processes (the guardian's command line does not name it).
SYNCHOOKS = "pgrep -c -f '^/usr/bin/python3 -I -S /usr/(local/)?sbin/synchook'"


def test_the_deb_takes_over_from_install_sh_upgrades_and_purges(guest, debs):
    previous, current = debs
    code, out = guest.run("cd /src && sh install.sh --init systemd --freeze all --allow 10.0.2.2 "
                          "--post-sync 'echo post >> /run/posts' 2>&1", timeout=300)
    assert code == 0, out
    # install.sh's synchook handed over: its service and program gone, its settings kept.
    out = dpkg(guest, "-i " + previous)
    assert "taking over from the synchook install.sh installed (/usr/local/sbin/synchook)" in out
    assert guest.run("ls -d /etc/systemd/system/synchook.service /etc/systemd/system/"
                     "synchook.socket /usr/local/sbin/synchook /usr/local/lib/synchook "
                     "2>/dev/null")[1] == ""
    settings = guest.run("cat /etc/synchook.conf")[1]
    assert "SYNCHOOK_ALLOW='10.0.2.2'" in settings and "SYNCHOOK_FREEZE='all'" in settings
    assert guest.run("systemctl is-active synchook.socket synchook")[1].split() == [
        "active", "active"]
    assert guest.run("systemctl show -p FragmentPath --value synchook")[1].strip() == \
        "/lib/systemd/system/synchook.service"
    assert guest.run(SYNCHOOKS)[1].strip() == "1"
    a_window_freezes_and_thaws_root(guest)
    # An upgrade that changed the program: restarted in place (same process).
    pid = main_pid(guest)
    out = dpkg(guest, "-i " + current)
    assert "restarting it in place" in out, out
    for _ in range(30):
        if status_version(guest) == synchook.__version__:
            break
        time.sleep(1)
    assert status_version(guest) == synchook.__version__
    assert main_pid(guest) == pid
    # systemd took it as a reload: running, not stopping (1.6.0 said STOPPING=1).
    assert guest.run("sleep 2; systemctl show -p ActiveState -p SubState --value "
                     "synchook")[1].split() == ["active", "running"]
    assert "nothing it runs changed: not restarted" in dpkg(guest, "-i " + current)
    assert main_pid(guest) == pid
    # install.sh over the package: refused, nothing changed.
    code, out = guest.run("cd /src && sh install.sh --allow 10.0.2.3 2>&1")
    assert code == 1 and "installed from a package here (dpkg)" in out, out
    assert "SYNCHOOK_ALLOW='10.0.2.2'" in guest.run("cat /etc/synchook.conf")[1]
    # Removed: the service stopped, the settings kept; install.sh then takes them over,
    # and dpkg's leftover record goes (a later `apt purge` cannot take the config).
    dpkg(guest, "-r synchook")
    assert guest.run("systemctl is-active synchook; " + SYNCHOOKS)[1].split() == [
        "inactive", "0"]
    assert guest.run("ls /usr/sbin/synchook /etc/synchook.conf 2>&1")[1].split()[-1] == \
        "/etc/synchook.conf"
    code, out = guest.run("cd /src && sh install.sh 2>&1", timeout=300)
    assert code == 0 and "taking the settings over from the removed synchook package" in out, out
    settings = guest.run("cat /etc/synchook.conf")[1]
    assert "SYNCHOOK_ALLOW='10.0.2.2'" in settings and "SYNCHOOK_FREEZE='all'" in settings
    assert guest.run(SYNCHOOKS)[1].strip() == "1"
    assert "no packages found" in guest.run("dpkg-query -W synchook 2>&1")[1]
    assert http_get(guest.port, "/status", timeout=30)[0] == 200
    code, out = guest.run("cd /src && sh install.sh --purge 2>&1")
    assert code == 0, out


def test_a_fresh_deb_is_closed_until_configure_opens_it(guest, debs):
    _, current = debs
    code, out = guest.run(
        "start=$(cut -d' ' -f1 /proc/uptime); DEBIAN_FRONTEND=noninteractive dpkg -i %s "
        ">/run/dpkg.out 2>&1 || exit 1; until curl -s http://127.0.0.1:1727/status >/dev/null; "
        "do sleep 0.1; done; echo \"$start $(cut -d' ' -f1 /proc/uptime)\"" % current,
        timeout=300)
    assert code == 0, guest.run("cat /run/dpkg.out")[1]
    start, answered = (float(word) for word in out.split())
    print("\nguest: dpkg -i to the first answer of /status: %.1f s" % (answered - start))
    # XO (this host, 10.0.2.2 to the guest) is refused, and the journal says how to open it.
    with pytest.raises((OSError, http.client.HTTPException)):
        http_get(guest.port, "/sync", timeout=30)
    code, out = guest.run("journalctl -u synchook -o cat --no-pager | tail -n 20")
    assert "10.0.2.2: connection refused: --allow none, closed until configured: synchook " \
        "configure --allow XO_ADDRESS" in out, out
    code, out = guest.run("synchook configure --allow 10.0.2.2 --freeze all "
                          "--post-sync 'echo post >> /run/posts' 2>&1")
    assert code == 0 and "told to restart in place" in out, out
    for _ in range(30):
        try:
            if http_get(guest.port, "/status", timeout=10)[0] == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(1)
    a_window_freezes_and_thaws_root(guest)
    # Removed: the settings kept; purged: the settings, the state dir and the runtime
    # dir gone, as install.sh --purge does.
    dpkg(guest, "-r synchook")
    assert "SYNCHOOK_ALLOW='10.0.2.2'" in guest.run("cat /etc/synchook.conf")[1]
    dpkg(guest, "-P synchook")
    assert guest.run("ls -d /etc/synchook.conf /var/lib/synchook /run/synchook "
                     "/usr/lib/synchook /usr/sbin/synchook 2>/dev/null")[1] == ""
    assert guest.run("systemctl is-active synchook.socket synchook")[1].split() == [
        "inactive", "inactive"]
