"""install.sh under dash and busybox sh: files, services, idempotence, pipes, removal."""

import hashlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SYNCHOOK, free_port, run, synchook

INSTALL = os.path.join(ROOT, "install.sh")


def shells():
    found = []
    for name, argv in (("dash", ["dash"]), ("busybox", ["busybox", "sh"])):
        found.append(pytest.param(argv, id=name, marks=pytest.mark.skipif(
            shutil.which(argv[0]) is None, reason="%s not installed" % argv[0])))
    return found


SHELLS = shells()


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
    env.update(extra or {})
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


def make_root(tmp_path, kind):
    root = tmp_path / ("root-" + kind)
    root.mkdir()
    (root / "etc").mkdir()
    if kind == "systemd":
        (root / "run" / "systemd" / "system").mkdir(parents=True)
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


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = run(["shellcheck", "-s", "sh", INSTALL])
    assert out.returncode == 0, out.stdout


def test_ends_by_calling_main():
    lines = [l for l in open(INSTALL).read().splitlines() if l.strip()]
    assert lines[-1] == 'main "$@"'


def test_installer_knows_every_daemon_option():
    text = open(INSTALL).read()
    listed = text.split('DAEMON_OPTIONS="')[1].split('"')[0].split()
    daemon = [o.flag[2:] for o in synchook.OPTIONS if o.name not in ("config", "syslog")]
    assert sorted(listed) == sorted(daemon)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("kind", ["systemd", "openrc", "sysv", "buildroot", "rc.local"])
def test_install_into_root_detects_init_and_writes_files(shell, kind, tmp_path):
    root = make_root(tmp_path, kind)
    out = install(shell, "--root", str(root), "--sync", "fsfreeze -f /data",
                  "--post-sync", "fsfreeze -u /data", "--timeout", "20")
    assert out.returncode == 0, out.stderr
    files = tree(root)
    program = root / "usr/local/sbin/synchook"
    assert files["usr/local/sbin/synchook"][0] == "0o755"
    first = program.read_text().splitlines()[0]
    assert first.startswith("#!/") and first.endswith(" -IS")
    assert run([first[2:].split()[0], "-c", "import sys; sys.exit(sys.version_info < (3, 6))"]
               ).returncode == 0
    assert run([str(program), "--version"]).stdout.startswith("synchook ")
    assert files["etc/synchook.conf"][0] == "0o600"
    conf = (root / "etc/synchook.conf").read_text()
    assert "SYNCHOOK_SYNC='fsfreeze -f /data'\n" in conf
    assert "SYNCHOOK_TIMEOUT='20'\n" in conf
    if kind == "systemd":
        unit = (root / "etc/systemd/system/synchook.service").read_text()
        for line in ("Type=notify", "Restart=on-failure", "KillMode=mixed",
                     "TimeoutStopSec=70", "--config /etc/synchook.conf"):
            assert line in unit
        assert " -I -S /usr/local/sbin/synchook" in unit
        for forbidden in ("ProtectSystem=", "PrivateTmp=", "PrivateMounts=", "ProtectHome=",
                          "PrivateDevices=", "User=", "CapabilityBoundingSet="):
            assert "\n" + forbidden not in unit
        assert files["etc/systemd/system/multi-user.target.wants/synchook.service"] == (
            "link", "/etc/systemd/system/synchook.service")
    elif kind == "openrc":
        script = (root / "etc/init.d/synchook").read_text()
        assert script.startswith("#!/sbin/openrc-run\n")
        assert "supervisor=supervise-daemon" in script and "--syslog" in script
        assert files["etc/runlevels/default/synchook"] == ("link", "/etc/init.d/synchook")
    elif kind == "sysv":
        script = (root / "etc/init.d/synchook").read_text()
        assert "### BEGIN INIT INFO" in script and "--syslog" in script
        assert files["etc/rc2.d/S90synchook"] == ("link", "../init.d/synchook")
        assert files["etc/rc0.d/K10synchook"] == ("link", "../init.d/synchook")
    elif kind == "buildroot":
        assert "etc/init.d/S99synchook" in files and "etc/init.d/synchook" not in files
    else:
        rc = (root / "etc/rc.local").read_text()
        assert rc.startswith("#!/bin/sh\n") and rc.count("# BEGIN synchook") == 1
        assert "--syslog" in rc and files["etc/rc.local"][0] == "0o755"


