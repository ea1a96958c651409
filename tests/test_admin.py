"""The admin's tools: tag, status, call as admins type it and as XO sends it, --help,
and install.sh's firewall flag and summary."""

import http.server
import json
import os
import sys
import threading

import pytest

from conftest import SYNCHOOK, run
from test_install import INSTALL, PrivateSystem, clean_env, free_port  # noqa: F401

COMMANDS = ("serve", "check", "call", "tag", "status", "thaw")


def secret_file(tmp_path, value):
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    os.chmod(str(path), 0o600)
    return str(path)


def synchook_cmd(*args, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
    env["SYNCHOOK_CONFIG"] = ""        # never this machine's /etc/synchook.conf
    env.update(kwargs.pop("env", {}))
    return run([sys.executable, SYNCHOOK] + list(args), env=env, **kwargs)


# --help ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_lists_every_command(command):
    out = synchook_cmd(command, "--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout, (command, name)


# call: what admins type, what XO sends ---------------------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 200 and records each request: (connection id, path, headers)."""
    protocol_version = "HTTP/1.1"
    seen = []

    def do_GET(self):
        Recorder.seen.append((id(self.connection), self.path, dict(self.headers)))
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"Ok\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_call_as_xo_sends_what_released_xo_sends(recorder):
    out = synchook_cmd("call", "http://127.0.0.1:%d/?x=1" % recorder, "--as-xo",
                       "--secret", "a+b/c", "--pause", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    (conn1, path1, headers1), (conn2, path2, _) = Recorder.seen
    assert path1 == "/sync?x=1&token=a%2Bb%2Fc" and path2 == "/post-sync?x=1&token=a%2Bb%2Fc"
    assert conn1 == conn2                                  # one keep-alive connection
    assert "Authorization" not in headers1                 # XO never sends it
    for name, value in (("User-Agent", "node"), ("Accept", "*/*"), ("Accept-Language", "*"),
                        ("Sec-Fetch-Mode", "cors"), ("Accept-Encoding", "gzip, deflate")):
        assert headers1.get(name) == value


def test_call_without_as_xo_sends_the_documented_header(recorder):
    out = synchook_cmd("call", "http://127.0.0.1:%d/" % recorder, "--secret", "s", "--pause", "0")
    assert out.returncode == 0
    (_, path, headers), _ = Recorder.seen
    assert path == "/sync" and headers["Authorization"] == "Bearer cw=="


@pytest.mark.slow
def test_call_accepts_what_admins_type(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--listen", "::")
    targets = ["127.0.0.1:%d" % d.port, "[::1]:%d" % d.port,
               "https://127.0.0.1:%d/" % d.port, "http://localhost:%d" % d.port]
    for target in targets:
        out = synchook_cmd("call", target, "--pause", "0")
        assert out.returncode == 0, (target, out.stdout, out.stderr)
        assert out.stdout.startswith("sync      200 Ok")
    assert rec.lines() == ["sync", "post"] * len(targets)
    bad = synchook_cmd("call", "10.0.0.5:http")
    assert bad.returncode == 2 and "bad port 'http'" in bad.stderr


def test_call_as_xo_through_a_secret_daemon(start, tmp_path):
    secret = secret_file(tmp_path, "ab+cd&e%f")
    d = start("--sync", "true", "--secret-file", secret)
    out = synchook_cmd("call", "127.0.0.1:%d" % d.port, "--as-xo", "--secret-file", secret,
                       "--pause", "0")
    assert out.returncode == 0, out.stdout


# tag ---------------------------------------------------------------------------------------

def test_tag_bare_when_it_applies():
    out = synchook_cmd("tag")
    assert out.returncode == 0
    if "no address found" in out.stderr or "IPv6 addresses only" in out.stderr:
        pytest.skip("this machine has no IPv4 address but loopback")
    assert out.stdout == "xo:notify-on-snapshot\n"


def test_tag_with_port_tls_off_and_secret_is_a_url_per_address():
    out = synchook_cmd("tag", "--port", "8080", "--tls", "off", env={"SYNCHOOK_SECRET": "a+b&c"})
    assert out.returncode == 0
    tags = out.stdout.split()
    assert tags and all(t.startswith("xo:notify-on-snapshot=http://") for t in tags)
    assert all(t.endswith(":8080/?token=a%2Bb%26c") for t in tags), tags
    for tag in tags:
        host = tag.split("://")[1].rsplit(":", 1)[0]
        assert host == "<VM address>" or not host.startswith(("127.", "[::1]", "[fe80"))


def test_tag_ipv6_only_guest_warns_about_xo_bug():
    sys.path.insert(0, os.path.dirname(SYNCHOOK))
    import ipaddress
    import synchook

    class Cfg:
        tls, listen, port, secret = "auto", "", 1727, ""

    tags, warnings = synchook.xo_tags(Cfg, [], [ipaddress.ip_address("2001:db8::5")])
    assert tags == ["xo:notify-on-snapshot=https://[2001:db8::5]:1727/"]
    assert "https://localhost:1727" in warnings[0]
    tags, warnings = synchook.xo_tags(Cfg, [ipaddress.ip_address("192.0.2.9")], [])
    assert tags == ["xo:notify-on-snapshot"] and not warnings


def test_tag_secret_new_writes_a_url_safe_secret_the_daemon_takes(start, tmp_path):
    secret = tmp_path / "secret"
    out = synchook_cmd("tag", "--secret-new", "--secret-file", str(secret))
    assert out.returncode == 0, out.stderr
    value = secret.read_text().strip()
    assert len(value) >= 32 and all(c.isalnum() or c in "-_" for c in value)
    assert os.stat(str(secret)).st_mode & 0o777 == 0o600
    assert "token=" + value in out.stdout and "restart synchook" in out.stderr
    d = start("--sync", "true", "--secret-file", str(secret))
    assert d.get("/sync?token=" + value) == (200, "Ok")
    missing = synchook_cmd("tag", "--secret-new")
    assert missing.returncode == 2 and "--secret-new needs --secret-file" in missing.stderr


# status ------------------------------------------------------------------------------------

@pytest.mark.xdist_group("freezes")     # status names every frozen filesystem
def test_status_names_a_failed_freeze_once():
    sys.path.insert(0, os.path.dirname(SYNCHOOK))
    import synchook
    step = {"step": "freeze", "ok": False, "reason": "freeze /data: Input/output error",
            "exit": None, "duration": 0.001}
    assert synchook.step_text(step) == "freeze /data: Input/output error"
    assert synchook.step_text(dict(step, step="sync", reason="timed out")) == "sync timed out"
    assert synchook.step_text(dict(step, ok=True)) == "freeze ok"


@pytest.mark.xdist_group("freezes")     # status names every frozen filesystem
def test_status_reads_the_daemon_even_when_allow_leaves_loopback_out(start, tmp_path):
    args = ["--allow", "192.0.2.99", "--secret-file", secret_file(tmp_path, "S3cret"),
            "--listen", "127.0.0.1"]
    d = start("--sync", "true", *args)
    assert d.get("/sync?token=S3cret")[0] == 403             # loopback: /status only
    out = synchook_cmd("status", "--port", str(d.port), *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "window:         idle" in out.stdout and "synchook " in out.stdout
    as_json = synchook_cmd("status", "--json", "--port", str(d.port), *args)
    assert json.loads(as_json.stdout)["state"] == "idle"


@pytest.mark.xdist_group("freezes")     # status names every frozen filesystem
def test_status_shows_an_open_window_and_a_stopped_daemon(start):
    d = start("--sync", "true", "--tls", "off")
    d.get("/sync")
    out = synchook_cmd("status", "--port", str(d.port), "--listen", "127.0.0.1")
    assert "window:         OPEN since" in out.stdout and "last sync:      200 Ok" in out.stdout
    assert ": sync ok [exit 0] (" in out.stdout
    d.get("/post-sync")
    d.stop()
    out = synchook_cmd("status", "--port", str(d.port), "--listen", "127.0.0.1")
    assert out.returncode == 1 and "refused: nothing listens on 127.0.0.1" in out.stdout


# install.sh: the firewall when asked, the tag in the summary -------------------------------

@pytest.fixture
def firewalled(tmp_path):
    """test_install's private system, with a directory for fake firewall tools
    (.fake) first on the PATH of .env; purged and closed at teardown."""
    system = PrivateSystem(tmp_path)
    system.fake = tmp_path / "fakebin"
    system.fake.mkdir()
    system.env = clean_env({"PATH": "%s:%s" % (system.fake, os.environ["PATH"])})
    yield system
    system.run(["dash", INSTALL, "--purge"], env=clean_env())
    system.close()


@pytest.mark.slow
def test_open_firewall_uses_the_active_firewall_and_summary_has_the_tag(firewalled, tmp_path):
    system, fake = firewalled, firewalled.fake
    calls = tmp_path / "calls"
    fake_tool(fake, "firewall-cmd", "#!/bin/sh\necho \"firewall-cmd $*\" >>CALLS\n", calls)
    port = free_port()
    env = system.env
    out = system.run(["dash", INSTALL, "--init", "sysv", "--port", str(port), "--listen",
                      "127.0.0.1", "--sync", "true"], env=env)
    assert out.returncode == 0, out.stderr
    assert not calls.exists()                            # never unless asked
    out = system.run(["dash", INSTALL, "--open-firewall"], env=env)
    assert out.returncode == 0, out.stderr
    assert calls.read_text().splitlines() == [
        "firewall-cmd --state", "firewall-cmd --permanent --add-port=%d/tcp" % port,
        "firewall-cmd --reload"]
    assert "XO tag:   xo:notify-on-snapshot=https://127.0.0.1:%d/" % port in out.stdout
    # --allow: the port opened to XO's addresses alone, IPv4 and IPv6
    calls.unlink()
    out = system.run(["dash", INSTALL, "--open-firewall", "--allow",
                      "127.0.0.1,2001:db8::2"], env=env)
    assert out.returncode == 0, out.stderr
    rule = "rule family=%s source address=%s port port=%d protocol=tcp accept"
    assert calls.read_text().splitlines() == [
        # the earlier rule closed first: nothing left open to all
        "firewall-cmd --permanent --remove-port=%d/tcp" % port, "firewall-cmd --reload",
        "firewall-cmd --state",
        "firewall-cmd --permanent --add-rich-rule=%s" % (rule % ("ipv4", "127.0.0.1", port)),
        "firewall-cmd --permanent --add-rich-rule=%s" % (rule % ("ipv6", "2001:db8::2",
                                                                 port)),
        "firewall-cmd --reload"]
    # and --uninstall closes what it opened
    calls.unlink()
    out = system.run(["dash", INSTALL, "--uninstall"], env=env)
    assert out.returncode == 0, out.stderr
    assert calls.read_text().splitlines() == [
        "firewall-cmd --permanent --remove-rich-rule=%s" % (rule % ("ipv4", "127.0.0.1",
                                                                    port)),
        "firewall-cmd --permanent --remove-rich-rule=%s" % (rule % ("ipv6", "2001:db8::2",
                                                                    port)),
        "firewall-cmd --reload"]


FAKE_NFT = r"""#!/bin/sh
# nft, as far as install.sh uses it: one chain, rules kept in a file with handles,
# in the chain's order (insert puts a rule first).
echo "nft $*" >>CALLS
touch STATE
case "$*" in
    "list chain inet filter input") cat STATE 2>/dev/null ;;
    "-a list chain inet filter input") cat STATE 2>/dev/null ;;
    "insert rule inet filter input "*)
        n=$(($(cat COUNTER 2>/dev/null || echo 0) + 1)); echo $n >COUNTER
        rule=$(echo "${*#insert rule inet filter input }" | sed 's/comment synchook/comment "synchook"/')
        { echo "$rule # handle $n"; cat STATE; } >STATE.new; mv STATE.new STATE ;;
    "delete rule inet filter input handle "*)
        grep -v "# handle ${*##* }\$" STATE >STATE.new; mv STATE.new STATE ;;
    *) exit 1 ;;
esac
"""


def fake_tool(directory, name, text, calls, **places):
    text = text.replace("CALLS", str(calls))
    for place, path in places.items():
        text = text.replace(place.upper(), str(path))
    (directory / name).write_text(text)
    os.chmod(str(directory / name), 0o755)


@pytest.mark.slow
def test_open_firewall_again_replaces_its_rules_and_never_doubles_them(firewalled, tmp_path):
    system, fake = firewalled, firewalled.fake
    calls, state = tmp_path / "calls", tmp_path / "rules"
    fake_tool(fake, "nft", FAKE_NFT, calls, state=state, counter=tmp_path / "counter")
    env = system.env
    port = free_port()
    base = ["dash", INSTALL, "--init", "sysv", "--port", str(port), "--listen", "127.0.0.1",
            "--sync", "true", "--open-firewall"]
    for _ in range(2):
        out = system.run(base + ["--allow", "127.0.0.1"], env=env)
        assert out.returncode == 0, out.stderr
    rules = state.read_text().splitlines()
    # XO's address accepted, anyone else refused at once (a reset, not a drop)
    assert len(rules) == 2 and "ip saddr 127.0.0.1 tcp dport %d accept" % port in rules[0]
    assert 'tcp dport %d reject with tcp reset comment "synchook"' % port in rules[1]
    other = free_port()
    base[base.index("--port") + 1] = str(other)
    out = system.run(base + ["--allow", "127.0.0.2"], env=env)
    assert out.returncode == 0, out.stderr
    rules = state.read_text().splitlines()
    assert len(rules) == 2 and "ip saddr 127.0.0.2 tcp dport %d accept" % other in rules[0]
    assert "dport %d reject" % other in rules[1]
    out = system.run(["dash", INSTALL, "--uninstall"], env=env)
    assert out.returncode == 0 and state.read_text() == "", out.stderr


@pytest.mark.slow
def test_a_firewall_that_fails_rolls_back_and_installs_nothing(firewalled, tmp_path):
    system, fake = firewalled, firewalled.fake
    calls = tmp_path / "calls"
    fake_tool(fake, "firewall-cmd", "#!/bin/sh\necho \"firewall-cmd $*\" >>CALLS\n"
              "case \"$*\" in *2001:db8::bad*) exit 1 ;; esac\n", calls)
    env = system.env
    port = free_port()
    out = system.run(["dash", INSTALL, "--init", "sysv", "--port", str(port), "--listen",
                      "127.0.0.1", "--sync", "true", "--open-firewall"], env=env)
    assert out.returncode == 0, out.stderr
    config = open(system.path("/etc/synchook.conf")).read()
    pid = open(system.path("/run/synchook.pid")).read()
    calls.unlink()
    out = system.run(["dash", INSTALL, "--open-firewall", "--sync", "echo new", "--allow",
                      "127.0.0.1,2001:db8::bad"], env=env)
    assert out.returncode == 1
    assert "nothing installed, the firewall as it was" in out.stderr, out.stderr
    rule = "rule family=%s source address=%s port port=%d protocol=tcp accept"
    assert calls.read_text().splitlines() == [
        "firewall-cmd --permanent --remove-port=%d/tcp" % port, "firewall-cmd --reload",
        "firewall-cmd --state",
        "firewall-cmd --permanent --add-rich-rule=%s" % (rule % ("ipv4", "127.0.0.1", port)),
        "firewall-cmd --permanent --add-rich-rule=%s" % (rule % ("ipv6", "2001:db8::bad",
                                                                 port)),
        # rolled back: this run's rule closed, the earlier one opened again
        "firewall-cmd --permanent --remove-rich-rule=%s" % (rule % ("ipv4", "127.0.0.1",
                                                                    port)),
        "firewall-cmd --permanent --add-port=%d/tcp" % port, "firewall-cmd --reload"]
    assert open(system.path("/etc/synchook.conf")).read() == config
    assert open(system.path("/run/synchook.pid")).read() == pid     # never restarted
    assert "--add-port=%d/tcp" % port in open(system.path("/etc/synchook.firewall")).read()


def test_firewall_commands_in_readme_name_the_port():
    readme = open(os.path.join(os.path.dirname(SYNCHOOK), "README.md")).read()
    for command in ("firewall-cmd --permanent --add-port=1727/tcp", "ufw allow 1727/tcp",
                    "nft insert rule inet filter input tcp dport 1727 accept",
                    "iptables -I INPUT -p tcp --dport 1727 -j ACCEPT"):
        assert command in readme
