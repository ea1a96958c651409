"""install.sh under dash and busybox sh: files, services, idempotence, pipes, removal."""

import hashlib
import os
import shlex
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, SYNCHOOK, accepts, free_port, run, synchook, wait_until

pytestmark = pytest.mark.install

INSTALL = os.path.join(ROOT, "install.sh")

# Settings the systemd unit must never have.  Each of the first group makes systemd
# build a mount namespace for the unit before it starts synchook, with a mkdir on /
# that waits while / is frozen: a restart after a crash in a window would hang and
# nothing would thaw the guest (seen in a real Debian 12 guest with 1.4.0's
# ProtectKernelTunables= and ProtectControlGroups=).  OOMScoreAdjust= would be
# inherited by every hook command; User= and CapabilityBoundingSet= would take
# away what FIFREEZE needs.
UNIT_FORBIDDEN = (
    "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset", "ProtectHostname",
    "ProtectClock", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork",
    "PrivateUsers", "PrivateIPC", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
    "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
    "RootDirectory", "RootImage", "MountAPIVFS", "MountFlags", "DynamicUser",
    "NetworkNamespacePath", "OOMScoreAdjust", "User", "CapabilityBoundingSet")


def shells():
    found = []
    for name, argv in (("dash", ["dash"]), ("busybox", ["busybox", "sh"])):
        found.append(pytest.param(argv, id=name, marks=pytest.mark.skipif(
            shutil.which(argv[0]) is None, reason="%s not installed (apt-get install %s)" % (argv[0], argv[0]))))
    return found


SHELLS = shells()


def clean_env(extra=None):
    """install.sh's environment: no SYNCHOOK_ settings, and where the distribution
    has a python3, a PATH without pyenv's shims (a guest has none; each python3
    run through one costs this machine a tenth of a second)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
    env.update(extra or {})
    if os.path.exists("/usr/bin/python3"):
        env["PATH"] = ":".join(part for part in env.get("PATH", "").split(":")
                               if "/.pyenv/" not in part)
    return env


def install(shell, *args, env=None, cwd=None):
    return run(shell + [INSTALL] + list(args), env=clean_env(env), cwd=cwd)


def tree(root):
    """{path: (mode, sha256 or link target)} for every file and link under root."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, str(root))
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            else:
                with open(path, "rb") as handle:
                    found[rel] = (oct(os.stat(path).st_mode & 0o7777),
                                  hashlib.sha256(handle.read()).hexdigest())
    return found


