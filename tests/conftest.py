"""Shared fixtures: start synchook.py as a real process and talk HTTP(S) to it."""

import glob
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNCHOOK = os.path.join(ROOT, "synchook.py")
sys.path.insert(0, ROOT)
sys.dont_write_bytecode = True
import synchook  # noqa: E402  (only for the certificate maker and constants)
import consistency  # noqa: E402  (its free_port: one for the suite and bench/consistency)

sys.dont_write_bytecode = False


MARKERS = {
    "slow": "a test of about a second or more on 2 cores (measured with --durations=0: a "
            "real wait, a timeout, a --max-hold, an install), and the modules of a minute "
            "or more: the real guest, the databases, the benches, XO's code (the fast "
            "subset: -m 'not slow')",
    "install": "runs install.sh (many shell and Python forks per test)",
    "root": "needs root: loop devices, mounts, mount namespaces, other users (skips, "
            "saying so, without)",
}

# Set by the fixtures and modules below, beside the marks written on tests.
ROOT_FIXTURES = {"loops", "private_system", "firewalled"}
ROOT_MODULES = {"test_consistency", "test_fsfreeze", "test_guest"}


def xdist_group(item):
    """Which tests share one pytest-xdist worker (-n 2 --dist loadgroup), or None:
    the real guest's module (one VM for all its tests, not one per worker); the
    tests that freeze loop devices, with those that read what is frozen on the
    whole machine (`synchook status`, marked xdist_group("freezes")), so that none
    sees another's freeze; the real installs (each a mount namespace, a service);
    the packages' tests (one build of the packages)."""
    module = item.module.__name__
    if module == "test_guest":
        return "guest"
    if module in ("test_consistency", "test_fsfreeze") or "loops" in item.fixturenames:
        return "freezes"
    if item.get_closest_marker("install") or {"private_system", "firewalled"} & set(
            item.fixturenames):
        return "install"
    if module == "test_packaging":
        return "packaging"          # its packages built once (a module fixture), not per worker
    return None


# The groups in the order the workers get them, the longest first: the real
# guest's module (7 to 8 min) given last would run alone at the end.
GROUP_ORDER = ("guest", "freezes", "install", "packaging")


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", "%s: %s" % (name, text))
    # pytest-xdist hands out the groups in collection order (GROUP_ORDER, set
    # below), not sorted by their number of tests.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def group_rank(item):
    mark = item.get_closest_marker("xdist_group")
    name = (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None
    return GROUP_ORDER.index(name) if name in GROUP_ORDER else len(GROUP_ORDER)


@pytest.hookimpl(tryfirst=True)          # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        if ROOT_FIXTURES & set(item.fixturenames) or item.module.__name__ in ROOT_MODULES:
            item.add_marker(pytest.mark.root)
        group = xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=group_rank)           # stable: each group in collection order


def interpreters():
    """Every CPython 3.6+ under ~/.pyenv, and python3 from PATH, with a skip reason."""
    found = []
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python3"))):
        version = os.path.basename(os.path.dirname(os.path.dirname(path)))
        parts = version.split(".")
        if len(parts) >= 2 and parts[0] == "3" and parts[1].isdigit() and int(parts[1]) >= 6:
            found.append(pytest.param(path, id="py" + ".".join(parts[:2])))
    system = shutil.which("python3")
    found.append(pytest.param(system or "python3", id="python3", marks=pytest.mark.skipif(
        system is None, reason="no python3 on PATH")))
    if len(found) == 1:
        found.insert(0, pytest.param(sys.executable, id="current"))
    return found


@pytest.fixture(scope="session")
def shared_cert(tmp_path_factory):
    """One generated pair for the session: most tests need not pay for keygen."""
    directory = tmp_path_factory.mktemp("cert")
    cert, key = synchook.make_self_signed("localhost")
    (directory / "cert.pem").write_text(cert)
    (directory / "key.pem").write_text(key)
    os.chmod(str(directory / "key.pem"), 0o600)
    return directory