@pytest.mark.parametrize("shell", SHELLS)
def test_systemd_unit_passes_systemd_analyze(shell, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    root = make_root(tmp_path, "systemd")
    assert install(shell, "--root", str(root), "--sync", "true").returncode == 0
    out = run(["systemd-analyze", "verify", str(root / "etc/systemd/system/synchook.service")])
    assert out.returncode == 0, out.stderr
    assert "synchook.service" not in out.stderr, out.stderr


@pytest.mark.parametrize("shell", SHELLS)
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
def test_hostile_values_round_trip_into_running_daemon(shell, tmp_path, start):
    out_file = tmp_path / "out"
    weird = "it's \"$HOME\" \\ `id` $(id) ; & | \n second line\t\n"
    sync_cmd = "printf %%s %s > %s" % (shlex.quote(weird), out_file)
    secret = "s'e\"c$r`e\\t"
    root = make_root(tmp_path, "rc.local")
    assert install(shell, "--root", str(root), "--sync", sync_cmd, "--secret", secret,
                   env={"SYNCHOOK_POST_SYNC": "echo 'from env'"}).returncode == 0
    program = str(root / "usr/local/sbin/synchook")
    d = start("--config", str(root / "etc/synchook.conf"), command=[program])
    import urllib.parse
    assert d.get("/sync?token=" + urllib.parse.quote(secret)) == (200, "Ok")
    assert out_file.read_text() == weird
    assert d.get("/post-sync?token=" + urllib.parse.quote(secret)) == (200, "Ok")
    d.wait_log(r"post-sync\| from env")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("kind", ["systemd", "sysv", "rc.local", "openrc"])
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
    cuts = list(range(0, len(data), max(1, len(data) // 25))) + [data.rindex(b"main ") + 3]
    for cut in cuts:
        root = make_root(tmp_path, "x%d" % cut)
        proc = subprocess.run(shell + ["-s", "--", "--root", str(root), "--from", SYNCHOOK,
                                       "--sync", "x"],
                              input=data[:cut], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=clean_env(), cwd=str(tmp_path),
                              timeout=60)
        assert tree(root) == {}, "cut at %d installed something" % cut


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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield "http://127.0.0.1:%d" % port
    proc.terminate()
    proc.wait()


@pytest.mark.parametrize("shell", SHELLS)
def test_curl_pipe_install_with_sha256(shell, tmp_path, web):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
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
    out = install(shell, "--root", str(root), "--from", web + "/synchook.py", "--sha256", "0" * 64)
    assert out.returncode == 1 and "SHA-256 mismatch" in out.stderr
    assert tree(root) == {}
    out = install(shell, "--root", str(root), "--from", web + "/missing.py")
    assert out.returncode == 1 and "cannot download" in out.stderr
    half = tmp_path / "half.py"
    for cut, message in ((5000, "does not answer --version"), (5003, "not a Python program")):
        half.write_bytes(open(SYNCHOOK, "rb").read()[:cut])
        out = install(shell, "--root", str(root), "--from", str(half))
        assert out.returncode == 1 and "nothing installed" in out.stderr, out.stderr
    assert tree(root) == {}


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
    out = run(["/usr/bin/dash", INSTALL, "--root", str(tmp_path / "r")],
              env={"PATH": str(bin_dir)})
    assert out.returncode == 1
    assert "needs Python 3.6 or newer" in out.stderr
    for distro in ("apt-get install -y python3", "dnf install -y python3", "apk add python3",
                   "zypper install -y python3"):
        assert distro in out.stderr


def test_requires_root_unless_root_dir(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to try as another user")
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
    assert bad.returncode == 1 and "unknown option --frobnicate" in bad.stderr


def test_sysv_script_really_starts_reports_and_stops(tmp_path):
    """A real install on this machine (unique port, temp dirs), then removed."""
    if os.geteuid() != 0:
        pytest.skip("a real install needs root")
    for path in ("/etc/synchook.conf", "/etc/init.d/synchook", "/run/synchook.pid"):
        if os.path.exists(path):
            pytest.skip("%s exists: not touching a real installation" % path)
    port = free_port()
    prefix = tmp_path / "prefix"
    try:
        out = install(["dash"], "--init", "sysv", "--prefix", str(prefix), "--port", str(port),
                      "--listen", "127.0.0.1", "--sync", "true", "--runtime-dir",
                      str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"))
        assert out.returncode == 0, out.stderr
        assert "synchook is listening on port %d" % port in out.stderr
        status = run(["/etc/init.d/synchook", "status"])
        assert status.returncode == 0 and "is running" in status.stdout
        pid = int(open("/run/synchook.pid").read())
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/status")
        assert conn.getresponse().status == 200
        conn.close()
        stop = run(["/etc/init.d/synchook", "stop"])
        assert stop.returncode == 0 and not os.path.exists("/proc/%d" % pid)
        assert run(["/etc/init.d/synchook", "status"]).returncode == 3
        assert run(["/etc/init.d/synchook", "start"]).returncode == 0
        assert run(["/etc/init.d/synchook", "status"]).returncode == 0
    finally:
        out = install(["dash"], "--purge")
    assert out.returncode == 0, out.stderr
    for path in ("/etc/synchook.conf", "/etc/init.d/synchook", "/run/synchook.pid",
                 str(prefix / "sbin/synchook")):
        assert not os.path.exists(path)
    assert not [f for d in ("rc0.d", "rc2.d", "rc3.d") if os.path.isdir("/etc/" + d)
                for f in os.listdir("/etc/" + d) if "synchook" in f]


@pytest.mark.parametrize("downloader", ["wget", "python3"])
def test_download_without_curl(tmp_path, web, downloader):
    """No curl: wget, else python3's urllib, fetches synchook.py."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ["sed", "cat", "mkdir", "chmod", "mv", "rm", "tr", "cut", "dirname", "mktemp",
             "head", "tail", "grep", "id", "cp", "ln", "sha256sum", "python3"]
    if downloader == "wget":
        if shutil.which("wget") is None:
            pytest.skip("wget not installed")
        tools.append("wget")
    for tool in tools:
        path = shutil.which(tool)
        if path:
            os.symlink(path, str(bin_dir / tool))
    root = make_root(tmp_path, "dl")
    out = run(["/usr/bin/dash", INSTALL, "--root", str(root), "--from", web + "/synchook.py",
               "--init", "none"], env=clean_env({"PATH": str(bin_dir)}))
    assert out.returncode == 0, out.stderr
    assert (root / "usr/local/sbin/synchook").read_text().split("\n", 1)[1] == \
        open(SYNCHOOK).read().split("\n", 1)[1]


def test_rc_local_really_starts_at_boot_and_uninstalls(tmp_path):
    """A real rc.local install: the block starts the daemon when rc.local runs."""
    if os.geteuid() != 0:
        pytest.skip("a real install needs root")
    for path in ("/etc/synchook.conf", "/etc/rc.local", "/run/synchook.pid",
                 "/etc/init.d/synchook"):
        if os.path.exists(path):
            pytest.skip("%s exists: not touching a real installation" % path)
    port = free_port()
    prefix = tmp_path / "prefix"
    import http.client

    def answers():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/status")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    try:
        out = install(["busybox", "sh"] if shutil.which("busybox") else ["dash"],
                      "--init", "rc.local", "--prefix", str(prefix), "--port", str(port),
                      "--listen", "127.0.0.1", "--sync", "true", "--runtime-dir",
                      str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"))
        assert out.returncode == 0, out.stderr
        assert "synchook is listening on port %d" % port in out.stderr
        assert answers()
        os.kill(int(open("/run/synchook.pid").read()), 15)       # as at shutdown
        deadline = time.monotonic() + 10
        while answers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not answers()
        boot = subprocess.run(["sh", "/etc/rc.local"], timeout=30)  # as at boot
        assert boot.returncode == 0
        deadline = time.monotonic() + 15
        while not answers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answers(), "rc.local did not start synchook"
    finally:
        out = install(["dash"], "--purge")
    assert out.returncode == 0, out.stderr
    assert not answers()
    for path in ("/etc/synchook.conf", "/etc/rc.local", "/run/synchook.pid",
                 str(prefix / "sbin/synchook")):
        assert not os.path.exists(path), path
