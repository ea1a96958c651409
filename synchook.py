#!/usr/bin/env python3
"""synchook: the guest side of Xen Orchestra's VM sync hook.

Xen Orchestra (XO) calls ``GET /sync`` on a VM tagged ``xo:notify-on-snapshot``
before it snapshots the VM, waits for the answer (60 s at most), snapshots, then
calls ``GET /post-sync``.  synchook answers those calls by running the commands
the admin configured (flush a database, ``fsfreeze -f /data``; then
``fsfreeze -u /data``) and guarantees that every window it opened is closed:
on /post-sync, after --max-hold seconds, on shutdown, and when synchook itself
dies, stops or hangs (its guardian, or the next start, runs the post phase).
A window never opens without its record (the marker) and its guardian, and a
failed sync step never costs the freeze: XO snapshots whatever /sync answers.

One file, Python 3.6 or newer, standard library only.  Run ``synchook.py
--help``; the README has the whole story.

The file reads top to bottom from the ground up: what everything uses
(constants, logging, configuration), what a window runs, the window, then
HTTP and the server, the admin's tools, and main last (a function may call
one defined further down).  Its banner sections:

  Constants             limits and names, one comment each
  Logging               a bounded queue and one writer thread: never blocks a thaw,
                        writes no file while a window is open (held lines wait in
                        the runtime dir)
  Configuration         flag > variable > --config file > default; trusted files
  Running commands      process groups, bounded time and output, --hold, hooks,
                        the steps of a phase
  Freezing filesystems  --freeze: FIFREEZE/FITHAW, the mount selection, identity
  The sync window       the state machine: one window, its post phase owed once;
                        the Marker, recovery, the runtime dir's lock, the guardian
                        and its timer
  HTTP                  one handler: strict, bounded parsing; nothing reaches a shell
  The server            connection threads, signals, TLS detection, allow-list,
                        the cap (XO's connections before strangers'), the socket
                        systemd passes (synchook.socket), the restart in place
  TLS                   a self-signed certificate from the standard library
  call, check, ...      the admin's tools: call, fleet, tag, thaw, status, check,
                        configure (the --config file, checked as install.sh checks it)
  serve, and main       start-up order (lock, recovery, guardian, then the rest),
                        recover, the command line
"""

import sys

# While a sync window is open the filesystem under us may be frozen, and a
# blocked write would deadlock the thaw.  So: no .pyc writes, and every module a
# window needs is imported here, at start.  The few that only the start-up
# (shlex: the config file; resource: the descriptor limit; secrets: the key) or
# the admin's tools need are imported where they are used, never on a window's
# path: the daemon keeps each one it never loads out of its memory for good.
sys.dont_write_bytecode = True

import base64  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import email.utils  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import http.client  # noqa: E402
import http.server  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import socketserver  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import _thread  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

try:
    import ssl
except ImportError:  # Python built without OpenSSL: plain HTTP only
    ssl = None

__version__ = "1.7.0"

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

PROG = "synchook"
DEFAULT_PORT = 1727                # the port XO's bare tag calls
XO_TIMEOUT = 60.0                  # how long XO waits for /sync (syncHookTimeout)
TERM_GRACE = 2.0                   # SIGTERM to SIGKILL, for a process group
KILL_WAIT = 2.0                    # how long to wait for a SIGKILLed child to be reaped
DRAIN_GRACE = 0.5                  # output drained after the command exited
HOLD_GRACE = 2.0                   # a hold command's time to end after stdin closes
POLL = 0.2                         # slice of a running command's wait loop
MAX_OUTPUT_LINE = 2000             # bytes of one output line that reach the log
MAX_OUTPUT_LINES = 1000            # output lines logged per command; more are counted
# A command's output is read into one buffer of this size, reused: a new 64 KB
# string per read came from each connection thread's own malloc arena, and 10 MB
# of output left a megabyte or two more memory behind, for good.
OUTPUT_CHUNK = 65536
MAX_REQUEST_LINE = 8192            # bytes in the request line (414 beyond)
MAX_HEADER_LINE = 8192             # bytes in one header line (431 beyond)
MAX_HEADERS = 64                   # header lines per request (431 beyond)
MAX_HEAD = 32768                   # bytes in request line plus headers
LOG_QUEUE = 2000                   # log lines waiting for the writer; more are dropped
LOG_COALESCE = 0.01                # the writer gathers a burst of lines this long
NOISE_BURST = 20                   # log lines one client can cause at will (refusals,
NOISE_PER_MINUTE = 10              # failures, /status) in a burst, then per minute;
NOISE_CLIENTS = 4096               # clients tracked; beyond, they share one count
NOISE_ALL_BURST = 100              # such lines from all clients together: a burst,
NOISE_ALL_PER_MINUTE = 60          # then per minute (many addresses, one flood)
NOISE_SUMMARY = 60.0               # how often "N more from ADDR" is logged
IDLE_WORKERS = 4                   # connection threads kept waiting for the next one
POST_RETRIES = (1.0, 2.0, 5.0, 10.0)   # waits between tries of a post phase that could
                                   # not start; the last one repeats until it starts
SHUTDOWN_RETRY = 10.0              # at exit, how long an owed post phase is still tried
RECOVER_WAIT = 5.0                 # at start, how long a leftover group may take to die
FD_RESERVE = 24                    # descriptors kept for the post phase, never for clients
ACCEPT_PAUSE = 0.25                # out of descriptors: accept nothing for this long
MAX_REQUESTS = 100                 # requests on one connection; then it is closed
STATUS_ONLY_CONNECTIONS = 4        # connections of loopback clients --allow leaves out
KNOWN_CLIENTS = 64                 # addresses remembered as having sent a valid request
LOCK_FILE = "lock"                 # inside --runtime-dir: held by whoever acts on the marker
LOCK_WAIT = 600.0                  # at start, how long a recovery under way may keep it
RECOVER_RETRY = 60.0               # a recovery's post phase that cannot start: tried this long
ROOT_MAX_HOLD = 150.0              # --max-hold's default when / is frozen: under journald's
                                   # 3-minute watchdog (journald blocks on a frozen /)
DAEMON_OOM_SCORE = -900            # oom_score_adj: the OOM killer's last choices
GUARDIAN_OOM_SCORE = -1000         # never: it is a shell, and the safety net
GUARDIAN_NAME = "window-guardian"  # its $0: nothing that `pkill -f synchook` matches
GUARDIAN_ENV_PREFIX = b"SYNCHOOK_GUARDIAN_"   # what it needs, by environment, not argv
SHELL = "/bin/sh"
SYSLOG_SOCKET = "/dev/log"
SYSLOG_FALLBACK = "/var/log/synchook.log"   # --syslog with no syslog socket at start
SYSLOG_FACILITY = 3                # daemon
CERT_FILE = "cert.pem"             # names inside --state-dir
KEY_FILE = "key.pem"
MARKER_FILE = "window.json"        # inside --runtime-dir: its first line names the open window
DEADLINE_FILE = "deadline"         # inside --runtime-dir: the open window's, for the guardian
SPILL_FILE = "log.held"            # inside --runtime-dir: log lines held while a window is open
SPILL_MAX = 1 << 20                # bytes of held lines kept there; more are counted as dropped
MARKER_SPACE = 65536               # bytes the marker keeps allocated (see Marker)
THAW_TRIES = 5                     # a recovery's lookups of a mount whose path moves under it
GUARDIAN_GRACE = 5.0               # past a window's deadline, the guardian kills a daemon
                                   # that has not released it (stopped, hung)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
LISTEN_FD = 3                      # the listening socket passed by systemd (LISTEN_FDS,
                                   # sd_listen_fds(3)) or kept by a restart in place
REEXEC_NAME = "synchook-reexec"    # LISTEN_FDNAMES of a socket kept by a restart in place
REEXEC_SYSTEMD_NAME = "synchook-reexec-systemd"    # the same, when the socket is systemd's
CLOCK_BOOTTIME = 7                 # Linux's clock id (time.CLOCK_BOOTTIME is 3.7+)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")   # the unit of a start time in /proc/PID/stat
WRONG_SECRET = "forbidden: missing or wrong secret"
HOOK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
HOOK_LEFTOVER = re.compile(
    r"\.(dpkg-[a-z]+|ucf-[a-z]+|rpmnew|rpmsave|rpmorig|orig|bak|swp|tmp|disabled)$")

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
JOURNAL_PRIORITY = {10: 7, 20: 6, 30: 4, 40: 3}   # sd-daemon(3) <N> prefixes
LEVEL_NAMES = {10: "debug", 20: "info", 30: "warning", 40: "error"}

# Control characters, escaped wherever request or command data meets the log.
_ESCAPES = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7F, 0xA0))}


def escape(text, limit=None):
    text = str(text).translate(_ESCAPES)
    if limit and len(text) > limit:
        text = text[:limit] + "..."
    return text


def iso(when=None):
    """Local ISO 8601 time of a time.time() value (default: now)."""
    stamp = datetime.datetime.fromtimestamp(time.time() if when is None else when,
                                            datetime.timezone.utc)
    return stamp.astimezone().isoformat(timespec="milliseconds")


def seconds(value):
    """55.0 -> '55', 0.5 -> '0.5': durations the way an admin writes them."""
    return ("%g" % value)