def executable(path, text="#!/bin/sh\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(str(path), 0o755)


def running(pid):
    try:
        return open("/proc/%d/stat" % pid).read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def make_root(tmp_path, kind, python=True):
    """An image on disk, laid out as the distribution's own tools lay one out,
    with a python3 in usr/bin (a link to this interpreter, so that what is
    installed can run here)."""
    root = tmp_path / ("root-" + kind)
    root.mkdir()
    (root / "etc").mkdir()
    if python:
        (root / "usr" / "bin").mkdir(parents=True)
        os.symlink(os.path.realpath(sys.executable), str(root / "usr/bin/python3"))
    if kind == "systemd":                   # as debootstrap leaves it: systemd, and SysV dirs
        executable(root / "lib/systemd/systemd")
        (root / "etc/systemd/system").mkdir(parents=True)
        for d in ("init.d", "rc0.d", "rc2.d", "rc3.d"):
            (root / "etc" / d).mkdir()
    elif kind == "openrc":
        (root / "sbin").mkdir()
        (root / "sbin" / "openrc-run").write_text("#!/bin/sh\n")
        os.chmod(str(root / "sbin" / "openrc-run"), 0o755)
        (root / "etc" / "init.d").mkdir()
    elif kind == "sysv":
        for d in ("init.d", "rc0.d", "rc1.d", "rc2.d", "rc3.d", "rc5.d", "rc6.d"):
            (root / "etc" / d).mkdir()
    elif kind == "buildroot":
        (root / "etc" / "init.d").mkdir()
        (root / "etc" / "init.d" / "rcS").write_text(
            "#!/bin/sh\nfor i in /etc/init.d/S??* ;do\n  $i start\ndone\n")
    return root


@pytest.mark.slow
def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = run(["shellcheck", "-s", "sh", INSTALL])
    assert out.returncode == 0, out.stdout


def test_ends_by_calling_main():
    lines = [l for l in open(INSTALL).read().splitlines() if l.strip()]
    assert lines[-1] == 'main "$@" --end-of-install.sh'


def test_installer_knows_every_daemon_option():
    text = open(INSTALL).read()
    listed = text.split('DAEMON_OPTIONS="')[1].split('"')[0].split()
    daemon = [o.flag[2:] for o in synchook.OPTIONS if o.name not in ("config", "syslog")]
    assert sorted(listed) == sorted(daemon)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("kind", ["systemd", "openrc", "sysv", "buildroot", "rc.local"])
@pytest.mark.slow
def test_install_into_root_detects_init_and_writes_files(shell, kind, tmp_path):
    root = make_root(tmp_path, kind)
    out = install(shell, "--root", str(root), "--sync", "fsfreeze -f /data",
                  "--post-sync", "fsfreeze -u /data", "--timeout", "20")
    assert out.returncode == 0, out.stderr
    files = tree(root)
    program = root / "usr/local/sbin/synchook"
    assert files["usr/local/sbin/synchook"][0] == "0o755"
    assert program.read_text().splitlines()[0] == "#!/usr/bin/python3 -ISB"  # the image's
    module = root / "usr/local/lib/synchook/synchook.py"
    assert module.read_bytes() == open(SYNCHOOK, "rb").read()
    tag = "cpython-%d%d" % sys.version_info[:2]           # usr/bin/python3 runs here
    assert files["usr/local/lib/synchook/__pycache__/synchook.%s.pyc" % tag][0] == "0o644"
    assert run([str(program), "--version"]).stdout.startswith("synchook ")
    host_python = os.path.realpath(sys.executable)
    for path in files:
        if files[path][0] != "link":
            assert host_python not in (root / path).read_text(errors="replace"), path
    expected = {"systemd": "lib/systemd/systemd", "openrc": "sbin/openrc-run",
                "sysv": "etc/rc?.d", "buildroot": "runs S??* scripts",
                "rc.local": "no other init system"}[kind]
    assert "service kind: %s (" % ("sysv" if kind == "buildroot" else kind) in out.stderr
    assert expected in out.stderr, out.stderr
    assert files["etc/synchook.conf"][0] == "0o600"
    conf = (root / "etc/synchook.conf").read_text()
    assert "SYNCHOOK_SYNC='fsfreeze -f /data'\n" in conf
    assert "SYNCHOOK_TIMEOUT='20'\n" in conf
    if kind == "systemd":
        unit = (root / "etc/systemd/system/synchook.service").read_text()
        for line in ("Type=notify", "Restart=on-failure", "KillMode=process", "OOMPolicy=continue",
                     "TimeoutStopSec=70", "--config /etc/synchook.conf"):
            assert line in unit
        assert "ExecStart=/usr/bin/python3 -I -S /usr/local/sbin/synchook" in unit
        assert "etc/init.d/synchook" not in files
        for forbidden in UNIT_FORBIDDEN:
            assert "\n" + forbidden + "=" not in unit, forbidden
        assert files["etc/systemd/system/multi-user.target.wants/synchook.service"] == (
            "link", "/etc/systemd/system/synchook.service")
        # systemd holds the port (synchook.socket): never free while synchook restarts.
        assert "\nRequires=synchook.socket\nAfter=synchook.socket\n" in unit
        socket_unit = (root / "etc/systemd/system/synchook.socket").read_text()
        assert "\nListenStream=1727\nBindIPv6Only=both\n" in socket_unit
        assert files["etc/systemd/system/synchook.socket"][0] == "0o644"
        assert files["etc/systemd/system/sockets.target.wants/synchook.socket"] == (
            "link", "/etc/systemd/system/synchook.socket")
    elif kind == "openrc":
        script = (root / "etc/init.d/synchook").read_text()
        assert script.startswith("#!/sbin/openrc-run\n")
        assert "supervisor=supervise-daemon" in script and "--syslog" in script
        assert 'command="/usr/bin/python3"' in script and 'error_log="/var/log/synchook.log"' in script
        assert files["etc/runlevels/default/synchook"] == ("link", "/etc/init.d/synchook")
    elif kind == "sysv":
        script = (root / "etc/init.d/synchook").read_text()
        assert "### BEGIN INIT INFO" in script and "--syslog" in script
        assert 'PYTHON="/usr/bin/python3"' in script
        assert files["etc/rc2.d/S90synchook"] == ("link", "../init.d/synchook")
        assert files["etc/rc0.d/K10synchook"] == ("link", "../init.d/synchook")
    elif kind == "buildroot":
        assert "etc/init.d/S99synchook" in files and "etc/init.d/synchook" not in files
    else:
        rc = (root / "etc/rc.local").read_text()
        assert rc.startswith("#!/bin/sh\n") and rc.count("# BEGIN synchook") == 1
        assert "--syslog" in rc and files["etc/rc.local"][0] == "0o755"
        assert "\n/usr/bin/python3 -I -S /usr/local/sbin/synchook" in rc


@pytest.mark.parametrize("shell", SHELLS)
def test_systemd_unit_passes_systemd_analyze(shell, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    root = make_root(tmp_path, "systemd")
    assert install(shell, "--root", str(root), "--sync", "true").returncode == 0
    units = [str(root / "etc/systemd/system" / ("synchook." + kind)) for kind in ("socket", "service")]
    out = run(["systemd-analyze", "verify"] + units)
    assert out.returncode == 0, out.stderr
    assert "synchook.s" not in out.stderr, out.stderr


@pytest.mark.parametrize("listen, stream", [("127.0.0.1", "127.0.0.1:1800"),
                                            ("[fe80::1]", "[fe80::1]:1800"),
                                            ("::", "1800"), ("xo-guest.lan", None)])
@pytest.mark.slow
def test_the_socket_unit_binds_what_listen_names(tmp_path, listen, stream):
    root = make_root(tmp_path, "systemd")
    assert install(["dash"], "--root", str(root), "--sync", "true", "--listen", listen,
                   "--port", "1800").returncode == 0
    socket_unit = root / "etc/systemd/system/synchook.socket"
    unit = (root / "etc/systemd/system/synchook.service").read_text()
    if stream is None:                   # a name: systemd resolves none, synchook binds it
        assert not socket_unit.exists() and "synchook.socket" not in unit
    else:
        assert "\nListenStream=%s\n" % stream in socket_unit.read_text()
        assert "Requires=synchook.socket" in unit


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_rerun_is_idempotent_and_keeps_config(shell, tmp_path):
    root = make_root(tmp_path, "rc.local")
    (root / "etc/rc.local").write_text("#!/bin/sh\necho mine\nexit 0\n")
    assert install(shell, "--root", str(root), "--sync", "one").returncode == 0
    first = tree(root)
    out = install(shell, "--root", str(root))
    assert out.returncode == 0 and "keeping /etc/synchook.conf" in out.stderr
    assert tree(root) == first
    rc = (root / "etc/rc.local").read_text()
    assert rc.count("# BEGIN synchook") == 1 and rc.endswith("# END synchook\nexit 0\n")
    assert "echo mine" in rc
    assert install(shell, "--root", str(root), "--sync", "two").returncode == 0
    assert "SYNCHOOK_SYNC='two'" in (root / "etc/synchook.conf").read_text()
    assert (root / "etc/rc.local").read_text() == rc


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_hostile_values_round_trip_into_running_daemon(shell, tmp_path, start):
    out_file = tmp_path / "out"
    weird = "it's \"$HOME\" \\ `id` $(id) ; & | \n second line\t\n"
    sync_cmd = "printf %%s %s > %s" % (shlex.quote(weird), out_file)
    secret = "s'e\"c$r`e\\t"
    root = make_root(tmp_path, "rc.local")
    assert install(shell, "--root", str(root), "--sync", sync_cmd, "--secret", secret,
                   env={"SYNCHOOK_POST_SYNC": "echo 'from env'"}).returncode == 0
    os.chmod(str(root / "etc/synchook.conf"), 0o600)
    program = str(root / "usr/local/sbin/synchook")
    d = start("--config", str(root / "etc/synchook.conf"), command=[program])
    import urllib.parse
    assert d.get("/sync?token=" + urllib.parse.quote(secret)) == (200, "Ok")
    assert out_file.read_text() == weird
    assert d.get("/post-sync?token=" + urllib.parse.quote(secret)) == (200, "Ok")
    d.wait_log(r"post-sync\| from env")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("kind", ["systemd", "sysv", "rc.local", "openrc"])
@pytest.mark.slow
def test_uninstall_and_purge_leave_nothing(shell, kind, tmp_path):
    root = make_root(tmp_path, kind)
    if kind == "rc.local":
        (root / "etc/rc.local").write_text("#!/bin/sh\necho mine\n")
        os.chmod(str(root / "etc/rc.local"), 0o755)
    before = tree(root)
    assert install(shell, "--root", str(root), "--sync", "x").returncode == 0
    out = install(shell, "--root", str(root), "--uninstall")
    assert out.returncode == 0, out.stderr
    assert set(tree(root)) - set(before) == {"etc/synchook.conf"}     # config kept
    assert install(shell, "--root", str(root), "--purge").returncode == 0
    assert tree(root) == before


@pytest.mark.parametrize("quoted", ['SYNCHOOK_STATE_DIR="/var/lib/my state"',
                                    "export SYNCHOOK_STATE_DIR='/var/lib/my state' # mine"])
@pytest.mark.slow
def test_purge_reads_the_state_dir_as_synchook_does(tmp_path, quoted):
    root = make_root(tmp_path, "sysv")
    assert install(["dash"], "--root", str(root), "--sync", "x").returncode == 0
    with open(str(root / "etc/synchook.conf"), "a") as conf:
        conf.write(quoted + "\n")
    state = root / "var/lib/my state"
    state.mkdir(parents=True)
    (state / "key.pem").write_text("secret key")
    out = install(["dash"], "--root", str(root), "--purge")
    assert out.returncode == 0, out.stderr
    assert not state.exists(), "--purge left the TLS key in %s" % state
    assert "/var/lib/my state" in out.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_dry_run_changes_nothing(shell, tmp_path):
    root = make_root(tmp_path, "sysv")
    before = tree(root)
    out = install(shell, "--root", str(root), "--dry-run", "--sync", "x")
    assert out.returncode == 0, out.stderr
    assert tree(root) == before
    assert "dry-run: would write %s/usr/local/sbin/synchook (mode 0755)" % root in out.stderr
    assert "dry-run: would write %s/etc/synchook.conf (mode 0600)" % root in out.stderr
    assert "dry-run: would run: ln -sf ../init.d/synchook" in out.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_truncated_script_installs_nothing(shell, tmp_path):
    data = open(INSTALL, "rb").read()
    trap_end = data.index(b"\n", data.index(b"\ntrap ") + 1)
    functions = [m.start() for m in __import__("re").finditer(rb"\n[a-z_]+\(\) \{", data)]
    cuts = (list(range(0, len(data), max(1, len(data) // 25))) + functions[::4] +
            [data.rindex(b"main ") + 3, data.rindex(b"main "), data.rindex(b"main ") + 5,
             data.rindex(b"main ") + 10, len(data) - 2])
    before = {}
    # A cut of the final newline alone leaves the whole script: it runs, as it should
    # (one of the evenly spaced cuts lands there when the length is a multiple of 25).
    for cut in sorted(set(cut for cut in cuts if cut < len(data) - 1)):
        root = make_root(tmp_path, "x%d" % cut)
        before[cut] = tree(root)
        proc = subprocess.run(shell + ["-s", "--", "--root", str(root), "--from", SYNCHOOK,
                                       "--sync", "x"],
                              input=data[:cut], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=clean_env(), cwd=str(tmp_path),
                              timeout=60)
        assert tree(root) == before[cut], "cut at %d installed something" % cut
        if cut > trap_end:                 # a cut inside the first lines cannot be seen
            assert proc.returncode == 1, "cut at %d exited %d" % (cut, proc.returncode)
            assert b"install.sh ended before its last line (a cut download?)" in \
                proc.stderr, "cut at %d: %s" % (cut, proc.stderr)


@pytest.fixture
def web(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving install.sh and synchook.py."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(INSTALL, str(site / "install.sh"))
    shutil.copy(SYNCHOOK, str(site / "synchook.py"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                             str(port)], cwd=str(site), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until(lambda: accepts(port, proc), 10, "the web server listening", 0.05)
    yield "http://127.0.0.1:%d" % port
    proc.terminate()
    proc.wait()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_curl_pipe_install_with_sha256(shell, tmp_path, web):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (apt-get install curl)")
    digest = hashlib.sha256(open(SYNCHOOK, "rb").read()).hexdigest()
    sh = " ".join(shell)
    root = make_root(tmp_path, "pipe")
    out = run(["sh", "-c", 'curl -fsSL "$BASE/install.sh" | SYNCHOOK_BASE_URL="$BASE" %s -s -- '
               '--root "$R" --sha256 %s --init none --sync true' % (sh, digest)],
              env=clean_env({"BASE": web, "R": str(root)}))
    assert out.returncode == 0, out.stderr
    assert "downloading %s/synchook.py" % web in out.stderr
    assert (root / "usr/local/sbin/synchook").exists()
    root2 = make_root(tmp_path, "from")
    out = run(["sh", "-c", 'curl -fsSL "$BASE/install.sh" | %s -s -- --root "$R" '
               '--from "$BASE/synchook.py" --sha256 %s --init none' % (sh, digest.upper())],
              env=clean_env({"BASE": web, "R": str(root2)}))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_wrong_hash_or_broken_download_refused(shell, tmp_path, web):
    root = make_root(tmp_path, "bad")
    empty = tree(root)
    out = install(shell, "--root", str(root), "--from", web + "/synchook.py", "--sha256", "0" * 64)
    assert out.returncode == 1 and "SHA-256 mismatch" in out.stderr
    assert tree(root) == empty
    out = install(shell, "--root", str(root), "--from", web + "/missing.py")
    assert out.returncode == 1 and "cannot download" in out.stderr
    half = tmp_path / "half.py"
    for cut, message in ((5000, "does not answer --version"), (5003, "not a Python program")):
        half.write_bytes(open(SYNCHOOK, "rb").read()[:cut])
        out = install(shell, "--root", str(root), "--from", str(half))
        assert out.returncode == 1 and "nothing installed" in out.stderr, out.stderr
    assert tree(root) == empty


def test_piped_without_source_says_how(tmp_path):
    root = make_root(tmp_path, "nosrc")
    out = subprocess.run(["dash", "-s", "--", "--root", str(root)], input=open(INSTALL, "rb").read(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                         cwd=str(tmp_path))
    assert out.returncode == 1 and b"SYNCHOOK_BASE_URL" in out.stderr


def test_no_python_says_how_to_install(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sed", "cat", "mkdir", "chmod", "mv", "rm", "tr", "cut", "dirname", "mktemp",
                 "head", "tail", "grep", "id", "cp", "ln", "sha256sum"):
        path = shutil.which(tool)
        if path:
            os.symlink(path, str(bin_dir / tool))
    out = run(["/usr/bin/dash", INSTALL, "--dry-run"], env={"PATH": str(bin_dir)})
    assert out.returncode == 1
    assert "needs Python 3.6 or newer" in out.stderr
    for distro in ("apt-get install -y python3", "dnf install -y python3", "apk add python3",
                   "zypper install -y python3"):
        assert distro in out.stderr


@pytest.mark.root
def test_requires_root_unless_root_dir(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (apt-get install util-linux) to try as another user")
    out = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "dash", INSTALL,
               "--sync", "x"], env=clean_env(), cwd="/")
    assert out.returncode == 1 and "run install.sh as root" in out.stderr


def test_help_lists_variables():
    out = run(["dash", INSTALL, "--help"])
    assert out.returncode == 0
    for word in ("SYNCHOOK_FROM", "SYNCHOOK_INIT", "SYNCHOOK_ROOT", "--uninstall", "--purge",
                 "--dry-run", "SYNCHOOK_SYNC"):
        assert word in out.stdout
    bad = run(["dash", INSTALL, "--frobnicate"])
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


@pytest.mark.parametrize("downloader", ["wget", "python3"])
@pytest.mark.slow
def test_download_without_curl(tmp_path, web, downloader):
    """No curl: wget, else python3's urllib, fetches synchook.py."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ["sed", "cat", "mkdir", "chmod", "mv", "rm", "tr", "cut", "dirname", "mktemp",
             "head", "tail", "grep", "id", "cp", "ln", "sha256sum", "python3"]
    if downloader == "wget":
        if shutil.which("wget") is None:
            pytest.skip("wget not installed (apt-get install wget)")
        tools.append("wget")
    for tool in tools:
        # python3: this interpreter itself (PATH's may be a pyenv shim, which needs PATH)
        path = os.path.realpath(sys.executable) if tool == "python3" else shutil.which(tool)
        if path:
            os.symlink(path, str(bin_dir / tool))
    root = make_root(tmp_path, "dl")
    out = run(["/usr/bin/dash", INSTALL, "--root", str(root), "--from", web + "/synchook.py",
               "--init", "none"], env=clean_env({"PATH": str(bin_dir)}))
    assert out.returncode == 0, out.stderr
    assert (root / "usr/local/lib/synchook/synchook.py").read_text() == open(SYNCHOOK).read()


# Images --------------------------------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_root_without_python_names_both_fixes(shell, tmp_path):
    root = make_root(tmp_path, "sysv", python=False)
    out = install(shell, "--root", str(root), "--sync", "x")
    assert out.returncode == 1
    assert "no Python 3 in %s" % root in out.stderr
    assert "install python3 into the image" in out.stderr and "--python PATH" in out.stderr
    assert tree(root) == {}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_python_flag_is_what_the_service_runs(shell, tmp_path):
    root = make_root(tmp_path, "rc.local", python=False)
    out = install(shell, "--root", str(root), "--python", "/opt/py/bin/python3", "--sync", "x")
    assert out.returncode == 0, out.stderr
    assert "not in %s (yet?)" % root in out.stderr
    assert (root / "usr/local/sbin/synchook").read_text().startswith("#!/opt/py/bin/python3 -ISB\n")
    assert "no bytecode compiled, synchook runs from source" in out.stderr
    assert "\n/opt/py/bin/python3 -I -S " in (root / "etc/rc.local").read_text()


@pytest.mark.parametrize("shell", SHELLS)
def test_platform_python_found_in_root(shell, tmp_path):
    root = make_root(tmp_path, "sysv", python=False)
    executable(root / "usr/libexec/platform-python")
    out = install(shell, "--root", str(root), "--sync", "x")
    assert out.returncode == 0, out.stderr
    assert "Python in %s: /usr/libexec/platform-python" % root in out.stderr


def test_rcs_that_runs_no_s_scripts_gets_no_s99(tmp_path):
    root = make_root(tmp_path, "rcs")
    executable(root / "etc/init.d/rcS", "#!/bin/sh\nfor f in /etc/boot/*.sh; do . $f; done\n")
    out = install(["dash"], "--root", str(root), "--sync", "x")
    assert out.returncode == 0, out.stderr
    assert (root / "etc/init.d/synchook").exists()
    assert not (root / "etc/init.d/S99synchook").exists()
    assert "nothing will start /etc/init.d/synchook at boot" in out.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_nothing_written_is_open_to_others_whatever_the_umask(shell, tmp_path):
    """Under umask 000 as under 077: directories and programs 0755, the module and
    its bytecode 0644, the config 0600; nothing writable by group or others."""
    root = make_root(tmp_path, "systemd")
    out = run(["sh", "-c", 'umask 000; exec "$@"', "sh"] + shell +
              [INSTALL, "--root", str(root), "--secret", "S3cret", "--sync", "true"],
              env=clean_env())
    assert out.returncode == 0, out.stderr
    files = tree(root)
    assert files["usr/local/sbin/synchook"][0] == "0o755"
    assert files["usr/local/lib/synchook/synchook.py"][0] == "0o644"
    assert files["etc/synchook.conf"][0] == "0o600"
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            assert not mode & 0o022, "%s is mode %o" % (path, mode & 0o7777)
    for directory in ("usr/local/lib/synchook", "usr/local/lib/synchook/__pycache__",
                      "etc/systemd/system/multi-user.target.wants"):
        assert oct(os.stat(str(root / directory)).st_mode & 0o777) == "0o755", directory


# Failures fail -------------------------------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("args,shown", [
    (["--timeout", "abc"], "synchook: error: SYNCHOOK_TIMEOUT 'abc': not a number of seconds"),
    (["--allow", "10.0.0.5/8"], "did you mean 10.0.0.0/8"),
    (["--port", "99999"], "port out of range"),
    (["--port", "0"], "--port 0: a service needs a fixed port"),
    (["--allow", "fe80::1%x;touch${IFS}F;#"], "a zone (%...) has no place in --allow"),
])
@pytest.mark.slow
def test_bad_setting_is_refused_before_anything_is_written(shell, tmp_path, args, shown):
    root = make_root(tmp_path, "sysv")
    before = tree(root)
    out = install(shell, "--root", str(root), *args)
    assert out.returncode == 2                          # a bad setting, as synchook says it
    assert "the settings are not valid, nothing installed" in out.stderr and shown in out.stderr
    assert tree(root) == before


@pytest.mark.parametrize("value", ["abc", "0" * 63, "0" * 65, "g" * 64])
def test_sha256_must_be_64_hex_digits(tmp_path, value):
    out = install(["dash"], "--root", str(make_root(tmp_path, "s" + value[:3])), "--sha256", value)
    assert out.returncode == 2 and "--sha256" in out.stderr


@pytest.mark.slow
def test_uninstall_dry_run_says_would_remove(tmp_path):
    root = make_root(tmp_path, "sysv")
    assert install(["dash"], "--root", str(root), "--sync", "x").returncode == 0
    before = tree(root)
    out = install(["dash"], "--root", str(root), "--uninstall", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "would remove" in out.stderr and "info: removed" not in out.stderr
    assert tree(root) == before


# Re-runs keep what they are not told to change ------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_rerun_keeps_settings_not_given_and_reset_forgets(shell, tmp_path):
    root = make_root(tmp_path, "sysv")
    out = install(shell, "--root", str(root), "--sync", "one",
                  env={"SYNCHOOK_SECRET_FILE": "/root/synchook.secret"})
    assert out.returncode == 0, out.stderr
    out = install(shell, "--root", str(root), "--sync", "two", "--timeout", "9")
    assert out.returncode == 0, out.stderr
    conf = (root / "etc/synchook.conf").read_text()
    assert "SYNCHOOK_SECRET_FILE='/root/synchook.secret'" in conf     # kept
    assert "SYNCHOOK_SYNC='two'" in conf and "SYNCHOOK_TIMEOUT='9'" in conf
    assert "changes:  changed SYNCHOOK_SYNC, set SYNCHOOK_TIMEOUT" in out.stdout
    assert "settings: sync=two timeout=9 secret-file=/root/synchook.secret" in out.stdout
    out = install(shell, "--root", str(root), "--unset", "secret-file",
                  env={"SYNCHOOK_SECRET": "hunter2"})
    assert out.returncode == 0 and "secret=<hidden>" in out.stdout and "hunter2" not in (
        out.stdout + out.stderr), out.stdout + out.stderr
    out = install(shell, "--root", str(root), "--unset", "secret", "--secret-file",
                  "/root/synchook.secret")
    assert out.returncode == 0, out.stderr
    out = install(shell, "--root", str(root), "--reset", "--sync", "three")
    assert out.returncode == 0, out.stderr
    conf = (root / "etc/synchook.conf").read_text()
    assert "SECRET_FILE" not in conf and "TIMEOUT" not in conf and "SYNCHOOK_SYNC='three'" in conf
    assert "dropped SYNCHOOK_SECRET_FILE (--reset)" in out.stdout


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_rerun_keeps_the_installed_kind_and_init_switches_cleanly(shell, tmp_path):
    root = make_root(tmp_path, "sysv")                 # has etc/init.d and rc?.d
    assert install(shell, "--root", str(root), "--init", "rc.local", "--sync", "x").returncode == 0
    out = install(shell, "--root", str(root))          # no --init: stays rc.local
    assert out.returncode == 0, out.stderr
    assert "service kind: rc.local (installed as rc.local before" in out.stderr
    assert not (root / "etc/init.d/synchook").exists()
    out = install(shell, "--root", str(root), "--init", "sysv")
    assert out.returncode == 0, out.stderr
    assert (root / "etc/init.d/synchook").exists() and not (root / "etc/rc.local").exists()
    assert "removing the rc.local service of an earlier install" in out.stderr


# Real installs, in a private mount namespace: the host's /etc, /run, /var are never touched --

TEST_MOUNTS = (os.path.join(tempfile.gettempdir(), "pytest-of-"),   # conftest's loops
               os.path.join(tempfile.gettempdir(), "synchook-consistency-"),
               os.path.join(tempfile.gettempdir(), "synchook-freeze-"))   # bench/freeze's


def mount_points():
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4].encode().decode("unicode_escape") for line in handle]


class PrivateSystem:
    """A mount namespace whose /etc, /var and /usr/local are overlays of this
    machine's and whose /run is a new tmpfs: a real install and a real service
    there leave the host as it was, and concurrent runs cannot collide."""

    def __init__(self, tmp_path):
        if os.geteuid() != 0 or not shutil.which("nsenter") or not shutil.which("unshare"):
            pytest.skip("a real install needs root, unshare and nsenter (apt-get install util-linux)")
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep",
                                        "900"])
        mounts = ["mount -t tmpfs tmpfs /run"]
        for index, path in enumerate(("/etc", "/var", "/usr/local")):
            upper, work = tmp_path / ("up%d" % index), tmp_path / ("work%d" % index)
            upper.mkdir()
            work.mkdir()
            mounts.append("mount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s"
                          % (path, upper, work, path))
        time.sleep(0.1)
        out = self.run(["sh", "-c", " && ".join(mounts)])
        if out.returncode != 0:
            self.close()
            pytest.skip("cannot build a private /etc, /var, /run here: " + out.stderr.strip())
        # Other tests' loop devices, mounted when this namespace was made: gone from
        # it, so that `synchook status` in here never sees one of them frozen.
        others = [point for point in mount_points() if point.startswith(TEST_MOUNTS)]
        if others:
            self.run(["umount", "-l"] + others[::-1])

    def run(self, cmd, **kwargs):
        return run(["nsenter", "-t", str(self.holder.pid), "-m"] + list(cmd), **kwargs)

    def path(self, path):
        return "/proc/%d/root%s" % (self.holder.pid, path)

    def install(self, init, port, shell=("dash",)):
        """install.sh for real in here: that init kind, that port, on 127.0.0.1."""
        return self.run(list(shell) + [INSTALL, "--init", init, "--port", str(port), "--listen",
                                       "127.0.0.1", "--sync", "true"], env=clean_env())

    def close(self):
        for pid_file in ("/run/synchook.pid",):
            try:
                os.kill(int(open(self.path(pid_file)).read()), 9)
            except (OSError, ValueError):
                pass
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def private_system(tmp_path):
    system = PrivateSystem(tmp_path)
    yield system
    system.close()


def answers(port, timeout=5):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/status")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@pytest.mark.slow
def test_sysv_script_really_starts_reports_and_stops(private_system):
    system = private_system
    port = free_port()
    out = system.install("sysv", port)
    assert out.returncode == 0, out.stderr
    assert "synchook is listening on port %d" % port in out.stderr
    status = system.run(["/etc/init.d/synchook", "status"])
    assert status.returncode == 0 and "is running" in status.stdout
    pid = int(open(system.path("/run/synchook.pid")).read())
    assert answers(port)
    # The start log names the commands (a password in --sync): root's alone.
    assert oct(os.stat(system.path("/run/synchook.start")).st_mode & 0o777) == "0o600"
    with open("/proc/%d/status" % pid) as handle:       # started as an init would start it
        assert "Umask:\t0022" in handle.read()
    if os.path.exists("/usr/bin/python3"):        # the distribution's, never a pyenv one
        assert open(system.path("/usr/local/sbin/synchook")).readline() == \
            "#!/usr/bin/python3 -ISB\n"
    # The tools read /etc/synchook.conf by default on an installed guest.
    status = system.run(["/usr/local/sbin/synchook", "status"])
    assert status.returncode == 0 and "window:         idle" in status.stdout, status.stdout
    assert "who may run the hooks: ANYONE who can reach port %d, no secret" % port in out.stdout
    assert "anyone who can reach port %d can freeze this guest" % port in out.stderr
    stop = system.run(["/etc/init.d/synchook", "stop"])
    assert stop.returncode == 0 and not running(pid)   # gone, or a zombie left to reap
    assert system.run(["/etc/init.d/synchook", "status"]).returncode == 3
    start = system.run(["/etc/init.d/synchook", "start"])
    assert start.returncode == 0 and "synchook started" in start.stdout
    assert answers(port)                                # started means listening
    # restart, and a re-install that changes a setting: synchook runs itself again
    # in the same process, the port held all along (no local user can take it).
    pid = int(open(system.path("/run/synchook.pid")).read())
    restart = system.run(["/etc/init.d/synchook", "restart"])
    assert restart.returncode == 0, restart.stdout
    assert "synchook restarted in place (pid %d)" % pid in restart.stdout
    out = system.run(["dash", INSTALL, "--sync", "echo changed"], env=clean_env())
    assert out.returncode == 0, out.stderr
    assert "synchook restarted in place (pid %d)" % pid in out.stdout + out.stderr
    assert int(open(system.path("/run/synchook.pid")).read()) == pid and answers(port)
    out = system.run(["dash", INSTALL, "--purge"], env=clean_env())
    assert out.returncode == 0, out.stderr
    for path in ("/etc/synchook.conf", "/etc/init.d/synchook", "/run/synchook.pid",
                 "/usr/local/sbin/synchook"):
        assert not os.path.exists(system.path(path)), path
    assert not [f for d in ("rc0.d", "rc2.d", "rc3.d") if os.path.isdir(system.path("/etc/" + d))
                for f in os.listdir(system.path("/etc/" + d)) if "synchook" in f]
    assert not answers(port)


@pytest.mark.slow
def test_sysv_start_with_a_bad_setting_shows_the_error_and_logs_it(private_system):
    system = private_system
    port = free_port()
    out = system.install("sysv", port)
    assert out.returncode == 0, out.stderr
    system.run(["/etc/init.d/synchook", "stop"])
    with open(system.path("/etc/synchook.conf"), "a") as conf:
        conf.write("SYNCHOOK_MAX_HOLD=soon\n")
    start = system.run(["/etc/init.d/synchook", "start"])
    assert start.returncode == 1
    line = "synchook: error: /etc/synchook.conf line 6: SYNCHOOK_MAX_HOLD 'soon': not a number"
    assert "synchook failed to start:" in start.stdout and line in start.stdout, start.stdout
    if os.path.exists("/dev/log"):
        return                 # a syslog daemon here: the line went to it
    # no syslog daemon: the error is in the file the README names
    logged = open(system.path("/var/log/synchook.log")).read()
    assert line in logged, logged


@pytest.mark.slow
def test_port_held_by_another_program_fails_the_install(private_system):
    system = private_system
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        out = system.install("sysv", port)
    assert out.returncode != 0
    assert "synchook would not start with these settings, nothing installed: port %d is " \
        "already in use by another program" % port in out.stderr, out.stderr
    assert "listening on port" not in out.stderr
    assert not os.path.exists(system.path("/etc/synchook.conf"))


@pytest.mark.slow
def test_rc_local_really_starts_at_boot_and_uninstalls(private_system):
    system = private_system
    port = free_port()
    shell = ["busybox", "sh"] if shutil.which("busybox") else ["dash"]
    out = system.install("rc.local", port, shell)
    assert out.returncode == 0, out.stderr
    assert "synchook is listening on port %d" % port in out.stderr
    assert answers(port)
    os.kill(int(open(system.path("/run/synchook.pid")).read()), 15)       # as at shutdown
    wait_until(lambda: not answers(port, 1), 10, "synchook stopped", 0.1)
    boot = system.run(["sh", "/etc/rc.local"], timeout=30)               # as at boot
    assert boot.returncode == 0
    wait_until(lambda: answers(port, 1), 15, "rc.local starting synchook", 0.1)
    pid = int(open(system.path("/run/synchook.pid")).read())
    out = system.run(shell + [INSTALL, "--sync", "echo changed"], env=clean_env())
    assert out.returncode == 0 and "synchook restarted in place" in out.stderr, out.stderr
    assert int(open(system.path("/run/synchook.pid")).read()) == pid and answers(port)
    out = system.run(["dash", INSTALL, "--purge"], env=clean_env())
    assert out.returncode == 0, out.stderr
    assert not answers(port)
    for path in ("/etc/synchook.conf", "/etc/rc.local", "/run/synchook.pid",
                 "/usr/local/sbin/synchook"):
        assert not os.path.exists(system.path(path)), path


@pytest.mark.slow
def test_init_systemd_without_systemd_running_fails(private_system):
    if not shutil.which("systemctl"):
        pytest.skip("no systemctl here to fail (apt-get install systemd)")
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd runs here: nothing to fail")
    out = private_system.run(["dash", INSTALL, "--init", "systemd", "--sync", "true"],
                             env=clean_env())
    assert out.returncode == 1
    assert "is systemd running? (else pass --init KIND)" in out.stderr, out.stderr
    assert "synchook installed" not in out.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_sysv_script_takes_a_zombie_for_not_running(shell, tmp_path):
    """A zombie answers kill -0: taken for synchook, it made `start` say "already
    running" and start nothing, and `restart` wait out STOP_WAIT."""
    root = make_root(tmp_path, "sysv")
    out = install(shell, "--root", str(root), "--sync", "true")
    assert out.returncode == 0, out.stderr
    pidfile = tmp_path / "synchook.pid"
    script = (root / "etc/init.d/synchook").read_text().replace(
        "PIDFILE=/run/synchook.pid", "PIDFILE=%s" % pidfile).replace(
        'PROGRAM="/usr/local/sbin/synchook"', 'PROGRAM="%s/usr/local/sbin/synchook"' % root)
    (tmp_path / "init").write_text(script)
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: open("/proc/%d/stat" % zombie.pid).read().rsplit(") ", 1)[1][0]
                   == "Z", 10, "a zombie")
        pidfile.write_text("%d\n" % zombie.pid)
        status = run(shell + [str(tmp_path / "init"), "status"])
        assert status.returncode == 3 and "not running" in status.stdout, status.stdout
        began = time.monotonic()
        stop = run(shell + [str(tmp_path / "init"), "stop"])
        assert "not running" in stop.stdout and time.monotonic() - began < 5
    finally:
        zombie.wait()


@pytest.mark.slow
def test_reinstall_with_a_setting_that_would_not_start_changes_nothing(private_system):
    system = private_system
    port = free_port()
    assert system.install("sysv", port).returncode == 0
    config = open(system.path("/etc/synchook.conf")).read()
    out = system.run(["dash", INSTALL, "--secret-file", "/nonexistent/secret"], env=clean_env())
    assert out.returncode == 1
    assert "synchook would not start with these settings, nothing installed" in out.stderr
    assert "--secret-file /nonexistent/secret" in out.stderr, out.stderr
    assert open(system.path("/etc/synchook.conf")).read() == config
    assert answers(port)


def sysv_links(system):
    return sorted(f for d in os.listdir(system.path("/etc")) if re.match(r"rc\d\.d$", d)
                  for f in os.listdir(system.path("/etc/" + d)) if "synchook" in f)


@pytest.mark.parametrize("init", [[], ["--init", "rc.local"]], ids=["same-init", "other-init"])
@pytest.mark.slow
def test_failed_start_after_reinstall_puts_the_previous_agent_back(private_system, init):
    """A start can still fail where no check foresaw it (here: the runtime dir held
    by another synchook): the previous program, settings and service come back,
    and the previous service kind when the re-install changed --init (the SysV
    script and its links)."""
    system = private_system
    port = free_port()
    assert system.install("sysv", port).returncode == 0
    config = open(system.path("/etc/synchook.conf")).read()
    script, links = open(system.path("/etc/init.d/synchook")).read(), sysv_links(system)
    squatter = subprocess.Popen(
        ["nsenter", "-t", str(system.holder.pid), "-m", sys.executable, SYNCHOOK, "--port", "0",
         "--listen", "127.0.0.1", "--tls", "off", "--runtime-dir", "/run/other"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b" listening on " in squatter.stderr.readline()
        out = system.run(["dash", INSTALL, "--runtime-dir", "/run/other"] + init,
                         env=clean_env())
        assert out.returncode == 1, out.stderr
        assert "the new synchook did not start, so the previous one is running again" \
            in out.stderr, out.stderr
        if init:
            assert "putting the sysv service back in place of the rc.local one" in out.stderr
            rc_local = system.path("/etc/rc.local")
            assert not os.path.exists(rc_local) or "# BEGIN synchook" not in open(
                rc_local).read()
        assert open(system.path("/etc/synchook.conf")).read() == config
        assert open(system.path("/etc/init.d/synchook")).read() == script
        assert sysv_links(system) == links
        assert system.run(["/etc/init.d/synchook", "status"]).returncode == 0 and answers(port)
    finally:
        squatter.terminate()
        squatter.wait(20)


def test_version_is_synchook_s():
    out = run(["dash", INSTALL, "--version"])
    assert out.returncode == 0 and out.stdout == "install.sh for synchook %s\n" % (
        synchook.__version__)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.slow
def test_unset_drops_one_setting_and_keeps_the_rest(shell, tmp_path):
    root = make_root(tmp_path, "sysv")
    assert install(shell, "--root", str(root), "--sync", "one", "--allow",
                   "192.0.2.1").returncode == 0
    out = install(shell, "--root", str(root), "--unset", "allow")
    assert out.returncode == 0 and "dropped SYNCHOOK_ALLOW (--unset)" in out.stderr, out.stderr
    conf = (root / "etc/synchook.conf").read_text()
    assert "SYNCHOOK_ALLOW" not in conf and "SYNCHOOK_SYNC='one'" in conf
    out = install(shell, "--root", str(root), "--unset", "nonsense")
    assert out.returncode == 2 and "--unset nonsense: not a setting" in out.stderr


def test_bytecode_names_the_installed_path_not_the_build_directory(tmp_path):
    import marshal
    root = make_root(tmp_path, "sysv")
    assert install(["dash"], "--root", str(root), "--sync", "true").returncode == 0
    tag = "cpython-%d%d" % sys.version_info[:2]
    data = open(str(root / ("usr/local/lib/synchook/__pycache__/synchook.%s.pyc" % tag)),
                "rb").read()
    assert marshal.loads(data[16:]).co_filename == "/usr/local/lib/synchook/synchook.py"


def test_alpine_image_without_openrc_fails_the_build(tmp_path):
    root = make_root(tmp_path, "rc.local")
    (root / "etc" / "alpine-release").write_text("3.20.0\n")
    out = install(["dash"], "--root", str(root), "--sync", "true")
    assert out.returncode == 1 and "an Alpine image without OpenRC" in out.stderr, out.stderr
    assert not (root / "etc/synchook.conf").exists()


def test_logrotate_entry_where_logrotate_is_and_gone_with_uninstall(tmp_path):
    root = make_root(tmp_path, "sysv")
    (root / "etc/logrotate.d").mkdir()
    assert install(["dash"], "--root", str(root), "--sync", "true").returncode == 0
    entry = (root / "etc/logrotate.d/synchook").read_text()
    assert entry.startswith("/var/log/synchook.log {") and "copytruncate" in entry
    assert install(["dash"], "--root", str(root), "--uninstall").returncode == 0
    assert not (root / "etc/logrotate.d/synchook").exists()
