"""A real Debian guest under qemu, for tests/test_guest.py.

What no simulation on this machine shows runs here: the guest's own kernel
freezing its own `/`, systemd's handling of synchook's unit, journald with its
journal on `/`.  See ../../README.md ("Tested in a real guest") and
tests/README.md.

- The image: tests/vm/build-image (mmdebstrap from Debian's packages, then
  mkfs.ext4 -d), cached outside the checkout in $SYNCHOOK_VM_CACHE (default
  ~/.cache/synchook-vm) under a key made of that script's text: rebuilt when it
  changes.  The downloaded .debs are kept there too.
- The boot: direct kernel boot of the image's kernel; the root disk a qcow2
  overlay over the image, so that each boot starts clean.  TCG (software
  emulation) unless SYNCHOOK_VM_ACCEL=kvm: /dev/kvm on the development machines
  is a nested hypervisor that boots no stock kernel.
- Into the guest: the project shared read-only over 9p (mounted at /src),
  commands through qemu-guest-agent (guest-exec), synchook's port forwarded to
  127.0.0.1 on this machine (user networking, restrict=on: the guest reaches
  nothing else), the serial console logged to a file (and, with autologin, the
  rescue channel that works while `/` is frozen).
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(HERE, "build-image")
CACHE = os.environ.get("SYNCHOOK_VM_CACHE") or os.path.expanduser("~/.cache/synchook-vm")
QEMU = "qemu-system-x86_64"


def why_not():
    """Why no guest can be had here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap --mode=root, mkfs.ext4 -d)"
    missing = [tool for tool in ("mmdebstrap", QEMU, "qemu-img", "mkfs.ext4")
               if shutil.which(tool) is None]
    if missing:
        return ("missing %s (apt-get install mmdebstrap qemu-system-x86 qemu-utils)"
                % ", ".join(missing))
    return None


def image():
    """The image's directory (root.raw, vmlinuz, initrd.img), built if missing."""
    with open(BUILD, "rb") as handle:
        key = hashlib.sha256(handle.read()).hexdigest()[:16]
    directory = os.path.join(CACHE, "image-" + key)
    if not os.path.exists(os.path.join(directory, "root.raw")):
        os.makedirs(CACHE, exist_ok=True)
        building = directory + ".building"
        shutil.rmtree(building, ignore_errors=True)
        out = subprocess.run(["sh", BUILD, building], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=1200)
        if out.returncode:
            tail = out.stdout.decode("utf-8", "replace")[-2000:]
            raise RuntimeError("tests/vm/build-image failed:\n" + tail)
        os.rename(building, directory)
    return directory


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GuestError(Exception):
    pass