class ConfigError(Exception):
    """A bad setting: one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------
# Logging: never blocks the caller
# ---------------------------------------------------------------------------

class Log:
    """Log lines go through a bounded buffer to one writer thread.

    A hook thread must never block on a log write: stderr may be a pipe to a
    journal that writes to the very filesystem the hook froze.  When the buffer
    is full, lines are dropped and counted, and the count is logged later.
    The writer sleeps on a semaphore, woken once per burst, and writes a
    burst in one system call.

    Held: from the opening of a window to its close, and at start until
    recovery is done.  A sink that is a file (stderr redirected to one, or the
    syslog fallback file) is not written then: a write to a frozen filesystem
    waits in the kernel, uninterruptibly, and a writer thread caught there
    would keep even a SIGKILLed synchook from dying.  As qemu-ga turns its
    logging off while frozen, the lines wait, and are written after the thaw:
    in the spill file in the runtime dir (tmpfs) once one is attached, so that
    they are on record at once and survive a SIGKILL (the guardian's recovery,
    or the next start, writes them out), else in this buffer.  Lines logged
    while held carry their own time to a journal or syslog, which may be
    blocked on the frozen root and stamp them only when the thaw lets it read.
    The writer thread ends only when the log is closed.
    """

    def __init__(self):
        self.level = LEVELS["info"]
        self.pending = collections.deque()
        self.wake = threading.Semaphore(0)
        self.sleeping = False
        self.closing = False
        self.lost = LogLosses()
        self.noise_filter = NoiseFilter()
        self.out = LogOutputs()
        self.thread = None
        self.held = False              # no file is written (lines wait, or are spilled)
        self.stamping = False          # lines carry their own time (see hold)
        self.resume = threading.Event()     # set whenever not held
        self.resume.set()
        self.writing = threading.Lock()     # held by the writer during a file write
        self.local = threading.local()      # .deferred: see defer()

    def start(self, level="info", syslog=False, held=False):
        """Start the writer.  With syslog, lines also go to stderr until serving()
        (an init script shows a failed start's own error line), and where no
        syslog socket exists they go to SYSLOG_FALLBACK instead.  held: write
        no file until release() (start-up, until recovery has thawed)."""
        self.level = LEVELS[level]
        self.out.start(syslog)
        if held:
            self.hold()
        self.thread = threading.Thread(target=self._write_loop, name="log", daemon=True)
        self.thread.start()
        if isinstance(self.out.sink, FileSink):
            self.warning("no syslog socket at %s: logging to %s", SYSLOG_SOCKET,
                         self.out.sink.path)

    def attach_spill(self, runtime_dir):
        """Held lines go to a file in the runtime dir from now on (the caller
        holds the runtime dir's lock).  Lines an earlier run held there and
        never wrote out are written with this run's, after a line saying so."""
        spill = SpillFile(os.path.join(runtime_dir, SPILL_FILE))
        if spill.inherited:
            spill.write(file_line(30, time.time(), "(the lines above were held by a "
                                  "synchook that ended before it could write them)"))
        with self.writing:
            self.out.spill = spill
        self._wake_writer_now()

    def hold(self):
        """Write no file from now on, until release(); a file write already
        under way is waited for (1 s at most), so that none is left to meet a
        freeze that follows."""
        self.stamping = True
        if not self.out.writes_files():
            return
        self.held = True
        self.resume.clear()
        if self.writing.acquire(timeout=1.0):
            self.writing.release()

    def release(self):
        self.stamping = False
        if self.held:
            self.held = False
            self.resume.set()
            self._wake_writer_now()

    def serving(self):
        """Start-up is over: from now on, lines go to the sink alone."""
        self.out.echo_until = time.time()

    def debug(self, msg, *args):
        self._emit(10, msg, args)

    def info(self, msg, *args):
        self._emit(20, msg, args)

    def warning(self, msg, *args):
        self._emit(30, msg, args)

    def error(self, msg, *args):
        self._emit(40, msg, args)

    def alert(self, msg, *args, level=40):
        """A line about a release at risk: on record at once (to the spill
        file while held), whatever the request in this thread defers."""
        self._emit(level, msg, args)
        self._wake_writer_now()

    def noise(self, client, msg, *args, level=20, wrong_secret=False):
        """An info line any client can cause at will (a refused connection, a
        failed handshake, a 4xx, /status): bounded per client by the noise
        filter, and kept out of the half of the buffer that window lines need,
        so that a flood never pushes out the lines of a window."""
        if level < self.level:
            return
        admitted, summaries = self.noise_filter.admit(client, time.monotonic(), wrong_secret)
        lines = [(20, summary, ()) for summary in summaries]
        if admitted:
            lines.append((level, msg, args))
        for line in lines:                 # summaries are noise too: the same rule
            if len(self.pending) >= LOG_QUEUE // 2 and self.thread is not None:
                self.lost.dropped += 1
            else:
                self._emit(*line)

    def _emit(self, level, msg, args):
        # The line is formatted by the writer, not on a request's way.  Its
        # arguments are strings and numbers (or exceptions, made strings alike
        # now or later), so nothing they say changes before it is written.
        if level < self.level:
            return
        item = (level, time.time(), msg, args, self.stamping)
        if self.thread is None:          # before start(): plain synchronous write
            self.out.sink.write([render(item)])
            return
        if len(self.pending) >= LOG_QUEUE:
            self.lost.dropped += 1
            return
        self.pending.append(item)
        if self.sleeping and not getattr(self.local, "deferred", False):
            self.sleeping = False
            self.wake.release()

    # The one speed trick kept (bench/README.md): a request's lines wake the
    # writer once its answer is sent, or its thread is about to wait on a
    # command; a writer woken mid-request takes the interpreter lock from the
    # request at its next system call, and the answer (a thaw's) waits for it.
    def defer(self):
        """This thread's lines wait for wake_writer(), or end_defer()."""
        self.local.deferred = True

    def wake_writer(self):
        """Let the writer write what is pending (this thread is about to wait)."""
        if self.sleeping and self.pending:
            self._wake_writer_now()

    def end_defer(self):
        self.local.deferred = False
        self.wake_writer()

    def _wake_writer_now(self):
        if self.sleeping:
            self.sleeping = False
            self.wake.release()

    def _write_loop(self):
        # Nothing but close() may end this thread: a log that stops is worse
        # than a lost line.
        while not self.closing:
            try:
                self._write_once()
            except Exception:              # noqa: BLE001 (counted in /status, carried on)
                self.lost.failures += 1
                time.sleep(LOG_COALESCE)   # a fault that repeats must not spin

    def _write_once(self):
        """Write what is pending, or sleep until there is some; returns once
        the log is closing."""
        while True:
            if self.held and self.out.spill is None:
                # Lines wait in the buffer (LOG_QUEUE at most; more are counted).
                # A hold() right after the release() that woke us: wait again.
                self.resume.wait()
                if self.held and self.closing:     # closing while held: write nothing
                    return
                continue
            with self.writing:
                if self.held:
                    wrote = self._spill_pending()
                else:
                    self.out.replay_spill()
                    wrote = self._write_pending()
            if wrote:
                continue
            if self.closing:
                return
            self.sleeping = True
            if not self.pending and not self.closing:   # re-check after raising the flag
                self.wake.acquire()
                # Let the rest of a request's lines arrive: one write per burst, and
                # the request thread is not interrupted after every line.
                time.sleep(LOG_COALESCE)
            self.sleeping = False

    def _take_pending(self):
        batch = []
        while self.pending:
            batch.append(render(self.pending.popleft()))
        return batch

    def _spill_pending(self):
        """Held: what is pending goes to the spill file; True if there was some."""
        batch = self._take_pending()
        if not batch:
            return False
        if not self.out.spill.write("".join(file_line(*item) for item in batch)):
            self.lost.dropped += len(batch)
        return True

    def _write_pending(self):
        """Write what is pending now; True if there was something."""
        batch = self._take_pending()
        if self.lost.dropped != self.lost.reported:
            lost = self.lost.dropped - self.lost.reported
            if self.out.sink.write([(30, time.time(), "%d log lines dropped (log output was "
                                                      "blocked, or held while a window was "
                                                      "open)" % lost, False)]):
                self.lost.reported += lost
        if not batch:
            return False
        written = 0
        try:
            written = self.out.write(batch)
        finally:
            self.lost.dropped += len(batch) - written
        return True

    def close(self, timeout=2.0):
        """Flush what is buffered, but never wait on a blocked sink for long."""
        if self.thread is None:
            return
        self.closing = True
        self.wake.release()
        self.resume.set()
        self.thread.join(timeout)


class LogLosses:
    """What the log lost: lines dropped (a full buffer, a sink that failed),
    how many of them a line has reported, and the writer's own failures."""

    def __init__(self):
        self.dropped = 0
        self.reported = 0
        self.failures = 0


class LogOutputs:
    """Where the log's writer puts lines: the sink (stderr, or syslog, or the
    fallback file), the start-up echo to stderr beside syslog (until serving()),
    and the spill file in the runtime dir for lines held while a window is open."""

    def __init__(self):
        self.sink = StderrSink()
        self.echo = None               # a second sink for the start-up lines
        self.echo_until = float("inf")
        self.spill = None              # a SpillFile in the runtime dir, once attached
        self.sink_file = False         # the sink writes to a file: hold() applies
        self.echo_file = False         # so does the start-up echo, until serving()

    def start(self, syslog):
        if syslog:
            self.sink = syslog_or_file()
            self.echo = StderrSink()
        self.sink_file = self.sink.is_file()
        self.echo_file = self.echo is not None and self.echo.is_file()

    def writes_files(self):
        """Would a line written now go to a file (which a freeze would block)?"""
        return self.sink_file or (self.echo_file and self.echo_until == float("inf"))

    def write(self, batch):
        """Write rendered lines to the sink, and the start-up ones to the echo;
        returns how many the sink took."""
        written = self.sink.write(batch)
        if self.echo is not None:
            start_up = [item for item in batch if item[1] <= self.echo_until]
            if start_up:
                self.echo.write(start_up)
            else:
                self.echo = None
        return written

    def replay_spill(self):
        """Released: what the spill file holds goes to the sink, in order."""
        if self.spill is None or not self.spill.size:
            return
        data = self.spill.read()
        if data and not self.sink.write_raw(data):
            return                       # kept for the next try
        self.spill.clear()


def render(item):
    """A queued line (level, time, msg, args, stamped) as the sinks take it:
    (level, time, text, stamped)."""
    level, when, msg, args, stamped = item
    try:
        text = msg % args if args else msg
    except (TypeError, ValueError):      # a bad format must not lose the line
        text = "%s %r" % (msg, args)
    return level, when, escape(text), stamped


def file_line(level, when, text, stamped=False):
    """A line as it is written to a file: its time, its level, its text."""
    return "%s %s: %s\n" % (iso(when), LEVEL_NAMES[level], text)


def own_time(when, stamped):
    """The line's own time, for a sink that stamps lines when it reads them."""
    return "[%s] " % iso(when) if stamped else ""


class SpillFile:
    """The held lines' file in the runtime dir (tmpfs, never frozen), at most
    SPILL_MAX bytes: appended to while held, written out and emptied after.
    Opened without following a link, and used only if it is a regular file
    of synchook's user that no one else can read."""

    def __init__(self, path):
        self.path = path
        self.fd = None
        self.size = 0
        self.inherited = False         # lines an earlier run held and never wrote out
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
        except OSError:
            return
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            return
        self.fd, self.size = fd, st.st_size
        self.inherited = bool(st.st_size)

    def write(self, text):
        if self.fd is None:
            return False
        data = text.encode("utf-8", "replace")
        if self.size + len(data) > SPILL_MAX:
            return False
        try:
            write_all(self.fd, data)
        except OSError:
            return False
        self.size += len(data)
        return True

    def read(self):
        try:
            return os.pread(self.fd, SPILL_MAX, 0) if self.fd is not None else b""
        except OSError:
            return b""

    def clear(self):
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        self.size = 0


class NoiseFilter:
    """Per client, a bucket of NOISE_BURST lines refilled at NOISE_PER_MINUTE,
    and one bucket for all clients together (NOISE_ALL_BURST, NOISE_ALL_PER_MINUTE:
    a flood from many addresses); what does not fit is counted and summed up
    once per NOISE_SUMMARY, in one line when many clients were left out.  No
    timer: the summary rides on the next noisy line from anyone.  Requests
    with a wrong secret are counted apart, and every client that sent one is
    named with its count, however loud the others (a guessing client cannot
    hide behind decoy traffic)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.clients = {}              # address -> [tokens, last seen, lines not logged]
        self.next_summary = 0.0
        self.all_tokens = float(NOISE_ALL_BURST)
        self.all_seen = 0.0

    def admit(self, client, now, wrong_secret=False):
        """(log this line?, summary lines due now)"""
        with self.lock:
            entry = self.clients.get(client)
            if entry is None:
                if len(self.clients) >= NOISE_CLIENTS:
                    client = "other clients"
                    entry = self.clients.get(client)
                if entry is None:
                    entry = self.clients[client] = [float(NOISE_BURST), now, 0, 0]
            tokens = min(float(NOISE_BURST), entry[0] + (now - entry[1]) * NOISE_PER_MINUTE / 60)
            everyone = min(float(NOISE_ALL_BURST),
                           self.all_tokens + (now - self.all_seen) * NOISE_ALL_PER_MINUTE / 60)
            admitted = tokens >= 1 and everyone >= 1
            entry[0], entry[1] = tokens - 1 if admitted else tokens, now
            self.all_tokens, self.all_seen = everyone - 1 if admitted else everyone, now
            summaries = []
            if not admitted:
                entry[2] += 1
                entry[3] += wrong_secret
            elif entry[2]:                     # quiet again: say what was left out
                summaries.append(self.summary(client, entry))
            if now >= self.next_summary:
                self.next_summary = now + NOISE_SUMMARY
                left_out = [(address, other) for address, other in self.clients.items()
                            if other[2]]
                if len(left_out) > 3:
                    summaries.append(self.crowd_summary(left_out))
                else:
                    summaries.extend(self.summary(address, other) for address, other in left_out)
                for address, other in list(self.clients.items()):
                    if not other[2] and now - other[1] > 10 * NOISE_SUMMARY:
                        del self.clients[address]
            return admitted, summaries

    @staticmethod
    def summary(address, entry):
        count, secret, entry[2], entry[3] = entry[2], entry[3], 0, 0
        return "%d more log lines from %s not logged (over %d a minute)%s" % (
            count, address, NOISE_PER_MINUTE,
            ", %d of them a wrong or missing secret" % secret if secret else "")

    @staticmethod
    def crowd_summary(left_out):
        busiest = sorted(left_out, key=lambda item: -item[1][2])[:3]
        shown = ", ".join("%s (%d)" % (address, entry[2]) for address, entry in busiest)
        guessing = sorted((item for item in left_out if item[1][3]), key=lambda item: -item[1][3])
        secrets = ", ".join("%s (%d)" % (address, entry[3]) for address, entry in guessing[:16])
        if len(guessing) > 16:
            secrets += " and %d more clients" % (len(guessing) - 16)
        total = sum(entry[2] for _, entry in left_out)
        for _, entry in left_out:
            entry[2] = entry[3] = 0
        return ("%d more log lines from %d clients not logged (over %d a minute from one, "
                "%d from all); the most from %s%s" % (
                    total, len(left_out), NOISE_PER_MINUTE, NOISE_ALL_PER_MINUTE, shown,
                    "; a wrong or missing secret from %s" % secrets if secrets else ""))


class StderrSink:
    """stderr: journal priority prefixes under systemd, ISO timestamps elsewhere."""

    def __init__(self):
        self.journal = bool(os.environ.get("JOURNAL_STREAM"))

    @staticmethod
    def is_file():
        """Is stderr on a filesystem (a file, or a block device), where a write
        waits while that filesystem is frozen?  Pipes, sockets and terminals do not."""
        try:
            mode = os.fstat(2).st_mode
        except OSError:
            return False
        return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode))

    def line(self, level, when, text, stamped=False):
        if self.journal:
            return "<%d>%s%s\n" % (JOURNAL_PRIORITY[level], own_time(when, stamped), text)
        return file_line(level, when, text)

    def write(self, items):
        """Write items in one go; returns how many were written."""
        return len(items) if self._write_bytes(
            "".join(self.line(*item) for item in items).encode("utf-8", "replace")) else 0

    def write_raw(self, data):
        """Lines already made (the spill file's); True if all were written."""
        if self.journal:                  # the spill's lines (each with its time and level)
            data = b"".join(b"<6>" + line + b"\n" for line in data.splitlines())
        return self._write_bytes(data)

    @staticmethod
    def _write_bytes(data):
        try:
            write_all(2, data)
            return True
        except OSError:
            return False


class FileSink:
    """Appends to a file (--syslog with no syslog socket).  Opened by the
    writer thread on first use, so that a file on a frozen filesystem blocks
    that thread alone, never the start or a thaw."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    @staticmethod
    def is_file():
        return True

    def write(self, items):
        return len(items) if self.write_raw(
            "".join(file_line(*item) for item in items).encode("utf-8", "replace")) else 0

    def write_raw(self, data):
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                                  os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            except OSError:
                return False
        try:
            write_all(self.fd, data)
            return True
        except OSError:
            return False


def syslog_or_file():
    try:
        is_socket = stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode)
    except OSError:
        is_socket = False
    return SyslogSink() if is_socket else FileSink(SYSLOG_FALLBACK)


class SyslogSink:
    """RFC 3164 datagrams to /dev/log, non-blocking: a full or absent socket drops."""

    def __init__(self, path=SYSLOG_SOCKET):
        self.path = path
        self.sock = None
        self.next_connect = 0.0

    @staticmethod
    def is_file():
        return False                   # non-blocking datagrams: never waits

    def _connect(self):
        if time.monotonic() < self.next_connect:
            return False
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(self.path)
        except OSError:
            self.next_connect = time.monotonic() + 1.0
            return False
        self.sock = sock
        return True

    def write(self, items):
        written = 0
        for level, when, text, stamped in items:
            if self.sock is None and not self._connect():
                continue
            pri = SYSLOG_FACILITY * 8 + JOURNAL_PRIORITY[level]
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime(when))
            msg = "<%d>%s %s[%d]: %s%s" % (pri, stamp, PROG, os.getpid(),
                                           own_time(when, stamped), text)
            try:
                self.sock.send(msg.encode("utf-8", "replace")[:8192])
                written += 1
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:                     # syslogd restarted: reconnect next time
                self.sock.close()
                self.sock = None
        return written

    def write_raw(self, data):
        """The spill file's lines (each has its own time and level in its text)."""
        lines = [line.decode("utf-8", "replace") for line in data.splitlines() if line]
        return self.write([(20, time.time(), line, False) for line in lines]) == len(lines)


log = Log()


# ---------------------------------------------------------------------------
# Configuration: flag, then environment, then config file, then default
# ---------------------------------------------------------------------------

def default_runtime_dir():
    if os.geteuid() == 0:
        return "/run/synchook"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "synchook")
    return "/tmp/synchook-%d" % os.geteuid()


def parse_port(text):
    try:
        port = int(text, 10)
    except ValueError:
        raise ConfigError("not a port number")
    if not 0 <= port <= 65535:
        raise ConfigError("port out of range (0-65535)")
    return port


def parse_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("not a number of seconds")
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError("must be a positive number of seconds")
    return value


def parse_count(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError("not a whole number")
    if value < 2:
        raise ConfigError("must be 2 or more")
    return value


def parse_choice(*choices):
    def parse(text):
        if text not in choices:
            raise ConfigError("must be one of %s" % ", ".join(choices))
        return text
    return parse


def parse_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off", ""):
        return False
    raise ConfigError("must be 1 or 0")


class Nobody:
    """--allow none: the allow-list no address is in.  A package installs synchook
    closed this way, until the admin names XO (synchook configure --allow ...);
    loopback may still read /status."""

    def __contains__(self, address):
        return False

    def __str__(self):
        return "none"


NOBODY = Nobody()
CLOSED_HINT = ("closed until configured: synchook configure --allow XO_ADDRESS (or "
               "--secret-file FILE)")


def parse_allow(text):
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if "none" in entries:
        if len(entries) > 1:
            raise ConfigError("'none' lets no one in: it cannot stand beside addresses")
        return [NOBODY]
    return [parse_network(entry) for entry in entries]


def is_closed(cfg):
    """--allow none: every client refused (loopback may read /status)."""
    return cfg.allow == [NOBODY]


def parse_network(entry):
    """One --allow entry: an address or a CIDR block written as such."""
    if "%" in entry:                   # Python takes fe80::1%<anything> as an address
        raise ConfigError("%r: a zone (%%...) has no place in --allow: give the address "
                          "without it" % entry)
    bare = entry.replace("[", "").replace("]", "")
    address, slash, prefix = bare.partition("/")
    try:
        network = ipaddress.ip_network(bare, strict=False)
        first = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError("%r is not an IP address or CIDR block" % entry)
    if slash and not prefix.isdigit():
        raise ConfigError("%r: write the prefix length: %s" % (entry, network))
    if slash and first != network.network_address:
        raise ConfigError("%r has bits set after the prefix: did you mean %s (the network) "
                          "or %s (the one address)?" % (entry, network, address))
    mapped = network.network_address.version == 6 and network.network_address.ipv4_mapped
    if mapped and network.prefixlen >= 96:   # ::ffff:10.0.0.2 is 10.0.0.2, as clients are
        network = ipaddress.ip_network("%s/%d" % (mapped, network.prefixlen - 96))
    return network


def parse_freeze(text):
    """'' (no freeze), 'all', or a list of absolute mount points."""
    text = text.strip()
    if text in ("", "all"):
        return text
    points = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if not entry.startswith("/"):
            raise ConfigError("%r: a mount point is an absolute path (or use 'all')" % entry)
        point = os.path.normpath(entry)
        if point not in points:
            points.append(point)
    return points


def parse_hook_words(text):
    words = [word.strip() for word in text.split(",")]
    if len(words) != 2 or not all(re.match(r"^[A-Za-z0-9_.-]+$", word) for word in words):
        raise ConfigError("two words, comma-separated (sync,post-sync or freeze,thaw)")
    return words


HOST_NAME = re.compile(r"(?i)^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                       r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?$")


def parse_listen(text):
    """An address (IPv6 in brackets or not, with a zone or not) or a host name;
    '' means all addresses."""
    text = text.strip()
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
    if not text and not bracketed:
        return text
    address, percent, zone = text.partition("%")     # fe80::1%eth0: a zone, IPv6 only
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        version = None
    if bracketed and version != 6:
        raise ConfigError("brackets hold an IPv6 address only")
    if version is not None and (not percent or (version == 6 and re.match(r"^[\w.-]+$", zone))):
        return text
    if ":" in text or "%" in text or not HOST_NAME.match(text):
        raise ConfigError("not an IP address or a host name")
    return text


def parse_text(text):
    return text


Option = collections.namedtuple("Option", "name flag env default parse metavar group help")

# Every setting of the daemon, in --help order.  `name` is the attribute of the
# resolved configuration; `env` is also the name used in the --config file.
OPTIONS = [
    Option("sync", "--sync", "SYNCHOOK_SYNC", "sync", parse_text, "CMD", "hooks",
           "shell command run on /sync ('' runs nothing)"),
    Option("post_sync", "--post-sync", "SYNCHOOK_POST_SYNC", "", parse_text, "CMD", "hooks",
           "shell command run on /post-sync (default: nothing)"),
    Option("hold", "--hold", "SYNCHOOK_HOLD", "", parse_text, "CMD", "hooks",
           "command that holds a lock for the whole window: started first on /sync, "
           "ready when it prints a line, its stdin closed when the window closes"),
    Option("hooks_dir", "--hooks-dir", "SYNCHOOK_HOOKS_DIR", "", parse_text, "DIR", "hooks",
           "directory of executable hooks run with 'sync' (name order) and "
           "'post-sync' (reverse order)"),
    Option("hook_words", "--hook-words", "SYNCHOOK_HOOK_WORDS", "sync,post-sync", parse_hook_words,
           "SYNC,POST", "hooks", "the argument --hooks-dir hooks get in each phase; freeze,thaw "
           "runs qemu-guest-agent's fsfreeze-hook.d scripts unchanged"),
    Option("freeze", "--freeze", "SYNCHOOK_FREEZE", "", parse_freeze, "all|MOUNT,...", "hooks",
           "freeze these mount points, or every local filesystem ('all'), as the last "
           "step of /sync; thawed first on /post-sync (no fsfreeze needed)"),
    Option("freeze_under", "--freeze-under", "SYNCHOOK_FREEZE_UNDER", "", parse_text, "DIR",
           "hooks", "with --freeze all: only the mounts at or below DIR"),
    Option("skip_freeze_on_failure", "--skip-freeze-on-failure",
           "SYNCHOOK_SKIP_FREEZE_ON_FAILURE", "0", parse_bool, None, "hooks",
           "a failed sync step skips the freeze, as synchook 1.4 did (default: freeze "
           "anyway, since XO snapshots whatever /sync answers)"),
    Option("timeout", "--timeout", "SYNCHOOK_TIMEOUT", "55", parse_seconds, "SEC", "hooks",
           "longest a hook command may run (XO waits 60)"),
    Option("max_hold", "--max-hold", "SYNCHOOK_MAX_HOLD", "300", parse_seconds, "SEC", "hooks",
           "longest a window stays open without /post-sync; then the post phase runs anyway "
           "(default 150 when --freeze freezes /: journald's watchdog kills it after 3 "
           "minutes of a frozen /)"),
    Option("listen", "--listen", "SYNCHOOK_LISTEN", "", parse_listen, "ADDR", "network",
           "address to bind (default: all, IPv6 and IPv4)"),
    Option("port", "--port", "SYNCHOOK_PORT", str(DEFAULT_PORT), parse_port, "N", "network",
           "TCP port (0 picks a free one, logged at start)"),
    Option("tls", "--tls", "SYNCHOOK_TLS", "auto", parse_choice("auto", "on", "off"), "MODE",
           "network", "auto: HTTPS and HTTP on one port; on: HTTPS only; off: HTTP only"),
    Option("tls_cert", "--tls-cert", "SYNCHOOK_TLS_CERT", "", parse_text, "PATH", "network",
           "certificate (PEM); default: a self-signed one kept in --state-dir"),
    Option("tls_key", "--tls-key", "SYNCHOOK_TLS_KEY", "", parse_text, "PATH", "network",
           "private key (PEM) for --tls-cert"),
    Option("secret", "--secret", "SYNCHOOK_SECRET", "", parse_text, "S", "access",
           "shared secret every request must carry (?token=S or Authorization: Bearer "
           "base64(S)); prefer --secret-file or the variable: flags show in ps"),
    Option("secret_file", "--secret-file", "SYNCHOOK_SECRET_FILE", "", parse_text, "PATH",
           "access", "read the secret from a file (trailing newline stripped)"),
    Option("allow", "--allow", "SYNCHOOK_ALLOW", "", parse_allow, "LIST", "access",
           "comma-separated addresses or CIDR blocks allowed to connect, or 'none' "
           "(a package's start: closed until configured) (default: all)"),
    Option("header_timeout", "--header-timeout", "SYNCHOOK_HEADER_TIMEOUT", "10", parse_seconds,
           "SEC", "access", "time a client has to complete the TLS handshake and request head"),
    Option("max_connections", "--max-connections", "SYNCHOOK_MAX_CONNECTIONS", "256",
           parse_count, "N", "access",
           "connections served at once; beyond it the oldest one not waiting on a command "
           "is dropped (lowered to fit the descriptor limit)"),
    Option("runtime_dir", "--runtime-dir", "SYNCHOOK_RUNTIME_DIR", None, parse_text, "DIR",
           "files", "runtime state, on tmpfs (default /run/synchook as root)"),
    Option("state_dir", "--state-dir", "SYNCHOOK_STATE_DIR", "/var/lib/synchook", parse_text,
           "DIR", "files", "where a generated certificate and key are kept"),
    Option("config", "--config", "SYNCHOOK_CONFIG", "", parse_text, "FILE", "files",
           "file of SYNCHOOK_NAME=value lines (sh quoting, never executed); tag, status "
           "and check read /etc/synchook.conf when it exists and none is given"),
    Option("log_level", "--log-level", "SYNCHOOK_LOG_LEVEL", "info",
           parse_choice("debug", "info", "warning", "error"), "LEVEL", "logging",
           "debug, info, warning or error"),
    Option("syslog", "--syslog", "SYNCHOOK_SYSLOG", "0", parse_bool, None, "logging",
           "log to the local syslog socket instead of stderr"),
]
OPTION_BY_ENV = {o.env: o for o in OPTIONS}
GROUP_TITLES = collections.OrderedDict([
    ("hooks", "what runs"), ("network", "network and TLS"),
    ("access", "who may call, and what a connection may cost"),
    ("files", "files"), ("logging", "logging")])

SERVE_EPILOG = """\
Commands (each takes --help):
  synchook.py [serve] [options]      answer XO's /sync and /post-sync (the default)
  synchook.py check [options]        run the sync then the post phase once, locally
                                     (the real commands); --parse-only runs nothing
  synchook.py configure [options]    change /etc/synchook.conf, checked first; the
                                     running daemon restarts in place with it
  synchook.py call TARGET [options]  act as XO: /sync, a pause, /post-sync
  synchook.py fleet FILE|--xo URL    from the XO host: which VMs will be quiesced
                                     (/status only)
  synchook.py tag [options]          print the XO tag for this guest
  synchook.py status [options]       show the running daemon's /status
  synchook.py thaw [--under DIR]     thaw every frozen local filesystem (rescue)
  synchook.py recover [--runtime-dir DIR]
                                     close a window a dead synchook left open
                                     (what its guardian, or the next start, does)

Every option also reads its variable (shown in brackets) and the same
SYNCHOOK_NAME=value line in --config; a flag wins over the variable, the
variable over the file, the file over the default.

Examples:
  synchook.py --freeze /data
  synchook.py --sync 'redis-cli SAVE && sync' --freeze all --max-hold 120
  SYNCHOOK_SECRET_FILE=/etc/synchook.secret synchook.py --allow 10.0.0.2
  synchook.py check --parse-only --config /etc/synchook.conf
  synchook.py tag --config /etc/synchook.conf
  synchook.py status --config /etc/synchook.conf
  synchook.py call 192.0.2.10 --as-xo --secret-file /etc/synchook.secret
"""


def argument_parser(**kwargs):
    """An argparse parser whose usage error is one line on stderr and exit code 2.

    argparse is imported here, not with the rest: the daemon reads its flags
    with parse_serve_flags and so never loads it (0.4 MB, for the life of the
    process); help, mistakes and the tools come here.  The help width comes
    from $COLUMNS: without a width, argparse imports shutil.
    """
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def __init__(self, prog):
            try:
                width = int(os.environ.get("COLUMNS", "")) - 2
            except ValueError:
                width = 78
            argparse.RawDescriptionHelpFormatter.__init__(self, prog, width=max(width, 40))

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message):
            sys.stderr.write("%s: error: %s (see --help)\n" % (self.prog, message))
            sys.exit(2)

    kwargs.setdefault("formatter_class", Formatter)
    return OneLineParser(**kwargs)


class Flags:
    """Flags as parse_args returns them: an attribute per setting, None if absent."""

    def __init__(self):
        for opt in OPTIONS:
            setattr(self, opt.name, None)


def parse_serve_flags(argv):
    """The daemon's flags, read without argparse; None when argparse must judge
    (--help, --version, a mistake, a value that looks like a flag): it then
    parses them all, with its own messages."""
    by_flag = {opt.flag: opt for opt in OPTIONS}
    flags = Flags()
    words = iter(argv)
    for word in words:
        flag, equals, value = word.partition("=")
        opt = by_flag.get(flag)
        if opt is None:
            return None
        if opt.parse is parse_bool:
            if equals:
                return None
            value = "1"
        elif not equals:
            value = next(words, None)
            if value is None or value.startswith("-"):
                return None
        setattr(flags, opt.name, value)
    return flags


SERVE_DESCRIPTION = """\
Answer Xen Orchestra's VM sync hook: run a command before a snapshot and
another after it, and never leave the guest frozen."""
CHECK_DESCRIPTION = """\
Check the configuration the daemon would use (certificate, port, hooks), then
run the sync phase and the post phase once, locally, as the daemon would: the
real commands (a freeze freezes). Report each step; exit 0 only when all is
well. --parse-only checks the settings alone and runs nothing."""
TAG_DESCRIPTION = """\
Print the xo:notify-on-snapshot tag to set on this VM in Xen Orchestra, from
the settings (port, TLS, secret) and this guest's addresses."""
STATUS_DESCRIPTION = """\
Show the /status of the synchook running with these settings, asked over
loopback (always allowed for /status, whatever --allow says)."""
DESCRIPTIONS = {"serve": SERVE_DESCRIPTION, "check": CHECK_DESCRIPTION,
                "tag": TAG_DESCRIPTION, "status": STATUS_DESCRIPTION}   # configure's: below


def build_serve_parser(prog, command="serve"):
    """The parser of every command that reads the daemon's settings (serve,
    check, tag, status), with that command's own flags."""
    description = CONFIGURE_DESCRIPTION if command == "configure" else DESCRIPTIONS[command]
    parser = argument_parser(
        prog=prog, description=description, epilog=SERVE_EPILOG, allow_abbrev=False)
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    if command == "check":
        parser.add_argument("--no-run", action="store_true",
                            help="every check a start makes (files, certificate, port, "
                                 "hooks, the freeze plan) but run no command (what "
                                 "install.sh does before it replaces a running agent)")
        parser.add_argument("--parse-only", action="store_true",
                            help="check the settings' syntax and values only: no file is "
                                 "opened but the --config file, no command runs (what "
                                 "install.sh does before it writes anything)")
    elif command == "tag":
        parser.add_argument("--secret-new", action="store_true",
                            help="write a new URL-safe secret to --secret-file (mode 0600) "
                                 "and print the tag that carries it")
    elif command == "status":
        parser.add_argument("--json", action="store_true", help="print /status as it is")
    elif command == "configure":
        parser.add_argument("--reset", action="store_true",
                            help="start from the defaults, not from the file's settings")
        parser.add_argument("--unset", metavar="NAME", action="append", default=[],
                            help="drop one setting of the file's (--unset allow); repeatable")
    import argparse
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    own = TOOL_SETTINGS.get(command)
    for opt in OPTIONS:
        default = opt.default if opt.default is not None else "/run/synchook, per-user if not root"
        shown = "%s=%s, default %s" % (opt.env, "1" if opt.parse is parse_bool else opt.metavar,
                                        default or "none")
        # tag and status read every setting (a --config file names them all) but
        # list only those they use.
        text = argparse.SUPPRESS if own is not None and opt.name not in own else (
            "%s [%s]" % (opt.help, shown))
        if opt.parse is parse_bool:
            groups[opt.group].add_argument(opt.flag, dest=opt.name, action="store_const",
                                           const="1", default=None, help=text)
        else:
            groups[opt.group].add_argument(opt.flag, dest=opt.name, metavar=opt.metavar,
                                           default=None, help=text)
    return parser


# The settings tag and status use (the others are accepted, and not listed).
TOOL_SETTINGS = {
    "tag": ("listen", "port", "tls", "secret", "secret_file", "config"),
    "status": ("listen", "port", "tls", "secret", "secret_file", "config"),
}
DEFAULT_CONFIG = "/etc/synchook.conf"    # what install.sh writes; the tools read it by default


def open_regular(path, nofollow=False):
    """A read descriptor for path, which must be a regular file.

    Opened non-blocking: a FIFO or device planted where a file is expected
    must not hang the start while a post phase is owed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags | (os.O_NOFOLLOW if nofollow else 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, limit):
    """Up to limit bytes of a regular file (see open_regular)."""
    fd = open_regular(path)
    try:
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def untrusted(path, owners=(0,), is_parent=False):
    """Why path cannot be trusted, as one line naming the fix, or None.

    As sshd's StrictModes: the file (after symbolic links) and every
    directory above it must be owned by one of `owners` and not writable by
    group or others, or anyone who could write there could swap in their own
    file; a world-writable parent with the sticky bit (/tmp) is fine (and
    path itself too when is_parent: it is the directory of what we check).
    """
    real = os.path.realpath(path)
    current = real
    while True:
        try:
            st = os.lstat(current)
        except OSError as err:
            if current == real:
                return None               # missing: its reader says so, more plainly
            return "%s: %s" % (current, err.strerror)
        if st.st_uid not in owners:
            owner = "root" if owners[-1] == 0 else str(owners[-1])
            return ("%s is owned by uid %d (fix: chown %s %s)"
                    % (current, st.st_uid, owner, current))
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_mode & 0o022 and not (sticky_dir and (is_parent or current != real)):
            return "%s is writable by group or others (fix: chmod go-w %s)" % (current, current)
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def check_trusted(path, what):
    """Running as root, refuse a file or directory another user could change."""
    if os.geteuid() != 0:
        return
    problem = untrusted(path)
    if problem:
        raise ConfigError("%s %s: not trusted: %s" % (what, path, problem))


def private_dir(path, what):
    """Make sure path is a directory only synchook's user can change: created
    0700 if missing, else it must be a real directory (not a symbolic link),
    owned by that user, not writable by group or others; so must its parents
    be (or sticky).  ConfigError naming the path and the fix otherwise;
    OSError if it cannot be created."""
    uid = os.geteuid()
    make_missing(path)
    st = os.lstat(path)
    fix = "chown %d %s && chmod 700 %s, or choose another %s" % (uid, path, path, what)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError("%s %s: not a directory (a symbolic link?): remove it, or choose "
                          "another %s" % (what, path, what))
    if st.st_uid != uid:
        raise ConfigError("%s %s: owned by uid %d, not synchook's %d (fix: %s)"
                          % (what, path, st.st_uid, uid, fix))
    if st.st_mode & 0o022:
        raise ConfigError("%s %s: writable by group or others (fix: %s)" % (what, path, fix))
    problem = untrusted(os.path.dirname(path), (0, uid) if uid else (0,), is_parent=True)
    if problem:
        raise ConfigError("%s %s: not trusted: %s" % (what, path, problem))


def make_missing(path):
    """mkdir path (0700) and its missing parents (0755), and nothing that exists.

    Never os.makedirs(..., exist_ok=True): mkdir on a directory that exists
    still takes the parent filesystem's write lock, and waits for as long as
    that filesystem is frozen (/run's parent is /, which --freeze all freezes,
    and start-up comes before the recovery that thaws it).  A stat is a read.
    """
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700 if directory == path else 0o755)
        except FileExistsError:
            pass                          # OSError for any other failure: caller's call


def read_config_file(path):
    """Parse SYNCHOOK_NAME=value words with sh quoting; nothing is executed."""
    try:
        text = read_regular(path, 1 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise ConfigError("--config %s: cannot read: %s" % (path, reason))
    import shlex                       # at start only
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    values = {}
    while True:
        # The line a word starts on: skip the blanks and comments shlex will skip.
        start = SKIPPED.match(text, lexer.instream.tell()).end()
        line = text.count("\n", 0, start) + 1
        try:
            word = lexer.get_token()
        except ValueError as err:
            raise ConfigError("%s line %d: %s" % (path, line, str(err).lower()))
        if word is None or word == lexer.eof:
            return values
        if word == "export":
            continue
        name, sep, value = word.partition("=")
        if not sep:
            # Never echo a word of a line that sets the secret: it may be part of it.
            line_text = text.split("\n")[line - 1] if line <= text.count("\n") + 1 else ""
            shown = ("(not shown: a secret line)" if "SECRET" in line_text or "SECRET" in word
                     else "%r" % word)
            raise ConfigError("%s line %d: expected SYNCHOOK_NAME=value, got %s (quote a value "
                              "with spaces)" % (path, line, shown))
        if name not in OPTION_BY_ENV or name == "SYNCHOOK_CONFIG":
            # A secret with a space in it, unquoted, makes its second word look like
            # a setting: never echo anything of a line that sets the secret.
            line_text = text.split("\n")[line - 1] if line <= text.count("\n") + 1 else ""
            shown = "(not shown: a secret line)" if "SECRET" in line_text else name
            raise ConfigError("%s line %d: unknown setting %s (quote a value with spaces)"
                              % (path, line, shown))
        values[name] = (value, "%s line %d: %s" % (path, line, name))


SKIPPED = re.compile(r"(?:\s+|#[^\n]*)*")


def merge_settings(old, given, unset=(), reset=False):
    """The settings a config file gets when `given` ({SYNCHOOK_NAME: value}) is
    laid over the `old` file's, for install.sh and configure alike: reset forgets
    the old ones, names in unset are dropped.  A secret given to a file whose
    --allow is 'none' (a package's closed start) opens it: the secret guards the
    hook from now on.  Returns (settings in OPTIONS order, changes in words)."""
    keep = {} if reset else dict(old)
    final, changes = collections.OrderedDict(), []
    if keep.get("SYNCHOOK_ALLOW", "").strip() == "none" and "SYNCHOOK_ALLOW" not in given \
            and (given.get("SYNCHOOK_SECRET") or given.get("SYNCHOOK_SECRET_FILE")):
        del keep["SYNCHOOK_ALLOW"]
        changes.append("dropped SYNCHOOK_ALLOW=none: the secret guards the hook now")
        old = {name: value for name, value in old.items() if name != "SYNCHOOK_ALLOW"}
    for opt in OPTIONS:
        name = opt.env
        if name in unset:
            if name in old:
                changes.append("dropped %s (--unset)" % name)
        elif name in given:
            final[name] = given[name]
            if name not in old:
                changes.append("set %s" % name)
            elif old[name] != given[name]:
                changes.append("changed %s" % name)
        elif name in keep:
            final[name] = keep[name]
        elif name in old:
            changes.append("dropped %s (--reset)" % name)
    return final, changes


def config_text(settings, writer):
    """A --config file holding settings, one sh-quoted line each."""
    lines = ["# synchook settings, read by synchook --config (parsed with sh quoting, never run).",
             "# Written by %s; see synchook --help for every SYNCHOOK_* name." % writer]
    lines += ["%s='%s'" % (name, value.replace("'", "'\\''"))
              for name, value in settings.items()]
    return "\n".join(lines) + "\n"


class Config:
    """The resolved settings, plain attributes; `origin` says where each came from."""

    def __init__(self):
        self.origin = {}
        self.secret_from_flag = False


# Settings that, set but empty, would quietly open the door: refused instead.
MUST_NOT_BE_EMPTY = {
    "secret": "let anyone in without a secret",
    "secret_file": "name no file",
    "allow": "let anyone connect",
    "tls_cert": "name no certificate",
    "tls_key": "name no key",
}


def resolve_config(args, environ=None, check_files=True, check_freeze=True):
    """The settings from flags, environment, --config file and defaults.
    check_files=False (check --parse-only) checks syntax and values alone;
    check_freeze=False (the tools) leaves the freeze plan to the caller."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    config_path = args.config if args.config is not None else environ.get("SYNCHOOK_CONFIG", "")
    if config_path and check_files:
        check_trusted(config_path, "--config")
    from_file = read_config_file(config_path) if config_path else {}
    for opt in OPTIONS:
        flag_value = getattr(args, opt.name)
        if flag_value is not None:
            raw, origin = flag_value, opt.flag
        elif opt.env in environ:
            raw, origin = environ[opt.env], opt.env
        elif opt.env in from_file:
            raw, origin = from_file[opt.env]
        else:
            raw, origin = opt.default, None
        if raw is None:
            raw = default_runtime_dir()
        if origin is not None and opt.name in MUST_NOT_BE_EMPTY and not raw.strip(", \t\r\n"):
            raise ConfigError("%s is set but empty, which would %s; unset it or give a value"
                              % (origin, MUST_NOT_BE_EMPTY[opt.name]))
        if origin is not None and opt.name == "secret" and not visible(raw):
            raise ConfigError("%s has no visible character (only white space or control "
                              "characters): give a secret one can type" % origin)
        try:
            value = opt.parse(raw)
        except ConfigError as err:
            where = origin or "default of %s" % opt.flag
            raise ConfigError("%s %s: %s" % (where, raw if origin == opt.flag else repr(raw), err))
        setattr(cfg, opt.name, value)
        cfg.origin[opt.name] = origin
    cfg.config = config_path
    cfg.secret_from_flag = args.secret is not None
    finish_config(cfg, check_files, check_freeze)
    return cfg


def check_freezing(cfg):
    """--freeze as a start needs it: root, and a plan that freezes something."""
    if os.geteuid() != 0:
        raise ConfigError("--freeze needs root (FIFREEZE and FITHAW need CAP_SYS_ADMIN): run "
                          "synchook as root, or leave --freeze out")
    check_freeze_plan(cfg)


def check_freeze_plan(cfg):
    """A freeze that would freeze nothing is refused at start: XO would take
    the unfrozen snapshot for a consistent one."""
    under = cfg.freeze_under
    if under:
        absolute = os.path.abspath(under)
        if not os.path.isdir(absolute):
            raise ConfigError("--freeze-under %s: no such directory" % under)
        if os.path.realpath(absolute) != absolute:
            raise ConfigError("--freeze-under %s: goes through a symbolic link (it is %s): give "
                              "the real path" % (under, os.path.realpath(absolute)))
        under = absolute
    mounts = read_mounts()
    plan, skipped = freeze_plan(mounts, cfg.freeze, under)
    if cfg.freeze == "all":
        if not plan:
            raise ConfigError("--freeze all%s: nothing to freeze (no local filesystem with a "
                              "block device there; see /proc/self/mountinfo)"
                              % (" --freeze-under %s" % under if under else ""))
        return
    for point, why in skipped:
        raise ConfigError("--freeze %s: %s (see /proc/self/mountinfo)" % (point, why))
    for mount in plan:
        why = cannot_freeze(mount)
        if why:
            raise ConfigError("--freeze %s: cannot be frozen (%s)" % (mount.point, why))


def freezes_root(cfg):
    """Does --freeze freeze / ?"""
    if cfg.freeze == "all":
        return cfg.freeze_under in ("", "/")
    return "/" in cfg.freeze


def read_secret_file(path):
    """The secret in a file, one trailing newline stripped; ConfigError if unusable."""
    try:
        data = read_regular(path, 4096)
    except OSError as err:
        raise ConfigError("--secret-file %s: %s" % (path, err.strerror))
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data.strip():
        raise ConfigError("--secret-file %s: %s" % (path, "file holds only white space"
                                                    if data else "file is empty"))
    secret = data.decode("utf-8", "surrogateescape")
    if not visible(secret):
        raise ConfigError("--secret-file %s: holds no visible character (only white space or "
                          "control characters)" % path)
    return secret


def visible(text):
    """Does text have a character one can see (\\v, \\f and \\x1c-\\x1f are no more
    a secret than a space)?"""
    return any(char.isprintable() and not char.isspace() for char in text)


def finish_config(cfg, check_files=True, check_freeze=True):
    """Checks that span several settings, and files that must be readable now."""
    if cfg.secret and cfg.secret_file:
        raise ConfigError("--secret and --secret-file are both set; choose one")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
    if not check_files:
        return
    if cfg.secret_file:
        check_trusted(cfg.secret_file, "--secret-file")
        cfg.secret = read_secret_file(cfg.secret_file)
    for name in ("tls_cert", "tls_key"):
        path = getattr(cfg, name)
        if path and not os.access(path, os.R_OK):
            raise ConfigError("--%s %s: cannot read the file" % (name.replace("_", "-"), path))
    if cfg.tls_key:
        check_trusted(cfg.tls_key, "--tls-key")
    if cfg.tls == "on" and ssl is None:
        raise ConfigError("--tls on: this Python has no ssl module")
    if cfg.hooks_dir and not os.path.isdir(cfg.hooks_dir):
        raise ConfigError("--hooks-dir %s: not a directory" % cfg.hooks_dir)
    if cfg.hooks_dir:
        check_trusted(cfg.hooks_dir, "--hooks-dir")
    if cfg.freeze_under and cfg.freeze != "all":
        raise ConfigError("--freeze-under %s: goes with --freeze all" % cfg.freeze_under)
    if cfg.freeze and check_freeze:
        check_freezing(cfg)
    if cfg.freeze and cfg.origin.get("max_hold") is None and freezes_root(cfg):
        cfg.max_hold = ROOT_MAX_HOLD
    # The daemon works from / (it must not keep a mount busy): paths become absolute.
    for name in ("tls_cert", "tls_key", "hooks_dir", "runtime_dir", "state_dir", "freeze_under"):
        if getattr(cfg, name):
            setattr(cfg, name, os.path.abspath(getattr(cfg, name)))


# ---------------------------------------------------------------------------
# Running commands: own process group, bounded time, bounded output
# ---------------------------------------------------------------------------

class WakePipe:
    """A non-blocking pipe that wakes whoever polls its read end: poke() is
    safe from any thread and from a signal handler; drain() re-arms it."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def poke(self):
        try:
            os.write(self.write_fd, b"\0")
        except OSError:                 # full: whoever polls is awake already
            pass

    def drain(self):
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass

    def fileno(self):
        return self.read_fd


class Canceller(WakePipe):
    """An event that also wakes a poll(): /post-sync cuts a sync command short."""

    def __init__(self):
        WakePipe.__init__(self)
        self.flag = False

    def set(self):
        self.flag = True
        self.poke()

    def clear(self):
        """Callers hold the window's lock, as set()'s callers do: a flag seen
        clear means an empty pipe."""
        if self.flag:
            self.flag = False
            self.drain()

    def is_set(self):
        return self.flag


class Result:
    """What one step (command, hook or hold) did.  `started` is False when the
    step could not even begin (no descriptor, no fork): a post step that did
    not start is still owed."""

    def __init__(self, label, ok, reason, code=None, duration=0.0, started=True):
        self.label, self.ok, self.reason, self.code = label, ok, reason, code
        self.duration = duration
        self.started = started
        self.at = time.time()

    def as_dict(self):
        return {"step": self.label, "ok": self.ok, "reason": self.reason,
                "exit": self.code, "duration": round(self.duration, 3), "at": iso(self.at)}


class OutputLogger:
    """Splits a command's output into log lines, bounded in length and number."""

    def __init__(self, label):
        self.label = label
        self.partial = b""
        self.skipping = False      # inside an over-long line
        self.lines = 0
        self.suppressed = 0

    def feed(self, buffer, size=None):
        """The first size bytes (default: all) of buffer, bytes or a reused
        bytearray: past the cap, counted where they are, copied nowhere."""
        if size is None:
            size = len(buffer)
        if self.lines >= MAX_OUTPUT_LINES and not self.skipping:
            # Past the cap only the count matters: counted in C, not line by line
            # (10 MB of `yes` cost 400 ms of CPU the other way).
            newlines = buffer.count(b"\n", 0, size)
            if newlines:
                self.suppressed += newlines
                last = buffer.rfind(b"\n", 0, size) + 1
                self.partial = bytes(buffer[last:min(last + 1, size)])
            elif not self.partial:
                self.partial = bytes(buffer[:1])
            return
        self._split(bytes(buffer[:size]))

    def _split(self, chunk):
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            if not self.skipping:                  # else: the rest of a line logged cut
                self._line(self.partial + piece)
            self.partial, self.skipping = b"", False
        tail = pieces[-1]
        if self.skipping:
            return
        self.partial += tail
        if len(self.partial) > MAX_OUTPUT_LINE:
            self._line(self.partial, cut=True)
            self.partial, self.skipping = b"", True

    def _line(self, data, cut=False):
        if cut and not data:
            return
        if self.lines >= MAX_OUTPUT_LINES:
            self.suppressed += 1
            return
        self.lines += 1
        text = data[:MAX_OUTPUT_LINE].rstrip(b"\r").decode("utf-8", "replace")
        log.info("%s| %s%s", self.label, text, " [line cut]" if cut else "")

    def close(self):
        if self.partial:
            self._line(self.partial)
        self.partial = b""
        if self.suppressed:
            log.info("%s| (%d more output lines not logged)", self.label, self.suppressed)


def group_gone(pgid, wait, child=None):
    """Wait up to `wait` seconds for every member of the group to be gone.

    A member that is a zombie is gone: an orphan (the shell died before its
    `sleep`) is reaped by pid 1 when pid 1 gets to it, which took up to 2 s
    here, and waiting for that made a /post-sync that cut a sync phase short
    miss XO's timeout.  child: our own Popen in the group, reaped meanwhile
    (or the group never empties)."""
    deadline = time.monotonic() + wait
    while True:
        if child is not None:
            child.poll()
        try:
            os.killpg(pgid, 0)
        except OSError:
            return True
        if not group_members(pgid):        # zombies only
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def end_group(pgid, kill_wait, child=None, label="process group"):
    """SIGTERM a process group, SIGKILL it after TERM_GRACE; True once it is
    gone.  The one way synchook ends a group: a command's own (end_process_group),
    or one a dead run left behind (its recovery)."""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except OSError as err:
            log.warning("%s: cannot signal process group %d: %s", label, pgid, err.strerror)
            return False
        if group_gone(pgid, wait, child):
            return True
    return False


def end_process_group(proc, label):
    """End a command's group (a new session: its group id is its pid); never
    wait forever for the reap."""
    end_group(proc.pid, KILL_WAIT, proc, label)
    try:
        proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        # Stuck in the kernel (a write to a frozen filesystem?): leave it, the
        # request must not wait for it.  The next spawn reaps it.
        PROCESS.abandoned.append(proc)
        log.error("%s: process %d did not exit after SIGKILL; leaving it", label, proc.pid)


def describe_exit(code):
    if code == 0:
        return "ok"
    if code == 127:
        return "command not found"
    if code == 126:
        return "command not executable (exit 126)"
    if code is not None and code < 0:
        return "command killed by signal %d" % -code
    return "command failed (exit %s)" % code


class CannotStart(Exception):
    """A command could not be started for want of a resource (a descriptor, a
    process, /dev/null), not because of the command: worth trying again."""


# exec() errors that are the command's own fault: trying again will not help.
EXEC_ERRORS = {
    errno.ENOENT: "command not found",
    errno.ENOTDIR: "command not found",
    errno.EACCES: "command not executable",
    errno.EPERM: "command not executable",
    errno.ENOEXEC: "command not executable (exec format error)",
    errno.ELOOP: "command not executable (too many symbolic links)",
    errno.ENAMETOOLONG: "command not found (name too long)",
    errno.E2BIG: "command not started (arguments and environment too large)",
}


class Child:
    """A command started by os.posix_spawn: the part of subprocess.Popen that
    synchook uses (pid, poll, wait, returncode, stdin), for a pid of our own."""

    def __init__(self, pid, argv):
        self.pid = pid
        self.args = argv
        self.returncode = None
        self.stdin = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:        # reaped elsewhere: no status to tell
                pid, status = self.pid, 255 << 8
            if pid:
                self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                   else os.WEXITSTATUS(status))
        return self.returncode

    def wait(self, timeout):
        """Popen.wait's polling, with its TimeoutExpired."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return self.returncode


# Commands are started with os.posix_spawn where Python has it (3.8+): a vfork
# and an exec, without subprocess's Python around them (tens of microseconds
# on each /sync).  It closes no descriptor: every descriptor synchook opens is
# close-on-exec (PEP 446), and those it inherited are made so at start
# (prepare_for_commands).  Python 3.6/3.7, a libc without setsid for
# posix_spawn, or no /proc to find inherited descriptors: subprocess.Popen.
class Process:
    """What this process learns once and its commands are started with: set
    at start (main, lower_oom_score, forbid_core_dumps) or at the first need,
    read each time a command starts.  One object, PROCESS."""

    def __init__(self):
        self.program = os.path.abspath(__file__)  # what the guardian runs (main: from argv)
        self.use_posix_spawn = hasattr(os, "posix_spawn")
        self.dev_null = None              # /dev/null, the commands' stdin, once it could be opened
        self.command_oom_score = None     # the oom_score_adj commands get, if synchook lowered its own
        self.command_core_limit = None    # RLIMIT_CORE commands get, if synchook changed its own
        self.abandoned = []               # children that outlived SIGKILL: reaped later


PROCESS = Process()


def give_core_limit(pid):
    """A command's RLIMIT_CORE back to what synchook had (forbid_core_dumps),
    as soon as it is started (posix_spawn cannot set a limit: a command that
    crashed in its first few microseconds would dump no core)."""
    try:
        resource.prlimit(pid, resource.RLIMIT_CORE, PROCESS.command_core_limit)
    except OSError:
        pass                             # gone already


def dev_null():
    """/dev/null, opened once for all commands (CannotStart while it cannot be)."""
    if PROCESS.dev_null is None:
        try:
            PROCESS.dev_null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise CannotStart("cannot open %s: %s" % (os.devnull, err.strerror))
    return PROCESS.dev_null


def prepare_for_commands():
    """Before the first command: cwd / (no mount kept busy, and the commands'
    cwd); SIGCHLD to its default (an ignored SIGCHLD, inherited from whoever
    started us, would make every exit status vanish); and every inherited
    descriptor above 2 close-on-exec, so that posix_spawn passes commands
    nothing but their stdin, stdout and stderr (as Popen's close_fds does)."""
    os.chdir("/")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    reset_ignored_signals()
    try:
        dev_null()                           # else the first command opens it
    except CannotStart:
        pass
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        PROCESS.use_posix_spawn = False
        return
    for name in names:
        if int(name) > 2:
            try:
                os.set_inheritable(int(name), False)
            except OSError:                  # listdir's own descriptor, closed now
                pass


# Ignored signals stay ignored across exec: these are left as they came (Python
# sets SIGPIPE and SIGXFSZ, and each command gets them back at their defaults;
# job control's must not stop a daemon started in the background).
KEEP_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTTIN, signal.SIGTTOU,
                signal.SIGTSTP, signal.SIGKILL, signal.SIGSTOP)


def reset_ignored_signals():
    """Signals that whoever started us ignored (SIGINT and SIGQUIT for a
    background job of a shell, SIGHUP under nohup) back to their defaults,
    so that no command inherits them ignored; the daemon's own handlers are
    installed after this (and are reset to defaults by exec)."""
    for number in range(1, 32):
        if number in KEEP_IGNORED:
            continue
        try:
            if signal.getsignal(number) == signal.SIG_IGN:
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass


def start_process(argv, env, stdin, output, stdout=None):
    """argv started in a new session (its own process group, no terminal),
    stdin and stdout+stderr on the given descriptors (stdout on its own if
    given), cwd the daemon's (/)."""
    stdout = output if stdout is None else stdout
    if PROCESS.use_posix_spawn:
        actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),  # novermin
                   (os.POSIX_SPAWN_DUP2, output, 2)]  # novermin
        try:
            # Python ignores SIGPIPE and SIGXFSZ; a command gets the defaults, as
            # Popen gives them, and no blocked signal.  (glibc leaves its own
            # internal signals, 32 and 33, ignored: programs that use them set
            # their handlers.)
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions,  # novermin
                                 setsid=True, setsigmask=(),
                                 setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
            return Child(pid, argv)
        except NotImplementedError:          # no POSIX_SPAWN_SETSID in this libc
            PROCESS.use_posix_spawn = False
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=output, env=env,
                            cwd="/", start_new_session=True, close_fds=True)