def client_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Daemon:
    """A running synchook.py: its port, its log, and XO-like requests."""

    def __init__(self, tmp_path, args, env=None, python=None, state_dir=None, wait=True,
                 cwd=None, command=None, preexec_fn=None, runtime="run", pass_fds=()):
        self.tmp = tmp_path
        self.log_path = str(tmp_path / ("daemon-%d.log" % time.monotonic_ns()))
        self.runtime = str(tmp_path / runtime)
        if "--runtime-dir" in args:
            self.runtime = args[list(args).index("--runtime-dir") + 1]
        self.args = list(args)
        # SYNCHOOK_TEST_PYTHON runs every daemon of the suite under another interpreter.
        python = python or os.environ.get("SYNCHOOK_TEST_PYTHON") or sys.executable
        cmd = list(command or [python, SYNCHOOK])
        if "--port" not in self.args and "SYNCHOOK_PORT" not in (env or {}):
            cmd += ["--port", "0"]
        if "--runtime-dir" not in self.args:
            cmd += ["--runtime-dir", self.runtime]
        if "--state-dir" not in self.args and state_dir is not None:
            cmd += ["--state-dir", str(state_dir)]
        if "--listen" not in self.args:
            cmd += ["--listen", "127.0.0.1"]
        cmd += self.args
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHOOK_")}
        full_env.pop("JOURNAL_STREAM", None)
        full_env.update(env or {})
        self.log_file = open(self.log_path, "wb")
        # stderr is a pipe, as under systemd (the journal): synchook holds log lines
        # meant for a file while a window is open (tests/test_dying.py uses a file).
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=cwd or ROOT,
                                     preexec_fn=preexec_fn, pass_fds=pass_fds)
        self.copier = threading.Thread(target=self._copy_log, daemon=True)
        self.copier.start()
        self.port = None
        if wait:
            self.wait_listening()

    def _copy_log(self):
        try:
            for chunk in iter(lambda: os.read(self.proc.stdout.fileno(), 65536), b""):
                self.log_file.write(chunk)
                self.log_file.flush()
        except (OSError, ValueError):          # closed at teardown
            pass

    def wait_listening(self, timeout=30):
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("synchook exited %s:\n%s" % (self.proc.returncode,
                                                                  self.log()))
            return re.search(r"listening on \S+ port (\d+)", self.log())
        match = wait_until(listening, timeout, lambda: "synchook listening:\n" + self.log(),
                           0.02)
        self.port = int(match.group(1))
        return self.port

    def log(self):
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=15):
        wait_until(lambda: re.search(pattern, self.log()), timeout,
                   lambda: "the log matching %r:\n%s" % (pattern, self.log()), 0.02)

    def connection(self, tls=False, timeout=30, host="127.0.0.1", source=None):
        source_address = (source, 0) if source else None
        if tls:
            return http.client.HTTPSConnection(host, self.port, timeout=timeout,
                                               context=client_context(),
                                               source_address=source_address)
        return http.client.HTTPConnection(host, self.port, timeout=timeout,
                                          source_address=source_address)

    def get(self, path, tls=False, method="GET", headers=None, timeout=30, host="127.0.0.1",
            source=None):
        conn = self.connection(tls, timeout, host, source)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace").strip()
        finally:
            conn.close()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def guardian_pid(self, timeout=10):
        """The pid of this daemon's guardian (a child shell named window-guardian)."""
        def guardian():
            for pid in children(self.proc.pid):
                try:
                    with open("/proc/%d/cmdline" % pid, "rb") as handle:
                        if synchook.GUARDIAN_NAME.encode() in handle.read():
                            return pid
                except OSError:
                    pass
            return None
        return wait_until(guardian, timeout, "a guardian", 0.02)

    def kill_all(self):
        """SIGKILL the guardian, then the daemon: as `systemctl kill -s KILL` (a whole
        service) would, so that only a restart can close the window.  The daemon is
        stopped first: running, it could start a new guardian between the two kills
        (as it does for a guardian lost), and that one would release the window."""
        guardian = self.guardian_pid()
        self.proc.send_signal(signal.SIGSTOP)
        os.kill(guardian, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout=30):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The copier ends at the pipe's EOF, at once when synchook was the last
        # writer; a guardian's leftover child, SIGKILLed with its shell, may hold
        # the pipe for seconds more, and what it writes then is no test's concern.
        self.copier.join(0.2)
        self.proc.stdout.close()
        self.log_file.close()


