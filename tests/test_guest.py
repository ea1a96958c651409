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

import re
import sys

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


@pytest.fixture(scope="module")
def guest():
    reason = vm.why_not()
    if reason:
        pytest.skip(reason)
    try:
        directory = vm.image()
    except (RuntimeError, OSError) as err:
        pytest.skip("no guest image could be built here: %s" % err)
    machine = vm.Guest(directory)
    try:
        machine.boot()
        print("\nguest: booted in %.0f s" % machine.booted_in)
        code, out = machine.run(
            "cd /src && sh install.sh --init systemd --freeze all --sync true "
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


def test_sigkill_of_the_daemon_with_root_frozen_is_released_by_the_guardian(guest):
    before = posts(guest)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    took = seconds_until_writable(
        guest, "kill -KILL $(systemctl show -p MainPID --value synchook)")
    print("\nguest: SIGKILL of the daemon with / frozen: writable %.2f s later" % took)
    assert guest.run("sleep 4; systemctl is-active synchook")[1].strip() == "active"
    assert posts(guest) == before + 1                   # once: the restart found nothing


def test_systemctl_kill_of_the_whole_service_with_root_frozen_is_recovered(guest):
    """Daemon, guardian and all: only systemd's restart can release, and 1.4.0's
    unit (a mount namespace) made that restart wait on the frozen / for good."""
    before = posts(guest)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    took = seconds_until_writable(guest, "systemctl kill -s SIGKILL synchook")
    print("\nguest: systemctl kill -s SIGKILL with / frozen: writable %.2f s later" % took)
    assert guest.run("sleep 2; systemctl is-active synchook")[1].strip() == "active"
    assert posts(guest) == before + 1
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")      # and serving
    assert http_get(guest.port, "/post-sync", timeout=60) == (200, "Ok")


def test_systemctl_restart_with_a_window_open_releases_once(guest):
    before = posts(guest)
    assert http_get(guest.port, "/sync", timeout=60) == (200, "Ok")
    took = seconds_until_writable(guest, "systemctl restart synchook")
    print("\nguest: systemctl restart with / frozen: writable %.2f s later" % took)
    assert guest.run("systemctl is-active synchook")[1].strip() == "active"
    assert posts(guest) == before + 1


def test_status_and_uninstall_as_the_readme_says(guest):
    code, out = guest.run("synchook status")
    assert code == 0 and "window:         idle" in out, out
    code, out = guest.run("cd /src && sh install.sh --uninstall 2>&1")
    assert code == 0, out
    assert guest.run("systemctl is-active synchook")[1].strip() != "active"
