"""Hardening: no file a local user could plant is trusted, no request shape a
proxy could smuggle gets through, no empty setting opens the door."""

import os
import socket
import ssl
import sys
import time

import pytest

from conftest import SYNCHOOK, client_context, run

def ROOT_ONLY(test):
    return pytest.mark.root(pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file "
                                                                         "ownership checks)")(test))
OTHER_UID = 1001


def serve(tmp_path, *args, **kwargs):
    """Start synchook expecting it to refuse: (exit code, stderr)."""
    cmd = [sys.executable, SYNCHOOK, "--port", "0", "--listen", "127.0.0.1"]
    if "--runtime-dir" not in args:
        cmd += ["--runtime-dir", str(tmp_path / "run")]
    if "--state-dir" not in args:
        cmd += ["--state-dir", str(tmp_path / "state")]
    out = run(cmd + list(args), timeout=30, **kwargs)
    return out.returncode, out.stderr


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# Directories synchook writes to ---------------------------------------------------

@ROOT_ONLY
def test_runtime_dir_symlink_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / "run"))
    code, err = serve(tmp_path, "--tls", "off")
    assert code == 2
    assert "--runtime-dir %s: not a directory (a symbolic link?)" % (tmp_path / "run") \
        in one_line(err)


@ROOT_ONLY
@pytest.mark.parametrize("which", ["--runtime-dir", "--state-dir"])
def test_dir_owned_by_another_user_refused(tmp_path, which):
    path = tmp_path / "d"
    path.mkdir(mode=0o700)
    os.chown(str(path), OTHER_UID, OTHER_UID)
    code, err = serve(tmp_path, which, str(path))
    assert code == 2
    line = one_line(err)
    assert "%s %s: owned by uid %d" % (which, path, OTHER_UID) in line
    assert "chown 0 %s" % path in line