def reap_abandoned():
    for proc in list(PROCESS.abandoned):
        if proc.poll() is not None:
            PROCESS.abandoned.remove(proc)


def spawn(argv, env, hold=False):
    """Start argv in a new session (its own process group) with stdout and
    stderr on one pipe; returns (proc, read end of that pipe).  proc.start_ticks
    is the range of boot clock ticks in which it started (for the marker).

    Each resource is taken here, one at a time, so that a failure names its
    real cause: CannotStart for a missing /dev/null, no descriptor or no fork;
    OSError (errno in EXEC_ERRORS) when exec() refused argv[0] itself.  With
    hold=True, stdin is a pipe (proc.stdin, unbuffered) instead of /dev/null.
    """
    reap_abandoned()
    stdin = stdin_end = read_end = write_end = None
    try:
        null = None if hold else dev_null()     # /dev/null first: its error is the real one
        try:
            if hold:
                stdin, stdin_end = os.pipe()
            read_end, write_end = os.pipe()
        except OSError as err:
            raise CannotStart("cannot create a pipe: %s" % err.strerror)
        first = boot_ticks()
        try:
            proc = start_process(argv, env, stdin if hold else null, write_end)
        except OSError as err:
            if err.errno in EXEC_ERRORS and argv[0] != SHELL:
                raise
            if err.errno in EXEC_ERRORS:
                raise CannotStart("cannot run %s: %s" % (SHELL, err.strerror))
            if err.errno in (errno.EMFILE, errno.ENFILE):
                raise CannotStart("cannot create a pipe: %s" % err.strerror)
            raise CannotStart("fork: %s" % err.strerror)
        proc.start_ticks = (first, boot_ticks())
        if PROCESS.command_oom_score is not None:
            set_oom_score(PROCESS.command_oom_score, proc.pid)
        if PROCESS.command_core_limit is not None:
            give_core_limit(proc.pid)
        if hold:
            proc.stdin, stdin_end = open(stdin_end, "wb", buffering=0), None
    except BaseException:
        for fd in (read_end, stdin_end):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (stdin, write_end):
            if fd is not None:
                os.close(fd)
    return proc, read_end