def read_marker(runtime):
    """The window marker's fields (one JSON object per line, later lines override)."""
    with open(os.path.join(str(runtime), "window.json")) as handle:
        return synchook.parse_marker(handle.read().splitlines())


def window_open(runtime):
    """Does the runtime dir's marker say a window is open?  (It stays, empty,
    between windows.)"""
    return synchook.marker_present(os.path.join(str(runtime), "window.json"))


def children(pid):
    found = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return found
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as handle:
                found.extend(int(word) for word in handle.read().split())
        except OSError:
            pass
    return found


def group_alive(pgid):
    """Is a process of group pgid still running (a zombie, done, is not)?  Once
    none is, nothing a hook command had still to do can happen any more."""
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue                   # not a process, or gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.fixture
def start(tmp_path, shared_cert):
    """start(*args, env=..., python=...) -> a running Daemon, stopped at teardown."""
    daemons = []

    def _start(*args, **kwargs):
        if "state_dir" not in kwargs:
            state = tmp_path / ("state%d" % len(daemons))
            if not state.exists():
                shutil.copytree(str(shared_cert), str(state))
            kwargs["state_dir"] = state
        # Each daemon its own runtime dir (one run holds it), unless the test names one.
        kwargs.setdefault("runtime", "run%d" % len(daemons) if daemons else "run")
        daemon = Daemon(tmp_path, args, **kwargs)
        daemons.append(daemon)
        return daemon

    yield _start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def rec(tmp_path):
    """A file that hook commands append to, and a reader for it."""
    path = tmp_path / "rec"

    class Recorder:
        file = str(path)

        def cmd(self, word):
            return "echo %s >> %s" % (word, path)

        def lines(self):
            return path.read_text().split() if path.exists() else []

        def wait_for(self, lines, timeout=15):
            wait_until(lambda: self.lines() == lines, timeout,
                       lambda: "the hook commands' record %r, not %r" % (lines, self.lines()),
                       0.02)

    return Recorder()


