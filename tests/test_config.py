"""Configuration: flag over variable over config file over default; bad values exit 2."""

import os
import shutil
import sys

import pytest

from conftest import run, SYNCHOOK


def synchook(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
    full.update(env or {})
    return run(["python3", SYNCHOOK] + list(args), env=full)


@pytest.mark.parametrize("args,env,message", [
    (["--port", "70000"], {}, "port out of range"),
    (["--port", "http"], {}, "not a port number"),
    (["--timeout", "-1"], {}, "positive number"),
    (["--max-hold", "0"], {}, "positive number"),
    (["--timeout", "soon"], {}, "not a number"),
    (["--bogus"], {}, "unrecognized arguments: --bogus"),
    ([], {"SYNCHOOK_PORT": "-5"}, "SYNCHOOK_PORT '-5': port out of range"),
    ([], {"SYNCHOOK_TLS": "maybe"}, "must be one of auto, on, off"),
    (["--log-level", "loud"], {}, "must be one of debug"),
    (["--secret-file", "/nonexistent/secret"], {}, "--secret-file /nonexistent/secret"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], {}, "cannot read"),
    (["--tls-cert", "/etc/hostname"], {}, "go together"),
    (["--allow", "10.0.0.0/8,not-an-ip"], {}, "'not-an-ip' is not an IP address"),
    (["--config", "/nonexistent.conf"], {}, "--config /nonexistent.conf: cannot read"),
    (["--hooks-dir", "/nonexistent.d"], {}, "not a directory"),
    (["--max-connections", "1"], {}, "must be 2 or more"),
    (["--secret", "a", "--secret-file", "/etc/hostname"], {}, "choose one"),
])
def test_bad_configuration_one_line_exit_2(args, env, message):
    result = synchook(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_help_shows_each_flag_variable_and_default():
    out = synchook("--help").stdout
    for flag, var, default in [("--sync", "SYNCHOOK_SYNC", "default sync"),
                               ("--port", "SYNCHOOK_PORT", "default 1727"),
                               ("--timeout", "SYNCHOOK_TIMEOUT", "default 55"),
                               ("--max-hold", "SYNCHOOK_MAX_HOLD", "default 300"),
                               ("--log-level", "SYNCHOOK_LOG_LEVEL", "default info"),
                               ("--runtime-dir", "SYNCHOOK_RUNTIME_DIR", "/run/synchook"),
                               ("--tls", "SYNCHOOK_TLS", "default auto")]:
        assert flag in out and var in out and default in " ".join(out.split())
    assert synchook("--version").stdout.startswith("synchook ")


@pytest.mark.slow
def test_flag_beats_variable_beats_file_beats_default(start, tmp_path, rec):
    conf = tmp_path / "synchook.conf"
    conf.write_text("# comment\nSYNCHOOK_SYNC='%s'\nSYNCHOOK_POST_SYNC=\"%s\"\n"
                    "SYNCHOOK_MAX_HOLD=1\n" % (rec.cmd("file-sync"), rec.cmd("file-post")))
    d = start("--config", str(conf))
    assert d.get("/sync")[0] == 200
    rec.wait_for(["file-sync", "file-post"])          # max-hold 1 from the file
    d2 = start("--config", str(conf), env={"SYNCHOOK_SYNC": rec.cmd("env-sync"),
                                           "SYNCHOOK_MAX_HOLD": "100"})
    assert d2.get("/sync")[0] == 200 and d2.get("/post-sync")[0] == 200
    d3 = start("--sync", rec.cmd("flag-sync"), env={"SYNCHOOK_SYNC": rec.cmd("env-sync"),
                                                    "SYNCHOOK_CONFIG": str(conf)})
    assert d3.get("/sync")[0] == 200 and d3.get("/post-sync")[0] == 200
    assert rec.lines() == ["file-sync", "file-post", "env-sync", "file-post", "flag-sync",
                           "file-post"]


def test_variable_selects_port(start):
    from conftest import free_port
    port = free_port()
    d = start(env={"SYNCHOOK_PORT": str(port), "SYNCHOOK_SYNC": "true"})
    assert d.port == port
    other = free_port()
    d2 = start("--port", str(other), env={"SYNCHOOK_PORT": str(port)})
    assert d2.port == other


def test_config_file_quoting_round_trips(start, tmp_path):
    out = tmp_path / "out"
    value = "echo 'it''s' \"$HOME\" \\$x `x` >> %s" % out
    conf = tmp_path / "c.conf"
    import shlex
    conf.write_text("SYNCHOOK_SYNC=%s\nSYNCHOOK_POST_SYNC='printf \"%%s\\n\" \"a\nb\" >> %s'\n"
                    % (shlex.quote(value), out))
    d = start("--config", str(conf), env={"HOME": "/home/x", "x": "X"})
    assert d.get("/sync")[0] == 200 and d.get("/post-sync")[0] == 200
    assert out.read_text().splitlines() == ["its /home/x $x", "a", "b"]


@pytest.mark.parametrize("text,message", [
    ("SYNCHOOK_SYNC='unterminated\n", "line 1: no closing quotation"),
    ("\n\nSYNCHOOK_NOPE=1\n", "line 3: unknown setting SYNCHOOK_NOPE"),
    ("# ok\nrm -rf /\n", "line 2: expected SYNCHOOK_NAME=value"),
    ("SYNCHOOK_PORT=abc\n", "line 1"),
])
def test_config_file_errors_name_file_and_line(tmp_path, text, message):
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    result = synchook("--config", str(conf))
    assert result.returncode == 2
    assert str(conf) in result.stderr and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_serve_word_is_optional(start, rec):
    d = start("--sync", rec.cmd("s"))
    assert d.get("/sync")[0] == 200
    assert synchook("serve", "--help").returncode == 0
    assert synchook("serve", "--port", "99999").returncode == 2


@pytest.mark.root
def test_freeze_needs_root_said_first(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run synchook as another user")
    out = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
               SYNCHOOK, "--freeze", "/", "--port", "0", "--runtime-dir", str(tmp_path / "r")])
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "synchook: error: --freeze needs root (FIFREEZE and FITHAW " \
        "need CAP_SYS_ADMIN): run synchook as root, or leave --freeze out", out.stderr


@pytest.mark.parametrize("listen, ok", [
    ("", True), ("::", True), ("0.0.0.0", True), ("[::1]", True), ("fe80::1%eth0", True),
    ("[fe80::1%eth0]", True), ("xo-guest.lan", True), ("localhost", True),
    ("[::1", False), ("::1]", False), ("[127.0.0.1]", False), ("a b", False),
    ("bad_host", False), ("10.0.0.1%eth0", False), ("[]", False)])
def test_listen_takes_an_address_or_a_host_name(listen, ok):
    """A malformed --listen ('[::1', taken for a host name before 1.7) is refused with
    the settings, exit 2, rather than at bind time."""
    result = run([sys.executable, SYNCHOOK, "check", "--parse-only", "--listen", listen])
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert result.returncode == 2 and "--listen" in result.stderr, result.stderr
