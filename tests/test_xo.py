"""Xen Orchestra's own hook code drives synchook.

tests/xo/harness/run.mjs runs the released `@xen-orchestra/xapi` (VM_snapshot,
VM_checkpoint, _httpHook: the code xo-server runs, unmodified) with only the XAPI
server's answers stubbed, and reports what XO did. Set up with tests/xo/setup (npm);
the version of XO under test is one string in tests/xo/package.json.
"""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import ROOT, group_alive, wait_until

XO = os.path.join(ROOT, "tests", "xo")
XO_CODE = os.path.join(XO, "node_modules", "@xen-orchestra", "xapi", "vm.mjs")


def xo_available():
    if shutil.which("node") is None:
        return "node not installed (apt-get install nodejs)"
    if not os.path.exists(XO_CODE):
        if shutil.which("npm") is None:
            return "npm not installed (apt-get install npm), so no XO code (tests/xo/setup)"
        return "XO's code is not installed: run tests/xo/setup (npm)"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(xo_available() is not None, reason=xo_available() or "")]


def xo(**case):
    """Run one VM_snapshot / VM_checkpoint through XO's code; what it did, as a dict."""
    out = subprocess.run(["node", "--import", "./register.mjs", "harness/run.mjs",
                          json.dumps(case)], cwd=XO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["touched_stubs"] == [], report      # stand-ins never used by the hook path
    return report


def paths(report):
    return [r["url"].split("/", 3)[3].split("?")[0] for r in report["requests"]]


def statuses(report):
    return [r["status"] for r in report["requests"]]


def hook_failures(report):
    return [log for log in report["logs"] if log["message"] == "HTTP hook failed"]


def test_xo_version_is_one_string():
    package = json.load(open(os.path.join(XO, "package.json")))
    assert package["xo"]["package"] == "@xen-orchestra/xapi" and package["xo"]["version"]
    installed = json.load(open(os.path.join(os.path.dirname(XO_CODE), "package.json")))
    assert installed["version"] == package["xo"]["version"]


def port_1727_free():
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 1727))
            return True
        except OSError:
            return False


def test_bare_tag_https_on_1727(start, rec):
    if not port_1727_free():
        pytest.skip("port 1727 is taken on this machine")
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--port", "1727")
    report = xo(tags=["xo:notify-on-snapshot"], networks={"1/ip": "127.0.0.1",
                                                         "0/ipv6/0": "2001:db8::5"})
    assert report["result"] == "OpaqueRef:snapshot"
    assert [r["url"] for r in report["requests"]] == ["https://127.0.0.1:1727/sync",
                                                      "https://127.0.0.1:1727/post-sync"]
    assert statuses(report) == [200, 200] and hook_failures(report) == []
    rec.wait_for(["sync", "post"])
    assert d.get("/status", tls=True)[0] == 200


def test_url_tag_over_http(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    report = xo(tags=["other", "xo:notify-on-snapshot=http://127.0.0.1:%d/ignored/path" % d.port])
    assert paths(report) == ["sync", "post-sync"] and statuses(report) == [200, 200]
    assert report["calls"][0] == "VM.snapshot"
    rec.wait_for(["sync", "post"])


def test_token_in_the_tag_is_the_secret_that_works(start, rec):
    secret = "Zm9v+YmFy/cw=="                      # a base64 secret, pasted raw
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              env={"SYNCHOOK_SECRET": secret})
    report = xo(tags=["xo:notify-on-snapshot=http://127.0.0.1:%d/?token=%s" % (d.port, secret)])
    assert statuses(report) == [200, 200] and hook_failures(report) == []
    assert report["requests"][0]["url"].endswith("/sync?token=" + secret)  # XO keeps the query
    rec.wait_for(["sync", "post"])