def open_pidfd(pid):
    """A descriptor that becomes readable when pid exits (Linux 5.3+, Python 3.9+),
    so waiting for a command needs no polling; None where unsupported."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)  # novermin
    except OSError:
        return None


def wait_ready(readers, timeout, writers=()):
    """The descriptors (or objects with fileno()) among readers and writers that
    are ready within timeout seconds, as a set of ints.

    poll(), never select(): a busy server has descriptors above 1024, which
    select() cannot watch, and poll() needs no descriptor of its own.
    """
    poller = select.poll()
    for obj in readers:
        poller.register(obj, select.POLLIN)
    for obj in writers:
        poller.register(obj, select.POLLOUT)
    millis = int(max(0.0, timeout) * 1000 + 0.999)
    log.wake_writer()                # this thread waits: the writer's turn (Log.defer)
    try:
        return {fd for fd, _ in poller.poll(millis)}
    except InterruptedError:         # a signal: the caller's loop looks again
        return set()


def follow(proc, fd, deadline, cancel, output, label):
    """Log proc's output (read from fd) until it exits; returns None, "timeout"
    or "cancel".

    Once the child has exited, its output is drained for DRAIN_GRACE at most:
    a grandchild that inherited stdout must not hold the request.
    """
    pidfd = open_pidfd(proc.pid)
    eof = False
    buffer = None                    # output is read into it (see OUTPUT_CHUNK)
    exited_at = None
    delay = 0.0005                   # polling for the exit, where there is no pidfd
    try:
        while True:
            if cancel is not None and cancel.is_set():
                return "cancel"
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if proc.poll() is not None:
                exited_at = exited_at or now
                if eof or now - exited_at >= DRAIN_GRACE:
                    if not eof:
                        log.debug("%s: exited, but something still holds its output open", label)
                    return None
            watched = [] if cancel is None else [cancel]
            if not eof:
                watched.append(fd)
            wait = deadline - now
            if exited_at is not None:
                wait = min(wait, DRAIN_GRACE - (now - exited_at))
            elif pidfd is not None:
                watched.append(pidfd)
            elif eof:
                wait, delay = min(wait, delay), min(delay * 2, POLL)
            else:
                wait = min(wait, POLL)
            if fd in wait_ready(watched, wait) and not eof:
                if buffer is None:
                    buffer = bytearray(OUTPUT_CHUNK)
                size = os.readv(fd, [buffer])
                if size:
                    output.feed(buffer, size)
                else:
                    eof = True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def run_command(argv, label, env, timeout, cancel=None, on_start=None):
    """Run argv to completion, logging its output; return a Result.

    Ends the whole process group on timeout or cancel.  A grandchild that
    keeps stdout open does not hold us up once the child itself has exited.
    on_start(proc) is called as soon as the process exists (the window records
    its process group in the marker).
    """
    started = time.monotonic()
    log.info("%s: started", label)
    try:
        proc, fd = spawn(argv, env)
    except CannotStart as err:
        log.error("%s: not started: %s", label, err)
        return Result(label, False, str(err), None, time.monotonic() - started, started=False)
    except OSError as err:
        reason = EXEC_ERRORS[err.errno]
        log.warning("%s: %s: %s", label, reason, argv[0])
        return Result(label, False, reason, None, time.monotonic() - started)
    output = OutputLogger(label)
    try:
        if on_start is not None:
            on_start(proc)
        ended = follow(proc, fd, started + timeout, cancel, output, label)
    except BaseException:
        end_process_group(proc, label)
        raise
    finally:
        output.close()
        os.close(fd)
    if ended:
        end_process_group(proc, label)
    duration = time.monotonic() - started
    if ended == "timeout":
        reason = "command timed out after %s s" % seconds(timeout)
        log.warning("%s: %s; process group ended", label, reason)
        return Result(label, False, reason, None, duration)
    if ended == "cancel":
        reason = "command ended early: /post-sync arrived"
        log.warning("%s: %s", label, reason)
        return Result(label, False, reason, None, duration)
    code = proc.returncode
    reason = describe_exit(code)
    if code == 0:
        log.info("%s: exit 0 in %.3f s", label, duration)
    else:
        log.warning("%s: %s in %.3f s", label, reason, duration)
    return Result(label, code == 0, "ok" if code == 0 else reason, code, duration)


class Hold:
    """A command that holds something (a database lock) for the whole window.

    Ready when it prints its first line; told to let go by closing its stdin,
    which also happens by itself if synchook dies.
    """

    def __init__(self, command):
        self.command = command
        self.proc = None
        self.fd = None                 # read end of its output
        self.reader = None

    def start(self, env, timeout, cancel, on_start=None):
        label = "hold"
        started = time.monotonic()
        log.info("hold: started")
        try:
            self.proc, self.fd = spawn([SHELL, "-c", self.command], env, hold=True)
        except CannotStart as err:
            log.error("hold: not started: %s", err)
            return Result(label, False, str(err), None, 0.0, started=False)
        if on_start is not None:
            on_start(self.proc)
        output = OutputLogger(label)
        deadline = started + timeout
        buffered = b""
        failure = None
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if cancel.is_set():
                failure = "hold command ended early: /post-sync arrived"
            elif remaining <= 0:
                failure = "hold command not ready after %s s" % seconds(timeout)
            if failure:
                break
            if self.fd in wait_ready([self.fd, cancel], min(remaining, POLL)):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    try:
                        self.proc.wait(KILL_WAIT)
                        failure = "hold command exited before it was ready (%s)" % (
                            describe_exit(self.proc.returncode))
                    except subprocess.TimeoutExpired:
                        failure = "hold command closed its output before it was ready"
                    break
                buffered += chunk
                output.feed(chunk)
        duration = time.monotonic() - started
        if failure:
            output.close()
            log.warning("hold: %s", failure)
            self.end()
            return Result(label, False, failure, None, duration)
        log.info("hold: ready in %.3f s", duration)
        self.reader = threading.Thread(target=self._drain, args=(self.fd, output),
                                       name="hold-output", daemon=True)
        self.reader.start()
        return Result(label, True, "ok", None, duration)

    @staticmethod
    def _drain(fd, output):
        """Log the hold's output until its end; the descriptor is this thread's
        to close (a grandchild may keep the pipe open after the hold ended)."""
        try:
            for chunk in iter(lambda: os.read(fd, 65536), b""):
                output.feed(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)
        output.close()

    def end(self):
        """Close stdin, wait briefly, then end the group.  Returns a Result or None.

        Needs no new descriptor and no fork: releasing a hold always starts.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        started = time.monotonic()
        early = proc.poll()
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(HOLD_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("hold: still running %s s after its stdin closed; ending it",
                        seconds(HOLD_GRACE))
        end_process_group(proc, "hold")
        reader, fd, self.reader, self.fd = self.reader, self.fd, None, None
        if reader is not None:
            reader.join(1.0)
        elif fd is not None:
            os.close(fd)
        duration = time.monotonic() - started
        if early is not None:
            reason = "hold command had ended during the window (%s)" % describe_exit(early)
            log.warning("hold: %s", reason)
            return Result("hold", False, reason, early, duration)
        log.info("hold: released in %.3f s", duration)
        return Result("hold", True, "ok", proc.returncode, duration)


def list_hooks(directory):
    """Executable hooks in name order, and (unsafe, reason) for each file skipped.

    Leftover and odd names are skipped quietly; unsafe ownership or modes are
    worth a warning (as root, a hook a user could write is a way to root).
    """
    hooks, skipped = [], []
    if not directory:
        return hooks, skipped
    try:
        names = sorted(os.listdir(directory))
    except OSError as err:
        return hooks, [(True, "%s: cannot read: %s" % (directory, err.strerror))]
    root = os.geteuid() == 0
    problem = untrusted(directory) if root else None
    if problem:
        return hooks, [(True, "%s: not trusted, no hook in it runs: %s" % (directory, problem))]
    for name in names:
        path = os.path.join(directory, name)
        if not HOOK_NAME.match(name) or HOOK_LEFTOVER.search(name):
            skipped.append((False, "%s: name skipped (hidden, leftover or not [A-Za-z0-9_.-])"
                            % path))
            continue
        try:
            st = os.stat(path)
        except OSError as err:
            skipped.append((True, "%s: %s" % (path, err.strerror)))
            continue
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
            skipped.append((False, "%s: not an executable regular file" % path))
            continue
        if root and (st.st_uid != 0 or st.st_mode & 0o022):
            skipped.append((True, "%s: not owned by root or writable by group/others" % path))
            continue
        hooks.append(path)
    return hooks, skipped


class Phases:
    """The steps of a window, shared by the daemon and `check`.

    sync phase: hold, hooks (name order), --sync, then the freeze; a failed
    step skips the commands after it, never the freeze (XO snapshots anyway:
    the freeze is the safety net), unless --skip-freeze-on-failure.
    post phase: thaw, --post-sync, hooks (reverse order), end of the hold; all run.
    """

    def __init__(self, cfg, freezing=True):
        self.cfg = cfg
        self.timeout = cfg.timeout
        self.hold = Hold(cfg.hold) if cfg.hold else None
        self.freezer = Freezer(cfg.freeze, cfg.freeze_under) if cfg.freeze else None
        self.freezing = freezing          # `check` lists what it would freeze, freezes nothing
        # The daemon's own environment does not change: copied once, as the
        # bytes exec() takes (os.environ would decode it, spawning encode it).
        self.base_env = {name: value for name, value in os.environb.items()
                         if name != b"SYNCHOOK_SECRET" and
                         not name.startswith(GUARDIAN_ENV_PREFIX)}

    def for_recovery(self, freezer, timeout):
        """These steps as a recovery runs a dead run's post plan: its freeze
        (what the marker names), its timeout, no hold of ours."""
        phases = Phases.__new__(Phases)
        phases.__dict__.update(self.__dict__)
        phases.freezer, phases.timeout, phases.hold = freezer, timeout, None
        return phases

    def sync_budget(self, plan):
        """The longest the sync phase of a window with this post plan can
        take: each of its commands' timeout, and one more for the freeze."""
        hooks = sum(1 for label, _ in plan if label.startswith("post-sync hook "))
        return (hooks + bool(self.hold) + bool(self.cfg.sync) + 1) * self.timeout

    def env(self, phase, client, sync_result=None):
        """A command's environment: synchook's own, less the secret, plus the
        phase, the client and, in the post phase, how the sync phase went
        (ok, failed, none: no window was open, unknown: a recovery), as
        VMware tells its post-thaw scripts about a freeze that failed."""
        env = dict(self.base_env)
        env[b"SYNCHOOK_PHASE"] = phase.encode()
        env[b"SYNCHOOK_CLIENT"] = client.encode()
        if sync_result is not None:
            env[b"SYNCHOOK_SYNC_RESULT"] = sync_result.encode()
        return env

    def hooks(self):
        hooks, skipped = list_hooks(self.cfg.hooks_dir)
        for unsafe, reason in skipped:
            (log.warning if unsafe else log.debug)("hooks dir: %s", reason)
        return hooks

    def sync_phase(self, client, cancel, marker=None):
        """The sync phase's steps; marker (the window's) records each process
        group and each filesystem about to be frozen."""
        env = self.env("sync", client)
        on_start = marker.add_group if marker is not None else None
        steps = []
        if self.hold is not None:
            steps.append(self.hold.start(env, self.timeout, cancel, on_start))
        for path in ([] if steps and not steps[-1].ok else self.hooks()):
            steps.append(run_command([path, self.cfg.hook_words[0]],
                                     "sync hook %s" % os.path.basename(path),
                                     env, self.timeout, cancel, on_start))
            if not steps[-1].ok:
                break
        if self.cfg.sync and all(step.ok for step in steps):
            steps.append(run_command([SHELL, "-c", self.cfg.sync], "sync", env,
                                     self.timeout, cancel, on_start))
        if self.freezer is None or not self.freezing:
            return steps
        failed = [step.label for step in steps if not step.ok]
        if cancel.is_set():
            steps.append(Result("freeze", False, "not frozen: /post-sync arrived"))
        elif failed and self.cfg.skip_freeze_on_failure:
            log.warning("freeze skipped: %s failed (--skip-freeze-on-failure)", failed[0])
            steps.append(Result("freeze", False, "not frozen: %s failed "
                                "(--skip-freeze-on-failure)" % failed[0]))
        else:
            if failed:
                log.warning("%s failed: freezing all the same (XO snapshots anyway)", failed[0])
            steps.append(self.freezer.freeze(marker))     # last: nothing runs after
        return steps

    def post_plan(self):
        """The post phase's steps as (label, argv); argv None is the hold's end.

        Fixed when a window's post phase first starts, so that a retry runs
        exactly the steps that could not start, in the same order.
        """
        plan = []
        if self.freezer:
            plan.append(("thaw", None))       # first, in this process: nothing can delay it
        if self.cfg.post_sync:
            plan.append(("post-sync", [SHELL, "-c", self.cfg.post_sync]))
        for path in reversed(self.hooks()):
            plan.append(("post-sync hook %s" % os.path.basename(path),
                         [path, self.cfg.hook_words[1]]))
        if self.hold is not None:
            plan.append(("hold", None))
        return plan

    def run_post_steps(self, plan, client, sync_result, on_start=None):
        """Run plan's steps in order until one cannot start.

        Returns (results, rest): rest is what is still owed: a thaw not
        verified (the steps after it run all the same), then the step that
        could not start and those after it ([] when all is done).
        on_start(label, proc) is told of each command's process.
        """
        env = None                        # made at the first command: after the thaw
        results, owed = [], []
        for index, (label, argv) in enumerate(plan):
            try:
                # A recovery's plan comes from the marker: its thaw and its
                # hold may belong to a dead run (already done by then).
                if label == "thaw":
                    result = self.freezer.thaw() if self.freezer else None
                elif argv is None:
                    result = self.hold.end() if self.hold else None
                else:
                    if env is None:
                        env = self.env("post-sync", client, sync_result)
                    started = None if on_start is None else (
                        lambda proc, label=label: on_start(label, proc))
                    result = run_command(argv, label, env, self.timeout, None, started)
            except Exception as err:       # noqa: BLE001 (a bug must not cost the thaw)
                log.error("%s: internal error: %r", label, err)
                result = Result(label, False, "internal error: %r" % (err,), started=False)
            if result is None:
                continue
            results.append(result)
            if not result.started and label == "thaw":
                owed.append((label, argv))
            elif not result.started:
                return results, owed + plan[index:]
        return results, owed

    def post_phase(self, client, sync_result="none"):
        """The whole post phase once, for `check` and a /post-sync with no window."""
        return self.run_post_steps(self.post_plan(), client, sync_result)


def phase_answer(steps):
    """(HTTP status, body) for a phase: the first failed step's reason, or Ok."""
    for step in steps:
        if not step.ok:
            prefix = "" if step.label in ("sync", "post-sync", "hold", "freeze",
                                          "thaw") else step.label + ": "
            return 500, prefix + step.reason
    return 200, "Ok"


# ---------------------------------------------------------------------------
# Freezing filesystems: FIFREEZE and FITHAW, the way qemu-guest-agent does it
# ---------------------------------------------------------------------------

FIFREEZE = 0xC0045877              # _IOWR('X', 119, int)
FITHAW = 0xC0045878                # _IOWR('X', 120, int)
MOUNTINFO = "/proc/self/mountinfo"
# Never frozen by --freeze all: no block device of their own, remote, or read-only images.
SKIPPED_FS = {
    "autofs", "binfmt_misc", "bpf", "ceph", "cgroup", "cgroup2", "cifs", "configfs",
    "debugfs", "devpts", "devtmpfs", "efivarfs", "glusterfs", "hugetlbfs", "iso9660",
    "mqueue", "nfs", "nfs4", "nsfs", "overlay", "proc", "pstore", "ramfs", "rpc_pipefs",
    "securityfs", "smb3", "smbfs", "squashfs", "sysfs", "tmpfs", "tracefs", "virtiofs",
    "9p", "zfs"}

# device: the filesystem's st_dev as mountinfo gives it; mount_id: the mount's own id
# (one filesystem may be mounted, or bind-mounted, at several points).
Mount = collections.namedtuple("Mount", "point fstype source device mount_id")


def unescape_mount(text):
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def parse_mountinfo(text):
    """The mounts of a /proc/PID/mountinfo text, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(Mount(unescape_mount(fields[4]), fields[dash + 1],
                                unescape_mount(fields[dash + 2]),
                                os.makedev(int(major), int(minor)), int(fields[0])))
        except (ValueError, IndexError):
            continue
    return mounts


def read_mounts():
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as handle:
            return parse_mountinfo(handle.read())
    except OSError:
        return []


def below(point, under):
    """Is mount point `point` at or below directory `under`?"""
    under = under.rstrip("/") or "/"
    return under == "/" or point == under or point.startswith(under + "/")


def cannot_freeze(mount):
    """Why mount is known not to freeze (FIFREEZE would fail), or None."""
    if mount.fstype in SKIPPED_FS or mount.fstype.startswith("fuse"):
        return "%s: virtual, remote or read-only" % mount.fstype
    if not mount.source.startswith("/dev/"):
        return "%s from %s: no block device" % (mount.fstype, mount.source)
    return None


def freeze_plan(mounts, wanted, under=""):
    """What a freeze would do: ([Mount to freeze, in order], [(point, why skipped)]).

    wanted is "all" (every local filesystem with a block device, as
    qemu-guest-agent picks them) or a list of mount points.  The order is the
    reverse of mount order: a mount before the filesystem it sits on.  Of two
    mounts on one point only the top one is visible, and kept.
    """
    plan, skipped, seen = [], [], set()
    for mount in reversed(mounts):
        if mount.point in seen:
            continue
        seen.add(mount.point)
        if wanted != "all":
            if mount.point in wanted:
                plan.append(mount)
            continue
        if under and not below(mount.point, under):
            continue
        why = cannot_freeze(mount)
        if why:
            skipped.append((mount.point, why))
        else:
            plan.append(mount)
    if wanted != "all":
        missing = [point for point in wanted if point not in seen]
        skipped.extend((point, "not a mount point") for point in missing)
    return plan, skipped


class Freezer:
    """Freezes the filesystems of --freeze (last step of the sync phase) and
    thaws them (first step of the post phase) with ioctls in this process: no
    fork, no exec, nothing read from a frozen disk.  Each descriptor stays open
    from freeze to thaw, so a path that became unreachable still thaws.

    A filesystem is known by its identity (device and mount id, from
    mountinfo), never by its path alone: FIFREEZE goes only to a descriptor
    found on the very mount planned, and the marker names devices, which a
    restart or the guardian finds again wherever they are mounted by then.

    The freeze is the safety net: XO snapshots whatever /sync answers, so a
    mount that cannot be frozen is named in the answer and the others are
    frozen all the same, and a thaw that cannot be verified stays owed.
    """

    def __init__(self, wanted, under=""):
        self.wanted = wanted
        self.under = under
        self.frozen = []              # [(point, fd, device)] in freeze order
        self.since = None

    def plan(self):
        return freeze_plan(read_mounts(), self.wanted, self.under)

    def freeze(self, marker=None):
        """Freeze the plan, each filesystem named in the marker just before it
        is frozen (and taken out again if it was not frozen by us).  With
        'all', a filesystem that cannot be frozen (EOPNOTSUPP) is skipped;
        "already frozen" (EBUSY: a bind mount of one frozen here, or frozen by
        another program) counts as frozen, not as ours.  Any other failure is
        the step's, and the rest is frozen anyway."""
        started = time.monotonic()
        plan, skipped = self.plan()
        failures = []
        for point, why in skipped:
            if self.wanted != "all":
                failures.append("freeze %s: %s" % (point, why))
            else:
                log.debug("freeze: %s skipped (%s)", point, why)
        self.since = time.time()
        already = 0
        for mount in plan:
            if marker is not None and not marker.freezing(mount):
                failures.append("freeze %s: not recorded in the window marker" % mount.point)
                continue
            outcome = self._freeze_one(mount)
            if outcome and marker is not None:
                marker.not_frozen(mount)
            if outcome == "already frozen":
                already += 1
            elif outcome and outcome != "skipped":
                failures.append(outcome)
        points = [point for point, _, _ in self.frozen]
        took = time.monotonic() - started
        if not points and not already and not failures:
            failures.append("freeze: nothing frozen (%s)" % (
                "no filesystem of the plan can be frozen" if plan else "nothing to freeze" +
                (" under %s" % self.under if self.under else "")))
        if failures:
            log.error("%s; %s", "; ".join(failures), self.summary())
            return Result("freeze", False, "; ".join(failures), None, took)
        log.info("freeze: %d frozen in %.3f s: %s", len(points), took,
                 ", ".join(points) or "none (all were frozen already)")
        return Result("freeze", True, "ok", None, took)

    def summary(self):
        """What is frozen, in words (what is not is in the failures)."""
        points = [point for point, _, _ in self.frozen]
        return "frozen anyway: %s" % ", ".join(points) if points else "nothing frozen"

    def _freeze_one(self, mount):
        """None when frozen, "skipped", "already frozen", or the failure."""
        fd, why = open_mount(mount)
        if fd is None:
            return "freeze %s: %s" % (mount.point, why)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as err:
            os.close(fd)
            if err.errno == errno.EOPNOTSUPP and self.wanted == "all":
                log.info("freeze: %s (%s) cannot be frozen: skipped", mount.point, mount.fstype)
                return "skipped"
            if err.errno == errno.EOPNOTSUPP:
                return "freeze %s: %s cannot be frozen (the filesystem has no freeze)" % (
                    mount.point, mount.fstype)
            if err.errno == errno.EBUSY:
                log.info("freeze: %s already frozen (a bind mount, or frozen by another "
                         "program): not ours to thaw", mount.point)
                return "already frozen"
            return "freeze %s: %s" % (mount.point, err.strerror)
        self.frozen.append((mount.point, fd, mount.device))
        return None

    def thaw(self):
        """Thaw what this window froze, last frozen first, each verified; None
        if nothing was frozen.  Always starts.  What is not verified thawed
        stays in self.frozen: the step is owed (not started), tried again."""
        if not self.frozen:
            self.since = None
            return None
        started = time.monotonic()
        still, errors = [], []
        for point, fd, device in reversed(self.frozen):
            outcome = thaw_fd(fd, close=False)
            if outcome in ("thawed", "not frozen"):
                os.close(fd)
            else:
                still.insert(0, (point, fd, device))
                errors.append("thaw %s: %s" % (point, outcome))
        self.frozen = still
        took = time.monotonic() - started
        if errors:
            log.alert("%s: still frozen, owed", "; ".join(errors))
            return Result("thaw", False, "still frozen: " + "; ".join(errors), None, took,
                          started=False)
        self.since = None
        return Result("thaw", True, "ok", None, took)

    def status(self):
        return [{"mount": point, "device": device_name(device), "since": iso(self.since)}
                for point, _, device in self.frozen]


def device_name(device):
    return "%d:%d" % (os.major(device), os.minor(device))


def mount_identity(mount):
    """What the marker keeps of a mount it may freeze."""
    return {"point": mount.point, "device": device_name(mount.device),
            "mount_id": mount.mount_id}


def fd_mount_id(fd):
    """The id of the mount a descriptor is on (/proc/self/fdinfo, Linux 3.15+), or None."""
    try:
        with open("/proc/self/fdinfo/%d" % fd, "rb") as handle:
            for line in handle.read(4096).splitlines():
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_mount(mount):
    """(descriptor on mount's root, None), checked to be on that very mount,
    or (None, why).  The path is walked one component at a time from /, never
    through a symbolic link: a path longer than PATH_MAX is reached, and
    whatever a user who owns a directory above it swaps in is refused, as is a
    directory left where the mount was, or another filesystem mounted there
    since (FIFREEZE on it would freeze, or thaw, the wrong filesystem)."""
    try:
        fd = walk_to(mount.point)
    except OSError as err:
        return None, err.strerror or str(err)
    mount_id = fd_mount_id(fd)
    if mount_id is None:
        same = is_mount_root(fd, mount)          # kernels without mnt_id in fdinfo
    else:
        same = mount_id == mount.mount_id
    if not same:
        os.close(fd)
        return None, "no longer a mount point"
    return fd, None


def walk_to(path):
    """A read descriptor on directory path, opened component by component
    (openat from the one before, O_NOFOLLOW): no PATH_MAX limit, no link."""
    parts = [part for part in path.split("/") if part]
    flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", (os.O_RDONLY if not parts else os.O_PATH) | flags)
    try:
        for index, part in enumerate(parts):
            if part in (".", ".."):
                raise OSError(errno.EINVAL, "a mount point with . or ..")
            last = index == len(parts) - 1
            fd, parent = os.open(part, (os.O_RDONLY if last else os.O_PATH) | flags,
                                 dir_fd=fd), fd
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_mount_root(fd, mount):
    """Is fd the root of that mount still (not the directory left under it)?"""
    st = os.fstat(fd)
    if st.st_dev == mount.device:
        return True
    try:
        parent = os.stat("..", dir_fd=fd)
    except OSError:
        return False
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def thaw_mount(mount):
    """FITHAW on a mount found in mountinfo: "thawed", "not frozen" or why not."""
    fd, why = open_mount(mount)
    if fd is None:
        return "cannot open: %s" % why
    return thaw_fd(fd)


def thaw_fd(fd, close=True):
    """FITHAW on fd, verified: "thawed", "not frozen" or why not.  Verified
    means a second FITHAW finds it not frozen: a filesystem frozen by one
    FIFREEZE is thawed by one FITHAW."""
    try:
        first = fithaw(fd)
        if first == "not frozen":
            return first
        if first:
            return "cannot thaw: %s" % first
        second = fithaw(fd)
        if second == "not frozen":
            return "thawed"
        return "thawed, not verified: %s" % (second or "still frozen after a thaw")
    finally:
        if close:
            os.close(fd)


def fithaw(fd):
    """One FITHAW: None when it thawed, "not frozen" (EINVAL), or the error."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return None
    except OSError as err:
        return "not frozen" if err.errno == errno.EINVAL else err.strerror


def thaw_identities(entries, tries=THAW_TRIES):
    """Thaw the filesystems a marker names by identity, last frozen first:
    each is looked up by its device in mountinfo (the same mount first, then
    any other mount of it: a frozen filesystem is thawed through any of its
    mounts), wherever it is mounted now.  A path renamed under our feet is
    looked up again (tries times).  [(entry, label, outcome)]."""
    outcomes = []
    for entry in reversed(entries):
        try:
            major, minor = (int(part) for part in entry["device"].split(":"))
            device, mount_id = os.makedev(major, minor), entry.get("mount_id")
            label = "%s (device %s)" % (entry.get("point"), entry["device"])
        except (TypeError, ValueError, KeyError, AttributeError):
            outcomes.append((entry, "%r" % (entry,), "not understood: skipped"))
            continue
        for attempt in range(tries):
            found = sorted((mount for mount in read_mounts() if mount.device == device),
                           key=lambda mount: mount.mount_id != mount_id)
            outcome = "no mount of device %s now (unmounted?)" % entry["device"]
            for mount in found:
                outcome = thaw_mount(mount)
                if not outcome.startswith("cannot open"):
                    break
            if not outcome.startswith("cannot open"):
                break
            time.sleep(0.01 * (attempt + 1))
        outcomes.append((entry, label, outcome))
    return outcomes


def thaw_paths(points):
    """FITHAW on each path (EINVAL: it was not frozen); [(point, outcome)].
    For a marker of synchook 1.2 or older, which named paths only."""
    outcomes = []
    for point in points:
        try:
            fd = walk_to(point)
        except OSError as err:
            outcomes.append((point, "cannot open: %s" % err.strerror))
            continue
        outcomes.append((point, thaw_fd(fd)))
    return outcomes


# ---------------------------------------------------------------------------
# The sync window: one state machine, one command at a time
# ---------------------------------------------------------------------------

class TurnQueue:
    """A fair lock: requests take turns in arrival order; `first` jumps the
    queue (a /post-sync that cuts a sync phase short, the shutdown).  Each
    waiter sleeps on a lock of its own and the turn is handed to the next one
    alone: waking every waiter at every turn made the cost of a crowd grow
    with its square."""

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting = collections.deque()
        self.busy = False

    def take(self, first=False):
        with self.lock:
            if not self.busy:
                self.busy = True
                return
            me = threading.Lock()
            me.acquire()
            if first:
                self.waiting.appendleft(me)
            else:
                self.waiting.append(me)
        log.wake_writer()                  # this thread waits: the writer's turn
        me.acquire()                       # released by give: the turn is ours

    def give(self):
        with self.lock:
            if self.waiting:
                self.waiting.popleft().release()     # busy stays True: handed over
            else:
                self.busy = False


class PostProgress:
    """The post phase of the open window: its plan (fixed when the window
    opens, or read from a dead run's marker), what is still owed of it and
    why, and what ran."""

    def __init__(self, plan, done=()):
        self.plan = plan
        self.done = sorted(done)           # labels, kept in the marker
        self.rest = [step for step in plan if step[0] not in self.done]
        self.results = []                  # of the steps that ran
        self.owed = None                   # why the rest is still owed
        self.tries = 0

    def ran(self, results, rest):
        """Take in what a try of run_post_steps did."""
        owed_labels = set(label for label, _ in rest)
        self.results.extend(result for result in results if result.started)
        self.done.extend(label for label, _ in self.rest if label not in owed_labels)
        self.rest = rest


class Opening:
    """The open window: when it opened (wall clock, for /status and the
    marker; monotonic, for its ceiling), for whom, whether its sync phase
    still runs, what its /sync answered, and when the watchdog acts on it
    (monotonic; None while the sync phase runs)."""

    def __init__(self, by, syncing=False):
        self.at, self.mono, self.by = time.time(), time.monotonic(), by
        self.syncing = syncing
        self.answer = None
        self.deadline = None


class SyncWindow:
    """/sync opens the window, /post-sync closes it; the post phase is owed
    exactly once per window that ran its sync phase.

    Requests take turns in arrival order (a fair lock), except a /post-sync
    that arrives while the sync phase runs: it cancels that phase and goes
    first.  A watchdog closes a window left open for --max-hold seconds, and
    retries a post phase that could not start (or a thaw not verified).  The
    window's Marker in the runtime dir and a live guardian are the two things
    a window cannot open without: the marker lets the guardian or the next
    start close a window this process could not, and the guardian closes it
    when this process dies; the guardian's timer, told the window's deadline
    at each change, kills this process if it is stopped or hung past it.

    States:  idle --/sync: marker written, guardian alive and told--> syncing
             syncing --sync phase over (whatever happened)--> open (deadline set)
             open --/post-sync, max-hold, shutdown--> closing: the post plan runs
             closing --every step started, every thaw verified--> idle
             closing --a step could not start--> owed (retried; /sync refused)
    """

    def __init__(self, phases, max_hold, marker, guardian=None):
        self.phases = phases           # the settings' steps
        self.window_phases = phases    # the steps of this window (a recovery's: the marker's)
        self.max_hold = max_hold
        self.marker = marker
        self.guardian = guardian       # releases the window if this process dies
        self.turns = TurnQueue()
        self.cond = threading.Condition()   # guards the state below; the watchdog waits on it
        self.cancel = Canceller()
        self.stopped = False
        self.released_by_watchdog = False
        self.opening = None            # an Opening while the window is open
        self.post = None               # the open window's PostProgress
        self.last = {"sync": None, "post-sync": None}
        self.watchdog = threading.Thread(target=self._watch, name="max-hold", daemon=True)

    @property
    def is_open(self):
        return self.opening is not None

    @property
    def owed(self):
        """Why the open window's post phase is still owed, or None."""
        post = self.post
        return post.owed if post is not None else None

    # Requests --------------------------------------------------------------
    def sync(self, client):
        self.turns.take()
        try:
            if self.stopped:
                return 503, "shutting down"
            if self.owed is not None:
                log.warning("/sync refused: the last window's post phase is still owed")
                return 503, "the last window's post phase could not start yet: " + self.owed
            if self.is_open:
                with self.cond:
                    # XO's checkpoint fallback repeats /sync once; a hard ceiling
                    # keeps anyone else from holding the guest frozen for ever.
                    deadline = min(time.monotonic() + self.max_hold,
                                   self.opening.mono + 2 * self.max_hold)
                    if self.opening.deadline is None or deadline < self.opening.deadline:
                        self.cond.notify_all()       # else it wakes in time anyway
                    self.opening.deadline = deadline
                self._set_ceiling(deadline - time.monotonic())
                log.info("window already open: sync phase not run again; max-hold restarted")
                return self.opening.answer
            problem = self._open(client)
            if problem:
                log.alert("/sync refused, nothing run: %s (a window must have a record "
                          "and a guardian)", problem)
                return 500, "nothing run: " + problem
            opening = self.opening
            opening.answer = 500, "internal error"    # replaced unless sync_phase raises
            try:
                steps = self.phases.sync_phase(client, self.cancel, self.marker)
            finally:
                # Whatever happened, the window is open: the max-hold clock runs.
                with self.cond:
                    opening.syncing = False
                    opening.deadline = time.monotonic() + self.max_hold
                    self.cond.notify_all()
                self._set_ceiling(self.max_hold)
            opening.answer = self.sync_answer(steps)
            self._record("sync", steps)
            return opening.answer
        finally:
            self.turns.give()

    def sync_answer(self, steps):
        """phase_answer, and when a step failed, what the freeze did anyway."""
        status, text = phase_answer(steps)
        freezer = self.phases.freezer
        if status != 200 and freezer is not None and self.phases.freezing:
            text = "%s; %s" % (text, freezer.summary())
            log.warning("sync phase failed: %s", text)
        return status, text

    def post_sync(self, client):
        with self.cond:
            cut_short = self.opening is not None and self.opening.syncing
            if cut_short:
                log.warning("/post-sync arrived while the sync phase runs: ending it")
                self.cancel.set()
        self.turns.take(first=cut_short)
        try:
            if self.is_open:
                return self._close(client, "/post-sync")
            if self.released_by_watchdog:
                self.released_by_watchdog = False
                log.info("/post-sync after the max-hold release: nothing left to run")
                return 200, "Ok"
            if self.stopped:
                return 503, "shutting down"
            log.info("/post-sync with no window open: running the post phase anyway")
            steps, _ = self.phases.post_phase(client)
            self._record("post-sync", steps)
            return phase_answer(steps)
        finally:
            self.turns.give()

    def status(self):
        with self.cond:
            opening = self.opening
            state = {"state": "open" if self.is_open else "idle",
                     "open_since": iso(opening.at) if opening else None,
                     "opened_by": opening.by if opening else None,
                     "last_sync": phase_status(self.last["sync"]),
                     "last_post_sync": phase_status(self.last["post-sync"])}
            left = None
            if opening is not None and opening.deadline is not None:
                left = round(max(0.0, opening.deadline - time.monotonic()), 1)
            freezer = self.window_phases.freezer
            if freezer is not None:
                state["frozen"] = freezer.status()
            if self.owed is not None:
                state["post_phase_owed"] = {"reason": self.owed, "tries": self.post.tries,
                                            "next_try_in": left}
            elif left is not None:
                state["max_hold_left"] = left
        return state

    # Opening and closing ---------------------------------------------------
    def _open(self, client):
        """Open the window: None, or why it cannot be (nothing is run then)."""
        if self.guardian is not None and not self.guardian.ensure():
            return "no guardian could be started"
        plan = self.phases.post_plan()
        opening = Opening(client, syncing=True)
        problem = self.marker.open_window(client, opening.at, plan, self.phases.timeout)
        if problem:
            return problem
        with self.cond:
            self.cancel.clear()
            self.released_by_watchdog = False
            self.opening = opening
            self.window_phases = self.phases
            self.post = PostProgress(plan)
        # No file is written from here to the window's close: a sync step may
        # freeze any filesystem, the one under the log included.
        log.hold()
        if self.guardian is not None:
            self.guardian.open_window(self.phases.sync_budget(plan) + self.max_hold +
                                      GUARDIAN_GRACE)
        log.info("window opened by %s", client)
        return None

    def _set_ceiling(self, seconds):
        """The guardian kills this process if the window is still open
        GUARDIAN_GRACE after `seconds`: a daemon stopped or hung (SIGSTOP, a
        debugger, a deadlock) cannot keep the guest frozen past its ceiling."""
        if self.guardian is not None:
            self.guardian.move_deadline(seconds + GUARDIAN_GRACE)

    def _close(self, client, why):
        """Run what is owed of the post phase; the window closes once every
        step of it has started and every thaw is verified.  A step that could
        not start (no descriptor, no fork) or a filesystem not verified thawed
        keeps the window open, the marker in place, and is tried again after a
        short wait (POST_RETRIES) by the watchdog."""
        post = self.post
        answer = self.opening.answer
        status = answer[0] if answer else None
        sync_result = ("unknown" if client in ("restart", "recover") else
                       "ok" if status == 200 else "failed")
        self._set_ceiling(len(post.rest) * self.window_phases.timeout)
        results, rest = self.window_phases.run_post_steps(post.rest, client, sync_result,
                                                          self.marker.add_post_group)
        post.ran(results, rest)
        if rest:
            failed = [result for result in results if not result.started][0]
            reason = failed.reason if failed.label in ("post-sync", "thaw") else "%s: %s" % (
                failed.label, failed.reason)
            wait = POST_RETRIES[min(post.tries, len(POST_RETRIES) - 1)]
            with self.cond:
                post.tries += 1
                post.owed = reason
                self.opening.deadline = time.monotonic() + wait
                self.cond.notify_all()
            self.marker.add({"post_done": post.done})
            self._set_ceiling(wait + len(rest) * self.window_phases.timeout)
            log.alert("post phase (%s, try %d) %s: %s; still owed, next try in %s s",
                      why, post.tries, "not done" if failed.label == "thaw" else
                      "could not start", reason, seconds(wait))
            self._record("post-sync", post.results + [failed])
            return 500, "post phase not done: %s (retried in %s s)" % (reason, seconds(wait))
        steps = post.results
        with self.cond:
            self.opening = None
            self.post = None
            self.window_phases = self.phases     # a recovery's steps end with its window
            # No notify: the watchdog is woken where a deadline comes earlier;
            # one that goes away finds it, when it wakes, with nothing to do
            # (woken now, it would take the interpreter lock from this answer).
        self.marker.close_window()
        if self.guardian is not None:
            self.guardian.close_window()
        self._record("post-sync", steps)
        status, text = phase_answer(steps)
        log.info("window closed (%s): %s", why, text)
        log.release()
        return status, text

    def _record(self, phase, steps):
        with self.cond:
            self.last[phase] = (time.time(), steps)     # /status formats it

    # Outside requests -------------------------------------------------------
    def adopt(self, who, phases, plan, done):
        """Take a dead run's window (recover_window) and run what is owed of its
        post phase, with its steps (phases) and plan."""
        with self.cond:
            self.opening = Opening(who)
            self.window_phases = phases
            self.post = PostProgress(plan, done)
        self._close(who, who)

    def _watch(self):
        while True:
            with self.cond:
                while True:
                    if self.stopped:
                        return
                    opening = self.opening
                    if opening is not None and opening.deadline is not None:
                        left = opening.deadline - time.monotonic()
                        if left <= 0:
                            break
                        self.cond.wait(left)
                    elif self.is_open:           # the sync phase runs: no deadline yet
                        self.cond.wait(self.max_hold)
                    else:
                        self.cond.wait()
            self.turns.take()
            try:
                opening = self.opening
                expired = (opening is not None and not self.stopped and
                           opening.deadline is not None and time.monotonic() >= opening.deadline)
                if expired and self.owed is not None:
                    log.info("post phase: try %d", self.post.tries + 1)
                    self._close("retry", "retry")
                    self.released_by_watchdog = not self.is_open
                elif expired:
                    log.warning("no /post-sync within --max-hold %s s of the last /sync: "
                                "running the post phase now", seconds(self.max_hold))
                    self._close("max-hold", "max-hold")
                    self.released_by_watchdog = not self.is_open
            finally:
                self.turns.give()

    def retry_owed(self, why, patience):
        """Try what is owed of the post phase again, as POST_RETRIES paces it,
        for `patience` seconds at most; True once the window is closed."""
        give_up = time.monotonic() + patience
        while self.is_open and time.monotonic() < give_up:
            time.sleep(max(0.0, min(self.opening.deadline, give_up) - time.monotonic()))
            self._close(why, why)
        return not self.is_open

    def shutdown(self):
        """Wait for the running command, close an open window, refuse the rest.

        Returns False when the post phase is still owed at exit (it could not
        start within SHUTDOWN_RETRY): the marker stays for the next start."""
        self.turns.take(first=True)
        try:
            if self.is_open:
                log.warning("shutting down with a window open: running the post phase")
                self._close("shutdown", "shutdown")
                if not self.retry_owed("shutdown", SHUTDOWN_RETRY):
                    log.alert("exiting with the post phase still owed (%s): the next start "
                              "runs it (marker %s)", self.owed, self.marker.path)
            with self.cond:
                self.stopped = True
                self.cond.notify_all()
            return not self.is_open
        finally:
            self.turns.give()


def phase_status(last):
    """A phase's last run, (time, steps) or None, as /status shows it."""
    if last is None:
        return None
    when, steps = last
    status, text = phase_answer(steps)
    return {"status": status, "reason": text, "at": iso(when),
            "steps": [step.as_dict() for step in steps]}


def recover_window(window, who="restart", settings=True):
    """Close the window a dead run left open, if its marker says there is
    one; the caller holds the runtime dir's lock, so this runs once per window
    whoever gets there first (a restart, or the dead run's guardian).  First
    the dead run's freeze is thawed (nothing else can), then the process
    groups its sync phase started are ended (a sync command finishing after
    the thaw would freeze the guest again), a post step it had started is
    waited for (never run twice at once), then what is owed of its post phase
    runs, as the marker describes it.  True if there was one.
    settings=False (the guardian's recovery, which reads no settings): a
    marker that names no post phase (synchook 1.2) is thawed and left for the
    next start, which runs the post phase from its settings."""
    marker, phases = window.marker, window.phases
    info = marker.read(adopt=True)
    if info is None:
        return False
    same_boot = info.get("boot_id") == boot_id()
    leftover = LeftoverFreeze(info.get("freeze"), info.get("frozen")) if same_boot else None
    plan = marker_plan(info)
    if not settings and plan is None:
        log.error("%s names no post phase (an older synchook wrote it): thawing only; the "
                  "next start runs the post phase from its settings", marker.path)
        if leftover is not None:
            leftover.thaw()
        return False
    log.warning("found %s (window opened %s by %s, process %s): the previous run ended "
                "with a window open, for %s s now; running its post phase (%s)",
                marker.path, marker_field(info, "opened_at"), marker_field(info, "client"),
                marker_field(info, "pid"), open_for(info), who)
    if leftover is not None:
        leftover.thaw()
    timeout = info.get("timeout")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        timeout = phases.timeout or XO_TIMEOUT - 5
    end_leftover_groups(info)
    done = set(wait_for_post_steps(info, timeout))
    recorded = info.get("post_done")
    if isinstance(recorded, list):
        done.update(label for label in recorded if isinstance(label, str))
    if plan is None:                   # a marker of synchook 1.2 or older
        plan = phases.post_plan()
    window.adopt(who, phases.for_recovery(leftover, timeout), plan, done)
    return True


# The marker: the window's record, in the runtime dir (tmpfs, never frozen) -------
#
# One JSON object per line: the window as it opened, then what the window
# added (each process group of its sync phase, each filesystem just before it
# is frozen, each post step's group), then a blank line.  A window is open
# while the first line is not blank.  The file is made once, MARKER_SPACE
# bytes of newlines, and kept open: a window writes its lines into space that
# is already allocated (a full /run cannot refuse them), each line with the
# blank one after it in one pwrite (a crash cannot tear it), and its close
# writes one newline at the start.  What lies after the first blank line is an
# older window's, and ignored.  Lines that add to a list:
MARKER_APPEND = {"group": "groups", "freezing": "freeze", "post_group": "post_groups"}


class Marker:
    """The only owner of the window's marker file (and of the runtime dir's
    lock, which whoever acts on the marker holds)."""

    def __init__(self, runtime_dir, lock_fd=None):
        self.runtime_dir = runtime_dir
        self.path = os.path.join(runtime_dir, MARKER_FILE)
        self.lock_fd = lock_fd
        self.fd = None
        self.end = 0                   # where the next line goes

    def prepare(self):
        """At start, once recovery is done (and when the runtime dir was
        removed): a closed marker with its space allocated, kept open.
        Whatever else is at its name is removed first.  OSError if it cannot
        be made."""
        self._close_fd()
        self.remove()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, b"\n" * MARKER_SPACE, 0)
        except OSError:
            os.close(fd)
            raise
        self.fd, self.end = fd, 0

    def ensure(self):
        """Before a window: None when the marker (and the lock) are still in
        the runtime dir, else they are made again; why not, if they cannot be."""
        try:
            if self.fd is not None and os.fstat(self.fd).st_nlink:
                return None
        except OSError:
            pass
        log.alert("window marker %s was removed: making it again (the runtime dir was "
                  "cleaned?)", self.path)
        try:
            prepare_runtime_dir(self.runtime_dir)
            if self.lock_fd is not None and not os.fstat(self.lock_fd).st_nlink:
                fd = lock_runtime_dir(self.runtime_dir, "serve", 0)
                if fd is None:
                    return "the runtime dir's lock is held by another process"
                os.close(self.lock_fd)
                self.lock_fd = fd
            self.prepare()
        except (OSError, ConfigError) as err:
            return "cannot make the window marker %s again: %s" % (
                self.path, getattr(err, "strerror", None) or err)
        log.attach_spill(self.runtime_dir)       # held lines, in the new runtime dir too
        return None

    def open_window(self, client, opened_at, plan, timeout):
        """The window's first line; None, or why it cannot be written."""
        problem = self.ensure()
        if problem:
            return problem
        self.end = 0
        fields = {"pid": os.getpid(), "opened_at": opened_at, "client": client,
                  "boot_id": boot_id(), "groups": [], "freeze": [], "post_plan": plan,
                  "timeout": timeout, "post_done": []}
        if not self.add(fields):
            return "cannot write the window marker %s" % self.path
        return None

    def add(self, fields):
        """A line of fields, and the blank line after it; False if not written."""
        data = json.dumps(fields).encode() + b"\n"
        try:
            if os.pwrite(self.fd, data + b"\n", self.end) != len(data) + 1:
                raise OSError(errno.ENOSPC, "short write")
        except (OSError, TypeError) as err:
            log.alert("cannot write window marker %s: %s (a crash now would not be "
                      "recovered)", self.path, getattr(err, "strerror", err))
            return False
        self.end += len(data)
        return True

    # What a window adds, as its steps go (the freeze and command layers call these).
    def add_group(self, proc):
        """A process group of the sync phase: ended by a recovery."""
        self.add({"group": {"pgid": proc.pid, "start": list(proc.start_ticks)}})

    def add_post_group(self, label, proc):
        """A post step's process group: a recovery waits for it, never runs it again."""
        self.add({"post_group": {"label": label, "pgid": proc.pid,
                                 "start": list(proc.start_ticks)}})

    def freezing(self, mount):
        """Just before FIFREEZE: a recovery thaws it if this process dies."""
        return self.add({"freezing": mount_identity(mount)})

    def not_frozen(self, mount):
        """FIFREEZE did not freeze it (frozen by someone else, or failed): not ours."""
        self.add({"not_frozen": mount_identity(mount)})

    def close_window(self):
        """The window is closed: one newline at the start (or the file removed,
        where none is kept open)."""
        if self.fd is not None:
            try:
                os.pwrite(self.fd, b"\n", 0)
                self.end = 0
                return
            except OSError as err:
                log.error("cannot close window marker %s: %s; removing it", self.path,
                          err.strerror)
        self.remove()

    def remove(self):
        self._close_fd()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.error("cannot remove window marker %s: %s", self.path, err.strerror)

    def _close_fd(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, adopt=False):
        """The marker's fields, {} if it is torn or unreadable, None if no
        window is open.  adopt: keep it open to add lines to (a recovery)."""
        try:
            fd = open_regular(self.path, nofollow=True)
        except FileNotFoundError:
            return None
        except OSError as err:
            log.error("window marker %s: %s; treating the window as open", self.path,
                      err.strerror)
            return {}
        try:
            data = read_marker_text(fd)
        except OSError:
            data = b"?"                   # unreadable: open, as a torn one
        if adopt and data and data != b"?":
            try:
                self._close_fd()
                self.fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                self.end = len(data)
                if not data.endswith(b"\n"):       # a torn last line: ours start after it
                    os.pwrite(self.fd, b"\n", self.end)
                    self.end += 1
            except OSError:
                pass
        os.close(fd)
        if not data:
            return None
        return parse_marker(data.decode("utf-8", "replace").splitlines())


def read_marker_text(fd):
    """The lines of the open window (up to the first blank line, each with its
    newline), b"" if none; read whole, however long."""
    chunks = []
    while True:
        chunk = os.read(fd, MARKER_SPACE)
        if not chunk:
            break
        chunks.append(chunk)
        if b"\n\n" in chunk or chunk.startswith(b"\n"):
            break
    data = b"".join(chunks)
    if data.startswith(b"\n"):
        return b""
    end = data.find(b"\n\n")
    return data if end < 0 else data[:end + 1]


def marker_present(path):
    """Does path say a window is open (a first line that is not blank, or
    anything else than a regular file)?"""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not stat.S_ISREG(st.st_mode):
        return True
    try:
        fd = open_regular(path, nofollow=True)
    except OSError:
        return True
    try:
        return os.read(fd, 1) not in (b"", b"\n")
    except OSError:
        return True
    finally:
        os.close(fd)


def parse_marker(lines):
    """A marker's fields from its lines ({} if its first line is torn): each
    line's fields override the ones before, or add to a list (MARKER_APPEND,
    not_frozen takes away); a torn line after the first is skipped (a crash in
    the middle of adding it)."""
    info = {}
    for number, line in enumerate(lines):
        if not line.strip():
            break                          # the end of the window's lines
        try:
            fields = json.loads(line)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            if number == 0:
                return {}
            continue
        for key, value in fields.items():
            if key in MARKER_APPEND:
                listed = info.get(MARKER_APPEND[key])
                info[MARKER_APPEND[key]] = (listed if isinstance(listed, list) else []) + [value]
            elif key == "not_frozen" and isinstance(info.get("freeze"), list):
                info["freeze"] = [entry for entry in info["freeze"] if entry != value]
            else:
                info[key] = value
    return info


def marker_plan(info):
    """The post phase's steps a marker names, as [(label, argv or None)], or
    None if it names none (written by synchook 1.2 or older) or is garbled.
    Markers of 1.2 and older are read until 2.0: /run is a tmpfs, so only an
    upgrade in place from 1.2 during a window meets one (tests/test_window.py)."""
    plan = info.get("post_plan")
    if not isinstance(plan, list):
        return None
    steps = []
    for step in plan:
        if not (isinstance(step, list) and len(step) == 2 and isinstance(step[0], str)):
            return None
        label, argv = step
        if argv is not None and not (isinstance(argv, list) and argv and
                                     all(isinstance(word, str) for word in argv)):
            return None
        steps.append((label, argv))
    return steps


class LeftoverFreeze:
    """What a dead run's marker says it may have frozen, thawed as the post
    plan's thaw step of a recovery: by identity (device and mount id) where
    the marker has it, else by path (synchook 1.2).  What is not verified
    thawed stays owed, and is tried again."""

    def __init__(self, identities, points=None):
        self.pending = [entry for entry in identities] if isinstance(
            identities, list) and identities else []
        self.by_path = [] if self.pending else [
            point for point in points if isinstance(point, str)] if isinstance(
            points, list) else []
        self.result = None

    def thaw(self):
        """Try what is still pending; a Result (not started: some still owed)."""
        if self.result is not None and not self.pending:
            return self.result
        started = time.monotonic()
        outcomes = thaw_identities(self.pending) + [
            (None, point, outcome) for point, outcome in thaw_paths(self.by_path)]
        self.by_path = []
        still = []
        for entry, label, outcome in outcomes:
            if outcome in ("thawed", "not frozen"):
                log.warning("recovery: %s: %s", escape(label, 200), outcome)
            elif outcome.startswith("no mount") or entry is None:
                log.error("recovery: %s: %s", escape(label, 200), outcome)
            else:
                log.alert("recovery: %s: %s: still frozen, owed", escape(label, 200), outcome)
                still.append((entry, label, outcome))
        self.pending = [entry for entry, _, _ in reversed(still)]    # in freeze order
        duration = time.monotonic() - started
        if still:
            reason = "; ".join("thaw %s: %s" % (escape(label, 200), outcome)
                               for _, label, outcome in still)
            self.result = Result("thaw", False, "still frozen: " + reason, None, duration,
                                 started=False)
        else:
            self.result = Result("thaw", True, "ok", None, duration)
        return self.result

    def status(self):
        return [{"mount": entry.get("point"), "device": entry.get("device"), "since": None}
                for entry in self.pending if isinstance(entry, dict)]


def marker_field(info, name):
    """A marker field for the log: the marker is a file, so escaped and cut;
    a time (opened_at, seconds since the epoch) in ISO 8601."""
    value = info.get(name, "?") if isinstance(info, dict) else "?"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "opened_at":
        try:
            return iso(value)
        except (ValueError, OverflowError, OSError):
            return "?"
    return escape(value, 80)


def open_for(info):
    """How long the marker's window has been open, in whole seconds, or "?"."""
    opened = info.get("opened_at") if isinstance(info, dict) else None
    if not isinstance(opened, (int, float)) or isinstance(opened, bool):
        return "?"
    return "%d" % max(0, time.time() - opened)


def boot_id(cache=[]):
    """This boot's id (read once: it does not change while we run)."""
    if not cache:
        try:
            with open(BOOT_ID) as handle:
                cache.append(handle.read(64).strip())
        except OSError:
            cache.append(None)
    return cache[0]


def proc_stat(pid):
    """(state, process group, start time in clock ticks) of pid, None if gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read(4096)
        fields = data[data.rindex(b")") + 2:].split()
        return fields[0].decode("ascii", "replace"), int(fields[2]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_seconds():
    """Seconds since boot, as /proc/uptime counts them (the guardian's clock)."""
    return time.clock_gettime(CLOCK_BOOTTIME)


def boot_ticks():
    """Now, in the clock and unit of a start time in /proc/PID/stat."""
    return int(time.clock_gettime(CLOCK_BOOTTIME) * CLOCK_TICKS)


def started_within(start, recorded):
    """Whether a process that started at `start` (clock ticks since boot) is the
    one recorded as started within [first, last] (taken around its spawn).  The
    range is read from the clock rather than /proc/PID/stat, which blocks until
    the child's exec() is done; 1.1.0 recorded one exact value."""
    if isinstance(recorded, int):
        return start == recorded
    if (isinstance(recorded, list) and len(recorded) == 2 and
            all(isinstance(tick, int) for tick in recorded)):
        return recorded[0] - 1 <= start <= recorded[1] + 1
    return False


def group_members(pgid):
    """The live (not zombie) processes of process group pgid, from /proc."""
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if name.isdigit():
            info = proc_stat(int(name))
            if info is not None and info[1] == pgid and info[0] != "Z":
                members.append(int(name))
    return members


def dead_runs_group(group):
    """The process group a dead run recorded in its marker, if it still has
    processes and is that run's: its leader is gone (Linux reuses no pid that
    still names a group) or is the same process (same start time).  Else None."""
    if not isinstance(group, dict) or not isinstance(group.get("pgid"), int):
        return None
    pgid = group["pgid"]
    if pgid <= 1:
        return None
    leader = proc_stat(pgid)
    if leader is not None and not started_within(leader[2], group.get("start")):
        return None                           # pid reused by an unrelated process
    return pgid if group_members(pgid) else None


def end_leftover_groups(info):
    """End the process groups a dead run's sync phase recorded in its marker,
    and wait until they are gone; after a reboot nothing is left."""
    groups = info.get("groups")
    if not isinstance(groups, list) or not groups:
        return
    if info.get("boot_id") != boot_id():
        log.info("the marker is from before a reboot: no process of that run is left")
        return
    for group in groups:
        pgid = dead_runs_group(group)
        if pgid is None:
            continue
        log.warning("ending process group %d, left running by the previous run", pgid)
        if not end_group(pgid, RECOVER_WAIT):
            log.error("process group %d still has processes after SIGKILL (stuck on a "
                      "frozen filesystem?): running the post phase anyway", pgid)


def wait_for_post_steps(info, timeout):
    """The post steps a dead run had started (their groups are in its marker):
    one still running is waited for, `timeout` seconds at most, then ended.
    Returns their labels: each ran once, and is not run again."""
    groups = info.get("post_groups")
    if not isinstance(groups, list) or info.get("boot_id") != boot_id():
        return []
    labels = []
    for group in groups:
        label = group.get("label") if isinstance(group, dict) else None
        if not isinstance(label, str):
            continue
        labels.append(label)
        pgid = dead_runs_group(group)
        if pgid is None:
            continue
        log.warning("%s (process group %d) of the previous run is still running: waiting for "
                    "it, %s s at most, rather than running it twice", escape(label, 80), pgid,
                    seconds(timeout))
        if not group_gone(pgid, timeout):
            log.warning("%s (process group %d) still running after %s s: ending it",
                        escape(label, 80), pgid, seconds(timeout))
            end_group(pgid, RECOVER_WAIT)
    return labels


# The runtime dir's lock: one process at a time acts on the marker ---------------

def open_lock(runtime_dir):
    """The lock file of the runtime dir (on tmpfs), opened, never followed."""
    path = os.path.join(runtime_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ConfigError("--runtime-dir %s: cannot open %s: %s" % (runtime_dir, LOCK_FILE,
                                                                    err.strerror))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError("--runtime-dir %s: %s is not a regular file of synchook's user: "
                          "remove it" % (runtime_dir, path))
    return fd


def lock_holder(fd):
    """(pid, role) written by the lock's holder, or (None, None)."""
    try:
        words = os.pread(fd, 64, 0).split()
        return int(words[0]), words[1].decode("ascii", "replace")
    except (OSError, ValueError, IndexError):
        return None, None


def serving_pid(fd):
    """The pid of another, live synchook serving with this lock file, or None."""
    pid, holder = lock_holder(fd)
    if holder == "serve" and pid is not None and pid != os.getpid() and pid_alive(pid):
        return pid
    return None


def pid_alive(pid):
    info = proc_stat(pid)
    return info is not None and info[0] != "Z"


def lock_runtime_dir(runtime_dir, role, wait, stop=None):
    """Take the runtime dir's lock, which whoever may act on the marker holds:
    the daemon for its whole life, a recovery (the guardian's) while it runs.
    So a window is recovered once, by whoever comes first.  Returns the
    descriptor (kept open: closing it releases the lock), or None when it is
    still held after `wait` seconds or held by a running daemon."""
    fd = open_lock(runtime_dir)
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                os.close(fd)
                raise ConfigError("--runtime-dir %s: cannot lock %s: %s"
                                  % (runtime_dir, LOCK_FILE, err.strerror))
        if serving_pid(fd) is not None:
            os.close(fd)
            return None
        if time.monotonic() >= deadline or (stop is not None and stop()):
            os.close(fd)
            return None
        if not told:
            told = True
            pid, holder = lock_holder(fd)
            log.warning("waiting for process %s (%s) to finish with --runtime-dir %s",
                        pid, holder or "?", runtime_dir)
        time.sleep(0.05)
    record = ("%d %s\n" % (os.getpid(), role)).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:
        pass                                   # only a hint for whoever waits
    return fd


# The guardian: the release does not depend on synchook's own survival --------

# The guardian is a shell, the smallest process at hand (its memory counts in
# synchook's), with two pipes whose other ends only the daemon holds.
# - Its stdin: when the daemon is gone, however it died (SIGKILL, the OOM
#   killer, a crash, its timer), read returns at end of file.  If a window's
#   marker is there, the shell becomes a recovery (`synchook recover`): it
#   thaws, ends the sync commands' groups and runs the post phase the marker
#   describes, under the runtime dir's lock.
# - Its stdout (it writes nothing) wakes its timer, a subshell started with
#   it, when a window opens.  The timer then reads the window's deadline from the deadline file
#   (seconds since boot, as /proc/uptime counts them; 0 once the window is
#   closed) every 5 s at most, and SIGKILLs the daemon once past it: a daemon
#   stopped (SIGSTOP, ^Z, a debugger) or hung cannot keep the guest frozen past
#   the window's ceiling.  Idle, it waits on its pipe: no wake-up.  The daemon
#   moves the deadline by rewriting the file, which costs the timer nothing.
#   The timer acts only while its guardian lives and its daemon is the same
#   process (its start time in /proc): a timer whose guardian was killed, or
#   whose daemon is gone (its pid maybe reused), exits.
# Signals that stop a service are ignored: systemd (KillMode=process), OpenRC
# and SysV send theirs to the daemon, and a terminal's ^C must not take the
# safety net down with it.  Nothing in its command line names synchook (its
# paths come by environment), so `pkill -f synchook` spares it.  The timer
# writes nothing to stderr, which may be a file on a frozen filesystem, and
# never names /dev/null for output (where it is missing, `>` would create it).
GUARDIAN_SCRIPT = """trap '' HUP INT QUIT TERM
daemon=$PPID
started() {
    read -r stat <"/proc/$1/stat" || return 1
    set -- ${stat##*) }
    echo "${20}"
}
window_timer() {
    trap 'kill "$sleeper" 2>&-; exit 0' TERM
    guardian=$$
    since=$(started "$daemon") || exit 0
    while read -r _ <&3; do
        while IFS= read -r due <"$SYNCHOOK_GUARDIAN_DEADLINE" && [ "${due:-0}" -gt 0 ]; do
            # Our guardian killed, or our daemon gone: not ours to act on any more.
            kill -0 "$guardian" 2>&- && [ "$(started "$daemon")" = "$since" ] || exit 0
            read -r now _ </proc/uptime || exit 0
            now=${now%%.*}
            if [ "$now" -ge "$due" ]; then
                # The daemon rewrites the file in place, and a read that meets a
                # rewrite can be torn (its first bytes new, the rest old: "3" of
                # "39653" over "0"): past due for real is past due a moment later.
                sleep 1
                IFS= read -r again <"$SYNCHOOK_GUARDIAN_DEADLINE" && [ "$again" = "$due" ] \\
                    || continue
                printf '%s error: process %s had not released its window when due: killed by its guardian\\n' \\
                    "$(date +%Y-%m-%dT%H:%M:%S%z)" "$daemon" >>"$SYNCHOOK_GUARDIAN_SPILL"
                kill -KILL "$daemon"
                exit 0
            fi
            step=$((due - now))
            [ "$step" -le 5 ] || step=5
            sleep "$step" & sleeper=$!
            wait "$sleeper" || exit 0
        done
    done
}
window_timer <&- 2>&- 3<&1 >&- &
timer=$!
read -r _ || :
kill "$timer" 2>&-
m=$SYNCHOOK_GUARDIAN_MARKER
first=
[ -f "$m" ] && IFS= read -r first <"$m"
[ -n "$first" ] || [ -L "$m" ] || { [ -e "$m" ] && [ ! -f "$m" ]; } || exit 0
exec "$SYNCHOOK_GUARDIAN_PYTHON" $SYNCHOOK_GUARDIAN_FLAGS "$SYNCHOOK_GUARDIAN_PROGRAM" recover \\
    --runtime-dir "$SYNCHOOK_GUARDIAN_RUNTIME_DIR" --log-level "$SYNCHOOK_GUARDIAN_LOG_LEVEL" \\
    $SYNCHOOK_GUARDIAN_SYSLOG >&2
"""


class Guardian:
    """The daemon's side of the guardian: start it, tell its timer of each
    window and move the window's deadline, and start it again at once if it
    dies (a thread waits for that)."""

    def __init__(self, cfg, env):
        self.deadline_path = os.path.join(cfg.runtime_dir, DEADLINE_FILE)
        self.env = dict(env)
        for name, value in (("MARKER", os.path.join(cfg.runtime_dir, MARKER_FILE)),
                            ("SPILL", os.path.join(cfg.runtime_dir, SPILL_FILE)),
                            ("DEADLINE", self.deadline_path),
                            ("PYTHON", sys.executable),
                            ("FLAGS", " ".join(interpreter_flags())),
                            ("PROGRAM", PROCESS.program), ("RUNTIME_DIR", cfg.runtime_dir),
                            ("LOG_LEVEL", cfg.log_level),
                            ("SYSLOG", "--syslog" if cfg.syslog else "")):
            self.env[GUARDIAN_ENV_PREFIX + name.encode()] = os.fsencode(value)
        self.argv = [SHELL, "-c", GUARDIAN_SCRIPT, GUARDIAN_NAME]
        self.lock = threading.Lock()      # one start at a time: a /sync, or the watcher
        self.proc = None
        self.write_fd = None              # its stdin's pipe: closed only by our death
        self.timer_fd = None              # its timer's pipe: a line wakes it
        self.deadline_fd = None
        self.window_open = False
        self.changed = WakePipe()         # tells the watcher of a new guardian

    def start(self):
        """False (logged) if it cannot start now; the watcher tries again."""
        with self.lock:
            return self._start()

    def _start(self):
        for fd in (self.write_fd, self.timer_fd):
            if fd is not None:
                os.close(fd)
        self.write_fd = self.timer_fd = None
        pipes = []
        try:
            pipes.extend(os.pipe())
            pipes.extend(os.pipe())
        except OSError as err:
            for fd in pipes:
                os.close(fd)
            log.alert("guardian not started: cannot create a pipe: %s", err.strerror)
            return False
        read_fd, write_fd, timer_read, timer_write = pipes
        try:
            self.proc = start_process(self.argv, self.env, read_fd, 2, stdout=timer_read)
        except OSError as err:
            os.close(write_fd)
            os.close(timer_write)
            log.alert("guardian not started: %s", err.strerror)
            return False
        finally:
            os.close(read_fd)
            os.close(timer_read)
        os.set_blocking(timer_write, False)   # never wait on it: a full pipe is a timer awake
        self.write_fd, self.timer_fd = write_fd, timer_write
        set_oom_score(GUARDIAN_OOM_SCORE, self.proc.pid)
        log.debug("guardian started: process %d", self.proc.pid)
        if self.window_open:              # the new one times the open window too
            self._wake_timer()
        self.changed.poke()
        return True

    def open_window(self, seconds_left):
        """A window opened: it must be released within seconds_left."""
        with self.lock:
            self.window_open = True
            self._write_deadline(seconds_left)
            self._wake_timer()

    def move_deadline(self, seconds_left):
        """The open window must now be released within seconds_left."""
        with self.lock:
            if self.window_open:
                self._write_deadline(seconds_left)

    def close_window(self):
        """The timer finds 0 at its next look (5 s at most), and waits again."""
        with self.lock:
            if self.window_open:
                self.window_open = False
                self._write_deadline(None)

    def _wake_timer(self):
        if self.timer_fd is not None:
            try:
                os.write(self.timer_fd, b"\n")
            except OSError:               # full: it is awake; gone: the watcher acts
                pass

    def _write_deadline(self, seconds_left):
        """The deadline file: seconds since boot, one line, rewritten in place
        (what follows the first line is never read); 0: no window."""
        due = 0 if seconds_left is None else int(boot_seconds() + seconds_left + 0.999)
        try:
            if self.deadline_fd is None or not os.fstat(self.deadline_fd).st_nlink:
                self._open_deadline_file()
            os.pwrite(self.deadline_fd, b"%d\n" % due, 0)
        except OSError as err:
            log.alert("cannot write the guardian's deadline %s: %s (a stopped synchook "
                      "would not be killed at the window's ceiling)", self.deadline_path,
                      err.strerror)

    def _open_deadline_file(self):
        if self.deadline_fd is not None:
            os.close(self.deadline_fd)
            self.deadline_fd = None
        fd = os.open(self.deadline_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise OSError(errno.EPERM, "not a regular file of synchook's user")
        self.deadline_fd = fd

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ensure(self):
        """Before a window opens: the guardian must be there to release it.
        True when it is."""
        with self.lock:
            if self.alive():
                return True
            self._say_gone()
            return self._start()

    def _say_gone(self):
        if self.proc is not None:
            log.alert("the guardian (process %d) is gone (%s): starting a new one",
                      self.proc.pid, describe_exit(self.proc.returncode))

    def watch(self):
        """Start the thread that starts a new guardian as soon as one dies."""
        threading.Thread(target=self._watch, name="guardian", daemon=True).start()

    def _watch(self):
        # A pipe's write end reports POLLERR once its reader is gone: the
        # guardian's death wakes this thread, no polling.
        while True:
            try:
                self._watch_once()
            except Exception as err:      # noqa: BLE001 (the watcher must not end)
                log.error("guardian watcher: %r", err)
                time.sleep(1.0)

    def _watch_once(self):
        with self.lock:
            fd = self.write_fd
        poller = select.poll()
        poller.register(self.changed, select.POLLIN)
        if fd is not None:
            poller.register(fd, 0)
        try:
            events = poller.poll(None if fd is not None else 1000)
        except InterruptedError:
            return
        self.changed.drain()
        if fd is not None and not any(ready == fd for ready, _ in events):
            return                        # a new guardian: watch its pipe instead
        with self.lock:
            if self.write_fd != fd:
                return
            if fd is not None:
                try:
                    self.proc.wait(KILL_WAIT)
                except subprocess.TimeoutExpired:
                    return                # closed its pipe, not dead yet: look again
                self._say_gone()
            if self._start():
                return
        time.sleep(1.0)                   # could not start one: try again in a second


def interpreter_flags():
    """The flags this Python was started with that matter for a recovery:
    isolation and site as the daemon had them, and never a bytecode write."""
    flags = ["-B"]
    if sys.flags.isolated:
        flags.append("-I")
    elif sys.flags.ignore_environment:
        flags.append("-E")
    if sys.flags.no_site:
        flags.append("-S")
    return flags


def set_oom_score(value, pid="self"):
    """Write oom_score_adj (root may lower it); False if it could not."""
    try:
        fd = os.open("/proc/%s/oom_score_adj" % pid, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"%d" % value)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_oom_score():
    try:
        with open("/proc/self/oom_score_adj", "rb") as handle:
            return int(handle.read(16))
    except (OSError, ValueError):
        return None


def lower_oom_score():
    """Make the daemon one of the OOM killer's last choices (a guest frozen
    under memory pressure is when it strikes), unless already lower.  Commands
    get the score back that synchook had (see spawn).  Returns why it could
    not, or None (said once the start-up is over: not before a bad setting's
    one line)."""
    before = read_oom_score()
    if before is None or before <= DAEMON_OOM_SCORE or os.geteuid() != 0:
        return None
    if set_oom_score(DAEMON_OOM_SCORE):
        PROCESS.command_oom_score = before
        log.debug("oom_score_adj %d -> %d (commands keep %d)", before, DAEMON_OOM_SCORE, before)
        return None
    return ("cannot lower oom_score_adj below %d here (no CAP_SYS_RESOURCE: a container?): "
            "the OOM killer may choose synchook; its guardian would then release the window"
            % before)


def forbid_core_dumps():
    """No core dump from this process: a crash in a window would write it to
    the frozen root (a file, or /var for systemd-coredump) and wait there in
    the kernel, unkillable, its pipe to the guardian still open.  RLIMIT_CORE
    1 stops both kinds: no ELF core fits in one byte, and the kernel refuses a
    pipe core_pattern that value.  Commands get the limit back (see spawn)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if soft == 1:
        return
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (1, 1 if hard == 0 else hard))
    except (OSError, ValueError) as err:
        log.alert("cannot turn core dumps off (RLIMIT_CORE): %s: a crash during a window "
                  "could hang writing its core to the frozen filesystem", err)
        return
    PROCESS.command_core_limit = (soft, hard)


# ---------------------------------------------------------------------------
# HTTP: one handler, bounded reads, nothing from the request reaches a shell
# ---------------------------------------------------------------------------

HEADER_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+:")   # no folding, no space before ':'
# Exactly METHOD SP target SP HTTP/x.y: no other separator (TAB, VT, 0x85 and 0xA0
# were all "whitespace" to str.split), no control or non-ASCII byte in the target.
REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r?")
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")   # CTLs but TAB, in a header line
ROUTES = {"/sync": "sync", "/post-sync": "post_sync", "/status": "status"}


class Headers:
    """A request's header fields, as the handler reads them (get: the first
    value, get_all: every one, names in any case), without the email parser's
    machinery that http.client.HTTPMessage brings to every request."""
    __slots__ = ("fields",)

    def __init__(self):
        self.fields = {}

    def add(self, name, value):
        self.fields.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self.fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return self.fields.get(name.lower())


class BadHead(Exception):
    def __init__(self, status, reason):
        Exception.__init__(self, reason)
        self.status = status


# A non-blocking socket's "not now", plain or TLS.
SSL_WANTS_READ = (ssl.SSLWantReadError,) if ssl else ()
SSL_WANTS_WRITE = (ssl.SSLWantWriteError,) if ssl else ()


def by_deadline(sock, deadline, late, writing, call, *args):
    """call(*args) on a non-blocking socket before deadline (else
    socket.timeout(late)), waiting whenever it would block.  The call is tried
    before any wait: the data is mostly there already, and a socket timeout
    would poll() before every read and write, a system call and a turn of the
    interpreter lock each (and restart at every byte, which a slow client
    could use)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout(late)
        try:
            return call(*args)
        except BlockingIOError:
            wants_write = writing
        except SSL_WANTS_READ:
            wants_write = False
        except SSL_WANTS_WRITE:
            wants_write = True
        if wants_write:
            wait_ready([], left, [sock])
        else:
            wait_ready([sock], left)


class DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline: a slowloris client cannot reset it."""

    def __init__(self, sock, handler):
        io.RawIOBase.__init__(self)
        self.sock = sock
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        return by_deadline(self.sock, self.handler.deadline, "request head not complete in time",
                           False, self.sock.recv_into, buffer)


class SendAll:
    """A minimal wfile: every write is complete by its deadline (which the
    handler sets for each answer), or raises.  (sendall's timeout restarts at
    every byte, so a client reading 1 byte a second would keep the connection
    for ever.)"""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.closed = False

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[by_deadline(self.sock, self.deadline,
                                    "answer not taken by the client in time", True,
                                    self.sock.send, view):]
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def http_date(cache=[None, ""]):
    """Now as an HTTP Date header value, formatted once per second."""
    now = int(time.time())
    if cache[0] != now:
        cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return cache[1]


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "%s/%s" % (PROG, __version__)
    sys_version = ""                 # do not advertise the Python version
    protocol_version = "HTTP/1.1"    # XO keeps connections alive

    # Connection set-up ------------------------------------------------------
    def setup(self):
        self.connection = self.request
        self.conn = self.server.connection_of(self.request)
        self.client_ip = self.server.client_ip(self.client_address)
        self.started = time.monotonic()
        self.command = None
        self.path = "-"
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        self.deadline = time.monotonic() + self.server.cfg.header_timeout
        try:
            self.connection = self.server.negotiate(self.request, self)
        except (OSError, ValueError) as err:
            log.debug("%s: connection dropped during set-up: %s", self.client_ip, err)
            self.connection = None
        if self.connection is None:       # dropped: handle() and finish() do nothing
            return
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, self), 8192)
        self.wfile = SendAll(self.connection, self.deadline)
        self.requests = 0
        self.refused = False

    def handle(self):
        if self.connection is None:
            return
        self.close_connection = False
        try:
            while not self.close_connection:
                self.handle_one_request()
        except OSError as err:
            log.debug("%s: connection ended: %s", self.client_ip, err)

    def finish(self):
        if self.connection is None:
            return
        if self.refused:
            self.linger()
        try:
            self.rfile.close()
        except OSError:
            pass
        if self.connection is not self.request:   # the TLS socket is ours to close
            try:
                self.connection.close()
            except OSError:
                pass

    def linger(self):
        """After refusing a request, read (and drop) what the client still
        sends, 64 KB and one second at most, before closing: a close with
        unread data sends a reset, which can destroy the answer before the
        client has read it."""
        deadline = time.monotonic() + 1.0
        left = 65536
        try:
            while left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
                self.connection.settimeout(wait)
                chunk = self.connection.recv(min(left, 16384))
                if not chunk:
                    return
                left -= len(chunk)
        except (OSError, ValueError):
            pass

    def mark(self, state):
        """This connection's state, which the eviction of the oldest idle
        connection reads (under the server's lock; two attribute writes need
        no lock of their own, and a victim chosen a moment early is harmless)."""
        conn = self.conn
        if conn is not None:
            conn.state, conn.since = state, time.monotonic()

    # Reading one request ----------------------------------------------------
    def read_head(self):
        """Request line and headers, bounded in size and count; None at EOF."""
        lines = []
        total = 0
        while True:
            limit = MAX_REQUEST_LINE if not lines else MAX_HEADER_LINE
            line = self.rfile.readline(limit + 1)
            if not line:
                if lines:
                    raise socket.timeout("connection closed inside the request head")
                return None
            if not lines and line in (b"\r\n", b"\n"):
                continue                      # RFC 9112: ignore a leading empty line
            if len(line) > limit:
                if not lines:
                    raise BadHead(414, "request line too long")
                raise BadHead(431, "header line too long")
            total += len(line)
            lines.append(line)
            if total > MAX_HEAD:
                raise BadHead(431, "request head too large")
            if len(lines) > MAX_HEADERS + 1:
                raise BadHead(431, "too many header lines")
            if line in (b"\r\n", b"\n") and len(lines) > 1:
                return b"".join(lines)
            if len(lines) > 1 and not HEADER_LINE.match(line):
                raise BadHead(400, "malformed header line")

    def handle_one_request(self):
        self.mark("idle")
        self.deadline = time.monotonic() + self.server.cfg.header_timeout
        self.command, self.path, self.request_version = None, "-", "HTTP/1.1"
        try:
            head = self.read_head()
        except BadHead as err:
            self.started = time.monotonic()
            self.reply(err.status, str(err), close=True)
            return
        except (socket.timeout, OSError) as err:
            log.debug("%s: no complete request: %s", self.client_ip, err)
            self.close_connection = True
            return
        if head is None:
            self.close_connection = True
            return
        log.defer()                           # this request's lines: after its answer
        try:
            self.serve_request(head)
        finally:
            log.end_defer()

    def serve_request(self, head):
        self.mark("busy")
        self.started = time.monotonic()
        self.requests += 1
        try:
            self.parse_head(head)
        except BadHead as err:
            self.reply(err.status, str(err), close=True)
            return
        if self.requests >= MAX_REQUESTS:
            self.close_connection = True      # bounds what one client can pipeline
        self.dispatch()

    def parse_head(self, head):
        """Request line and headers (already bounded and checked line by line by
        read_head) into command, path, request_version and headers.

        http.server's parse_request would do, through the email parser, at
        three times the cost on the path of every /sync.
        """
        lines = head.decode("latin-1").split("\n")
        self.requestline = lines[0].rstrip("\r")
        match = REQUEST_LINE.fullmatch(lines[0])
        if not match:
            raise BadHead(400, "bad request line")
        words = match.groups()
        if words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadHead(505, "HTTP version not supported")
        self.command, self.path, self.request_version = words
        self.headers = Headers()
        for line in lines[1:]:
            line = line[:-1] if line.endswith("\r") else line
            if HEADER_CONTROL.search(line):
                raise BadHead(400, "control character in a header")
            name, _, value = line.partition(":")
            if name:
                self.headers.add(name, value.strip(" \t"))
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = (connection == "close" or
                                 (words[2] == "HTTP/1.0" and connection != "keep-alive"))

    # Routing -----------------------------------------------------------------
    def dispatch(self):
        # A body is never read, so a request that announces one ends the
        # connection whatever its path: its body must not be taken for the
        # next request (POST /x with "GET /sync ..." as its body).
        if self.has_body():
            return self.reply(400, "a request body is not accepted")
        path, _, query = self.path.partition("?")
        route = ROUTES.get(path)
        if route is None:
            return self.reply(404, "not found")
        if self.command != "GET":
            return self.reply(405, "method not allowed", {"Allow": "GET"})
        if route != "status" and self.server.status_only(self.client_ip):
            return self.reply(403, "forbidden: %s (loopback may read /status only)" % (
                "--allow none, " + CLOSED_HINT if is_closed(self.server.cfg) else "not in --allow"))
        if not self.server.secret.accepts(self.headers, query):
            return self.reply(403, WRONG_SECRET)
        if route != "status":
            self.server.prove(self.conn)
        getattr(self, "serve_" + route)()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch
    do_TRACE = do_CONNECT = dispatch

    def has_body(self):
        if self.headers.get("Transfer-Encoding"):
            return True
        lengths = self.headers.get_all("Content-Length") or []
        return any(value.strip() != "0" for value in lengths)

    def serve_sync(self):
        self.reply(*self.wait_on_window(self.server.window.sync))

    def serve_post_sync(self):
        self.reply(*self.wait_on_window(self.server.window.post_sync))

    def wait_on_window(self, phase):
        """phase(client)'s answer; while it waits, this connection is never the
        one evicted to make room."""
        self.mark("command")
        try:
            return phase(self.client_ip)
        finally:
            self.mark("busy")
            if self.conn is not None:
                self.conn.hook = True

    def serve_status(self):
        state = self.server.window.status()
        # For `synchook fleet`: would this caller's /sync be served, what would freeze.
        state["client_allowed"] = self.server.allowed(self.client_ip)
        state["freeze_plan"] = freeze_points(self.server.cfg)
        state["log_lines_dropped"] = log.lost.dropped
        state["log_writer_errors"] = log.lost.failures
        state["version"] = __version__
        state["uptime"] = round(time.monotonic() - self.server.started, 1)
        self.reply(200, json.dumps(state, indent=1), content_type="application/json")

    # Answering -----------------------------------------------------------------
    def reply(self, status, text, headers=None, close=False,
              content_type="text/plain; charset=utf-8"):
        body = (text + "\n").encode("utf-8")
        # The answer may come a minute after the request; writing it gets its own time.
        self.wfile.deadline = time.monotonic() + self.server.cfg.header_timeout
        if close or 400 <= status < 500:      # after a refusal, trust nothing that follows
            self.close_connection = True
            self.refused = True
        lines = ["%s %d %s" % (self.protocol_version, status, self.responses[status][0]),
                 "Server: " + self.server_version, "Date: " + http_date(),
                 "Content-Type: " + content_type, "Content-Length: %d" % len(body)]
        lines.extend("%s: %s" % item for item in (headers or {}).items())
        if self.close_connection:
            lines.append("Connection: close")
        else:
            # How long an idle connection stays: undici (XO) then reuses it only
            # while that is more than a second away, never when it is closing.
            lines.append(self.server.keep_alive)
        # The request's line is queued before the answer leaves: whatever the
        # client does next (a SIGTERM, the next request) is logged after it.
        self.log_request_line(status, text)
        # Head and body in one write: one segment on the wire, no Nagle wait.
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        if self.close_connection and self.connection is self.request:
            self.connection.shutdown(socket.SHUT_WR)   # the client sees the end at once
            if self.conn is not None:
                self.conn.ended = True

    def log_request_line(self, status, text):
        if log.level > LEVELS["info"]:
            return                            # request lines are info lines
        path = self.path.partition("?")[0]
        line = ("%s %s %s %d %.3fs", self.client_ip, self.command or "-", escape(path, 200),
                status, time.monotonic() - self.started)
        if path in ("/sync", "/post-sync") and not 400 <= status < 500:
            log.info(*line)                   # the window's story: always logged
        else:
            log.noise(self.client_ip, *line, wrong_secret=text == WRONG_SECRET)

    def log_message(self, fmt, *args):
        # Never called by the paths used (reply() logs each request): kept so that
        # nothing of http.server's ever writes to stderr, which may be a file on a
        # frozen filesystem.
        log.debug("%s: %s", self.client_ip, fmt % args)


# ---------------------------------------------------------------------------
# The server: connection threads, TLS detection, allow-list, connection cap,
# no idle wake-ups
# ---------------------------------------------------------------------------

if hasattr(http.server, "ThreadingHTTPServer"):
    ThreadingHTTPServer = http.server.ThreadingHTTPServer  # novermin
else:  # Python 3.6: the same class, as 3.7 defines it
    class ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True


class Waker(WakePipe):
    """Wakes the main thread: for a signal (set_wakeup_fd writes here from
    whichever thread the kernel gave the signal to), or the stop."""

    def __init__(self):
        WakePipe.__init__(self)
        self.stopping = False
        self.restarting = False          # stop, then run again in place (SIGUSR2)

    def install(self):
        if sys.version_info >= (3, 7):
            # A full pipe is harmless (the main thread is awake already); no warning
            # on stderr for it.
            signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)  # novermin
        else:
            signal.set_wakeup_fd(self.write_fd)

    def stop(self):
        self.stopping = True
        self.poke()

    def restart(self):
        """Stop and run again, once no window is open (SyncHookServer.serve)."""
        self.restarting = True
        self.poke()


class RateLimitedWarning:
    """A warning that may repeat many times a second (out of descriptors):
    logged once, then once per NOISE_SUMMARY seconds with how many times it
    happened meanwhile."""

    def __init__(self, what, consequence):
        self.what, self.consequence = what, consequence
        self.lock = threading.Lock()
        self.next_at = 0.0
        self.count = 0

    def note(self, reason):
        now = time.monotonic()
        with self.lock:
            self.count += 1
            if now < self.next_at:
                return
            count, self.count, self.next_at = self.count, 0, now + NOISE_SUMMARY
        log.warning("%s: %s; %s%s", self.what, reason, self.consequence,
                    " (%d times in the last %d s)" % (count, NOISE_SUMMARY) if count > 1 else "")


class Connection:
    __slots__ = ("sock", "state", "since", "ended", "ip", "status_only", "hook", "proven")

    def __init__(self, sock, ip, status_only):
        self.sock = sock
        self.state = "new"
        self.since = time.monotonic()
        self.ended = False             # our side already shut down (the last answer sent)
        self.ip = ip
        self.status_only = status_only     # loopback, not in --allow: may read /status only
        self.hook = False              # has carried a /sync or /post-sync (XO's connection)
        self.proven = False            # has carried a valid /sync or /post-sync request


class ConnectionTable:
    """The connections being served, and who may take whose place at the cap
    (max_connections, lowered at start to fit the descriptor limit)."""

    def __init__(self, max_connections):
        self.max_connections = max_connections
        self.lock = threading.Lock()
        self.table = {}                        # socket -> Connection
        self.known = collections.OrderedDict()   # addresses that sent a valid request

    def admit(self, request, ip, status_only, window_open):
        """Add a new connection, making room at the cap; False: refused."""
        with self.lock:
            full = len(self.table) >= self.max_connections
            if status_only:
                full = full or sum(c.status_only for c in self.table.values()
                                   ) >= STATUS_ONLY_CONNECTIONS
            if full:
                key = self.victim(status_only, ip, window_open)
                if key is None:
                    log.noise(ip, "%s: connection refused: %d connections, none that may be "
                              "dropped", ip, len(self.table), level=30)
                    return False
                victim = self.table.pop(key)
                try:
                    socket.socket.shutdown(victim.sock, socket.SHUT_RDWR)
                except OSError:
                    pass
                log.debug("connection limit: dropped the oldest %s connection%s", victim.state,
                          " (loopback, /status only)" if victim.status_only else "")
            self.table[request] = Connection(request, ip, status_only)
        return True

    def victim(self, for_status_only, ip, window_open):
        """Which connection makes room (under the lock), or None: the newcomer
        is refused.  Never one waiting on the window; connections that may only
        read /status go first, and a newcomer of that kind takes the place of
        its own kind only.  A newcomer from an address never seen sending a
        valid request (a stranger, say a flood of idle connections) may only
        take a stranger's place: XO's connections (from an address that sent
        a valid request) are never pushed out by one, whatever the cap.  While
        a window is open, a connection that carried a /sync or /post-sync (XO's
        kept-alive one, on which its /post-sync may come) is never dropped."""
        candidates = [c for c in self.table.items()
                      if c[1].status_only and c[1].state != "command"]
        if not candidates and not for_status_only:
            candidates = [c for c in self.table.items()
                          if c[1].state != "command" and not (window_open and c[1].hook)]
            strangers = [c for c in candidates
                         if not c[1].proven and c[1].ip not in self.known]
            # a stranger takes only a stranger's place; XO, strangers' first
            candidates = strangers if ip not in self.known else strangers or candidates
        if not candidates:
            return None
        return min(candidates, key=lambda item: item[1].since)[0]

    def prove(self, conn):
        """conn carried a valid hook request: it, and its address from now on,
        are XO's, which no stranger's connection may push out."""
        with self.lock:
            conn.proven = True
            self.known[conn.ip] = True
            self.known.move_to_end(conn.ip)
            if len(self.known) > KNOWN_CLIENTS:
                self.known.popitem(last=False)

    def get(self, request):
        with self.lock:
            return self.table.get(request)

    def pop(self, request):
        with self.lock:
            return self.table.pop(request, None)

    def rewrap(self, sock, tls):
        """The connection on sock now speaks TLS (so eviction can still reach it)."""
        with self.lock:
            conn = self.table.get(sock)
            if conn is not None:
                conn.sock = tls

    def busy(self):
        """Is a connection in the middle of a request?"""
        with self.lock:
            return any(c.state in ("busy", "command") for c in self.table.values())


class Spares:
    """How many connection threads wait in accept(), or are on their way to it.
    Counted under the connection table's lock: one order for counting threads
    and admitting connections (two locks let about 40 more threads pile up
    under 1,000 stalled connections, tests/test_access.py)."""

    def __init__(self, lock):
        self.lock = lock
        self.count = 0

    def now(self):
        with self.lock:
            return self.count

    def add(self):
        with self.lock:
            self.count += 1

    def taken(self):
        """One spare is gone (it took a connection, or never started): True if
        it was the last."""
        with self.lock:
            self.count -= 1
            return self.count == 0

    def rejoin(self, stopping):
        """A thread done with its connection waits for another, unless
        IDLE_WORKERS do already (or the server stops): True if it does."""
        with self.lock:
            if self.count >= IDLE_WORKERS or stopping:
                return False
            self.count += 1
            return True


class AcceptPause:
    """Out of descriptors, accept() fails at once (EMFILE): a connection thread
    waits ACCEPT_PAUSE, or until a connection closes, instead of spinning."""

    def __init__(self):
        self.paused = False
        self.freed = threading.Event()
        self.failures = RateLimitedWarning("cannot accept a connection", "pausing")

    def wait(self, err):
        self.failures.note(err.strerror)
        self.paused = True
        self.freed.wait(ACCEPT_PAUSE)
        self.freed.clear()
        self.paused = False

    def descriptor_closed(self):
        if self.paused:                   # a descriptor is free: accept again
            self.freed.set()


class Secret:
    """--secret, kept as digests (of the token= value, and of the base64 form a
    Bearer header carries) and compared in constant time."""

    def __init__(self, secret):
        self.digest = self.bearer_digest = None
        if secret:
            raw = secret.encode("utf-8", "surrogateescape")
            self.digest = hashlib.sha256(raw).digest()
            self.bearer_digest = hashlib.sha256(base64.b64encode(raw)).digest()

    def accepts(self, headers, query):
        """Does the request carry the secret (or is there none)?"""
        if self.digest is None:
            return True
        good = False
        auth = headers.get("Authorization", "")
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
            good = hmac.compare_digest(digest, self.bearer_digest)
        # Percent-decoding only, not form decoding: a raw "+" in the tag URL is a
        # "+" of the secret (base64 secrets have them), not a space.
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if urllib.parse.unquote(name) == "token":
                digest = hashlib.sha256(urllib.parse.unquote_to_bytes(value)).digest()
                good = hmac.compare_digest(digest, self.digest) or good
                break
        return good


class SyncHookServer(ThreadingHTTPServer):
    allow_reuse_address = True
    request_queue_size = 1024         # a burst of connections must not overflow the backlog

    def __init__(self, cfg, family, address, window, tls_context, waker, max_connections,
                 listener=None, shared=False):
        self.address_family = family
        self.cfg = cfg
        self.window = window
        self.tls_context = tls_context
        self.waker = waker
        self.started = time.monotonic()
        self.connections = ConnectionTable(max_connections)
        self.spares = Spares(self.connections.lock)
        self.pause = AcceptPause()
        self.keep_alive = "Keep-Alive: timeout=%d" % int(cfg.header_timeout)
        self.secret = Secret(cfg.secret)
        # systemd's socket (socket activation), which outlives this process.
        self.socket_shared = shared
        if listener is None:
            ThreadingHTTPServer.__init__(self, address, Handler)
        else:                             # bound already: systemd's, or our own kept one
            ThreadingHTTPServer.__init__(self, address, Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: its getfqdn() (for server_name, which
        # nothing here reads) can hang on a guest with broken DNS.
        socketserver.TCPServer.server_bind(self)

    # Threads.  Each connection thread accepts its own connection: spare ones
    # wait in accept() (blocked: no wake-up while idle; the kernel wakes one
    # per connection), so that a connection is served by the very thread the
    # kernel woke, with no hand-over to another thread on its way (that cost
    # tens of microseconds on each /sync).  The main thread waits for signals
    # and the stop, nothing else.
    def serve(self):
        """Serve until the waker says stop, then stop accepting; False when
        no connection thread could be started at all.

        Signals may be delivered to any thread; Python runs their handlers in
        this one, and set_wakeup_fd (the waker's pipe) makes sure it wakes to
        let it.
        """
        started = self.add_spare()
        if started:
            poller = select.poll()
            poller.register(self.waker.read_fd, select.POLLIN)
            while not self.waker.stopping:
                # A restart waits for an open window to close: run now, its post
                # phase would release the guest during XO's snapshot.
                poller.poll(1000 if self.waker.restarting else None)
                self.waker.drain()
                if self.waker.restarting and not self.window.is_open:
                    self.waker.stopping = True
        self.stop_accepting()
        return started

    def stop_accepting(self):
        if self.waker.restarting or self.socket_shared:
            # The socket stays open, listening: for the run that follows in this
            # process (restart_in_place), or in systemd's hands (a shutdown would
            # stop it listening for everyone).  Connections wait in its queue.
            self.wake_acceptors()
            if not self.waker.restarting:
                self.socket.close()
            return
        try:
            # Wakes every thread blocked in accept() (Linux: EINVAL), which
            # closing the socket alone would not.
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()

    def wake_acceptors(self):
        """A thread blocked in accept() returns only with a connection, and the
        kept socket cannot be shut down to wake it: give each spare one a
        connection of our own, so that none takes a client's afterwards."""
        host, port = self.server_address[:2]
        if host in ("::", "0.0.0.0"):
            host = "127.0.0.1"               # the dual-stack socket takes IPv4 too
        for _ in range(self.spares.now()):
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return

    def finish_requests(self, timeout):
        """Wait (at most timeout) until no connection is in the middle of a
        request: the last ones taken before a restart in place are answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.connections.busy():
                return
            time.sleep(0.05)

    def add_spare(self):
        """Start one more thread waiting for a connection; False if it cannot start."""
        self.spares.add()
        try:
            # Not threading.Thread: its start() waits until the new thread runs,
            # a hand-over of the interpreter lock on the way of a burst of
            # connections.  A bare thread is a daemon thread: exit ends it.
            _thread.start_new_thread(self._connections, ())
            return True
        except RuntimeError as err:          # no thread can be started now
            self.spares.taken()
            log.error("cannot start a connection thread: %s", err)
            return False

    def _connections(self):
        """A connection thread: accept a connection, serve it, and again, while
        fewer than IDLE_WORKERS others wait; the last spare starts the next
        one before it serves, so that someone always accepts."""
        while True:
            request, client_address = self.accept_next()
            last = self.spares.taken()
            if request is None:
                return
            if last and not self.waker.stopping:
                self.add_spare()
            self.serve_connection(request, client_address)
            if not self.spares.rejoin(self.waker.stopping):
                return

    def accept_next(self):
        """The next connection, or (None, None) once stopping.  Out of
        descriptors, waits (ACCEPT_PAUSE, or until a connection closes)
        instead of spinning on EMFILE."""
        while not self.waker.stopping:
            try:
                return self.get_request()
            except OSError as err:
                if self.waker.stopping:
                    break
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.pause.wait(err)
                # else: the client left before it was taken
        return None, None

    def serve_connection(self, request, client_address):
        try:
            if self.verify_request(request, client_address):
                self.process_request_thread(request, client_address)   # errors handled there
                return
        except Exception:                     # noqa: BLE001 (a bug must not end the thread)
            self.handle_error(request, client_address)
        self.shutdown_request(request)

    # Who may connect, and how many ---------------------------------------------
    @staticmethod
    def client_ip(client_address):
        host = client_address[0]
        if ":" not in host:                  # plain IPv4: the common case, kept cheap
            return host
        host = host.split("%", 1)[0]
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return host
        if addr.version == 6 and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(addr)

    def status_only(self, ip):
        """A loopback client that --allow leaves out may still read /status
        (synchook status), and nothing else."""
        return not self.allowed(ip)

    def allowed(self, ip):
        if not self.cfg.allow:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in network for network in self.cfg.allow)

    def verify_request(self, request, client_address):
        ip = self.client_ip(client_address)
        status_only = not self.allowed(ip)
        if status_only and not is_loopback(ip):   # loopback: /status only
            log.noise(ip, "%s: connection refused: %s", ip,
                      "--allow none, " + CLOSED_HINT if is_closed(self.cfg) else
                      "not in --allow", level=30)
            return False
        return self.connections.admit(request, ip, status_only, self.window.is_open)

    def prove(self, conn):
        if conn is not None:
            self.connections.prove(conn)

    def connection_of(self, request):
        return self.connections.get(request)

    def shutdown_request(self, request):
        conn = self.connections.pop(request)
        if conn is not None and conn.ended:    # reply() shut it down already
            self.close_request(request)
        else:
            ThreadingHTTPServer.shutdown_request(self, request)
        self.pause.descriptor_closed()

    def handle_error(self, request, client_address):
        err = sys.exc_info()[1]
        if isinstance(err, OSError):           # the client went away, mostly
            log.debug("%s: connection error: %s", client_address[0], err)
        else:
            log.error("%s: internal error: %r", client_address[0], err)

    # TLS or not, told by the first byte ---------------------------------------
    def negotiate(self, sock, handler):
        """Returns the socket to speak HTTP on (TLS-wrapped or not), or None."""
        mode = self.cfg.tls if self.tls_context is not None else "off"
        # The client's first byte is seldom there yet when accept() returns: a
        # socket timeout waits for it in C (poll, then recv), which by_deadline
        # would try first, fail (an exception) and wait for in Python.
        sock.settimeout(max(0.001, handler.deadline - time.monotonic()))
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            raise socket.timeout("no request in time")
        sock.setblocking(False)             # for good: see by_deadline
        if not first:
            return None
        is_tls = first == b"\x16"           # a TLS handshake record
        if is_tls and mode == "off":
            log.noise(handler.client_ip, "%s: TLS connection refused (--tls off)",
                      handler.client_ip)
            return None
        if not is_tls and mode == "on":
            self.refuse_plain(sock, handler.client_ip)
            return None
        if not is_tls:
            return sock
        tls = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.connections.rewrap(sock, tls)
        try:
            handshake(tls, handler.deadline)
        except (OSError, ValueError) as err:
            log.noise(handler.client_ip, "%s: TLS handshake failed: %s", handler.client_ip, err)
            tls.close()
            return None
        return tls

    def refuse_plain(self, sock, ip):
        body = b"this port speaks HTTPS only\n"
        head = ("HTTP/1.1 400 Bad Request\r\nServer: %s\r\nContent-Type: text/plain\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n" % (Handler.server_version,
                                                                     len(body)))
        try:
            sock.sendall(head.encode() + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        log.noise(ip, "%s: plain HTTP refused (--tls on)", ip)


def is_loopback(ip):
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def handshake(tls, deadline):
    """TLS handshake that ends at deadline, however slowly the client dribbles
    (a socket timeout would restart at every byte)."""
    by_deadline(tls, deadline, "TLS handshake not complete in time", False, tls.do_handshake)


def open_server(cfg, window, tls_context, waker, inherited=(None, False)):
    """Bind: dual-stack by default, IPv4 where IPv6 is off, or take the socket
    given (inherited_listener).  OSError on failure."""
    args = (window, tls_context, waker, cfg.max_connections)
    listener, shared = inherited
    if listener is not None:
        return SyncHookServer(cfg, listener.family, None, *args, listener=listener,
                              shared=shared)
    if cfg.listen:
        try:
            # An ASCII address as bytes: as str, getaddrinfo loads the idna codec.
            try:
                host = cfg.listen.encode("ascii")
            except UnicodeEncodeError:
                host = cfg.listen
            infos = socket.getaddrinfo(host, cfg.port, 0, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except socket.gaierror as err:
            raise ConfigError("--listen %s: %s" % (cfg.listen, err.strerror))
        family, _, _, _, address = infos[0]
        return SyncHookServer(cfg, family, address[:2], *args)
    try:
        return SyncHookServer(cfg, socket.AF_INET6, ("::", cfg.port), *args)
    except OSError as err:
        if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
            raise
        log.info("IPv6 unavailable (%s): listening on IPv4 only", err.strerror)
        return SyncHookServer(cfg, socket.AF_INET, ("0.0.0.0", cfg.port), *args)


def inherited_listener(cfg):
    """(the listening socket this process was given, or None; whether it is
    systemd's): by systemd's socket activation (synchook.socket: systemd holds
    the port from boot on, across restarts and crashes, so that no local user
    can take it meanwhile), or by our own restart in place.  The LISTEN_* variables are removed
    (commands must not think the socket theirs), the descriptor made
    close-on-exec.  A kept socket that no longer matches the settings (the
    port or address changed) is closed: the caller binds anew."""
    names = os.environ.pop("LISTEN_FDNAMES", "")
    count, pid = os.environ.pop("LISTEN_FDS", ""), os.environ.pop("LISTEN_PID", "")
    if not count or pid != str(os.getpid()):
        return None, False
    if count != "1":
        raise ConfigError("LISTEN_FDS=%s: synchook takes one socket (ListenStream= once in "
                          "synchook.socket)" % count)
    try:
        listener = socket_from_fd(LISTEN_FD)
    except OSError as err:
        raise ConfigError("the socket passed as descriptor %d (LISTEN_FDS): %s"
                          % (LISTEN_FD, err.strerror))
    listener.set_inheritable(False)
    port = listener.getsockname()[1]
    # A restart in place keeps whose the socket is: systemd's is never shut down
    # (systemd's socket unit would fail: POLLHUP on its listening socket).
    if names == REEXEC_SYSTEMD_NAME:
        return listener, True
    kept = names == REEXEC_NAME
    if kept and ((cfg.port and port != cfg.port) or not listen_matches(cfg.listen, listener)):
        log.info("the kept socket (port %d) is not the one the settings ask for: "
                 "binding anew", port)
        listener.close()
        return None, False
    if not kept and port != cfg.port:
        log.warning("listening on port %d, the socket systemd passed (synchook.socket), not "
                    "on --port %d: change ListenStream= there too (install.sh does)",
                    port, cfg.port)
    return listener, not kept


def socket_from_fd(fd):
    """A listening TCP socket object for descriptor fd (OSError if it is not
    one).  Python 3.6 does not detect the family of a socket(fileno=)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        family = probe.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_DOMAIN", 39))
        kind = probe.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TYPE", 3))
        listening = probe.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_ACCEPTCONN", 30))
    finally:
        probe.close()
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM \
            or not listening:
        raise OSError(errno.ENOTSOCK, "not a listening TCP socket")
    return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)


def listen_matches(listen, listener):
    """Is the kept socket bound where --listen asks (all addresses by default)?"""
    host = listener.getsockname()[0]
    if not listen:
        return host in ("::", "0.0.0.0")
    try:
        return ipaddress.ip_address(listen.strip("[]")) == ipaddress.ip_address(host)
    except ValueError:                   # a name: it was resolved at the first start
        return True


def restart_in_place(listener, shared):
    """Run synchook again in this very process (execv: the same pid, so the
    init system's pid file and supervisor stay right), the listening socket
    kept as descriptor LISTEN_FD: a restart never frees the port, and
    connections wait in its queue.  The program and settings are read anew.
    Returns only if the exec failed."""
    argv = [sys.executable] + interpreter_flags() + [PROCESS.program] + sys.argv[1:]
    if listener.fileno() != LISTEN_FD:
        os.dup2(listener.fileno(), LISTEN_FD)
    os.set_inheritable(LISTEN_FD, True)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1",
                      LISTEN_FDNAMES=REEXEC_SYSTEMD_NAME if shared else REEXEC_NAME)
    log.info("restarting in place: %s", " ".join(argv))
    log.close()
    try:
        os.execv(sys.executable, argv)
    except OSError as err:
        sys.stderr.write("%s: error: cannot restart in place (%s): %s\n"
                         % (PROG, sys.executable, err.strerror))


def open_descriptors():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


def connection_cap(wanted):
    """--max-connections, lowered where the descriptor limit cannot hold that
    many connections plus the FD_RESERVE a post phase needs (a command's pipes,
    /dev/null, the marker): clients must never take the thaw's descriptors.
    The soft limit is raised towards the hard one first."""
    import resource                    # at start only
    in_use = open_descriptors()
    need = wanted + in_use + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if raised > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    cap = max(1, soft - in_use - FD_RESERVE)
    log.warning("--max-connections %d lowered to %d: the descriptor limit is %d (ulimit -n, "
                "LimitNOFILE=) and %d are kept for the post phase", wanted, cap, soft,
                FD_RESERVE)
    return cap


def notify_systemd(message):
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), path)
    except OSError as err:
        log.warning("cannot notify systemd: %s", err.strerror)


# ---------------------------------------------------------------------------
# TLS: a self-signed certificate made with the standard library alone
# ---------------------------------------------------------------------------

def _der(tag, content):
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def der_int(n):
    return _der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def der_seq(*items):
    return _der(0x30, b"".join(items))


def der_oid(dotted):
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def der_time(when):
    if when.year < 2050:
        return _der(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    return _der(0x18, when.strftime("%Y%m%d%H%M%SZ").encode())


def der_name(common_name):
    return der_seq(_der(0x31, der_seq(der_oid("2.5.4.3"), _der(0x0C, common_name.encode()))))


# ECDSA on P-256 (secp256r1, SEC 2): a key and a signature in milliseconds, where
# RSA-2048 key generation in pure Python took 0.3 to 2 s with the port not yet open.
P256_P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffff
P256_N = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551
P256_G = (0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296,
          0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5)
EC_PUBLIC_KEY = der_oid("1.2.840.10045.2.1")
PRIME256V1 = der_oid("1.2.840.10045.3.1.7")
ECDSA_WITH_SHA256 = der_seq(der_oid("1.2.840.10045.4.3.2"))


def _p256_double(point):
    """2P in Jacobian coordinates (a = -3)."""
    x, y, z = point
    if not y:
        return (0, 1, 0)
    p = P256_P
    zz = z * z % p
    m = 3 * (x - zz) * (x + zz) % p
    yy = y * y % p
    s = 4 * x * yy % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _p256_add(one, two):
    """one + two in Jacobian coordinates."""
    if not one[2]:
        return two
    if not two[2]:
        return one
    p = P256_P
    (x1, y1, z1), (x2, y2, z2) = one, two
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _p256_double(one) if s1 == s2 else (0, 1, 0)
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh, v = h * hh % p, u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, h * z1 * z2 % p


def p256_multiply(k, point=P256_G):
    """k * point, affine in and out.  Not constant-time: it signs one
    certificate, locally, once."""
    result, addend = (0, 1, 0), (point[0], point[1], 1)
    while k:
        if k & 1:
            result = _p256_add(result, addend)
        addend = _p256_double(addend)
        k >>= 1
    x, y, z = result
    z_inverse = mod_inverse(z, P256_P)
    return x * z_inverse * z_inverse % P256_P, y * pow(z_inverse, 3, P256_P) % P256_P


def ecdsa_sign(secret, message):
    """An ECDSA-with-SHA256 signature of message, DER-encoded."""
    import secrets                     # at start or in a tool only
    digest = int.from_bytes(hashlib.sha256(message).digest(), "big")
    while True:
        nonce = 1 + secrets.randbelow(P256_N - 1)
        r = p256_multiply(nonce)[0] % P256_N
        s = mod_inverse(nonce, P256_N) * (digest + r * secret) % P256_N
        if r and s:
            return der_seq(der_int(r), der_int(s))


def mod_inverse(a, m):
    """Extended Euclid (pow(a, -1, m) needs Python 3.8)."""
    old_r, r, old_s, s = a, m, 1, 0
    while r:
        q = old_r // r
        old_r, r = r, old_r - q * r
        old_s, s = s, old_s - q * s
    if old_r != 1:
        raise ValueError("not invertible")
    return old_s % m


def pem(label, der):
    text = base64.b64encode(der).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def dns_name(name):
    """A host name as a certificate holds it; the idna codec (and unicodedata
    with it) only for a name that needs it."""
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def make_self_signed(hostname):
    """An ECDSA P-256 key and a self-signed X.509 v3 server certificate, as PEM
    strings.  TLS 1.2 and 1.3 clients (Node, as XO, curl, Python) take them."""
    import secrets                     # at start or in a tool only
    secret = 1 + secrets.randbelow(P256_N - 1)
    x, y = p256_multiply(secret)
    public_point = b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")
    spki = der_seq(der_seq(EC_PUBLIC_KEY, PRIME256V1), _der(0x03, b"\x00" + public_point))
    start = datetime.datetime.utcnow().replace(microsecond=0) - datetime.timedelta(days=1)
    names = [hostname, "localhost"] if hostname != "localhost" else ["localhost"]
    san = der_seq(*(_der(0x82, dns_name(name)) for name in names))
    extensions = der_seq(
        der_seq(der_oid("2.5.29.19"), b"\x01\x01\xff", _der(0x04, der_seq())),   # not a CA
        der_seq(der_oid("2.5.29.15"), b"\x01\x01\xff", _der(0x04, b"\x03\x02\x07\x80")),
        der_seq(der_oid("2.5.29.37"), _der(0x04, der_seq(der_oid("1.3.6.1.5.5.7.3.1")))),
        der_seq(der_oid("2.5.29.17"), _der(0x04, san)),
        der_seq(der_oid("2.5.29.14"), _der(0x04, _der(0x04, hashlib.sha1(public_point).digest()))))
    tbs = der_seq(
        _der(0xA0, der_int(2)),                                   # v3
        der_int(secrets.randbits(127) | 1 << 126),                 # positive serial
        ECDSA_WITH_SHA256,
        der_name("synchook " + hostname),
        der_seq(der_time(start), _der(0x18, b"99991231235959Z")),  # RFC 5280: no expiry
        der_name("synchook " + hostname),
        spki,
        _der(0xA3, extensions))
    cert_der = der_seq(tbs, ECDSA_WITH_SHA256, _der(0x03, b"\x00" + ecdsa_sign(secret, tbs)))
    key_der = der_seq(der_int(1), _der(0x04, secret.to_bytes(32, "big")),   # RFC 5915
                      _der(0xA0, PRIME256V1), _der(0xA1, _der(0x03, b"\x00" + public_point)))
    return pem("CERTIFICATE", cert_der), pem("EC PRIVATE KEY", key_der)


def tls_context(cert, key, stored=False):
    """A server context from cert and key files.  Both must be regular files
    owned by root or synchook's user, and the key unreadable by group and
    others (ConfigError otherwise); stored ones (in --state-dir) must not be
    symbolic links."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin
    else:  # Python 3.6
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    # Opened here, non-blocking and regular files only (a FIFO at either path
    # must not hang the start); OpenSSL then reads the very files we checked.
    cert_fd = open_regular(cert, nofollow=stored)
    try:
        key_fd = open_regular(key, nofollow=stored)
        try:
            for fd, path, private in ((cert_fd, cert, False), (key_fd, key, True)):
                check_key_file(os.fstat(fd), path, private)
            context.load_cert_chain(fd_path(cert_fd, cert), fd_path(key_fd, key))
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)
    return context


def check_key_file(st, path, private):
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError("%s is owned by uid %d, neither root nor synchook's user (fix: "
                          "chown root %s)" % (path, st.st_uid, path))
    if private and st.st_mode & 0o077:
        raise ConfigError("%s: a private key readable by group or others (fix: chmod 600 %s)"
                          % (path, path))
    if not private and st.st_mode & 0o022:
        raise ConfigError("%s is writable by group or others (fix: chmod go-w %s)"
                          % (path, path))


def fd_path(fd, path):
    """A name that opens the file already open as fd (Linux /proc), else path."""
    proc = "/proc/self/fd/%d" % fd
    return proc if os.path.exists(proc) else path


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_new_file(path, data, sync=False):
    """Replace path with a new 0600 file holding data.

    The new file gets an unpredictable name, is created with O_EXCL and
    O_NOFOLLOW (nothing planted in the directory is followed or reused), and
    is then renamed over path, so that path is never seen half written.
    """
    os.replace(write_candidate(path, data, sync), path)


def write_candidate(path, data, sync=False):
    """A new 0600 file beside path holding data, under an unpredictable name
    (see write_new_file): its name, for the caller to rename over path."""
    directory = os.path.dirname(path) or "."
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(8):
        tmp = os.path.join(directory, ".%s.%s" % (os.path.basename(path),
                                                  os.urandom(8).hex()))
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "cannot pick a temporary name", directory)
    try:
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_private(path, text):
    """A key or certificate, written whole and synced before it replaces path."""
    write_new_file(path, text.encode("ascii"), sync=True)


def load_tls(cfg):
    """The TLS context for --tls auto/on, or None for plain HTTP."""
    if cfg.tls == "off":
        return None
    if ssl is None:
        log.warning("this Python has no ssl module: serving plain HTTP only, which "
                    "XO's bare tag (HTTPS) cannot reach")
        return None
    if cfg.tls_cert:
        try:
            return tls_context(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError, ConfigError) as err:
            raise ConfigError("--tls-cert %s / --tls-key %s: cannot load: %s"
                              % (cfg.tls_cert, cfg.tls_key, err))
    cert = os.path.join(cfg.state_dir, CERT_FILE)
    key = os.path.join(cfg.state_dir, KEY_FILE)
    if os.path.lexists(cfg.state_dir):
        private_dir(cfg.state_dir, "--state-dir")    # exits 2 when not trusted
        if os.path.lexists(cert) or os.path.lexists(key):
            try:
                return tls_context(cert, key, stored=True)
            except (OSError, ssl.SSLError, ConfigError) as err:
                log.warning("stored certificate %s unusable (%s): making a new one", cert, err)
    started = time.monotonic()
    cert_pem, key_pem = make_self_signed(socket.gethostname() or "localhost")
    log.info("generated a self-signed ECDSA P-256 certificate in %.3f s",
             time.monotonic() - started)
    try:
        private_dir(cfg.state_dir, "--state-dir")
        write_private(key, key_pem)
        write_private(cert, cert_pem)
        log.info("certificate kept in %s", cert)
        return tls_context(cert, key, stored=True)
    except OSError as err:
        log.warning("cannot keep the certificate in %s (%s): using it for this run only",
                    cfg.state_dir, err.strerror)
    # load_cert_chain() wants files: use the runtime dir, then remove them.
    cert = os.path.join(cfg.runtime_dir, "run-" + CERT_FILE)
    key = os.path.join(cfg.runtime_dir, "run-" + KEY_FILE)
    try:
        write_private(key, key_pem)
        write_private(cert, cert_pem)
        return tls_context(cert, key, stored=True)
    finally:
        for path in (cert, key):
            try:
                os.unlink(path)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# call, check, ...: act as XO, print the tag, thaw, status, run the phases once
# ---------------------------------------------------------------------------

def parse_target(target):
    """What XO would call for what an admin types: a bare address (10.0.0.5,
    2001:db8::5), an address and port (10.0.0.5:8080, [2001:db8::5]:1727, a host
    name), or a tag URL -> (scheme, host, port, query).  Without a scheme it is
    HTTPS, as XO's bare tag."""
    if "://" not in target:
        host, port = target, DEFAULT_PORT
        match = re.match(r"^\[([^\]]+)\](?::(\d+))?$", target)     # [v6] or [v6]:port
        if match:
            host, port = match.group(1), int(match.group(2) or DEFAULT_PORT)
        elif target.count(":") == 1:                             # v4 or name, :port
            host, _, text = target.partition(":")
            try:
                port = parse_port(text)
            except ConfigError:
                raise ConfigError("TARGET %r: bad port %r" % (target, text))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
                raise ConfigError("TARGET %r: not an address, host name or URL" % target)
        return "https", host, port, ""
    parts = urllib.parse.urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("TARGET %r: URL must be http:// or https:// with a host" % target)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError("TARGET %r: bad port" % target)
    return parts.scheme, parts.hostname, port, parts.query


# What released XO's HTTP client (undici fetch) sends with each hook request.
XO_HEADERS = {"Connection": "keep-alive", "Accept": "*/*", "Accept-Language": "*",
              "Sec-Fetch-Mode": "cors", "User-Agent": "node",
              "Accept-Encoding": "gzip, deflate"}


def client_connection(scheme, host, port, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.tls = None
    if scheme == "https":
        conn.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        conn.tls.check_hostname = False
        conn.tls.verify_mode = ssl.CERT_NONE          # XO: rejectUnauthorized: false
    return conn


def connect(conn):
    """Open conn's connection (TCP, then TLS), raising CallFailed that says
    which way it failed: refused, dropped, or closed."""
    try:
        sock = socket.create_connection((conn.host, conn.port), conn.timeout)
    except socket.timeout:
        raise CallFailed("dropped", "no connection within %s s: the packets are dropped on "
                         "the way (a firewall that drops instead of refusing, or one that lets "
                         "only --allow's addresses in), or no such host" % seconds(conn.timeout))
    except ConnectionRefusedError:
        raise CallFailed("refused", "nothing listens on %s port %d (synchook not running? "
                         "another --port?), or a firewall rejects the connection"
                         % (conn.host, conn.port))
    if conn.tls is not None:
        try:
            sock = conn.tls.wrap_socket(sock, server_hostname=conn.host)
        except BaseException:
            sock.close()
            raise
    conn.sock = sock


class CallFailed(Exception):
    def __init__(self, how, text):
        Exception.__init__(self, text)
        self.how = how


# What xo_request got: status (None when no answer came), text (the answer, or
# why none came), took (seconds), reuse (how long undici would keep the
# connection after it), failed (None, or how: refused, dropped, slow, closed,
# tls (no TLS handshake), other).
Answer = collections.namedtuple("Answer", "status text took reuse failed")


def xo_request(conn, path, timeout, headers):
    """One GET on conn, as XO sends it: an Answer."""
    started = time.monotonic()

    def failed(how, text):
        return Answer(None, text, time.monotonic() - started, 0.0, how)

    try:
        if conn.sock is None:
            connect(conn)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        text = response.read(4096).decode("utf-8", "replace").strip()
        reuse = 0.0 if response.will_close else undici_reuse(response.getheader("Keep-Alive"))
        return Answer(response.status, text, time.monotonic() - started, reuse, None)
    except CallFailed as err:
        return failed(err.how, "%s: %s" % (err.how, err))
    except socket.timeout:
        conn.close()
        return failed("slow", "slow: connected, but no answer within %s s (a sync command "
                      "still running? synchook status on the guest shows it)" % seconds(timeout))
    except (OSError, http.client.HTTPException) as err:
        conn.close()
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        tls = ssl is not None and isinstance(err, ssl.SSLError)
        how = "other"
        if isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError)) or (
                tls and "EOF" in str(err)):
            how = "closed"
            reason = ("closed: the guest closed the connection without an answer (%s): is "
                      "this machine's address in its --allow?" % reason)
        # A handshake that failed: a plain-HTTP synchook, or one that let us not in.
        return failed("tls" if tls else how,
                      "cannot reach %s:%d: %s" % (conn.host, conn.port, reason))


# How XO's HTTP client (undici 6, which @xen-orchestra/xapi 8.10 installs) keeps an
# idle connection: 4 s, or the server's Keep-Alive: timeout=T less 2 s when the
# server sends one (not at all if that is 0 or less), 600 s at most.
UNDICI_KEEPALIVE = 4.0
UNDICI_THRESHOLD = 2.0
UNDICI_MAX_KEEPALIVE = 600.0


def undici_reuse(keep_alive):
    """Seconds undici would reuse a connection after an answer with this
    Keep-Alive header (None: no header)."""
    if not keep_alive:
        return UNDICI_KEEPALIVE
    match = re.search(r"(?:^|[,\s])timeout=(\d+)", keep_alive)
    if not match:
        return UNDICI_KEEPALIVE
    return max(0.0, min(int(match.group(1)) - UNDICI_THRESHOLD, UNDICI_MAX_KEEPALIVE))


COMMANDS_EPILOG = ("Commands: serve (the default), check, configure, call, fleet, tag, status, "
                   "thaw, recover; 'synchook.py COMMAND --help' for each.")


def cmd_call(argv):
    parser = argument_parser(
        prog="%s call" % os.path.basename(sys.argv[0]),
        description="Do what Xen Orchestra does: GET /sync, wait --pause seconds (the "
                    "snapshot), GET /post-sync. Certificates are not verified, as in XO.",
        epilog="TARGET is what you would put in the tag, or type: 10.0.0.5 (https, port "
               "1727, as the bare tag), 10.0.0.5:8080, [2001:db8::5]:1727, or a URL, which "
               "keeps its scheme, host, port and query (its path is replaced).\n"
               "Exit 0 when both answers are 2xx, 1 otherwise, 2 on bad usage.\n" +
               COMMANDS_EPILOG,
        allow_abbrev=False)
    parser.add_argument("target", metavar="TARGET",
                        help="the guest's address, or the URL of an xo:notify-on-snapshot tag")
    parser.add_argument("--as-xo", action="store_true",
                        help="send exactly what released XO sends: its headers, one "
                             "keep-alive connection, the secret only as ?token= in the query "
                             "(XO never sends its documented Authorization header)")
    parser.add_argument("--secret", metavar="S",
                        help="sent as Authorization: Bearer base64(S) (as XO's docs say), or "
                             "with --as-xo as ?token=S")
    parser.add_argument("--secret-file", metavar="PATH", help="read the secret from a file")
    parser.add_argument("--timeout", metavar="SEC", default=str(XO_TIMEOUT),
                        help="how long to wait for each answer (default 60, as XO)")
    parser.add_argument("--pause", metavar="SEC", default="1",
                        help="time between /sync and /post-sync (default 1)")
    args = parser.parse_args(argv)
    try:
        scheme, host, port, query = parse_target(args.target)
        timeout = parse_seconds(args.timeout)
        pause = float(args.pause)
        if pause < 0 or pause != pause:
            raise ConfigError("--pause must be 0 or more seconds")
        secret = read_secret_file(args.secret_file) if args.secret_file else args.secret
        if scheme == "https" and ssl is None:
            raise ConfigError("this Python has no ssl module: cannot call %s" % args.target)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    headers = dict(XO_HEADERS) if args.as_xo else {}
    if secret and args.as_xo:
        token = "token=" + urllib.parse.quote(secret, safe="")
        query = query + "&" + token if query else token
    elif secret:
        token = base64.b64encode(secret.encode("utf-8", "surrogateescape")).decode()
        headers["Authorization"] = "Bearer " + token
    suffix = "?" + query if query else ""
    ok = True
    out = Output()
    conn = client_connection(scheme, host, port, timeout)
    try:
        for phase in ("sync", "post-sync"):
            status, text, took, reuse, _ = xo_request(conn, "/" + phase + suffix, timeout,
                                                      headers)
            shown = "%d %s" % (status, text) if status is not None else "failed: " + text
            out.line("%-9s %s (%.3f s)" % (phase, shown, took))
            ok = ok and status is not None and 200 <= status < 300
            if phase == "sync":
                time.sleep(pause)
                if not args.as_xo or pause >= reuse:
                    # Older XO: a connection per request; undici: a new one once
                    # the kept one has been idle for as long as it keeps it.
                    conn.close()
    finally:
        conn.close()
        out.flush()
    return 0 if ok else 1


class Output:
    """call's lines: printed at once on a terminal or a pipe, but kept until
    /post-sync is answered when stdout is a file, which may sit on the very
    filesystem /sync just froze (a write there would wait for the thaw, and
    the thaw for /post-sync)."""

    def __init__(self):
        try:
            mode = os.fstat(sys.stdout.fileno()).st_mode
            self.defer = not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode))
        except (OSError, ValueError, AttributeError):
            self.defer = False
        self.kept = []

    def line(self, text):
        if self.defer:
            self.kept.append(text)
        else:
            print(text)
            sys.stdout.flush()

    def flush(self):
        for text in self.kept:
            print(text)
        self.kept = []
        sys.stdout.flush()