class Guest:
    """One booted guest: run(), its forwarded port, its serial log."""

    def __init__(self, image_dir, data_disks=(), restored=None):
        """data_disks: names of new blank disks; restored: {name: image} disks
        that start as those images (snapshots another guest's hypervisor took:
        the restore an admin does), written to overlays, the images untouched."""
        self.image_dir = image_dir
        self.restored = dict(restored or {})
        self.work = tempfile.mkdtemp(prefix="synchook-guest-")
        self.port = free_port()
        self.data_disks = list(data_disks)    # names: /dev/disk/by-id/virtio-NAME in the guest
        self.qga_path = os.path.join(self.work, "qga.sock")
        self.qmp_path = os.path.join(self.work, "qmp.sock")
        self.serial_log = os.path.join(self.work, "serial.log")
        self.proc = None
        self.sync_id = int(time.time()) % 100000

    def boot(self, timeout=300):
        overlay = os.path.join(self.work, "root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        os.path.join(self.image_dir, "root.raw"), overlay], check=True)
        accel = os.environ.get("SYNCHOOK_VM_ACCEL", "tcg")
        cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else [
            "-accel", "tcg,thread=multi", "-cpu", "max"]
        argv = [QEMU, "-machine", "q35", "-smp", "2", "-m", "1024", "-nodefaults",
                "-display", "none", "-no-user-config"] + cpu + [
            "-kernel", os.path.join(self.image_dir, "vmlinuz"),
            "-initrd", os.path.join(self.image_dir, "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 quiet",
            # The root disk's device first: the first virtio disk is /dev/vda.
            "-drive", "file=%s,if=none,id=root,format=qcow2" % overlay,
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:%d-:1727" % self.port,
            "-device", "virtio-net-pci,netdev=n0",
            "-virtfs", "local,path=%s,mount_tag=src,security_model=none,readonly=on" % ROOT,
            "-chardev", "socket,id=qga0,path=%s,server=on,wait=off" % self.qga_path,
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev", "file,id=ser0,path=%s" % self.serial_log, "-serial", "chardev:ser0",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        for name in self.data_disks + sorted(self.restored):
            if name in self.restored:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                                self.restored[name], self.disk(name)], check=True)
            else:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk(name),
                                "128M"], check=True)
            argv += ["-drive", "file=%s,if=none,id=%s,format=qcow2" % (self.disk(name), name),
                     "-device", "virtio-blk-pci,drive=%s,serial=%s" % (name, name)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.work, "qemu.log"), "wb"))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise GuestError("qemu exited %s: %s" % (self.proc.returncode, self.qemu_log()))
            try:
                self.qga("guest-ping", timeout=5)
                break
            except (OSError, GuestError, ValueError):
                if time.monotonic() > deadline:
                    raise GuestError("no guest agent after %d s:\n%s" % (timeout,
                                                                          self.serial()))
                time.sleep(2)
        self.booted_in = timeout - (deadline - time.monotonic())
        self.run("modprobe 9pnet_virtio 2>/dev/null; mkdir -p /src && "
                 "mount -t 9p -o trans=virtio,version=9p2000.L,ro src /src", check=True)

    def disk(self, name):
        """The host file of a data disk (after snapshot(), its point-in-time image)."""
        return os.path.join(self.work, "%s.qcow2" % name)

    def snapshot(self, name, overlay):
        """The hypervisor's point-in-time snapshot of one data disk, as XAPI takes
        them one after the other: the guest writes to a new overlay from now on,
        and disk(name) holds the disk as it was."""
        self.qmp("blockdev-snapshot-sync", {"device": name, "snapshot-file": overlay,
                                            "format": "qcow2"})

    def qmp(self, execute, arguments=None, timeout=30):
        """One QMP command on a connection of its own."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.qmp_path)
            handle = sock.makefile("rwb")
            handle.readline()                                   # the greeting
            for command in ({"execute": "qmp_capabilities"},
                            {"execute": execute, "arguments": arguments or {}}):
                handle.write(json.dumps(command).encode() + b"\n")
                handle.flush()
                while True:
                    answer = json.loads(handle.readline().decode())
                    if "event" not in answer:
                        break
                if "error" in answer:
                    raise GuestError("%s: %s" % (command["execute"], answer["error"]))
            return answer.get("return")
        finally:
            sock.close()

    def qga(self, execute, arguments=None, timeout=30):
        """One guest agent command, on a connection of its own (the agent's
        chardev serves one client at a time), after a guest-sync that skips
        whatever an earlier, abandoned command left in the channel."""
        self.sync_id += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.qga_path)
            handle = sock.makefile("rwb")
            handle.write(json.dumps({"execute": "guest-sync",
                                     "arguments": {"id": self.sync_id}}).encode() + b"\n")
            handle.flush()
            while True:
                line = handle.readline()
                if not line:
                    raise GuestError("guest agent closed the channel")
                try:
                    if json.loads(line.decode().strip("\xff\n")).get("return") == self.sync_id:
                        break
                except ValueError:
                    continue
            command = {"execute": execute}
            if arguments is not None:
                command["arguments"] = arguments
            handle.write(json.dumps(command).encode() + b"\n")
            handle.flush()
            answer = json.loads(handle.readline().decode())
        finally:
            sock.close()
        if "error" in answer:
            raise GuestError("%s: %s" % (execute, answer["error"]))
        return answer.get("return")

    def run(self, command, timeout=180, check=False, poll=1.0):
        """(exit code, output) of `sh -c command` in the guest.  Polled gently:
        the guest agent logs each call to the journal, which blocks while `/` is
        frozen (wait inside the guest rather than poll fast)."""
        pid = self.qga("guest-exec", {"path": "/bin/sh", "arg": ["-c", command],
                                      "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            state = self.qga("guest-exec-status", {"pid": pid})
            if state.get("exited"):
                break
            if time.monotonic() > deadline:
                raise GuestError("%r still running after %d s" % (command, timeout))
            time.sleep(poll)
        output = b""
        for stream in ("out-data", "err-data"):
            output += base64.b64decode(state.get(stream, ""))
        code = state.get("exitcode", -1)
        text = output.decode("utf-8", "replace")
        if check and code != 0:
            raise GuestError("%r exited %s:\n%s" % (command, code, text))
        return code, text

    def put(self, path, data):
        """Write data (bytes) to path in the guest, through the guest agent."""
        handle = self.qga("guest-file-open", {"path": path, "mode": "wb"})
        try:
            for start in range(0, len(data), 48 * 1024):
                chunk = base64.b64encode(data[start:start + 48 * 1024]).decode()
                self.qga("guest-file-write", {"handle": handle, "buf-b64": chunk})
        finally:
            self.qga("guest-file-close", {"handle": handle})

    def serial(self):
        try:
            with open(self.serial_log, "rb") as handle:
                return handle.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def qemu_log(self):
        try:
            with open(os.path.join(self.work, "qemu.log"), "rb") as handle:
                return handle.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.qga("guest-exec", {"path": "/bin/systemctl", "arg": ["poweroff", "-i"]},
                         timeout=5)
                self.proc.wait(30)
            except (OSError, GuestError, ValueError, subprocess.TimeoutExpired):
                pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)
