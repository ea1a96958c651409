"""The consistency harness: is what XO snapshots a database that starts and holds
its invariants?  Shared by tests/test_consistency.py (a few snapshots per mode,
in CI) and bench/consistency (the long run that fills the README's table).

The chain is the real one, from the sync hook to the checked snapshot:

  XO's own hook code (tests/xo/harness/run.mjs: @xen-orchestra/xapi, unmodified)
    -> GET /sync -> synchook (--freeze of the database's disks, or a README recipe)
    -> VM.snapshot, stubbed as XAPI does it: each disk copied atomically, one after
       another (`cp --reflink=always` of the disk's image on a btrfs "SR")
    -> GET /post-sync -> thaw

while the database runs under a write load.  Each snapshot is then checked on a
copy, never on the live disks: fsck, the database started on it (did it need crash
recovery, and how much log did it replay), the database's own checks, and the
load's invariant.  Any failure marks the snapshot inconsistent.

Everything runs on this machine's loop devices only: the SR is a btrfs image on a
loop device, each guest disk an ext4 image in it, attached and mounted below one
directory of the harness's own.  Databases run as their own users, on a port and a
socket directory the harness picks.
"""

import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNCHOOK = os.path.join(ROOT, "synchook.py")
XO = os.path.join(ROOT, "tests", "xo")
XO_CODE = os.path.join(XO, "node_modules", "@xen-orchestra", "xapi", "vm.mjs")


def run(cmd, check=False, timeout=300, **kwargs):
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=timeout, **kwargs)
    if check and out.returncode:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd), out.returncode,
                                                (out.stderr or out.stdout).strip()[-2000:]))
    return out


def free_port():
    """A port free now, and below the kernel's ephemeral range: never one the
    kernel may hand, a moment later, to a test running beside this one
    (pytest-xdist) for its --port 0 daemon or an outgoing connection.  (The
    suite's too: tests/conftest.py imports it.)"""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            ceiling = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        ceiling = 32768
    for _ in range(200):
        port = random.randrange(10000, max(10001, ceiling))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below %d" % ceiling)


def as_user(user, cmd):
    return ["runuser", "-u", user, "--"] + cmd


def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return os.path.dirname(found[-1]) if found else None