# fleet: which tagged VMs XO will reach, checked from the XO host ---------------

HOOK_TAG = "xo:notify-on-snapshot"
IPV4_KEY = re.compile(r"^\d+/ip(?:v4/\d+)?$")      # XO's getVmAddress, key by key
IPV6_KEY = re.compile(r"^\d+/ipv6/\d+$")
FLEET_FIELDS = "name_label,tags,addresses,power_state"


def xo_hook_url(tags, networks):
    """(URL or None, why not ready) as XO's _httpHook builds it: the last hook
    tag wins; a bare tag is https://ADDRESS:1727/, ADDRESS the guest tools'
    first address (IPv4 first, keys in string order).  An IPv6 address is one
    Node ignores as a host name (XO calls https://localhost:1727/, itself);
    no address makes XO fail the snapshot."""
    for tag in reversed(tags):
        if tag.startswith(HOOK_TAG + "="):
            return tag[len(HOOK_TAG) + 1:], ""
        if tag != HOOK_TAG:
            continue
        keys = sorted(networks or {})
        v4 = [networks[key] for key in keys if IPV4_KEY.match(key)]
        v6 = [networks[key] for key in keys if IPV6_KEY.match(key)]
        if v4:
            return "https://%s:%d/" % (v4[0], DEFAULT_PORT), ""
        if v6:
            return ("https://localhost:%d/" % DEFAULT_PORT,
                    "IPv6 only: XO calls its own localhost; tag it "
                    "xo:notify-on-snapshot=https://[%s]:%d/" % (v6[0], DEFAULT_PORT))
        return None, "no address from the guest tools: XO fails the snapshot"
    return None, "no hook tag"