def wait_until(predicate, timeout, what=None, step=0.01):
    """Poll predicate until it is true (its value), timeout seconds at most.  Then,
    with what (a text, or a function that makes one: a log read late), the test
    fails saying what never happened; without, wait_until returns False.  The
    one polling loop of the suite: no test sleeps a fixed time to wait for
    something it can ask about."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if what is None:
                return False
            raise AssertionError("not within %s s: %s" % (timeout, what() if callable(what)
                                                             else what))
        time.sleep(step)


def accepts(port, proc=None):
    """Does something accept connections on 127.0.0.1:port?  The process meant to
    (proc) having exited fails the test."""
    if proc is not None and proc.poll() is not None:
        raise AssertionError("exited (%s) before it listened on port %d" % (proc.returncode,
                                                                          port))
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def read_text(path):
    """A file's text, or "" while it does not exist."""
    try:
        with open(str(path), errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


free_port = consistency.free_port


def http_get(port, path, timeout=20):
    """(status, body) of a plain HTTP GET on loopback, on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace").strip()
    finally:
        conn.close()


def run(cmd, **kwargs):
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("universal_newlines", True)
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, **kwargs)


def build_packages(out, version=None):
    """packaging/build's .deb and .rpm, written to out: {"deb": path, "rpm": path}
    (no "rpm" without rpmbuild).  version: built from a copy of the checkout whose
    synchook.py says that version instead (a release to upgrade from, or to)."""
    source = ROOT
    if version is not None:
        source = os.path.join(str(out), "source")
        os.makedirs(source)
        for name in ("synchook.py", "install.sh", "README.md", "LICENSE"):
            shutil.copy(os.path.join(ROOT, name), source)
        shutil.copytree(os.path.join(ROOT, "packaging"), os.path.join(source, "packaging"))
        path = os.path.join(source, "synchook.py")
        with open(path) as handle:
            text = handle.read()
        with open(path, "w") as handle:
            handle.write(re.sub(r'(?m)^__version__ = ".*"$', '__version__ = "%s"' % version,
                                text, count=1))
    result = run(["sh", os.path.join(source, "packaging", "build"), str(out)], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {path.rsplit(".", 1)[1]: path for path in result.stdout.split()
            if path.endswith((".deb", ".rpm"))}


def start_writer(point, name="data"):
    """A write to a file under point that completes only on a writable (not
    frozen) filesystem; returns an Event set when it did, its `tid` the writing
    thread's."""
    done = threading.Event()
    done.tid = None

    def write():
        done.tid = threading.get_native_id()
        with open(os.path.join(point, name), "w") as handle:
            handle.write("x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done


# Loop-mounted filesystems of the test's own: the only ones a test may freeze --------

def why_not():
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    missing = [t for t in ("losetup", "mkfs.ext4", "mount", "umount", "fsfreeze")
               if not shutil.which(t)]
    if missing:
        return "missing tools: %s (apt-get install util-linux e2fsprogs)" % ", ".join(missing)
    return None


class Loops:
    """Loop-mounted filesystem images below one directory of the test's own."""

    def __init__(self, tmp_path):
        self.base = tmp_path / "mnt"
        self.base.mkdir()
        self.tmp = tmp_path
        self.devices, self.points = [], []

    def add(self, fstype="ext4", name=None):
        name = name or "fs%d" % len(self.points)
        image = self.tmp / (name.replace("/", "-") + ".img")
        with open(str(image), "wb") as handle:
            handle.truncate((320 if fstype == "xfs" else 32) * 1024 * 1024)
        made = run(["mkfs." + fstype, "-q"] + (["-F"] if fstype == "ext4" else ["-f"])
                   + [str(image)])
        if made.returncode:
            pytest.skip("mkfs.%s failed: %s" % (fstype, made.stderr.strip()))
        loop = run(["losetup", "--find", "--show", str(image)])
        if loop.returncode:
            pytest.skip("no loop device here: " + loop.stderr.strip())
        self.devices.append(loop.stdout.strip())
        point = self.base / name
        point.mkdir(parents=True, exist_ok=True)
        mounted = run(["mount", self.devices[-1], str(point)])
        if mounted.returncode:
            pytest.skip("cannot mount a loop device here: " + mounted.stderr.strip())
        self.points.append(str(point))
        return str(point)

    def close(self):
        # Whatever happened, thawed: fsfreeze, not `synchook thaw` (a Python start
        # per mount, 0.15 s, in some 60 tests); nothing is ever mounted below a point.
        for point in reversed(self.points):
            run(["fsfreeze", "--unfreeze", point])
        for point in reversed(self.points):
            run(["umount", "-l", point])
        for device in self.devices:
            run(["losetup", "-d", device])


@pytest.fixture
def loops(tmp_path):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    made = Loops(tmp_path)
    yield made
    made.close()


FREEZE_WAIT_CHANNEL = "percpu_rwsem_wait"   # where a write sleeps on a frozen filesystem


def waits_on_freeze(writer, timeout=0.5):
    """Is writer (start_writer's) held by a frozen filesystem?  Its thread then
    sleeps in the kernel where sb_start_write waits for the thaw (the wait
    channel FREEZE_WAIT_CHANNEL), which shows at once; where the kernel names no
    wait channel, not done within timeout seconds counts as held."""
    def held():
        try:
            with open("/proc/self/task/%d/wchan" % writer.tid) as handle:
                return handle.read().strip() == FREEZE_WAIT_CHANNEL
        except (OSError, TypeError):       # gone (done), or not started yet
            return False
    wait_until(lambda: writer.is_set() or held(), timeout, step=0.005)
    return not writer.is_set()


def assert_frozen(point):
    assert waits_on_freeze(start_writer(point)), "%s is not frozen" % point


def assert_thawed(point):
    assert start_writer(point, "after").wait(10), "%s is still frozen" % point
