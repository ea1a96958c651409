"""synchook fleet, from the XO host: which VMs will be quiesced.  50 local
synchooks on loopback addresses, some misconfigured, asked for /status only;
and XO's REST API, answered in its shape by a stand-in server."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import SYNCHOOK


def fleet(*args, stdin=None):
    return subprocess.run([sys.executable, SYNCHOOK, "fleet"] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)


def secret_file(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(value + "\n")
    os.chmod(str(path), 0o600)
    return str(path)


@pytest.mark.slow
def test_fifty_vms_some_misconfigured(start, rec, tmp_path):
    """40 ready; 3 leave this host out of --allow; 3 want a secret the line
    lacks; 2 run --tls off against the bare tag's https; 2 run no synchook."""
    kinds = ["ok"] * 40 + ["allow"] * 3 + ["secret"] * 3 + ["tls-off"] * 2 + ["absent"] * 2
    daemons = {}
    for index, kind in enumerate(kinds, 1):
        args = ["--listen", "127.0.1.%d" % index, "--sync", rec.cmd("sync-%d" % index)]
        if kind == "allow":
            args += ["--allow", "10.9.9.9"]
        if kind == "secret":
            args += ["--secret-file", secret_file(tmp_path, "s%d" % index, "S3cret")]
        if kind == "tls-off":
            args += ["--tls", "off"]
        if kind != "absent":
            daemons[index] = start(*args, wait=False)      # all starting at once
    lines = []
    for index, kind in enumerate(kinds, 1):
        port = daemons[index].wait_listening() if index in daemons else 1   # 1: nothing there
        lines.append("vm-%02d-%s 127.0.1.%d:%d" % (index, kind, index, port))
    began = time.monotonic()
    out = fleet("-", "--timeout", "5", stdin="\n".join(lines) + "\n")
    took = time.monotonic() - began
    print("\nfleet: 50 VMs checked in %.2f s" % took)
    assert out.returncode == 1, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:-1]}
    assert len(rows) == 50, out.stdout
    for name, line in rows.items():
        words = line.split()
        kind = name.split("-", 2)[2]
        assert words[1] == ("yes" if kind == "ok" else "NO"), line
        if kind == "allow":
            assert "this host is not in the guest's --allow" in line
        if kind == "secret":
            assert "403 forbidden: missing or wrong secret" in line
        if kind == "tls-off":
            assert "no TLS handshake: the guest runs --tls off" in line
        if kind == "absent":
            assert " refused " in line
    assert out.stdout.splitlines()[-1] == "50 VMs: 40 ready, 10 not ready, 0 not running"
    assert rec.lines() == []                             # /status only: nothing ran
    # the same with the secret the guests want, given for lines without a URL
    secret = secret_file(tmp_path, "fleet-secret", "S3cret")
    out = fleet("-", "--json", "--secret-file", secret, "--jobs", "1",
                stdin="\n".join(line for line in lines if "-secret " in line))
    assert out.returncode == 0 and all(row["ready"] for row in json.loads(out.stdout))
    bad = fleet("-", "--jobs", "0", stdin="")
    assert bad.returncode == 2 and "--jobs 0: give a whole number, 1 or more" in bad.stderr


VMS = [
    {"name_label": "url-tag", "power_state": "Running", "addresses": {},
     "tags": ["prod", "xo:notify-on-snapshot=http://127.0.2.1:PORT/?token=S3cret"]},
    {"name_label": "ipv6-only", "power_state": "Running",
     "addresses": {"0/ipv6/0": "2001:db8::5"}, "tags": ["xo:notify-on-snapshot"]},
    {"name_label": "no-tools", "power_state": "Running", "addresses": {},
     "tags": ["xo:notify-on-snapshot"]},
    {"name_label": "halted", "power_state": "Halted", "addresses": {},
     "tags": ["xo:notify-on-snapshot"]},
    {"name_label": "untagged", "power_state": "Running", "addresses": {"0/ip": "127.0.2.9"},
     "tags": ["other"]},
]


@pytest.mark.slow
def test_the_vms_come_from_xos_rest_api(start, rec, tmp_path):
    d = start("--listen", "127.0.2.1", "--tls", "off", "--sync", rec.cmd("sync"),
              "--secret-file", secret_file(tmp_path, "s", "S3cret"))
    vms = json.loads(json.dumps(VMS).replace("PORT", str(d.port)))
    asked = []

    class XO(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Cookie")))
            ok = self.headers.get("Cookie") == "authenticationToken=T0ken"
            body = json.dumps(vms if ok else {"error": "unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), XO)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        xo = "http://127.0.0.1:%d" % server.server_port
        out = fleet("--xo", xo, "--xo-token-file", secret_file(tmp_path, "t", "T0ken"))
        assert asked[0] == ("/rest/v0/vms?fields=name_label,tags,addresses,power_state",
                            "authenticationToken=T0ken")
        assert out.returncode == 1, out.stderr                # two will not be quiesced
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:-1]}
        assert sorted(rows) == ["halted", "ipv6-only", "no-tools", "url-tag"]
        assert rows["url-tag"].split()[1] == "yes"
        assert "XO calls its own localhost; tag it " \
            "xo:notify-on-snapshot=https://[2001:db8::5]:1727/" in rows["ipv6-only"]
        assert "no address from the guest tools: XO fails the snapshot" in rows["no-tools"]
        assert rows["halted"].split()[1] == "-" and "not running" in rows["halted"]
        bad = fleet("--xo", xo, "--xo-token-file", secret_file(tmp_path, "u", "wrong"))
        assert bad.returncode == 2 and "answered 401" in bad.stderr
    finally:
        server.shutdown()
    assert rec.lines() == []