def fleet_targets(lines, secret):
    """[(name, URL or None, why not ready)] from lines of `[NAME] TARGET`:
    TARGET an address (as `call` takes it, the bare tag's https and port 1727),
    a URL, or a whole tag `xo:notify-on-snapshot=URL`.  A secret goes into the
    query of targets that are no URL (XO sends only what the tag holds)."""
    targets = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ConfigError("line %d: expected [NAME] TARGET, got %r" % (number, line.strip()))
        target = words[-1]
        if target.startswith(HOOK_TAG + "="):
            target = target[len(HOOK_TAG) + 1:]
        scheme, host, port, query = parse_target(target)
        if "://" not in target and secret:
            query = "token=" + urllib.parse.quote(secret, safe="")
        shown = "[%s]" % host if ":" in host else host
        url = "%s://%s:%d/%s" % (scheme, shown, port, "?" + query if query else "")
        targets.append((words[0] if len(words) == 2 else target, url, ""))
    return targets


def xo_vms(xo_url, token, verify, timeout):
    """[(name, URL or None, why not ready)] for XO's VMs that carry a hook tag,
    read from XO's REST API (GET /rest/v0/vms, the token as the
    authenticationToken cookie).  A VM that is not running gets no hook call."""
    parts = urllib.parse.urlsplit(xo_url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--xo %s: expected https://XO-HOST" % xo_url)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", "%s/rest/v0/vms?fields=%s" % (parts.path, FLEET_FIELDS),
                     headers={"Cookie": "authenticationToken=" + token,
                              "Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(64 << 20)
    except (OSError, http.client.HTTPException) as err:
        raise ConfigError("--xo %s: %s" % (xo_url, err))
    finally:
        conn.close()
    if response.status != 200:
        raise ConfigError("--xo %s: GET /rest/v0/vms answered %d %s" % (
            xo_url, response.status, response.reason))
    try:
        vms = json.loads(body.decode("utf-8"))
    except ValueError as err:
        raise ConfigError("--xo %s: not JSON: %s" % (xo_url, err))
    found = []
    for vm in vms if isinstance(vms, list) else []:
        tags = vm.get("tags") if isinstance(vm, dict) else None
        if not isinstance(tags, list) or not any(
                tag == HOOK_TAG or str(tag).startswith(HOOK_TAG + "=") for tag in tags):
            continue
        name = str(vm.get("name_label") or "?")
        if vm.get("power_state") != "Running":
            found.append((name, None, "not running: XO calls no hook for it"))
            continue
        url, why = xo_hook_url([str(tag) for tag in tags], vm.get("addresses") or {})
        found.append((name, url, why))
    return found


def check_target(name, url, why, timeout):
    """One row of the fleet table: what GET /status says, with XO's headers
    and the tag's query (never /sync: nothing runs, nothing freezes)."""
    row = {"name": name, "url": url and re.sub(r"token=[^&]*", "token=***", url),
           "ready": False, "reach": "-", "tls": "-", "version": "-", "allowed": "-",
           "last_sync": "-", "freeze": "-", "problem": why}
    if url is None:
        if why.startswith("not running"):
            row["ready"] = None          # nothing to check, nothing wrong
        return row
    scheme, host, port, query = parse_target(url)
    conn = client_connection(scheme, host, port, timeout)
    try:
        status, text, _, _, failed = xo_request(conn, "/status" + ("?" + query if query else ""),
                                                timeout, dict(XO_HEADERS))
    finally:
        conn.close()
    row["tls"] = "yes" if scheme == "https" else "no"
    if status is None:
        row["reach"], row["problem"] = failed, text
        if failed == "tls":
            row["reach"], row["tls"] = "closed", "failed"
            row["problem"] = ("no TLS handshake: the guest runs --tls off (XO's bare tag "
                              "speaks HTTPS), or this host is not in its --allow")
        if why:
            row["problem"] = "%s; %s" % (why, row["problem"])
        return row
    row["reach"] = "ok"
    if status == 403:
        row["allowed"] = "no"
        row["problem"] = "; ".join(filter(None, (why, "403 %s" % text)))
        return row
    try:
        state = json.loads(text)
    except ValueError:
        state = None
    if status != 200 or not isinstance(state, dict) or "version" not in state:
        row["problem"] = "not synchook's /status: %s %s" % (status, text[:80])
        return row
    row["version"] = state.get("version")
    allowed = state.get("client_allowed")
    row["allowed"] = {True: "yes", False: "no"}.get(allowed, "?")
    last = state.get("last_sync")
    if isinstance(last, dict):
        row["last_sync"] = "%s at %s" % (last.get("status"), last.get("at"))
    else:
        row["last_sync"] = "none yet"
    plan = state.get("freeze_plan")
    if isinstance(plan, list):
        row["freeze"] = ",".join(str(point) for point in plan) or "none"
    problems = [why] if why else []
    if allowed is False:
        problems.append("this host is not in the guest's --allow")
    if state.get("post_phase_owed"):
        problems.append("a post phase is owed: %s" % state["post_phase_owed"].get("reason"))
    row["problem"] = "; ".join(problems)
    row["ready"] = not problems
    return row


FLEET_COLUMNS = (("name", "NAME"), ("ready", "READY"), ("reach", "REACH"), ("tls", "TLS"),
                 ("version", "VERSION"), ("allowed", "ALLOWED"), ("last_sync", "LAST SYNC"),
                 ("freeze", "FREEZE"), ("url", "URL"), ("problem", "PROBLEM"))


def fleet_table(rows):
    def cell(row, key):
        value = row[key]
        if key == "ready":
            return {True: "yes", False: "NO", None: "-"}[value]
        return "-" if value in (None, "") else str(value)

    table = [[title for _, title in FLEET_COLUMNS]]
    table += [[cell(row, key) for key, _ in FLEET_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(FLEET_COLUMNS) - 1)]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)) +
                     "  " + line[-1] for line in table)


