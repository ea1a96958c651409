"""The .deb and the .rpm (packaging/build), and `synchook configure`, which
opens a package's closed start.

Installed for real in tests/test_guest.py (a Debian guest: dpkg -i, the hand-over
from install.sh, an upgrade, dpkg -r and -P).  Here: the build and its
reproducibility, the distributions' own linters, what each package holds and
runs, install.sh's refusal to install over a package, and configure against
real daemons.
"""

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, SYNCHOOK, build_packages, free_port, run, wait_until

sys.path.insert(0, ROOT)
import synchook  # noqa: E402

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("no dpkg-deb here: the packages are built on Debian or Ubuntu")
    return build_packages(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def unpacked(built, tmp_path_factory):
    """{"deb": root, "rpm": root}: each package's files, unpacked."""
    roots = {"deb": str(tmp_path_factory.mktemp("deb-root"))}
    subprocess.run(["dpkg-deb", "-R", built["deb"], roots["deb"]], check=True)
    if "rpm" in built:
        roots["rpm"] = str(tmp_path_factory.mktemp("rpm-root"))
        subprocess.run("rpm2cpio %s | cpio -idm --quiet" % built["rpm"], shell=True,
                       cwd=roots["rpm"], check=True)
    return roots


def rpm_query(built, tmp_path, *args):
    """rpm -qp ARGS of the .rpm, with a database of the test's own (rpm would
    make one in ~/.rpmdb)."""
    return run(["rpm", "--dbpath", str(tmp_path / "rpmdb"), "-qp"] + list(args)
               + [built["rpm"]]).stdout


def needs_rpm(built):
    if "rpm" not in built:
        pytest.skip("no rpmbuild here (apt-get install rpm): the .rpm was not built")


def read(path, mode="r"):
    with open(path, mode) as handle:
        return handle.read()


# The build ------------------------------------------------------------------------

@pytest.mark.slow
def test_two_builds_are_byte_identical_and_named_by_version(built, tmp_path):
    again = build_packages(tmp_path)
    for kind, path in built.items():
        assert os.path.basename(path) in ("synchook_%s_all.deb" % synchook.__version__,
                                          "synchook-%s-1.noarch.rpm" % synchook.__version__)
        assert read(path, "rb") == read(again[kind], "rb"), kind
    sums = read(os.path.join(os.path.dirname(built["deb"]), "SHA256SUMS")).splitlines()
    assert sorted(sums) == sorted("%s  %s" % (hashlib.sha256(read(path, "rb")).hexdigest(),
                                              os.path.basename(path))
                                  for path in built.values())


@pytest.mark.slow
def test_lintian_finds_nothing(built):
    if shutil.which("lintian") is None:
        pytest.skip("no lintian here (apt-get install lintian)")
    result = run(["lintian", "--pedantic", built["deb"]], timeout=300)
    found = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "P:")]
    assert found == [] and result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_rpmlint_finds_nothing(built, tmp_path):
    needs_rpm(built)
    if shutil.which("rpmlint") is None:
        pytest.skip("no rpmlint here (apt-get install rpmlint)")
    # HOME of its own: rpmlint opens rpm's database, which rpm makes in ~/.rpmdb.
    result = run(["rpmlint", "-c", os.path.join(ROOT, "packaging", "rpm", "rpmlint.toml"),
                  built["rpm"]], timeout=300, env=dict(os.environ, HOME=str(tmp_path)))
    assert "0 errors, 0 warnings" in result.stdout, result.stdout + result.stderr


# What they hold ------------------------------------------------------------------