def test_xo_sync_hook_secret_is_never_sent(start, rec):
    """XO's documented syncHookSecret: the code reads another option name, so no
    header goes out; synchook, which requires the secret, answers 403 and runs
    nothing, XO logs "HTTP hook failed" and snapshots anyway. The day this fails,
    XO has fixed its bug."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"),
              env={"SYNCHOOK_SECRET": "S3cret"})
    report = xo(tags=["xo:notify-on-snapshot=http://127.0.0.1:%d/" % d.port],
                syncHookSecret="S3cret")
    assert all("authorization" not in {k.lower() for k in r["headers"]}
               for r in report["requests"])
    assert statuses(report) == [403, 403]
    assert [f["url"].rsplit("/", 1)[1] for f in hook_failures(report)] == ["sync", "post-sync"]
    assert report["result"] == "OpaqueRef:snapshot"
    time.sleep(0.3)
    assert rec.lines() == []


def test_failed_snapshot_sends_no_post_sync_and_max_hold_releases(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--max-hold", "1")
    report = xo(tags=["xo:notify-on-snapshot=http://127.0.0.1:%d/" % d.port], snapshot="throw")
    assert report["error"] == "SR_FULL" and report["result"] is None
    assert paths(report) == ["sync"]                 # no /post-sync from XO
    rec.wait_for(["sync", "post"], timeout=10)       # synchook's --max-hold did it
    d.wait_log(r"no /post-sync within --max-hold 1 s")


def test_checkpoint_falling_back_to_snapshot_syncs_once_posts_once(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    report = xo(tags=["xo:notify-on-snapshot=http://127.0.0.1:%d/" % d.port],
                method="checkpoint", checkpoint="bad_power_state")
    assert report["calls"][:2] == ["VM.checkpoint", "VM.snapshot"]
    assert paths(report) == ["sync", "sync", "post-sync"]
    assert statuses(report) == [200, 200, 200]
    time.sleep(0.3)
    assert rec.lines() == ["sync", "post"]


def test_sync_slower_than_xo_timeout(start, rec, tmp_path):
    pid_file = tmp_path / "sync.pid"
    d = start("--sync", "echo $$ > %s; %s; sleep 8; %s" % (pid_file, rec.cmd("start"),
                                                           rec.cmd("late")),
              "--post-sync", rec.cmd("post"))
    began = time.monotonic()
    # 2.5 s: XO's timeout applies to /post-sync too, which must end the sync command
    # and run the post command within it, on a loaded machine as well.
    report = xo(tags=["xo:notify-on-snapshot=http://127.0.0.1:%d/" % d.port],
                syncHookTimeout=2500)
    assert time.monotonic() - began < 8              # XO did not wait for the command
    assert report["requests"][0]["status"] is None   # XO gave up on /sync
    assert "TimeoutError" in report["requests"][0]["error"]
    assert report["result"] == "OpaqueRef:snapshot"  # and snapshotted anyway
    assert report["requests"][1]["status"] == 200    # /post-sync ended the sync command
    # Its process group ended (its shell leads it), "late" can never be written:
    # no need to wait the 8 s out.
    wait_until(lambda: not group_alive(int(pid_file.read_text())), 5,
               "the sync command's process group ended")
    assert rec.lines() == ["start", "post"]          # "late" never happened


def test_ipv6_only_guest_makes_xo_call_localhost():
    """XO's bug, asserted so that CI tells us the day it is fixed."""
    report = xo(tags=["xo:notify-on-snapshot"], networks={"0/ipv6/0": "2001:db8::5"},
                settle_ms=5000)
    assert [r["url"] for r in report["requests"]] == ["https://localhost:1727/sync",
                                                      "https://localhost:1727/post-sync"]


def test_no_address_fails_the_snapshot_before_any_request():
    report = xo(tags=["xo:notify-on-snapshot"], networks={})
    assert report["error"] == "no VM address found"
    assert report["requests"] == [] and report["calls"] == []


def test_lowest_key_in_string_order_wins():
    report = xo(tags=["xo:notify-on-snapshot"],
                networks={"2/ip": "127.0.0.2", "10/ip": "127.0.0.10"}, settle_ms=5000)
    assert report["requests"][0]["url"] == "https://127.0.0.10:1727/sync"