def cmd_fleet(argv):
    parser = argument_parser(
        prog="%s fleet" % os.path.basename(sys.argv[0]),
        description="From the XO host, before a backup: which VMs will be quiesced? Each "
                    "VM's synchook is asked GET /status (never /sync: nothing runs) the way "
                    "XO would call it: the URL XO builds from the tag, XO's headers, the tag's "
                    "secret.",
        epilog="FILE (or - for stdin): one VM a line, `[NAME] TARGET`, TARGET an address "
               "(10.0.0.5: the bare tag's https and port 1727), a URL, or the whole tag "
               "(xo:notify-on-snapshot=https://10.0.0.5:1727/?token=S). Or --xo with a token: "
               "every running VM with a hook tag, from XO's REST API.\n"
               "Exit 0 when every VM is ready, 1 when one is not, 2 on bad usage.\n" +
               COMMANDS_EPILOG, allow_abbrev=False)
    parser.add_argument("file", metavar="FILE", nargs="?",
                        help="targets, one a line (- for stdin)")
    parser.add_argument("--xo", metavar="URL", help="XO's address: read the VMs from its "
                        "REST API (/rest/v0/vms) instead of FILE")
    parser.add_argument("--xo-token-file", metavar="PATH", help="XO's authentication token "
                        "(xo-cli --createToken), or SYNCHOOK_XO_TOKEN")
    parser.add_argument("--xo-insecure", action="store_true",
                        help="do not verify XO's certificate")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="a secret for targets given as addresses (sent as ?token=, as "
                             "a tag would carry it)")
    parser.add_argument("--timeout", metavar="SEC", default="10",
                        help="how long to wait for each VM (default 10)")
    parser.add_argument("--jobs", metavar="N", default="16",
                        help="VMs checked at once (default 16)")
    parser.add_argument("--json", action="store_true", help="one JSON list, not a table")
    args = parser.parse_args(argv)
    try:
        timeout = parse_seconds(args.timeout)
        try:
            jobs = int(args.jobs, 10)
        except ValueError:
            jobs = 0
        if jobs < 1:
            raise ConfigError("--jobs %s: give a whole number, 1 or more" % args.jobs)
        secret = read_secret_file(args.secret_file) if args.secret_file else None
        if args.xo:
            if args.file:
                raise ConfigError("give FILE or --xo, not both")
            token = (read_secret_file(args.xo_token_file) if args.xo_token_file
                     else os.environ.get("SYNCHOOK_XO_TOKEN", ""))
            if not token:
                raise ConfigError("--xo needs a token: --xo-token-file or SYNCHOOK_XO_TOKEN")
            targets = xo_vms(args.xo, token, not args.xo_insecure, timeout)
        else:
            if not args.file:
                raise ConfigError("give FILE (or - for stdin), or --xo")
            if args.file == "-":
                lines = sys.stdin.read(1 << 20).splitlines()
            else:
                with open(args.file) as handle:
                    lines = handle.read(1 << 20).splitlines()
            targets = fleet_targets(lines, secret)
    except OSError as err:
        parser.error("%s: %s" % (err.filename or args.file, err.strerror))
    except ConfigError as err:
        parser.error(str(err))
    import concurrent.futures                 # the admin's tool only
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(lambda target: check_target(target[0], target[1], target[2],
                                                         timeout), targets))
    print(json.dumps(rows, indent=1) if args.json else fleet_table(rows))
    not_ready = [row for row in rows if row["ready"] is False]
    if not args.json:
        print("%d VMs: %d ready, %d not ready, %d not running" % (
            len(rows), sum(row["ready"] is True for row in rows), len(not_ready),
            sum(row["ready"] is None for row in rows)))
    return 1 if not_ready else 0


# tag: what to set in XO for this guest -----------------------------------------

SIOCGIFADDR = 0x8915


def guest_addresses():
    """This guest's addresses that XO could reach: (IPv4 list, IPv6 list), in
    interface order, without loopback and link-local ones."""
    v4, v6 = [], []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                request = struct.pack("256s", name.encode()[:15])
                raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24]
            except OSError:
                continue
            address = ipaddress.ip_address(socket.inet_ntoa(raw))
            if not (address.is_loopback or address.is_link_local):
                v4.append(address)
    try:
        with open("/proc/net/if_inet6") as handle:
            for line in handle:
                fields = line.split()
                address = ipaddress.ip_address(
                    ":".join(fields[0][i:i + 4] for i in range(0, 32, 4)))
                if not (address.is_loopback or address.is_link_local):
                    v6.append(address)
    except (OSError, ValueError, IndexError):
        pass
    return v4, v6


def xo_tags(cfg, v4, v6):
    """The tags that make XO call this synchook, best first, and warnings."""
    warnings = []
    scheme = "http" if cfg.tls == "off" or ssl is None else "https"
    if cfg.listen:
        try:
            listen = ipaddress.ip_address(cfg.listen)
            v4, v6 = ([listen], []) if listen.version == 4 else ([], [listen])
        except ValueError:
            pass
    if not v4 and not v6:
        warnings.append("no address found on this guest but loopback: put the address XO "
                        "reaches in the tag")
        v4 = ["<VM address>"]
    if not v4:
        warnings.append("this guest has IPv6 addresses only: XO's bare tag would call "
                        "https://localhost:1727, on the XO host itself (XO bug): use the "
                        "URL tag with the bracketed address")
    if v4 and cfg.port == DEFAULT_PORT and scheme == "https" and not cfg.secret:
        return ["xo:notify-on-snapshot"], warnings
    query = "?token=" + urllib.parse.quote(cfg.secret, safe="") if cfg.secret else ""
    hosts = [str(a) for a in v4] + ["[%s]" % a for a in v6]
    return (["xo:notify-on-snapshot=%s://%s:%d/%s" % (scheme, host, cfg.port, query)
             for host in hosts], warnings)