@ROOT_ONLY
def test_world_writable_state_dir_refused(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    os.chmod(str(path), 0o777)
    code, err = serve(tmp_path)
    assert code == 2
    assert "writable by group or others" in one_line(err)


@ROOT_ONLY
def test_runtime_dir_below_a_foreign_directory_refused(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(str(parent), OTHER_UID, OTHER_UID)
    code, err = serve(tmp_path, "--tls", "off", "--runtime-dir", str(parent / "run"))
    assert code == 2
    assert "%s is owned by uid %d" % (parent, OTHER_UID) in one_line(err)


def test_runtime_dir_under_sticky_tmp_is_fine(start, tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(str(sticky), 0o1777)
    d = start("--sync", "true", "--runtime-dir", str(sticky / "synchook"))
    assert d.get("/sync") == (200, "Ok")
    assert oct(os.stat(str(sticky / "synchook")).st_mode & 0o777) == "0o700"


def test_planted_marker_symlink_is_not_followed(start, tmp_path, rec):
    victim = tmp_path / "victim"
    victim.write_text("TOPSECRET root-only data\n")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    os.symlink(str(victim), str(runtime / "window.json"))
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert rec.lines() == ["post"]                 # treated as a window left open
    assert "TOPSECRET" not in d.log()              # its target never read into the log
    assert d.get("/sync") == (200, "Ok")
    assert victim.read_text() == "TOPSECRET root-only data\n"
    assert not os.path.islink(str(runtime / "window.json"))
    assert d.get("/post-sync") == (200, "Ok")
    assert victim.read_text() == "TOPSECRET root-only data\n"


def test_marker_fields_logged_escaped(start, tmp_path, rec):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (runtime / "window.json").write_text(
        '{"pid": 7, "opened_at": "x", "client": "\\u001b[31mevil\\nfake log line"}')
    d = start("--sync", "true", "--post-sync", rec.cmd("post"))
    assert rec.lines() == ["post"]
    d.wait_log(r"by \\x1b\[31mevil\\x0afake log line, process 7\)")
    assert "\x1b" not in d.log()


def served_certificate(d):
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        with client_context().wrap_socket(sock) as tls:
            return tls.getpeercert(binary_form=True)


def test_stored_cert_and_key_symlinks_are_not_served(start, tmp_path, shared_cert):
    theirs = tmp_path / "theirs"             # a valid pair, the attacker's
    theirs.mkdir()
    cert = (shared_cert / "cert.pem").read_text()
    (theirs / "cert.pem").write_text(cert)
    (theirs / "key.pem").write_text((shared_cert / "key.pem").read_text())
    os.chmod(str(theirs / "key.pem"), 0o600)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.symlink(str(theirs / "cert.pem"), str(state / "cert.pem"))
    os.symlink(str(theirs / "key.pem"), str(state / "key.pem"))
    d = start("--sync", "true", state_dir=state)
    d.wait_log(r"stored certificate .* unusable")
    assert served_certificate(d) != ssl.PEM_cert_to_DER_cert(cert)
    assert not os.path.islink(str(state / "key.pem"))
    assert os.stat(str(state / "key.pem")).st_mode & 0o777 == 0o600


def test_stored_key_readable_by_others_is_replaced(start, tmp_path, shared_cert):
    import shutil
    state = tmp_path / "state"
    shutil.copytree(str(shared_cert), str(state))
    os.chmod(str(state / "key.pem"), 0o644)
    old = ssl.PEM_cert_to_DER_cert((state / "cert.pem").read_text())
    d = start("--sync", "true", state_dir=state)
    d.wait_log(r"a private key readable by group or others .*making a new one")
    assert served_certificate(d) != old


def test_given_key_readable_by_others_refused(tmp_path, shared_cert):
    key = tmp_path / "key.pem"
    key.write_text((shared_cert / "key.pem").read_text())
    os.chmod(str(key), 0o644)
    code, err = serve(tmp_path, "--tls-cert", str(shared_cert / "cert.pem"),
                      "--tls-key", str(key))
    assert code == 2
    assert "chmod 600 %s" % key in one_line(err)


def test_temporary_names_are_not_predictable(start, tmp_path):
    """1.0.0 wrote key.pem.<pid>.tmp: files planted for every pid were followed."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    decoy = tmp_path / "decoy"
    decoy.write_text("x")
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    last = int(open("/proc/loadavg").read().split()[-1])
    for pid in range(last, min(last + 400, pid_max)):
        os.symlink(str(decoy), str(state / ("key.pem.%d.tmp" % pid)))
    d = start("--sync", "true", state_dir=state)
    d.wait_log(r"certificate kept in")
    assert decoy.read_text() == "x"
    assert os.stat(str(state / "key.pem")).st_mode & 0o777 == 0o600


# Files synchook reads, as root: StrictModes ---------------------------------------------

@ROOT_ONLY
@pytest.mark.parametrize("case", ["mode", "owner", "parent"])
def test_untrusted_config_refused(tmp_path, case):
    directory = tmp_path / "etc"
    directory.mkdir()
    config = directory / "synchook.conf"
    config.write_text("SYNCHOOK_SYNC='touch %s'\n" % (tmp_path / "pwned"))
    if case == "mode":
        os.chmod(str(config), 0o666)
        expected = "%s is writable by group or others (fix: chmod go-w %s)" % (config, config)
    elif case == "owner":
        os.chown(str(config), OTHER_UID, OTHER_UID)
        expected = "%s is owned by uid %d (fix: chown root %s)" % (config, OTHER_UID, config)
    else:
        os.chown(str(directory), OTHER_UID, OTHER_UID)
        expected = "%s is owned by uid %d" % (directory, OTHER_UID)
    code, err = serve(tmp_path, "--tls", "off", "--config", str(config))
    assert code == 2
    assert expected in one_line(err) and one_line(err).startswith("synchook: error: --config")
    assert not (tmp_path / "pwned").exists()


@ROOT_ONLY
def test_untrusted_secret_file_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("S3cret\n")
    os.chmod(str(secret), 0o622)
    code, err = serve(tmp_path, "--tls", "off", "--secret-file", str(secret))
    assert code == 2
    assert "--secret-file %s: not trusted" % secret in one_line(err)


@ROOT_ONLY
def test_hooks_dir_below_a_foreign_directory_refused(tmp_path):
    parent = tmp_path / "theirs"
    hooks = parent / "hooks.d"
    hooks.mkdir(parents=True)
    os.chown(str(parent), OTHER_UID, OTHER_UID)
    code, err = serve(tmp_path, "--tls", "off", "--hooks-dir", str(hooks))
    assert code == 2
    assert "--hooks-dir %s: not trusted: %s is owned by uid %d" % (hooks, parent, OTHER_UID) \
        in one_line(err)


@ROOT_ONLY
def test_config_in_sticky_world_writable_dir_is_fine(start, tmp_path, rec):
    directory = tmp_path / "tmp"
    directory.mkdir()
    os.chmod(str(directory), 0o1777)
    config = directory / "synchook.conf"
    config.write_text("SYNCHOOK_SYNC='%s'\n" % rec.cmd("sync"))
    os.chmod(str(config), 0o600)
    d = start("--config", str(config))
    assert d.get("/sync") == (200, "Ok")
    assert rec.lines() == ["sync"]


# Requests ------------------------------------------------------------------------------------

def exchange(d, data, wait=1.0):
    """Send data, read until the server closes (or wait passes): the raw answers."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(data)
        sock.settimeout(wait)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_body_smuggled_in_a_post_is_refused(start, rec):
    d = start("--sync", rec.cmd("sync"), "--tls", "off")
    inner = b"GET /sync HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",
                 b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",
                 b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"):
        answer = exchange(d, head % len(inner) + inner)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.count(b"HTTP/1.1") == 1 and b"Connection: close" in answer
    answer = exchange(d, b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"20\r\n" + inner + b"\r\n0\r\n\r\n")
    assert answer.count(b"HTTP/1.1") == 1 and b" 400 " in answer
    time.sleep(0.3)
    assert rec.lines() == []


@pytest.mark.parametrize("first", [b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
                                   b"POST /sync HTTP/1.1\r\nHost: x\r\n\r\n",
                                   b"GET /sync?token=wrong HTTP/1.1\r\nHost: x\r\n\r\n"])
@pytest.mark.slow
def test_connection_closes_after_any_4xx(start, rec, first):
    d = start("--sync", rec.cmd("sync"), "--tls", "off", "--secret", "s")
    answer = exchange(d, first + b"GET /sync?token=s HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer
    time.sleep(0.3)
    assert rec.lines() == []


@pytest.mark.parametrize("line", [
    b"GET\x85/sync\x85HTTP/1.1", b"GET\xa0/sync\xa0HTTP/1.1", b"GET\t/sync\tHTTP/1.1",
    b"GET\x0b/sync\x0bHTTP/1.1", b"GET  /sync HTTP/1.1", b"GET /sync  HTTP/1.1",
    b" GET /sync HTTP/1.1", b"GET /sync HTTP/1.1 ", b"GET /sy\x00nc HTTP/1.1",
    b"GET /sync\xff HTTP/1.1", b"G\x01ET /sync HTTP/1.1",
])
@pytest.mark.slow
def test_request_line_separators_are_single_spaces(start, rec, line):
    d = start("--sync", rec.cmd("sync"), "--tls", "off")
    answer = exchange(d, line + b"\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    time.sleep(0.2)
    assert rec.lines() == []


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01b", b"a\x7fb", b"a\rb", b"a\x1bb"])
def test_control_bytes_in_header_values_400(start, rec, value):
    d = start("--sync", rec.cmd("sync"), "--tls", "off")
    answer = exchange(d, b"GET /sync HTTP/1.1\r\nHost: x\r\nX-A: " + value + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    time.sleep(0.2)
    assert rec.lines() == []


@pytest.mark.slow
def test_tab_in_header_value_is_fine(start, rec):
    d = start("--sync", rec.cmd("sync"), "--tls", "off")
    answer = exchange(d, b"GET /sync HTTP/1.1\r\nHost: x\r\nX-A: a\tb\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer


@pytest.mark.slow
def test_repeated_sync_cannot_hold_the_window_past_twice_max_hold(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--max-hold", "1.5")
    began = time.monotonic()
    released = None
    while time.monotonic() - began < 6:
        if rec.lines()[:2] == ["sync", "post"]:
            released = time.monotonic() - began
            break
        d.get("/sync")                              # every 0.3 s: "keep it frozen"
        time.sleep(0.3)
    assert released is not None, "window never released"
    assert released < 3 + 1.5                      # 2 x --max-hold from the opening
    d.wait_log(r"no /post-sync within --max-hold")


@pytest.mark.slow
def test_noise_from_one_client_is_bounded_and_summed_up(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    for i in range(300):
        d.get("/nope-%d" % i)
        if i == 150:
            assert d.get("/sync") == (200, "Ok")   # a window line, amid the flood
    d.wait_log(r"GET /sync 200")
    time.sleep(0.5)
    nope = d.log().count("GET /nope-")
    assert 10 <= nope <= 25, nope                  # 20 in a burst, then 10 a minute
    time.sleep(6.5)                                # one more line's worth of time
    d.get("/nope-last")
    d.wait_log(r"\d+ more log lines from 127\.0\.0\.1 not logged \(over 10 a minute\)")
    d.wait_log(r"GET /nope-last 404")
    assert d.get("/post-sync") == (200, "Ok")
    d.wait_log(r"GET /post-sync 200")


# Settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,env,shown", [
    (["--secret", ""], {}, "--secret is set but empty"),
    ([], {"SYNCHOOK_SECRET": ""}, "SYNCHOOK_SECRET is set but empty"),
    (["--allow", ","], {}, "--allow is set but empty"),
    (["--allow", " "], {}, "--allow is set but empty"),
    (["--secret-file", ""], {}, "--secret-file is set but empty"),
])
def test_empty_access_settings_refused(tmp_path, args, env, shown):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
    full_env.update(env)
    code, err = serve(tmp_path, "--tls", "off", *args, env=full_env)
    assert code == 2
    assert shown in one_line(err)


def test_start_line_states_the_access_rule(start):
    open_door = start("--sync", "true", "--tls", "off")
    open_door.wait_log(r"access: anyone, no secret")
    open_door.wait_log(r"warning: anyone who can reach port \d+ can run the hooks: set --allow")
    closed = start("--sync", "true", "--tls", "off", "--allow", "127.0.0.1",
                   env={"SYNCHOOK_SECRET": "s"})
    closed.wait_log(r"access: clients in 127\.0\.0\.1/32 with the secret")
    assert "can run the hooks" not in closed.log()


def test_token_is_percent_decoded_not_form_decoded(start, rec):
    secret = "ab+c/d=e"
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off",
              env={"SYNCHOOK_SECRET": secret})
    assert d.get("/sync?token=ab+c/d=e") == (200, "Ok")          # pasted raw into the tag
    assert d.get("/post-sync?token=ab%2Bc%2Fd%3De") == (200, "Ok")  # or %-encoded
    assert d.get("/sync?token=ab%20c/d=e")[0] == 403             # a space is not a "+"
    assert rec.lines() == ["sync", "post"]


def test_special_characters_in_secret_with_percent_encoding(start, rec):
    d = start("--sync", rec.cmd("sync"), "--tls", "off", env={"SYNCHOOK_SECRET": "a&b#c%d"})
    assert d.get("/sync?token=a%26b%23c%25d") == (200, "Ok")


def test_config_syntax_error_never_shows_the_secret(tmp_path):
    config = tmp_path / "conf"
    config.write_text("SYNCHOOK_SYNC=true\nSYNCHOOK_SECRET=abc SecretTail99\n")
    os.chmod(str(config), 0o600)
    code, err = serve(tmp_path, "--config", str(config))
    assert code == 2
    line = one_line(err)
    assert "line 2" in line and "SecretTail99" not in line and "abc" not in line


def test_ipv4_mapped_allow_entry_is_normalised(start, rec):
    d = start("--sync", rec.cmd("sync"), "--tls", "off", "--allow", "::ffff:127.0.0.1")
    assert d.get("/sync") == (200, "Ok")
    d.wait_log(r"access: clients in 127\.0\.0\.1/32")


@pytest.mark.parametrize("entry,shown", [
    ("127.0.0.1/0", "did you mean 0.0.0.0/0 (the network) or 127.0.0.1 (the one address)?"),
    ("10.0.0.5/8", "did you mean 10.0.0.0/8"),
    ("10.0.0.0/255.0.0.0", "write the prefix length: 10.0.0.0/8"),
    ("2001:db8::1/32", "did you mean 2001:db8::/32"),
])
def test_allow_entry_with_host_bits_or_netmask_refused(tmp_path, entry, shown):
    code, err = serve(tmp_path, "--tls", "off", "--allow", entry)
    assert code == 2
    assert shown in one_line(err)


def test_noise_from_many_addresses_is_bounded_in_all(start, rec):
    """600 loopback addresses, each below its own limit, together above the global one."""
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"), "--tls", "off")
    for i in range(600):
        d.get("/nope-%d" % i, source="127.0.%d.%d" % (1 + i // 250, 1 + i % 250))
    assert d.get("/sync") == (200, "Ok")            # a window line, after the flood
    d.wait_log(r"GET /sync 200")
    nope = d.log().count("GET /nope-")
    assert 90 <= nope <= 110, nope                   # the global burst of 100
    assert d.get("/post-sync") == (200, "Ok")
    assert rec.lines() == ["sync", "post"]


def flood_summaries(guesser=None):
    """600 decoy clients, 3 noisy lines each, at once (and, every 20 of them, a
    wrong secret from guesser), then one line a summary period later: the
    summaries the noise filter gives."""
    sys.path.insert(0, os.path.dirname(SYNCHOOK))
    import synchook
    noise = synchook.NoiseFilter()
    summaries = []
    for i in range(600):
        for _ in range(3):
            summaries += noise.admit("127.0.%d.%d" % (i // 250, i % 250), 1.0)[1]
        if guesser and i % 20 == 0:
            summaries += noise.admit(guesser, 1.0, wrong_secret=True)[1]
    return summaries + noise.admit("127.9.9.9", 1.0 + synchook.NOISE_SUMMARY)[1]


def test_flood_summaries_come_as_one_line_for_many_clients():
    summaries = flood_summaries()
    # 100 lines got in (the burst for all), from 34 clients; the other 1,700 are one line
    assert len(summaries) == 1, summaries[:5]
    assert summaries[0].startswith("1700 more log lines from 567 clients not logged"), summaries


def test_a_client_guessing_the_secret_is_named_however_loud_the_decoys():
    """Decoys from 600 addresses use up the budget for all; the one client that
    sends wrong secrets still comes out by name, with its count."""
    summaries = flood_summaries("127.8.8.8")
    assert len(summaries) == 1, summaries[:5]
    # 30 sent: the first 2 were logged one by one, before the decoys used the budget up
    assert summaries[0].endswith("; a wrong or missing secret from 127.8.8.8 (28)"), summaries


def test_secret_of_white_space_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("\n\n")
    os.chmod(str(secret), 0o600)
    code, err = serve(tmp_path, "--secret-file", str(secret))
    assert code == 2 and "holds only white space" in one_line(err)
    code, err = serve(tmp_path, env=dict(os.environ, SYNCHOOK_SECRET=" \n"))
    assert code == 2 and "SYNCHOOK_SECRET is set but empty" in one_line(err)


@pytest.mark.parametrize("invisible", ["\v", "\f\v", "\x1c\x1d", "\x1e \x1f", "\x85"])
def test_secret_with_no_visible_character_refused_on_every_path(tmp_path, invisible):
    """Space, tab and newline were refused; \\v, \\f and \\x1c-\\x1f were a secret.
    Refused from the flag, the variable, the config file and the secret file."""
    code, err = serve(tmp_path, "--secret", invisible)
    assert code == 2 and "--secret has no visible character" in one_line(err), err
    code, err = serve(tmp_path, env=dict(os.environ, SYNCHOOK_SECRET=invisible))
    assert code == 2 and "SYNCHOOK_SECRET has no visible character" in one_line(err), err
    config = tmp_path / "synchook.conf"
    config.write_text("SYNCHOOK_SECRET='%s'\n" % invisible)
    os.chmod(str(config), 0o600)
    code, err = serve(tmp_path, "--config", str(config))
    assert code == 2 and "no visible character" in one_line(err), err
    assert invisible not in err
    secret = tmp_path / "secret"
    secret.write_bytes(invisible.encode() + b"\n")
    os.chmod(str(secret), 0o600)
    code, err = serve(tmp_path, "--secret-file", str(secret))
    assert code == 2 and "holds no visible character" in one_line(err) or \
        "holds only white space" in one_line(err), err


def test_config_error_never_echoes_a_word_of_the_secret(tmp_path):
    config = tmp_path / "conf"
    config.write_text("SYNCHOOK_SECRET=hunt er2=xyz\n")
    os.chmod(str(config), 0o600)
    code, err = serve(tmp_path, "--config", str(config))
    line = one_line(err)
    assert code == 2 and "line 1" in line and "er2" not in line and "xyz" not in line, line


@ROOT_ONLY
def test_tag_secret_new_trusts_no_config_anyone_could_write(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root-owned data\n")
    config = tmp_path / "conf"
    config.write_text("SYNCHOOK_SECRET_FILE=%s\n" % victim)
    os.chmod(str(config), 0o666)
    os.chown(str(config), OTHER_UID, OTHER_UID)
    out = run([sys.executable, SYNCHOOK, "tag", "--secret-new", "--config", str(config)])
    assert out.returncode == 2 and "--config %s: not trusted" % config in out.stderr, out.stderr
    assert victim.read_text() == "root-owned data\n"


def test_tag_secret_new_replaces_only_a_secret_file(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("line one\nline two\n")
    os.chmod(str(precious), 0o600)
    out = run([sys.executable, SYNCHOOK, "tag", "--secret-new", "--secret-file", str(precious)])
    assert out.returncode == 2 and "does not look like a secret file (more than one line)" \
        in out.stderr, out.stderr
    assert precious.read_text() == "line one\nline two\n"
    old = tmp_path / "secret"
    old.write_text("old-secret\n")
    os.chmod(str(old), 0o600)
    out = run([sys.executable, SYNCHOOK, "tag", "--secret-new", "--secret-file", str(old)])
    assert out.returncode == 0 and "old-secret" not in old.read_text()