def missing(database):
    """Why this harness cannot run here (a line naming the package), or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount, database users)"
    for tool, package in (("mkfs.btrfs", "btrfs-progs"), ("losetup", "util-linux"),
                          ("mkfs.ext4", "e2fsprogs"), ("runuser", "util-linux"),
                          ("node", "nodejs")):
        if shutil.which(tool) is None:
            return "%s not installed (apt-get install %s)" % (tool, package)
    if not os.path.exists(XO_CODE):
        return "XO's code is not installed: run tests/xo/setup (npm)"
    if database == "postgresql" and pg_bin() is None:
        return "PostgreSQL not installed (apt-get install postgresql)"
    if database == "mariadb" and shutil.which("mariadbd") is None:
        return "MariaDB not installed (apt-get install mariadb-server)"
    if database == "sqlite" and shutil.which("sqlite3") is None:
        return "sqlite3 not installed (apt-get install sqlite3)"
    return None


# --- the storage: a btrfs SR of ext4 disk images, attached as loop devices ----------

class Rig:
    """A VM's disks as XAPI holds them (image files in a btrfs SR, snapshotted by
    reflink copies) and as the guest sees them (loop devices, ext4, mounted)."""

    def __init__(self, base, disks, disk_mb=1024):
        self.base = base
        self.disks = list(disks)
        self.loops = []               # every loop device attached, for close()
        self.mounts = []              # every mount made, for close()
        self.sr = os.path.join(base, "sr")
        self.guest = {disk: os.path.join(base, "guest", disk) for disk in self.disks}
        os.makedirs(self.sr)
        sr_image = os.path.join(base, "sr.img")
        with open(sr_image, "wb") as handle:
            handle.truncate(32 << 30)                   # sparse: grows with the snapshots
        run(["mkfs.btrfs", "-q", sr_image], check=True)
        self.mount(self.attach(sr_image), self.sr)
        for disk in self.disks:
            image = self.image(disk)
            with open(image, "wb") as handle:
                handle.truncate(disk_mb << 20)
            run(["mkfs.ext4", "-q", "-F", image], check=True)
            os.makedirs(self.guest[disk])
            self.mount(self.attach(image), self.guest[disk])
        self.checked = os.path.join(base, "checked")

    def image(self, disk, snapshot=None):
        if snapshot is None:
            return os.path.join(self.sr, disk + ".img")
        return os.path.join(self.sr, "snap-%s" % snapshot, disk + ".img")

    def attach(self, image):
        device = run(["losetup", "--find", "--show", image], check=True).stdout.strip()
        self.loops.append(device)
        return device

    def mount(self, device, point):
        run(["mount", device, point], check=True)
        self.mounts.append(point)
        found = run(["findmnt", "-n", "-o", "SOURCE", point]).stdout.strip()
        if found != device:                      # never anything but our loop device
            raise RuntimeError("%s is %r, not %s" % (point, found, device))

    def unmount(self, point):
        run(["umount", point], check=True)
        self.mounts.remove(point)

    def snapshot_argv(self, snapshot, order, between=None):
        """What VM.snapshot runs: an atomic copy of each disk, in `order`; `between`,
        an argv, runs before each copy but the first (a checkpoint forced between
        the disks' snapshots)."""
        os.makedirs(os.path.dirname(self.image(order[0], snapshot)))
        argvs = [["cp", "--reflink=always", self.image(disk), self.image(disk, snapshot)]
                 for disk in order]
        if between:
            argvs[1:] = [["sh", "-c", "%s >/dev/null && exec %s" % (
                " ".join(map(shlex.quote, between)), " ".join(map(shlex.quote, argv)))]
                for argv in argvs[1:]]
        return argvs

    def check_copy(self, snapshot):
        """A writable copy of a snapshot's disks, fsck'd and mounted below
        base/checked/DISK: (points, findings)."""
        findings = {"journal_replay": [], "fsck_errors": []}
        points = {}
        for disk in self.disks:
            copy = os.path.join(self.sr, "check-%s.img" % disk)
            run(["cp", "--reflink=always", self.image(disk, snapshot), copy], check=True)
            header = run(["dumpe2fs", "-h", copy]).stdout
            if "needs_recovery" in header:
                findings["journal_replay"].append(disk)
            run(["e2fsck", "-E", "journal_only", "-y", copy])
            fsck = run(["e2fsck", "-fn", copy])
            if fsck.returncode:
                findings["fsck_errors"].append("%s: %s" % (disk, fsck.stdout.strip()[-300:]))
            points[disk] = os.path.join(self.checked, disk)
            os.makedirs(points[disk], exist_ok=True)
            self.mount(self.attach(copy), points[disk])
        return points, findings

    def drop_copy(self):
        for disk in self.disks:
            point = os.path.join(self.checked, disk)
            if point in self.mounts:
                self.unmount(point)
        self.detach_unmounted()
        for disk in self.disks:
            path = os.path.join(self.sr, "check-%s.img" % disk)
            if os.path.exists(path):
                os.unlink(path)

    def drop_snapshot(self, snapshot):
        shutil.rmtree(os.path.dirname(self.image(self.disks[0], snapshot)), ignore_errors=True)

    def detach_unmounted(self):
        keep = set()
        for point in self.mounts:
            keep.add(run(["findmnt", "-n", "-o", "SOURCE", point]).stdout.strip())
        for device in list(self.loops):
            if device not in keep:
                run(["losetup", "-d", device])
                self.loops.remove(device)

    def close(self):
        run([sys.executable, SYNCHOOK, "thaw", "--under", self.base])   # whatever happened
        for point in reversed(list(self.mounts)):
            run(["umount", point])
            run(["umount", "-l", point])                  # busy: detached all the same
        self.mounts = []
        for device in self.loops:
            run(["losetup", "-d", device])
        self.loops = []


# --- the chain: XO's hook code, synchook, the per-disk snapshot ---------------------

def xo_snapshot(port, disk_argv, gaps_ms):
    """One VM_snapshot through XO's own code, its hook URL on port (None: a port
    nothing listens on, as for a VM without synchook).  XO's report, as a dict."""
    port = port or free_port()
    case = {"tags": ["xo:notify-on-snapshot=http://127.0.0.1:%d/" % port],
            "networks": {"0/ip": "127.0.0.1"}, "disks": disk_argv, "disk_gaps_ms": gaps_ms,
            "settle_ms": 10000}
    out = run(["node", "--import", "./register.mjs", "harness/run.mjs", json.dumps(case)],
              cwd=XO, timeout=180)
    if out.returncode:
        raise RuntimeError("XO's harness failed: " + out.stderr[-2000:])
    report = json.loads(out.stdout.splitlines()[-1])
    if report["error"]:
        raise RuntimeError("VM_snapshot failed: %s" % report["error"])
    return report


class Synchook:
    """synchook as an admin starts it, for one mode."""

    def __init__(self, base, args, env=None):
        self.log_path = os.path.join(base, "synchook-%d.log" % time.monotonic_ns())
        self.port = free_port()
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, SYNCHOOK, "--port", str(self.port), "--listen", "127.0.0.1",
             "--tls", "off", "--runtime-dir", os.path.join(base, "run-%d" % self.port)] + args,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 30
        while " listening on " not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("synchook did not start: " + self.text())
            time.sleep(0.05)

    def text(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()


class StallProbe:
    """Writes and fsyncs a small file on a guest disk every 10 ms: the longest a
    write waited is the stall a snapshot cost the guest's writers."""

    def __init__(self, point):
        self.path = os.path.join(point, "stall-probe")
        self.longest = 0.0
        self.last_done = 0.0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        with open(self.path, "wb") as handle:
            while not self.stopping:
                began = time.monotonic()
                handle.seek(0)
                handle.write(b"x" * 512)
                handle.flush()
                os.fsync(handle.fileno())
                self.longest = max(self.longest, time.monotonic() - began)
                self.last_done = time.monotonic()
                time.sleep(0.01)

    def take(self):
        """The longest wait since the last take(), once a write begun after now is done."""
        now = time.monotonic()
        deadline = now + 30
        while self.last_done < now + 0.001 and time.monotonic() < deadline:
            time.sleep(0.005)
        longest, self.longest = self.longest, 0.0
        return longest

    def stop(self):
        self.stopping = True
        self.thread.join(30)


# --- PostgreSQL ---------------------------------------------------------------------

PG_LOAD_CONF = ["-c", "checkpoint_timeout=30s", "-c", "max_wal_size=32MB",
                "-c", "fsync=on", "-c", "full_page_writes=on", "-c", "listen_addresses=",
                "-c", "logging_collector=off", "-c", "log_checkpoints=on"]


class Postgres:
    """PGDATA on the data disk, the WAL (initdb --waldir) on the wal disk,
    checksums on, frequent checkpoints (data files are written during the run),
    pgbench's default TPC-B-like script as the load."""

    name = "postgresql"
    disks = ("data", "wal")
    order = ("wal", "data")           # the WAL disk snapshotted first, then the data

    def __init__(self, rig, base):
        self.rig = rig
        self.bin = pg_bin()
        self.base = base
        self.sockets = os.path.join(base, "pg-sockets")
        os.makedirs(self.sockets)
        shutil.chown(self.sockets, "postgres", "postgres")
        self.port = free_port()
        self.data = os.path.join(rig.guest["data"], "pgdata")
        self.wal = os.path.join(rig.guest["wal"], "pg_wal")
        for point in rig.guest.values():
            shutil.chown(point, "postgres", "postgres")
        run(as_user("postgres", [os.path.join(self.bin, "initdb"), "-k", "-A", "trust",
                                 "-U", "postgres", "-D", self.data, "--waldir", self.wal]),
            check=True)
        self.start(self.data, self.port, os.path.join(base, "pg.log"))
        run(self.client("pgbench", self.port) + ["-i", "-q", "-s", "4"], check=True)
        self.load = None

    def client(self, tool, port):
        return as_user("postgres", [os.path.join(self.bin, tool), "-h", self.sockets,
                                    "-p", str(port), "-U", "postgres"])

    def start(self, data, port, log):
        with open(log, "a"):
            pass
        shutil.chown(log, "postgres", "postgres")
        return run(as_user("postgres", [
            os.path.join(self.bin, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "120",
            "-o", " ".join(["-p", str(port), "-k", self.sockets] + PG_LOAD_CONF), "start"]))

    def stop(self, data):
        return run(as_user("postgres", [os.path.join(self.bin, "pg_ctl"), "-D", data,
                                        "-m", "fast", "-w", "-t", "120", "stop"]))

    def sql(self, port, query):
        out = run(self.client("psql", port) + ["-XAtq", "-c", query])
        return out.stdout.strip() if out.returncode == 0 else None

    def start_load(self):
        self.load = subprocess.Popen(self.client("pgbench", self.port) + [
            "-c", "4", "-j", "2", "-T", "100000", "-P", "1", "--no-vacuum"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
        self.progress = []
        threading.Thread(target=self._read_progress, daemon=True).start()

    def _read_progress(self):
        for line in self.load.stderr:
            match = re.match(r"progress: ([\d.]+) s, ([\d.]+) tps", line)
            if match:
                self.progress.append((time.monotonic(), float(match.group(2))))

    def stop_load(self):
        if self.load is not None:
            # SIGTERM: runuser passes it on to pgbench (a SIGINT it keeps for itself,
            # and the wait ran out every time: 30 s per test).
            self.load.terminate()
            try:
                self.load.wait(30)
            except subprocess.TimeoutExpired:
                self.load.kill()
                self.load.wait()

    readme = ("**PostgreSQL**", {"/var/lib/postgresql,/srv/pg_wal": "freeze_list"})
    # synchook 1.2.0's README recipe: a checkpoint, and no freeze.
    old = ["--sync", "su postgres -c 'psql -qc CHECKPOINT' && sync"]

    def checkpoint_argv(self):
        return self.client("psql", self.port) + ["-XAtqc", "CHECKPOINT"]

    def env(self):
        """What the README's psql finds its server by (on a guest: the defaults)."""
        return {"PGHOST": self.sockets, "PGPORT": str(self.port)}

    def commits(self):
        return int(self.sql(self.port, "SELECT count(*) FROM pgbench_history") or 0)

    def freeze_list(self):
        return ",".join(self.rig.guest[disk] for disk in self.disks)

    def check(self, points):
        """Start PostgreSQL on a snapshot's copy and check it: a dict of findings."""
        data = os.path.join(points["data"], "pgdata")
        link = os.path.join(data, "pg_wal")            # --waldir: points at the live disk
        os.unlink(link)
        os.symlink(os.path.join(points["wal"], "pg_wal"), link)
        pid_file = os.path.join(data, "postmaster.pid")  # names the live server
        if os.path.exists(pid_file):
            os.unlink(pid_file)
        control = run([os.path.join(self.bin, "pg_controldata"), data]).stdout
        found = {"crash_recovery": "in production" in control, "problems": [],
                 "replayed": 0}
        port = free_port()
        log = os.path.join(self.base, "pg-check.log")
        if os.path.exists(log):
            os.unlink(log)
        started = self.start(data, port, log)
        text = open(log, errors="replace").read()
        if started.returncode:
            panic = [line for line in text.splitlines() if "PANIC" in line or "FATAL" in line]
            found["problems"].append("would not start: %s" % (panic[-1] if panic
                                                             else text[-300:]))
            self.stop(data)
            return found
        begin = re.search(r"redo starts at ([0-9A-F]+)/([0-9A-F]+)", text)
        end = re.search(r"redo done at ([0-9A-F]+)/([0-9A-F]+)", text)
        if begin and end:
            found["replayed"] = lsn(end) - lsn(begin)
        amcheck = run(self.client("pg_amcheck", port) + ["--all", "--install-missing",
                                                         "--heapallindexed"])
        if amcheck.returncode:
            # Its findings: "heap table ..., block N, offset N:" then the detail, indented.
            lines = (amcheck.stdout + amcheck.stderr).splitlines()
            details = [line.strip() for line in lines if line.startswith((" ", "\t"))]
            found["problems"].append("pg_amcheck: %s (%d findings)" % (
                (details or [line for line in lines if line.strip()] or ["?"])[0],
                max(1, len(details))))
        sums = self.sql(port, "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                              "(SELECT sum(bbalance) FROM pgbench_branches), "
                              "(SELECT sum(tbalance) FROM pgbench_tellers), "
                              "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
        if sums is None or len(set(sums.split("|"))) != 1:
            found["problems"].append("balances disagree: %s" % sums)
        self.stop(data)
        checksums = run(as_user("postgres", [os.path.join(self.bin, "pg_checksums"),
                                             "--check", "-D", data]))
        if checksums.returncode:
            found["problems"].append("pg_checksums: " + checksums.stderr.strip()[-300:])
        return found

    def close(self):
        self.stop_load()
        self.stop(self.data)


def lsn(match):
    return (int(match.group(1), 16) << 32) + int(match.group(2), 16)


# --- MariaDB --------------------------------------------------------------------------

MARIADB_CNF = """[mariadbd]
user = mysql
datadir = {datadir}
innodb_log_group_home_dir = {redo}
socket = {socket}
port = {port}
bind-address = 127.0.0.1
pid-file = {pid}
log-error = {log}
innodb_flush_log_at_trx_commit = 1
innodb_log_file_size = 48M
innodb_buffer_pool_size = 64M
innodb_max_dirty_pages_pct = 5
skip-log-bin
"""


class MariaDB:
    """InnoDB's data on the data disk, its redo log on the redo disk; the load is
    transfers between accounts whose sum never changes."""

    name = "mariadb"
    disks = ("data", "redo")
    order = ("redo", "data")
    accounts = 1000
    balance = 1000

    def __init__(self, rig, base):
        self.rig = rig
        self.base = base
        for point in rig.guest.values():
            shutil.chown(point, "mysql", "mysql")
        self.live = self.cnf("live", rig.guest["data"], rig.guest["redo"])
        made = run(["mariadb-install-db", "--defaults-file=" + self.live["cnf"], "--user=mysql",
                    "--skip-test-db", "--auth-root-authentication-method=normal"])
        if made.returncode:                       # its own words say little: the log says why
            raise RuntimeError("mariadb-install-db: exit %d; its log: %s" % (
                made.returncode, open(self.live["log"], errors="replace").read()[-2000:]))
        self.server = self.start(self.live)
        if self.server is None:
            raise RuntimeError("mariadbd did not start: " + open(self.live["log"]).read()[-2000:])
        self.sql(self.live, "CREATE DATABASE bank; CREATE TABLE bank.accounts (id INT PRIMARY "
                            "KEY, balance BIGINT NOT NULL) ENGINE=InnoDB; CREATE TABLE bank.log "
                            "(id BIGINT AUTO_INCREMENT PRIMARY KEY, amount INT, pad CHAR(200)) "
                            "ENGINE=InnoDB; USE bank; INSERT INTO accounts SELECT seq, %d FROM "
                            "seq_1_to_%d" % (self.balance, self.accounts), check=True)
        self.workers = []
        self.stopping = False

    def cnf(self, name, data, redo):
        own = os.path.join(self.base, "mariadb-run")     # the server's socket, pid, log
        if not os.path.isdir(own):
            os.mkdir(own)
            shutil.chown(own, "mysql", "mysql")
        files = {key: os.path.join(own, "%s-%s" % (name, key))
                 for key in ("socket", "pid", "cnf")}
        files["log"] = os.path.join(own, "%s.err" % name)     # mariadbd adds .err otherwise
        files.update(datadir=os.path.join(data, "mysql"), redo=os.path.join(redo, "redo"),
                     port=free_port())
        for directory in (files["datadir"], files["redo"]):
            os.makedirs(directory, exist_ok=True)
            shutil.chown(directory, "mysql", "mysql")
        with open(files["cnf"], "w") as handle:
            handle.write(MARIADB_CNF.format(**files))
        for key in ("log",):
            with open(files[key], "a"):
                pass
            shutil.chown(files[key], "mysql", "mysql")
        return files

    def start(self, files, wait=60):
        proc = subprocess.Popen(["mariadbd", "--defaults-file=" + files["cnf"]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            if self.sql(files, "SELECT 1") == "1":
                return proc
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        return None

    def stop_server(self, proc):
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def sql(self, files, query, check=False):
        out = run(["mariadb", "-S", files["socket"], "-uroot", "-N", "-B", "-e", query],
                  check=check)
        return out.stdout.strip() if out.returncode == 0 else None

    def start_load(self):
        for worker in range(4):
            client = subprocess.Popen(["mariadb", "-S", self.live["socket"], "-uroot", "bank"],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            thread = threading.Thread(target=self._transfers, args=(client, worker),
                                      daemon=True)
            thread.start()
            self.workers.append((client, thread))

    def _transfers(self, client, seed):
        rand = random.Random(seed)
        try:
            while not self.stopping:
                batch = []
                for _ in range(50):
                    a, b = rand.randint(1, self.accounts), rand.randint(1, self.accounts)
                    amount = rand.randint(1, 50)
                    batch.append("START TRANSACTION; UPDATE accounts SET balance = balance - %d "
                                 "WHERE id = %d; UPDATE accounts SET balance = balance + %d "
                                 "WHERE id = %d; INSERT INTO log (amount, pad) VALUES (%d, "
                                 "REPEAT('x', 200)); COMMIT;\n" % (amount, a, amount, b, amount))
                client.stdin.write("".join(batch).encode())
                client.stdin.flush()
        except (OSError, ValueError):
            pass

    def stop_load(self):
        self.stopping = True
        for client, thread in self.workers:
            try:
                client.stdin.close()
            except OSError:
                pass
            client.terminate()
            client.wait(30)
        self.workers = []

    readme = ("**MySQL / MariaDB**", {"/var/lib/mysql,/srv/mysql-redo": "freeze_list"})
    # synchook 1.2.0's README recipe: the read lock held by --hold, and no freeze.
    old = ["--hold", '{ echo "FLUSH TABLES WITH READ LOCK;"; echo "SELECT \\"locked\\";"; cat; } '
           '| mysql -N --unbuffered', "--sync", "sync"]

    def checkpoint_argv(self):
        """Every dirty page written to the data disk now (InnoDB has no CHECKPOINT)."""
        return ["mariadb", "-S", self.live["socket"], "-uroot", "-e",
                "FLUSH TABLES bank.accounts, bank.log FOR EXPORT; UNLOCK TABLES"]

    def env(self):
        """What the README's mysql client finds its server by (on a guest: the default)."""
        return {"MYSQL_UNIX_PORT": self.live["socket"]}

    def commits(self):
        return int(self.sql(self.live, "SELECT COALESCE(MAX(id), 0) FROM bank.log") or 0)

    def freeze_list(self):
        return ",".join(self.rig.guest[disk] for disk in self.disks)

    def check(self, points):
        files = self.cnf("check", points["data"], points["redo"])
        with open(files["log"], "w"):
            pass
        shutil.chown(files["log"], "mysql", "mysql")
        for stale in glob.glob(os.path.join(files["datadir"], "*.pid")):
            os.unlink(stale)
        found = {"crash_recovery": False, "problems": [], "replayed": 0}
        server = self.start(files, wait=120)
        text = open(files["log"], errors="replace").read()
        checkpoint = re.search(r"Starting crash recovery from checkpoint LSN=(\d+)", text)
        end = re.search(r"End of log at LSN=(\d+)", text)
        found["crash_recovery"] = checkpoint is not None
        if checkpoint and end:
            found["replayed"] = int(end.group(1)) - int(checkpoint.group(1))
        if server is None:
            errors = [line for line in text.splitlines() if "[ERROR]" in line]
            found["problems"].append("would not start: %s" % (errors[0] if errors
                                                             else text[-300:]))
            return found
        try:
            checked = self.sql(files, "CHECK TABLE bank.accounts, bank.log EXTENDED")
            if checked is None or any(line.split("\t")[-1] != "OK"
                                      for line in checked.splitlines()
                                      if "\tstatus\t" in line or "\terror\t" in line):
                found["problems"].append("CHECK TABLE: %s" % checked)
            total = self.sql(files, "SELECT SUM(balance), COUNT(*) FROM bank.accounts")
            if total != "%d\t%d" % (self.accounts * self.balance, self.accounts):
                found["problems"].append("sum of balances: %s" % total)
            if "[ERROR]" in text:
                found["problems"].append("error log: %s" % [line for line in text.splitlines()
                                                             if "[ERROR]" in line][0])
        finally:
            self.stop_server(server)
        return found

    def close(self):
        self.stop_load()
        self.stop_server(self.server)


# --- SQLite in WAL mode ----------------------------------------------------------------

SQLITE_WRITER = r"""
import random, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
rand = random.Random(1)
while True:
    a, b, amount = rand.randint(1, 1000), rand.randint(1, 1000), rand.randint(1, 50)
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, a))
    db.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
    db.execute("INSERT INTO log (amount, pad) VALUES (?, ?)", (amount, "x" * 200))
    db.execute("COMMIT")
"""


class SQLite:
    """One database file and its WAL on one disk, a writer process making
    transfers; the README's recipe checkpoints the WAL, then freezes the disk."""

    name = "sqlite"
    disks = ("data",)
    order = ("data",)
    accounts, balance = 1000, 1000

    def __init__(self, rig, base):
        self.rig = rig
        self.db = os.path.join(rig.guest["data"], "app.db")
        script = ("PRAGMA journal_mode=WAL; CREATE TABLE accounts (id INTEGER PRIMARY KEY, "
                  "balance INTEGER NOT NULL); CREATE TABLE log (id INTEGER PRIMARY KEY, amount "
                  "INTEGER, pad TEXT); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
                  "FROM n WHERE i < %d) INSERT INTO accounts SELECT i, %d FROM n;"
                  % (self.accounts, self.balance))
        run(["sqlite3", self.db, script], check=True)
        self.writer_path = os.path.join(base, "sqlite-writer.py")
        with open(self.writer_path, "w") as handle:
            handle.write(SQLITE_WRITER)
        self.writer = None

    def start_load(self):
        self.writer = subprocess.Popen([sys.executable, self.writer_path, self.db])

    def stop_load(self):
        if self.writer is not None:
            self.writer.kill()
            self.writer.wait()

    readme = ("**SQLite**", {"/srv/app/app.db": "db", "/srv/app": "freeze_list"})
    # The checkpoint alone, without the freeze.
    old = None

    def env(self):
        return {}

    def commits(self):
        out = run(["sqlite3", "-cmd", ".timeout 5000", self.db, "SELECT MAX(id) FROM log"])
        return int(out.stdout.strip() or 0)

    def freeze_list(self):
        return self.rig.guest["data"]

    def check(self, points):
        db = os.path.join(points["data"], "app.db")
        found = {"crash_recovery": False, "problems": [], "replayed": 0}
        # The frames the WAL holds are what the first open replays (a page each).
        frames = run(["sqlite3", db, "PRAGMA page_size; PRAGMA wal_checkpoint(PASSIVE);"])
        try:
            page_size, counts = frames.stdout.split()
            found["replayed"] = int(counts.split("|")[1]) * int(page_size)
            found["crash_recovery"] = found["replayed"] > 0
        except ValueError:
            found["problems"].append("cannot open: %s" % frames.stderr.strip()[-300:])
        out = run(["sqlite3", db, "PRAGMA integrity_check; SELECT SUM(balance), COUNT(*) "
                                  "FROM accounts;"])
        expected = "ok\n%d|%d" % (self.accounts * self.balance, self.accounts)
        if out.returncode or out.stdout.strip() != expected:
            found["problems"].append("integrity_check / sum: %s %s" % (out.stdout.strip()[-300:],
                                                                      out.stderr.strip()))
        return found

    def close(self):
        self.stop_load()


DATABASES = {"postgresql": Postgres, "mariadb": MariaDB, "sqlite": SQLite}


def readme_recipe(database):
    """The README's recipe for this database, its flags as synchook takes them,
    with the README's example paths replaced by the harness's own: the test runs
    exactly what the README tells an admin to run."""
    import shlex
    readme = open(os.path.join(ROOT, "README.md")).read()
    heading, paths = database.readme
    text = readme.split("\n" + heading, 1)[1]
    block = re.search(r"\n\n((?:    --.*\n)+)", text).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    for example, attribute in sorted(paths.items(), key=lambda item: -len(item[0])):
        value = getattr(database, attribute)
        value = value() if callable(value) else value
        words = [word.replace(example, value) for word in words]
    return words


def old_recipe(database):
    """1.2.0's README recipe (no freeze); for SQLite, the README's without its freeze."""
    if database.old is not None:
        return list(database.old)
    words = readme_recipe(database)
    index = words.index("--freeze")
    return words[:index] + words[index + 2:]


# --- one run: modes side by side, each snapshot checked ------------------------------

MODES = ("freeze", "recipe", "old-recipe", "none")
MODE_TITLES = {
    "freeze": "synchook --freeze of every disk",
    "recipe": "the README's recipe (freeze included)",
    "old-recipe": "1.2.0's README recipe (no freeze)",
    "none": "no synchook",
}


def synchook_args(database, mode):
    if mode == "freeze":
        return ["--freeze", database.freeze_list()]
    if mode == "recipe":
        return readme_recipe(database)
    if mode == "old-recipe":
        return old_recipe(database)
    return None


def consistency_run(kind, modes, snapshots, gaps=(0.2, 0.5), settle=(0.5, 1.5), baseline=10.0,
                    batch=5, report=None, keep_base=None, checkpoint_between=False):
    """Snapshots of a database under load, in each mode, interleaved round by round
    (all of a round's modes in a shuffled order); every `batch` rounds, the
    snapshots taken are checked (the load runs on; no snapshot is taken meanwhile)
    and dropped, which bounds what the SR holds.

    Returns (results, rates): results is {mode: [finding per snapshot]}, each finding
    with the snapshot's stall, gap and hook answers; rates is the database's commits
    per second with no snapshot (`baseline` seconds first) and while snapshots were
    being taken (the checks' time left out), so that the checks weigh neither on
    the stall nor on the rates.  checkpoint_between: the database checkpoints between
    the two disks' snapshots (the torn pair made certain, for the negative control)."""
    base = keep_base or tempfile.mkdtemp(prefix="synchook-consistency-")
    os.chmod(base, 0o755)
    rig = database = probe = None
    results = {mode: [] for mode in modes}
    hooks = {}
    rates = {}
    number = 0
    try:
        rig = Rig(base, DATABASES[kind].disks)
        database = DATABASES[kind](rig, base)
        for mode in modes:
            args = synchook_args(database, mode)
            hooks[mode] = None if args is None else Synchook(base, args + ["--max-hold", "60"],
                                                             database.env())
        database.start_load()
        probe = StallProbe(rig.guest[database.disks[0]])
        time.sleep(2)                           # the load under way, a checkpoint or two
        began, before = time.monotonic(), database.commits()
        time.sleep(baseline)
        rates["without snapshots"] = (database.commits() - before) / (time.monotonic() - began)
        spent, committed = 0.0, 0
        for first in range(0, snapshots, batch):
            taken = []
            began, before = time.monotonic(), database.commits()
            for _ in range(min(batch, snapshots - first)):
                order = list(modes)
                random.shuffle(order)
                for mode in order:
                    time.sleep(random.uniform(*settle))
                    number += 1
                    gap = random.uniform(*gaps)
                    argv = rig.snapshot_argv(number, database.order, database.checkpoint_argv()
                                             if checkpoint_between else None)
                    probe.take()
                    xo = xo_snapshot(hooks[mode].port if hooks[mode] else None, argv,
                                     [int(gap * 1000)] * (len(argv) - 1))
                    snapshot = {"number": number, "mode": mode, "gap": gap,
                                "stall": probe.take(),
                                "hooks": [(r["url"].split("?")[0].rsplit("/", 1)[-1],
                                           r["status"]) for r in xo["requests"]]}
                    if hooks[mode] and any(status != 200 for _, status in snapshot["hooks"]):
                        snapshot["log"] = hooks[mode].text()[-3000:]   # why: it goes with base
                    taken.append(snapshot)
            spent += time.monotonic() - began
            committed += database.commits() - before
            for snapshot in taken:
                finding = check_snapshot(rig, database, snapshot)
                results[snapshot["mode"]].append(finding)
                if report is not None:
                    report(finding)
        rates["while snapshots are taken"] = committed / spent if spent else 0.0
        return results, rates
    finally:
        if probe is not None:
            probe.stop()
        for hook in hooks.values():
            if hook is not None:
                hook.stop()
        if database is not None:
            database.close()
        if rig is not None:
            rig.close()
        if keep_base is None:
            shutil.rmtree(base, ignore_errors=True)


def check_snapshot(rig, database, snapshot):
    """Check one snapshot on a copy, then drop it: the finding."""
    points, finding = rig.check_copy(snapshot["number"])
    try:
        finding.update(database.check(points))
    finally:
        rig.drop_copy()
        rig.drop_snapshot(snapshot["number"])
    finding["problems"] = finding["problems"] + finding["fsck_errors"]
    finding.update(snapshot, consistent=not finding["problems"])
    return finding