def cmd_tag(args, cfg):
    if args.secret_new:
        if not cfg.secret_file:
            raise ConfigError("--secret-new needs --secret-file PATH (SYNCHOOK_SECRET_FILE in "
                              "the config): where the daemon reads the secret")
        # The config that names the file is trusted as the daemon trusts it (else
        # anyone who could write it could make root replace any file), so is the
        # directory, and what is replaced must look like a secret file.
        if cfg.config:
            check_trusted(cfg.config, "--config")
        check_trusted(os.path.dirname(os.path.abspath(cfg.secret_file)), "--secret-file")
        check_replaceable_secret(cfg.secret_file)
        import secrets                                   # a tool: never in a window
        cfg.secret = secrets.token_urlsafe(24)          # URL-safe: nothing to %-encode
        try:
            write_new_file(cfg.secret_file, cfg.secret.encode() + b"\n", sync=True)
        except OSError as err:
            raise ConfigError("--secret-file %s: cannot write: %s" % (cfg.secret_file,
                                                                      err.strerror))
        sys.stderr.write("note: a new secret is in %s (mode 0600); restart synchook to use "
                         "it, and set the tag below on the VM\n" % cfg.secret_file)
    v4, v6 = guest_addresses()
    tags, warnings = xo_tags(cfg, v4, v6)
    for warning in warnings:
        sys.stderr.write("warning: %s\n" % warning)
    if len(tags) > 1:
        sys.stderr.write("note: one tag per address of this guest; use the one XO reaches\n")
    for tag in tags:
        print(tag)
    return 0


def check_replaceable_secret(path):
    """A file --secret-new may replace: none yet, or one that looks like a secret
    file (a regular file of root's or ours, private, one short line)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "not a regular file"
    elif st.st_uid not in (0, os.geteuid()):
        why = "owned by uid %d" % st.st_uid
    elif st.st_mode & 0o077:
        why = "readable or writable by group or others"
    elif st.st_size > 4096:
        why = "larger than a secret"
    else:
        data = read_regular(path, 4097)
        if data.rstrip(b"\r\n").count(b"\n") or b"\0" in data:
            why = "more than one line"
    if why:
        raise ConfigError("--secret-file %s: exists and does not look like a secret file (%s): "
                          "refusing to replace it; remove it or name another file"
                          % (path, why))


# thaw: the rescue, whoever froze what -------------------------------------------

def cmd_thaw(argv):
    parser = argument_parser(
        prog="%s thaw" % os.path.basename(sys.argv[0]),
        description="Thaw every frozen local filesystem (those --freeze all would "
                    "freeze), whoever froze it: the rescue when a guest stays frozen.",
        epilog="Exit 0 when nothing is left frozen, 1 otherwise (also when there is no "
               "filesystem to look at).\n" + COMMANDS_EPILOG,
        allow_abbrev=False)
    parser.add_argument("--under", metavar="DIR", default="",
                        help="only the mounts at or below DIR")
    args = parser.parse_args(argv)
    under = os.path.abspath(args.under) if args.under else ""
    plan, _ = freeze_plan(read_mounts(), "all", under)
    if not plan:
        print("nothing to thaw: no local filesystem with a block device%s"
              % (" at or below %s" % under if under else ""))
        return 1
    failed = False
    thawed = 0
    for mount in plan:
        outcome = thaw_mount(mount)
        if outcome == "thawed":
            thawed += 1
            print("thawed     %s" % mount.point)
        elif outcome != "not frozen":
            failed = True
            print("FAILED     %s: %s" % (mount.point, outcome))
    print("%d filesystem(s) thawed, %d checked" % (thawed, len(plan)))
    return 1 if failed else 0


# configure: change the --config file, checked as install.sh checks it ------------

CONFIGURE_DESCRIPTION = """\
Change settings in the --config file (default /etc/synchook.conf): those given
replace the file's, the others stay.  The new file is judged as install.sh
judges it (syntax and values, then every check a start makes, running no
command) before it replaces the old one, which stays as it was otherwise.  A
running synchook is then told to restart in place (SIGUSR2), which it does
once no window is open: the port is never closed."""


def cmd_configure(argv):
    parser = build_serve_parser(os.path.basename(sys.argv[0]) + " configure", "configure")
    args = parser.parse_args(argv)
    path = os.path.abspath(args.config or os.environ.get("SYNCHOOK_CONFIG") or DEFAULT_CONFIG)
    given = {opt.env: getattr(args, opt.name) for opt in OPTIONS
             if opt.name != "config" and getattr(args, opt.name) is not None}
    unset = set()
    for name in args.unset:
        opt = OPTION_BY_ENV.get("SYNCHOOK_" + name.upper().replace("-", "_"))
        if opt is None or opt.name == "config":
            raise ConfigError("--unset %s: no such setting" % name)
        unset.add(opt.env)
    old = {}
    if os.path.lexists(path):
        check_trusted(path, "--config")
        old = {name: value for name, (value, _) in read_config_file(path).items()}
    settings, changes = merge_settings(old, given, unset, args.reset)
    if not changes:
        print("%s: unchanged" % path)
        return 0
    candidate = write_candidate(path, config_text(settings, "synchook configure").encode("utf-8"),
                                sync=True)
    try:
        flags = Flags()
        flags.config = candidate
        # The file alone decides, as for the service: not this shell's SYNCHOOK_* variables.
        try:
            cfg = resolve_config(flags, environ={}, check_freeze=False)
        except ConfigError as err:       # named as the setting, not the candidate's line
            raise ConfigError(re.sub(re.escape(candidate) + r" line \d+: ", "", str(err)))
        log.start("warning", False)
        if cmd_check(cfg, run_phases=False):
            print("%s: not changed: synchook would not start with these settings" % path)
            return 1
        os.replace(candidate, path)
    finally:
        if os.path.lexists(candidate):
            os.unlink(candidate)
    for change in changes:
        print(change)
    print("%s: written" % path)
    tell_daemon_to_restart(cfg.runtime_dir)
    return 0


def tell_daemon_to_restart(runtime_dir):
    """SIGUSR2 to the synchook serving with runtime_dir (the holder of its lock),
    if one runs: it restarts in place with the new file once no window is open."""
    pid = None
    try:
        fd = os.open(os.path.join(runtime_dir, LOCK_FILE),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)    # free: nobody serves
        except OSError:
            pid = serving_pid(fd)
        finally:
            os.close(fd)
    if pid is None:
        print("no synchook runs with --runtime-dir %s: the settings apply at its next "
              "start" % runtime_dir)
        return
    os.kill(pid, signal.SIGUSR2)
    print("synchook (pid %d) told to restart in place with these settings; it does so "
          "once no window is open (synchook status shows it)" % pid)


# status: the local daemon's /status, for humans ----------------------------------

def cmd_status(args, cfg):
    """Ask the daemon named by the config.  Loopback may always read /status,
    even when --allow leaves it out.  Then look for filesystems frozen now
    that the daemon does not list as its own."""
    host = cfg.listen or "127.0.0.1"
    if host in ("::", "0.0.0.0"):
        host = "127.0.0.1"
    scheme = "https" if cfg.tls == "on" and ssl is not None else "http"
    path = "/status" + ("?token=" + urllib.parse.quote(cfg.secret, safe="") if cfg.secret
                        else "")
    conn = client_connection(scheme, host, cfg.port, 10)
    status, text = xo_request(conn, path, 10, {})[:2]
    conn.close()
    if args.json and status == 200:
        print(text)
        return 0
    recorded = set()
    if status != 200:
        print("synchook on %s port %d: %s" % (host, cfg.port,
                                             text if status is None else "%d %s" % (status, text)))
    else:
        state = json.loads(text)
        recorded = set(frozen["mount"] for frozen in state.get("frozen") or [])
        print(describe_status(state))
    unrecorded = [point for point in frozen_now() if point not in recorded]
    for point in unrecorded:
        print("FROZEN          %s: frozen now, and no window of this synchook's says so "
              "('synchook thaw' releases it)" % point)
    return 0 if status == 200 and not unrecorded else 1


PROBE_ATTRIBUTE = "user.synchook-frozen-probe"   # never set: removing it changes nothing
FROZEN_PROBE_WAIT = 0.5                # seconds a probe may take before its filesystem
                                       # counts as frozen


def frozen_now(wait=FROZEN_PROBE_WAIT):
    """The local filesystems frozen now, found without freezing or thawing
    anything: a child process per filesystem removes an extended attribute
    that does not exist, which first asks for write access, and that waits
    while the filesystem is frozen.  A child still waiting after `wait`
    seconds means frozen; it ends by itself at the thaw (pid 1 reaps it)."""
    plan, _ = freeze_plan(read_mounts(), "all")
    probes = {}
    for mount in plan:
        try:
            pid = os.fork()
        except OSError:
            continue
        if pid == 0:                       # the probe: nothing of Python's runs after
            try:
                os.closerange(0, 3)        # holds no pipe of whoever reads our output
                os.removexattr(mount.point, PROBE_ATTRIBUTE)
            except OSError:
                pass
            os._exit(0)
        probes[pid] = mount.point
    deadline = time.monotonic() + wait
    while probes and time.monotonic() < deadline:
        for pid in list(probes):
            if os.waitpid(pid, os.WNOHANG)[0]:
                del probes[pid]
        time.sleep(0.01)
    return sorted(probes.values())


def step_text(step):
    """"sync ok", "freeze /data: Input/output error" (a reason that names its
    step already is not given the name twice)."""
    reason = "ok" if step["ok"] else step["reason"]
    if reason.startswith(step["step"] + " ") or reason.startswith(step["step"] + ":"):
        return reason
    return "%s %s" % (step["step"], reason)


def describe_status(state):
    def phase(name, last):
        if not last:
            return "%-15s none yet" % name
        steps = ", ".join("%s%s (%.3f s)" % (
            step_text(step), "" if step["exit"] is None else " [exit %s]" % step["exit"],
            step["duration"]) for step in last["steps"]) or "nothing configured"
        return "%-15s %d %s at %s: %s" % (name, last["status"], last["reason"], last["at"],
                                          steps)

    lines = ["synchook %s, up %s s" % (state.get("version"), state.get("uptime"))]
    if state.get("state") == "open":
        lines.append("window:         OPEN since %s, opened by %s" % (state.get("open_since"),
                                                                     state.get("opened_by")))
        if "max_hold_left" in state:
            lines.append("                released in %s s at the latest (--max-hold)"
                         % state["max_hold_left"])
        owed = state.get("post_phase_owed")
        if owed:
            lines.append("                POST PHASE OWED: %s (try %d, next in %s s)"
                         % (owed["reason"], owed["tries"], owed["next_try_in"]))
        for frozen in state.get("frozen") or []:
            lines.append("                frozen: %s since %s" % (frozen["mount"], frozen["since"]))
    else:
        lines.append("window:         idle")
    lines.append(phase("last sync:", state.get("last_sync")))
    lines.append(phase("last post-sync:", state.get("last_post_sync")))
    lines.append("log lines dropped: %s" % state.get("log_lines_dropped"))
    return "\n".join(lines)


def check_port(cfg):
    """(ok, text): is the port free, or is it a running synchook?"""
    host = cfg.listen or "::"
    try:
        family, _, _, _, address = socket.getaddrinfo(host, cfg.port, 0, socket.SOCK_STREAM)[0]
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        family, address = socket.AF_INET, ("0.0.0.0", cfg.port)
        probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return True, "port %d is free" % cfg.port
    except OSError as err:
        in_use, reason = err.errno == errno.EADDRINUSE, err.strerror
    finally:
        probe.close()
    if not in_use:
        return False, "cannot bind port %d: %s" % (cfg.port, reason)
    loopback = "::1" if family == socket.AF_INET6 and host in ("::", "::1") else "127.0.0.1"
    if host not in ("::", "0.0.0.0"):
        loopback = host
    conn = http.client.HTTPConnection(loopback, cfg.port, timeout=3)
    try:
        conn.request("GET", "/synchook-check")
        server = conn.getresponse().getheader("Server", "")
    except (OSError, http.client.HTTPException):
        server = ""
    finally:
        conn.close()
    if server.startswith(PROG + "/"):
        return True, "port %d is served by a running synchook (%s)" % (cfg.port, server)
    return False, "port %d is already in use by another program" % cfg.port


def check_tls(cfg):
    if cfg.tls == "off":
        return True, "TLS off: plain HTTP only (XO's bare tag needs HTTPS)"
    if ssl is None:
        return False, "this Python has no ssl module: XO's bare tag (HTTPS) cannot work"
    if cfg.tls_cert:
        try:
            tls_context(cfg.tls_cert, cfg.tls_key)
            return True, "certificate %s loads" % cfg.tls_cert
        except (OSError, ssl.SSLError, ConfigError) as err:
            return False, "certificate %s / key %s: %s" % (cfg.tls_cert, cfg.tls_key, err)
    cert = os.path.join(cfg.state_dir, CERT_FILE)
    if os.path.exists(cert):
        try:
            tls_context(cert, os.path.join(cfg.state_dir, KEY_FILE), stored=True)
            return True, "stored certificate %s loads" % cert
        except (OSError, ssl.SSLError, ConfigError) as err:
            return True, "stored certificate %s unusable (%s): replaced at start" % (cert, err)
    return True, "no certificate yet: one is generated at first start in %s" % cfg.state_dir


def interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_check(cfg, run_phases=True):
    problems = []

    def report(ok, text):
        print("%-4s %s" % ("ok" if ok else "FAIL", text))
        sys.stdout.flush()
        if not ok:
            problems.append(text)

    def report_steps(steps):
        for step in steps:
            report(step.ok, "  %s: %s (%.3f s)" % (step.label, step.reason, step.duration))
        if not steps:
            print("     (nothing configured)")

    report(*check_tls(cfg))
    report(*check_port(cfg))
    if cfg.hooks_dir:
        hooks, skipped = list_hooks(cfg.hooks_dir)
        names = ", ".join(os.path.basename(hook) for hook in hooks) or "none"
        report(True, "hooks dir %s: %s" % (cfg.hooks_dir, names))
        for unsafe, reason in skipped:
            if unsafe:
                report(False, "hook skipped: " + reason)
            else:
                print("--   " + reason)
    if cfg.secret and cfg.secret_from_flag:
        report(False, "--secret on the command line is visible in ps: use --secret-file")
    if cfg.freeze:
        try:
            check_freezing(cfg)
        except ConfigError as err:
            report(False, str(err))
        plan, skipped = freeze_plan(read_mounts(), cfg.freeze, cfg.freeze_under)
        report(bool(plan),
               "--freeze: would freeze, in this order: %s (check itself freezes nothing)"
               % (", ".join(mount.point for mount in plan) or "nothing"))
        for point, why in skipped:
            print("--   --freeze would skip %s: %s" % (point, why))
        if os.path.isdir(cfg.runtime_dir):
            try:
                check_runtime_dir_stays_writable(cfg)
            except ConfigError as err:
                report(False, str(err))
    if not run_phases:
        print("all good (no command run)" if not problems else "%d problem(s)" % len(problems))
        return 0 if not problems else 1
    phases = Phases(cfg, freezing=False)
    signal.signal(signal.SIGTERM, interrupt)
    print("sync phase:")
    sync_result = "failed"
    try:
        sync_steps = phases.sync_phase("check", Canceller())
        report_steps(sync_steps)
        sync_result = "ok" if all(step.ok for step in sync_steps) else "failed"
    except KeyboardInterrupt:
        report(False, "interrupted during the sync phase")
    print("post phase:")                   # owed whatever happened above
    steps, rest = phases.post_phase("check", sync_result)
    tries, give_up = 0, time.monotonic() + 60
    while rest and time.monotonic() < give_up:
        wait = POST_RETRIES[min(tries, len(POST_RETRIES) - 1)]
        print("     %s could not start (%s): trying again in %s s"
              % (steps[-1].label, steps[-1].reason, seconds(wait)))
        sys.stdout.flush()
        time.sleep(wait)
        tries += 1
        more, rest = phases.run_post_steps(rest, "check", sync_result)
        steps = [step for step in steps if step.started] + more
    report_steps(steps)
    print("all good" if not problems else "%d problem(s)" % len(problems))
    return 0 if not problems else 1


# ---------------------------------------------------------------------------
# serve, and main
# ---------------------------------------------------------------------------

def prepare_runtime_dir(path):
    try:
        private_dir(path, "--runtime-dir")
    except OSError as err:
        raise ConfigError("--runtime-dir %s: cannot create: %s" % (path, err.strerror))
    if not os.access(path, os.W_OK):
        raise ConfigError("--runtime-dir %s: not writable" % path)


def access_rule(cfg):
    """Who may run the hooks, in words, for the start line."""
    if is_closed(cfg):
        return "no one (--allow none)"
    who = ("clients in " + ",".join(str(network) for network in cfg.allow)
           if cfg.allow else "anyone")
    return "%s%s" % (who, " with the secret" if cfg.secret else ", no secret")


def freeze_points(cfg):
    """The mount points --freeze would freeze now."""
    if not cfg.freeze:
        return []
    return [mount.point for mount in freeze_plan(read_mounts(), cfg.freeze,
                                                 cfg.freeze_under)[0]]


def freeze_rule(cfg):
    """What --freeze will freeze, in words, for the start line."""
    if not cfg.freeze:
        return ""
    points = ", ".join(freeze_points(cfg))
    if cfg.freeze == "all":
        return " freeze=all%s (now: %s)" % (" under %s" % cfg.freeze_under if cfg.freeze_under
                                           else "", points)
    return " freeze=%s" % points


def install_signal_handlers(waker):
    def on_signal(signum, frame):
        log.info("%s received: shutting down", signal.Signals(signum).name)
        waker.stop()

    def on_restart(signum, frame):
        log.info("SIGUSR2 received: restarting in place, once no window is open (the "
                 "port stays bound; connections wait in its queue)")
        waker.restart()

    def on_hangup(signum, frame):
        # The default action would kill us without the post phase (an init
        # script started from a terminal that then closed); there is nothing
        # to reload, so carry on.
        log.info("SIGHUP received: ignored (restart synchook to change its settings)")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGQUIT, on_signal)     # ^\ : a clean stop, never a core dump
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGUSR2, on_restart)
    waker.install()


def check_runtime_dir_stays_writable(cfg):
    """The marker is written while filesystems are frozen: never on one of them."""
    if not cfg.freeze:
        return
    device = os.stat(cfg.runtime_dir).st_dev
    for mount in freeze_plan(read_mounts(), cfg.freeze, cfg.freeze_under)[0]:
        if mount.device == device:
            raise ConfigError("--runtime-dir %s is on %s (%s), which --freeze freezes: the "
                              "window's marker must stay writable; give a directory on a "
                              "tmpfs (/run)" % (cfg.runtime_dir, mount.point, mount.fstype))


def take_runtime_dir(runtime_dir, role, stop=None):
    """The runtime dir's lock, None if stop() said so while waiting, or
    ConfigError naming who holds it."""
    lock = lock_runtime_dir(runtime_dir, role, LOCK_WAIT, stop)
    if lock is None and not (stop is not None and stop()):
        fd = open_lock(runtime_dir)
        pid, holder = lock_holder(fd)
        os.close(fd)
        raise ConfigError("--runtime-dir %s is in use by process %s (synchook %s): stop it, or "
                          "give this one its own --runtime-dir" % (runtime_dir, pid, holder))
    return lock


def cmd_serve(cfg):
    inherited = inherited_listener(cfg)  # first: commands must not inherit LISTEN_*
    prepare_runtime_dir(cfg.runtime_dir)
    check_runtime_dir_stays_writable(cfg)
    waker = Waker()
    install_signal_handlers(waker)
    # Held for life (never closed): a recovery waits while this run lives.
    lock = take_runtime_dir(cfg.runtime_dir, "serve", lambda: waker.stopping)
    if lock is None:
        return 0
    log.attach_spill(cfg.runtime_dir)
    forbid_core_dumps()
    oom_problem = lower_oom_score()
    phases = Phases(cfg)
    guardian = Guardian(cfg, phases.base_env)
    marker = Marker(cfg.runtime_dir, lock)
    window = SyncWindow(phases, cfg.max_hold, marker, guardian)
    # Recovery first: anything before it (a key written to --state-dir, a
    # certificate read, a log line written to a file) could block on the
    # filesystem the dead run froze.
    recover_window(window)
    try:
        if not window.is_open:           # else the recovered window, still owed, keeps it
            marker.prepare()
    except OSError as err:
        log.alert("cannot make the window marker %s: %s; no window opens until it can be "
                  "made (/sync answers 500)", marker.path, err.strerror)
    log.release()
    guardian.start()
    guardian.watch()                     # a guardian that dies is started again at once
    window.watchdog.start()              # retries a post phase that could not start
    try:
        if cfg.secret_from_flag:
            log.warning("--secret on the command line is visible in ps; prefer --secret-file "
                        "or SYNCHOOK_SECRET")
        context = load_tls(cfg)
        server = open_server(cfg, window, context, waker, inherited)
    except OSError as err:
        log.error("cannot listen on %s port %d: %s", cfg.listen or "all addresses", cfg.port,
                  err.strerror)
        window.shutdown()
        return 1
    except ConfigError:
        window.shutdown()
        raise
    server.connections.max_connections = connection_cap(cfg.max_connections)
    host, port = server.server_address[:2]
    scheme = {"auto": "https+http", "on": "https", "off": "http"}[
        cfg.tls if context is not None else "off"]
    log.info("synchook %s listening on %s port %d (%s); sync=%r post-sync=%r%s%s%s; "
             "timeout=%s max-hold=%s; access: %s", __version__,
             "[%s]" % host if ":" in host else host, port, scheme, cfg.sync, cfg.post_sync,
             " hold=%r" % cfg.hold if cfg.hold else "",
             " hooks-dir=%s" % cfg.hooks_dir if cfg.hooks_dir else "", freeze_rule(cfg),
             seconds(cfg.timeout), seconds(cfg.max_hold), access_rule(cfg))
    if oom_problem:
        log.alert("%s", oom_problem, level=30)
    if cfg.timeout > XO_TIMEOUT - 5:
        log.warning("--timeout %s s: XO waits %s s for /sync, then snapshots without waiting "
                    "for the sync phase and its freeze (keep it at 55 s or less, or raise "
                    "syncHookTimeout in xo-server's config too)", seconds(cfg.timeout),
                    seconds(XO_TIMEOUT))
    if is_closed(cfg):
        log.warning("--allow none: every client is refused, XO included; %s", CLOSED_HINT)
    elif not cfg.secret and not cfg.allow:
        log.warning("anyone who can reach port %d can run the hooks: set --allow to XO's "
                    "address (and a secret, --secret-file)", port)
    if hasattr(gc, "freeze"):
        # Start-up objects live for ever: keep them out of the collector's full
        # passes, which would otherwise add milliseconds to an unlucky request.
        gc.collect()
        gc.freeze()  # novermin
    log.serving()
    notify_systemd("READY=1\nSTATUS=listening on port %d" % port)
    served = server.serve()
    # A restart in place is a reload to systemd (the same pid goes on, and says
    # READY=1 again once it listens); STOPPING=1 would make systemd wait for an
    # exit that never comes, then kill it (TimeoutStopSec) and call it failed.
    notify_systemd("RELOADING=1\nMONOTONIC_USEC=%d" % int(time.monotonic() * 1e6)
                   if waker.restarting else "STOPPING=1")
    released = window.shutdown()
    if released:
        marker.remove()                  # the closed one: nothing is left behind
    if waker.restarting and served:
        server.finish_requests(TERM_GRACE)
        restart_in_place(server.socket, server.socket_shared)  # returns only if it failed
        return 1
    log.info("stopped" if released else "stopped with the post phase owed")
    return 0 if released and served else 1


RECOVER_DESCRIPTION = """\
Close the window a synchook that died left open, as its marker in the runtime
dir describes it: thaw what it froze (found by device, wherever it is mounted
now), end the commands it started, and run what is owed of its post phase.
The guardian runs this when the daemon dies, and every start does it first;
by hand it is a rescue that runs nothing twice (the runtime dir's lock)."""


def cmd_recover(argv):
    parser = argument_parser(
        prog="%s recover" % os.path.basename(sys.argv[0]), description=RECOVER_DESCRIPTION,
        epilog="Exit 0 when no window is owed any more, 1 otherwise.\n" + COMMANDS_EPILOG,
        allow_abbrev=False)
    parser.add_argument("--runtime-dir", metavar="DIR", default=default_runtime_dir(),
                        help="the dead daemon's --runtime-dir (default /run/synchook as root)")
    parser.add_argument("--log-level", choices=sorted(LEVELS, key=LEVELS.get), default="info",
                        help="as the daemon's")
    parser.add_argument("--syslog", action="store_true", help="as the daemon's")
    args = parser.parse_args(argv)
    runtime_dir = os.path.abspath(args.runtime_dir)
    # Until it is done, nothing is written to a file: the filesystem under it
    # may be the frozen one.
    log.start(args.log_level, args.syslog, held=True)

    def carry_on(signum, frame):
        # A handler, not SIG_IGN: commands get the default back at exec.
        log.info("%s received during a recovery: ignored until it is done",
                 signal.Signals(signum).name)

    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, carry_on)
    prepare_for_commands()
    forbid_core_dumps()
    try:
        return recover_runtime_dir(runtime_dir)
    finally:
        log.release()


def recover_runtime_dir(runtime_dir):
    """cmd_recover's work, under the runtime dir's lock: its exit code."""
    if not os.path.lexists(runtime_dir):
        log.info("recover: %s does not exist: no window is owed", runtime_dir)
        return 0
    private_dir(runtime_dir, "--runtime-dir")
    lock = lock_runtime_dir(runtime_dir, "recover", LOCK_WAIT)
    if lock is None:
        log.info("recover: a running synchook holds %s: the window is its own", runtime_dir)
        return 0
    log.attach_spill(runtime_dir)
    cfg = Config()
    cfg.sync = cfg.post_sync = cfg.hold = cfg.hooks_dir = cfg.freeze = cfg.freeze_under = ""
    cfg.hook_words = ["sync", "post-sync"]
    cfg.skip_freeze_on_failure = False
    cfg.timeout = None                   # the marker's
    window = SyncWindow(Phases(cfg), XO_TIMEOUT, Marker(runtime_dir, lock))
    if not recover_window(window, "recover", settings=False):
        if marker_present(window.marker.path):
            return 1                     # an older synchook's marker: the next start's
        log.info("recover: no window is owed (%s)", window.marker.path)
        return 0
    if not window.retry_owed("recover", RECOVER_RETRY):
        log.alert("recover: the post phase is still owed (%s): the next start runs it "
                  "(marker %s)", window.owed, window.marker.path)
        return 1
    return 0


def reopen_standard_fds():
    """Started with 0, 1 or 2 closed (`0<&- 1>&- 2>&-`), the next pipe or
    socket would take that number, and log lines would go into it: give each
    closed one /dev/null first."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
            except OSError:
                return
            if null != fd:                   # lowest free number: it is fd, unless
                os.dup2(null, fd)            # an earlier one was free too
                os.close(null)
            if fd and getattr(sys, ("stdout", "stderr")[fd - 1]) is None:
                setattr(sys, ("stdout", "stderr")[fd - 1], open(fd, "w", closefd=False))


def main(argv=None):
    reopen_standard_fds()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    if argv and argv[0] in ("serve", "check", "call", "tag", "status", "thaw", "recover",
                            "fleet", "configure"):
        command = argv.pop(0)
    if sys.argv[0] and os.path.isfile(sys.argv[0]):
        PROCESS.program = os.path.abspath(sys.argv[0])     # before cwd becomes /
    if command == "call":
        return cmd_call(argv)
    if command == "fleet":
        return cmd_fleet(argv)
    if command == "thaw":
        return cmd_thaw(argv)
    if command == "configure":
        try:
            return cmd_configure(argv)
        except ConfigError as err:               # a bad setting: nothing written
            sys.stderr.write("%s configure: error: %s\n" % (PROG, err))
            return 2
        except OSError as err:                   # the file could not be written
            sys.stderr.write("%s configure: error: %s\n" % (PROG, err))
            return 1
        finally:
            log.close()
    if command == "recover":
        try:
            return cmd_recover(argv)
        except ConfigError as err:
            sys.stderr.write("%s: error: %s\n" % (PROG, err))
            return 2
        finally:
            log.close()
    prog = os.path.basename(sys.argv[0]) + ("" if command == "serve" else " " + command)
    args = parse_serve_flags(argv) if command == "serve" else None
    if args is None:
        args = build_serve_parser(prog, command).parse_args(argv)
    parse_only = getattr(args, "parse_only", False)
    if (command in ("tag", "status", "check") and args.config is None and
            "SYNCHOOK_CONFIG" not in os.environ and os.path.isfile(DEFAULT_CONFIG)):
        args.config = DEFAULT_CONFIG        # an installed guest's settings
    try:
        if command == "tag" and args.secret_new:
            # The secret file is about to be written: only its name is needed now.
            return cmd_tag(args, resolve_config(args, check_files=False))
        # The tools work with a mount missing (status and tag are wanted exactly
        # then; check lists it as FAIL): only the daemon refuses to start.
        cfg = resolve_config(args, check_files=not parse_only,
                             check_freeze=command == "serve")
        if parse_only:
            print("ok   settings are valid (syntax and values; no file opened, nothing run)")
            return 0
        if command == "tag":
            return cmd_tag(args, cfg)
        if command == "status":
            return cmd_status(args, cfg)
        # The daemon writes no file until its recovery has thawed what a dead
        # run froze (cmd_serve releases the log).
        log.start(cfg.log_level, cfg.syslog, held=command == "serve")
        prepare_for_commands()
        if command == "check":
            return cmd_check(cfg, run_phases=not args.no_run)
        return cmd_serve(cfg)
    except ConfigError as err:
        line = "%s: error: %s" % (PROG, err)
        sys.stderr.write(line + "\n")
        if (command == "serve" or parse_only) and wants_syslog(args):
            syslog_or_file().write([(40, time.time(), escape(line), False)])
        return 2
    finally:
        log.close()


def wants_syslog(args):
    """--syslog asked for, by flag or variable: a bad setting is reported there too."""
    if args.syslog is not None:
        return True
    try:
        return parse_bool(os.environ.get("SYNCHOOK_SYSLOG", "0"))
    except ConfigError:
        return False


if __name__ == "__main__":
    sys.exit(main())