def install_sh_files(tmp_path, init):
    """What install.sh writes for init into an image, as the packages lay it out."""
    root = tmp_path / init
    (root / "etc" / "logrotate.d").mkdir(parents=True)
    result = run(["sh", os.path.join(ROOT, "install.sh"), "--root", str(root), "--prefix", "/usr",
                  "--init", init, "--python", "/usr/bin/python3", "--allow", "none"],
                 env={"PATH": os.environ["PATH"]}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return str(root)


@pytest.mark.slow
def test_the_packages_hold_the_files_install_sh_writes(unpacked, tmp_path):
    """One source of truth: the program, its launcher, the units, the SysV script."""
    systemd = install_sh_files(tmp_path, "systemd")
    sysv = install_sh_files(tmp_path, "sysv")
    unit_dir = {"deb": "lib/systemd/system", "rpm": "usr/lib/systemd/system"}
    for kind, root in unpacked.items():
        pairs = [(os.path.join(systemd, "usr/sbin/synchook"), "usr/sbin/synchook"),
                 (SYNCHOOK, "usr/lib/synchook/synchook.py")]
        pairs += [(os.path.join(systemd, "etc/systemd/system", name),
                   os.path.join(unit_dir[kind], name))
                  for name in ("synchook.service", "synchook.socket")]
        if kind == "deb":
            pairs += [(os.path.join(sysv, "etc/init.d/synchook"), "etc/init.d/synchook"),
                      (os.path.join(sysv, "etc/logrotate.d/synchook"),
                       "etc/logrotate.d/synchook")]
        for expected, packaged in pairs:
            assert read(expected, "rb") == read(os.path.join(root, packaged), "rb"), \
                "%s: %s differs from install.sh's" % (kind, packaged)
        assert not os.path.exists(os.path.join(root, "usr/lib/synchook/__pycache__"))


def test_the_packaged_config_is_closed_valid_and_private(built, unpacked):
    listing = run(["dpkg-deb", "-c", built["deb"]]).stdout
    assert [line.split()[0] for line in listing.splitlines()
            if line.endswith("./etc/synchook.conf")] == ["-rw-------"], listing
    for kind, root in unpacked.items():
        config = os.path.join(root, "etc", "synchook.conf")
        settings = synchook.read_config_file(config)
        assert {name: value for name, (value, _) in settings.items()} == {
            "SYNCHOOK_ALLOW": "none"}, kind
        result = run([sys.executable, SYNCHOOK, "check", "--parse-only", "--config", config])
        assert result.returncode == 0, result.stderr
        assert "synchook configure --allow" in read(config)


def test_deb_control_conffiles_and_scripts(built, unpacked):
    fields = {name: run(["dpkg-deb", "-f", built["deb"], name]).stdout.strip()
              for name in ("Package", "Version", "Architecture", "Depends")}
    assert fields == {"Package": "synchook", "Version": synchook.__version__,
                      "Architecture": "all", "Depends": "python3 (>= 3.6)"}
    debian = os.path.join(unpacked["deb"], "DEBIAN")
    assert read(os.path.join(debian, "conffiles")).split() == [
        "/etc/init.d/synchook", "/etc/logrotate.d/synchook", "/etc/synchook.conf"]
    scripts = [os.path.join(debian, name) for name in ("preinst", "postinst", "prerm", "postrm")]
    for path in scripts:
        assert run(["sh", "-n", path]).returncode == 0, path
    if shutil.which("shellcheck"):
        result = run(["shellcheck", "-s", "sh"] + scripts)
        assert result.returncode == 0, result.stdout
    postinst = read(os.path.join(debian, "postinst"))
    assert "restore_carried_settings" in postinst and "apply_upgrade" in postinst
    assert "retire_install_sh" in read(os.path.join(debian, "preinst"))
    assert "purge_state" in read(os.path.join(debian, "postrm"))


def test_rpm_metadata_config_and_scriptlets(built, tmp_path):
    needs_rpm(built)
    query = rpm_query(built, tmp_path, "--qf", "%{NAME} %{VERSION} %{ARCH}")
    assert query == "synchook %s noarch" % synchook.__version__
    assert "python3" in rpm_query(built, tmp_path, "--requires").split()
    flags = rpm_query(built, tmp_path, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]")
    assert "/etc/synchook.conf cn" in flags.splitlines(), flags   # %config(noreplace)
    scripts = rpm_query(built, tmp_path, "--scripts")
    pieces = re.split(r"(?m)^(\w+) scriptlet \(using /bin/sh\):\n", scripts)
    parts = dict(zip(pieces[1::2], pieces[2::2]))
    names = ("preinstall", "postinstall", "preuninstall", "postuninstall", "posttrans")
    assert sorted(parts) == sorted(names), list(parts)
    assert "retire_install_sh" in parts["preinstall"] and "record_digests" in parts["preinstall"]
    assert "systemctl preset synchook.socket synchook.service" in parts["postinstall"]
    assert "disable --now synchook.service synchook.socket" in parts["preuninstall"]
    assert "\napply_upgrade" in parts["posttrans"]
    for name, text in parts.items():
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + text)
        assert run(["sh", "-n", str(path)]).returncode == 0, name
        if shutil.which("shellcheck"):
            result = run(["shellcheck", "-s", "sh", str(path)])
            assert result.returncode == 0, name + "\n" + result.stdout


def test_install_sh_leaves_a_packaged_synchook_alone(tmp_path):
    """dpkg says synchook is installed: install.sh refuses (exit 1), writes nothing."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg-query here")
    admin = tmp_path / "var" / "lib" / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_text("Package: synchook\nStatus: install ok installed\n"
                                  "Version: %s\nArchitecture: all\n\n" % synchook.__version__)
    result = run(["sh", os.path.join(ROOT, "install.sh"), "--root", str(tmp_path),
                  "--init", "systemd", "--allow", "10.0.0.5"], cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "installed from a package here (dpkg)" in result.stderr
    assert "synchook configure" in result.stderr
    assert sorted(os.listdir(str(tmp_path))) == ["var"]


# configure ------------------------------------------------------------------------

def configure(config, *args):
    return run([sys.executable, SYNCHOOK, "configure", "--config", str(config)] + list(args))


@pytest.mark.slow
def test_configure_merges_checks_and_writes_the_file(tmp_path):
    config = tmp_path / "synchook.conf"
    runtime = str(tmp_path / "run")
    port = str(free_port())
    first = configure(config, "--allow", "none", "--port", port, "--runtime-dir", runtime)
    assert first.returncode == 0, first.stderr
    assert os.stat(str(config)).st_mode & 0o777 == 0o600
    assert "set SYNCHOOK_ALLOW" in first.stdout and "the settings apply at its next start" \
        in first.stdout
    written = read(str(config))
    # A bad value: exit 2, named as the setting, the file as it was, no leftover.
    bad = configure(config, "--timeout", "soon")
    assert bad.returncode == 2 and "SYNCHOOK_TIMEOUT 'soon'" in bad.stderr, bad.stderr
    assert ".synchook.conf." not in bad.stderr
    assert read(str(config)) == written
    assert sorted(os.listdir(str(tmp_path))) == ["synchook.conf"]
    # The same again: nothing to do.
    again = configure(config, "--allow", "none")
    assert again.returncode == 0 and "unchanged" in again.stdout
    # A secret opens the closed start; the other settings stay.
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    os.chmod(str(secret), 0o600)
    opened = configure(config, "--secret-file", str(secret))
    assert opened.returncode == 0, opened.stderr
    assert "dropped SYNCHOOK_ALLOW=none: the secret guards the hook now" in opened.stdout
    settings = {name: value for name, (value, _) in synchook.read_config_file(str(config)).items()}
    assert settings == {"SYNCHOOK_PORT": port, "SYNCHOOK_RUNTIME_DIR": runtime,
                        "SYNCHOOK_SECRET_FILE": str(secret)}
    # A start check that fails (the port taken by something else): exit 1, unchanged.
    written = read(str(config))
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen(1)
        taken = configure(config, "--port", str(squatter.getsockname()[1]))
    assert taken.returncode == 1 and "FAIL" in taken.stdout, taken.stdout
    assert read(str(config)) == written
    unknown = configure(config, "--unset", "colour")
    assert unknown.returncode == 2 and "--unset colour: no such setting" in unknown.stderr


@pytest.mark.slow
def test_configure_opens_a_running_closed_synchook_in_place(start, rec, tmp_path):
    """The package's path: closed, configure --allow, and the same process (the
    same socket) serves with the new settings."""
    config = tmp_path / "synchook.conf"
    runtime = str(tmp_path / "run")
    result = configure(config, "--allow", "none", "--sync", rec.cmd("sync"),
                       "--runtime-dir", runtime)
    assert result.returncode == 0, result.stderr
    d = start("--config", str(config), "--tls", "off")
    assert d.get("/sync", timeout=5)[0] == 403
    result = configure(config, "--allow", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert "(pid %d) told to restart in place" % d.proc.pid in result.stdout, result.stdout
    assert wait_until(lambda: d.get("/sync", timeout=5)[0] == 200, 20), d.log()
    assert d.proc.poll() is None and rec.lines() == ["sync"]
    assert d.get("/post-sync")[0] == 200
