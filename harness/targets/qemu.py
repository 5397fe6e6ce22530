"""Local QEMU (TCG or KVM): QMP through qemu.qmp, serial through a unix-socket chardev.

Both sockets live in a private 0700 runtime directory and the harness is their listening end, so
QEMU opens no port at all.  QEMU starts paused (-S); hooks may act over QMP before ``cont``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from qemu.qmp.legacy import QEMUMonitorProtocol

from ..errors import ConfigError, InfraError
from ..payload import layout
from ..payload.image import Image
from .base import (ConsoleWatch, HostControl, RawRun, Target, remove_runtime_dir, runtime_dir, write_records,
                   write_replay)
from .config import Field, command_name
from .quoting import (Unquotable, check_escape_hatch, config_check, qemu_cpu, qemu_host_files, qemu_id, qemu_keyvals, qemu_listeners,
                      qemu_name, qemu_opts, qemu_trace_pattern, qemu_value)
from . import proc

# A property of a QEMU device: a string (its commas doubled in the option string), an integer or a
# boolean (on/off).  Keys are QEMU names: a ',' or '=' in a key would start another property.
PROPERTY_VALUE = Field((str, int, bool), low=-(1 << 63), high=(1 << 64) - 1, check=config_check(qemu_value))


def _properties(doc: str) -> Field:
    return Field(dict, default={}, keys=config_check(qemu_name), values=PROPERTY_VALUE, doc=doc)


DEVICE_SCHEMA = {
    "driver": Field(str, required=True, check=config_check(qemu_name), doc="a QEMU device, e.g. edu"),
    "addr": Field(str, default=None, check=config_check(qemu_value), doc="PCI slot.function, e.g. '0x4.0'"),
    "bus": Field(str, default=None, check=config_check(qemu_value)),
    "id": Field(str, default=None, check=config_check(qemu_id)),
    "options": _properties("extra device properties"),
}

IOMMU_SCHEMA = {
    "aw_bits": Field(int, default=39, choices=(39, 48), doc="guest address width"),
    "caching_mode": Field(bool, default=False),
    "intremap": Field(bool, default=False),
    "device_iotlb": Field(bool, default=False),
    "options": _properties("extra intel-iommu properties"),
}


START_TIMEOUT_S = 30.0      # QEMU connects both sockets within this (it does so before it runs anything)
QMP_TIMEOUT_S = 5.0         # every QMP command is answered within this, or QEMU counts as unresponsive
DIAGNOSE_TIMEOUT_S = 2.0    # the register dump for a timeout message
END_QUIET_S = 2.0           # after END: QEMU normally exits at once (end of stream); else this quiet


def qemu_exit_status(end_status: int) -> int:
    """isa-debug-exit turns a write of n into the exit status (n << 1) | 1."""
    return ((layout.EXIT_BASE | end_status) << 1) | 1


class QemuTarget(Target):
    KIND = "qemu"
    SECTION = "qemu"
    IMAGE_FORMAT = "elf"
    HOST_ACTIONS = frozenset({"qmp"})
    SCHEMA = {
        "binary": Field(str, default="qemu-system-x86_64", check=command_name),
        "accel": Field(str, default="tcg", choices=("tcg", "kvm")),
        "machine": Field(str, default="q35", check=config_check(qemu_name),
                         doc="a machine type, without properties (the harness adds accel=...)"),
        "cpu": Field(str, default="max", check=config_check(qemu_cpu),
                     doc="a CPU model and features, e.g. host,+vmx"),
        "memory_mb": Field(int, default=256, low=32, high=65536),
        "iommu": Field((dict, type(None)), default=None, schema=IOMMU_SCHEMA),
        "devices": Field(list, default=[], items=Field(dict, schema=DEVICE_SCHEMA), max_items=32),
        "icount": Field((str, type(None)), default=None, check=config_check(qemu_keyvals),
                        doc="e.g. 'shift=0,sleep=off'"),
        "trace": Field(list, default=[], items=Field(str, check=config_check(qemu_trace_pattern)),
                       doc="QEMU trace event patterns"),
        "extra_args": Field(list, default=[], items=Field(str), doc="further QEMU arguments (no listeners)"),
        "allow_network_listeners": Field(bool, default=False,
                                         doc="let extra_args open ports (-gdb, -vnc, tcp chardevs, hostfwd, ...)"),
        "allow_host_files": Field(bool, default=False,
                                  doc="let extra_args write host files or run host commands (-D, file: chardevs, "
                                      "writable -drive, tap scripts, ...)"),
        "require_kvm_vmx": Field(bool, default=False, doc="skip unless /dev/kvm offers VMX"),
    }

    @classmethod
    def check_config(cls, config) -> None:
        q, where, section = config.section, config.source, cls.SECTION
        if q["iommu"] is not None and q["machine"] != "q35":
            raise ConfigError(f"{where}: {section}.machine: intel-iommu needs q35, got {q['machine']!r}")
        if q["icount"] is not None and q["accel"] != "tcg":
            raise ConfigError(f"{where}: {section}.icount: needs accel tcg (QEMU refuses -icount with "
                              f"{q['accel']}), got accel {q['accel']!r}")
        if q["require_kvm_vmx"] and q["accel"] != "kvm":
            raise ConfigError(f"{where}: {section}.require_kvm_vmx: needs accel kvm, got accel {q['accel']!r}")
        check_escape_hatch(where, f"{section}.extra_args", q, qemu_listeners(q["extra_args"]),
                           qemu_host_files(q["extra_args"]))

    def __init__(self, config):
        super().__init__(config)
        self.q = config.section
        type(self).check_config(config)
        # Hooks called with the QMP monitor while the CPU is still paused (-S).
        self.before_start: list[Callable[[QEMUMonitorProtocol], None]] = []

    def unavailable(self) -> str | None:
        """Why this target cannot run here (None when it can)."""
        if shutil.which(self.q["binary"]) is None:
            return f"{self.q['binary']} is not installed"
        if self.q["accel"] == "kvm":
            if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                return "/dev/kvm is not usable"
            if self.q["require_kvm_vmx"] and not kvm_offers_vmx():
                return "/dev/kvm offers no nested VMX (kvm_intel.nested is off or this is not an Intel KVM host)"
        return None

    def argv(self, image: Image, rt: Path, evidence: Path, paused: bool = True) -> list[str]:
        """QEMU's argv (``paused``: -S, the CPU waits for QMP ``cont``).  Every option string is
        built by quoting.qemu_opts: names from a safe set, values (config text and paths alike, e.g.
        a runtime directory holding a comma) escaped."""
        try:
            return self._argv(image, rt, evidence, paused)
        except Unquotable as e:        # only for a config that bypassed load(): say which file
            raise ConfigError(f"{self.config.source}: {self.SECTION}: {e}") from None

    @staticmethod
    def chardev(name: str, path: Path | str) -> str:
        """The unix-socket chardev the harness listens on (remote_qemu swaps it for a FIFO)."""
        return qemu_opts("socket", {"id": name, "path": str(path)})

    def _argv(self, image: Image, rt: Path, evidence: Path, paused: bool) -> list[str]:
        q = self.q
        machine = {"accel": q["accel"]}
        if q["iommu"] is not None and q["iommu"]["intremap"]:
            machine["kernel-irqchip"] = "split"
        argv = [q["binary"], "-machine", qemu_opts(q["machine"], machine), "-cpu", qemu_cpu(q["cpu"]),
                "-m", str(q["memory_mb"]),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                *(["-S"] if paused else []),
                "-chardev", self.chardev("qmp", rt / "qmp.sock"), "-mon", "chardev=qmp,mode=control",
                "-chardev", self.chardev("ser0", rt / "serial.sock"), "-serial", "chardev:ser0",
                "-device", qemu_opts("isa-debug-exit", {"iobase": f"{layout.DEBUG_EXIT_PORT:#x}", "iosize": 4}),
                "-kernel", str(image.elf)]
        if q["icount"]:
            argv += ["-icount", qemu_keyvals(q["icount"])]
        if q["iommu"] is not None:
            i = q["iommu"]
            props = {"aw-bits": i["aw_bits"], "caching-mode": i["caching_mode"],
                     "intremap": i["intremap"], "device-iotlb": i["device_iotlb"], **i["options"]}
            argv += ["-device", qemu_opts("intel-iommu", props)]
        for d in q["devices"]:
            props = {k: d[k] for k in ("bus", "addr", "id") if d[k] is not None}
            props.update(d["options"])
            argv += ["-device", qemu_opts(d["driver"], props)]
        if q["trace"]:
            argv += ["-D", str(evidence / "qemu-trace.log")]
            for pattern in q["trace"]:
                argv += ["-trace", f"enable={qemu_value(qemu_trace_pattern(pattern))}"]
        return argv + list(q["extra_args"])

    def run(self, image: Image, evidence: Path, timeout: float | None = None) -> RawRun:
        timeout = self.begin_run(evidence, timeout)
        rt = runtime_dir("qemu", evidence)
        # Paused (-S) only when a hook must act before the CPU runs: otherwise the QMP handshake
        # overlaps the guest's run instead of delaying it (a visible share of a short run's time).
        paused = bool(self.before_start)
        try:
            argv = self.argv(image, rt, evidence, paused)
            (evidence / "cmdline.sh").write_text(
                "#!/bin/sh\n# The exact command; the harness listened on both sockets (replay.sh runs it "
                "by hand).\n" + shlex.join(argv) + "\n")
            image.copy_to(evidence)
            self._write_replay(evidence)
        except BaseException:
            remove_runtime_dir(rt)
            raise
        transcript = QmpTranscript(evidence / "qmp.jsonl", f"target {self.name}")
        watch = ConsoleWatch(evidence / "serial.log", timeout, f"target {self.name}", self.sync_actions)
        qmp_listener = _listen(rt / "qmp.sock")
        serial_listener = _listen(rt / "serial.sock")
        stderr = open(evidence / "qemu.stderr", "wb")
        process: subprocess.Popen | None = None
        qmp: QEMUMonitorProtocol | None = None
        qmp_sock: socket.socket | None = None
        serial: socket.socket | None = None
        try:
            process = proc.spawn(argv, stderr=stderr, stdout=subprocess.DEVNULL)
            (evidence / "qemu.pid").write_text(f"{process.pid}\n")
            start_by = time.monotonic() + min(max(watch.remaining(), 0.1), START_TIMEOUT_S)
            qmp_sock = self._accept(qmp_listener, process, evidence, start_by, "QMP")
            qmp = QEMUMonitorProtocol(qmp_sock)
            qmp.settimeout(QMP_TIMEOUT_S)
            left_early = False
            try:
                transcript.greeting(self._handshake(qmp, qmp_sock, process, evidence, start_by))
            except InfraError:
                if paused or process.poll() is None:
                    raise
                # Not paused, QEMU may run a short payload to its end before the handshake is
                # through: then the console decides, and no records at all is a start failure.
                left_early = True
            serial = self._accept(serial_listener, process, evidence, start_by, "serial")
            if left_early:
                watch.sync.refuse("QEMU left during the QMP handshake")
            else:
                watch.sync.connect(serial.sendall, QmpControl(self.name, evidence, qmp, transcript))
            if paused:
                for hook in self.before_start:
                    hook(qmp)
                transcript.cmd(qmp, "cont")
            watch.pump(serial.fileno(), evidence, lambda: self._diagnose(process, qmp, transcript, evidence),
                       check_alive=None if left_early else GuestStopWatch(f"target {self.name}", qmp, transcript,
                                                                          evidence),
                       quiet_s=END_QUIET_S)
            if left_early and not watch.parser.records:
                raise self._start_failure(process, evidence, "QEMU exited at start-up during the QMP handshake")
            status = _wait(process, 3.0)
            if status is None:
                # The payload ended but QEMU did not leave: ask, then insist.
                transcript.cmd(qmp, "quit", check=False)
                status = _wait(process, 1.0)
            transcript.events(qmp)
            watch.check_exit(evidence, status, lambda: (evidence / "qemu.stderr").read_text(errors="replace"))
            watch.check(evidence)
            return RawRun(target=self.name, records=watch.parser.records, console=bytes(watch.raw),
                          exit_status=status, exit_expected=qemu_exit_status,
                          duration_s=time.monotonic() - watch.started, evidence=evidence,
                          host_events=transcript.entries)
        finally:
            watch.close()
            write_records(evidence, watch.parser.records)
            if process is not None:
                proc.end(process)
            # QEMU has gone, so closing its QMP connection cannot wait on it.
            for closer in (qmp.close if qmp else None, qmp_sock.close if qmp_sock else None,
                           qmp_listener.close, serial_listener.close, serial.close if serial else None,
                           stderr.close):
                if closer is not None:
                    try:
                        closer()
                    except Exception:
                        pass
            transcript.close()
            remove_runtime_dir(rt)

    def _accept(self, listener: socket.socket, process: subprocess.Popen, evidence: Path, by: float,
                what: str) -> socket.socket:
        """Accept QEMU's connection to one of our sockets, checking that QEMU is still alive."""
        listener.settimeout(0.1)
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except socket.timeout:
                pass
            if process.poll() is not None:
                raise self._start_failure(process, evidence, f"QEMU exited at start-up before its {what} "
                                                              "connection")
            if time.monotonic() > by:
                raise self._start_failure(process, evidence, f"no {what} connection within "
                                                              f"{START_TIMEOUT_S:.0f} s")

    def _handshake(self, qmp: QEMUMonitorProtocol, sock: socket.socket, process: subprocess.Popen,
                   evidence: Path, by: float) -> Any:
        """QMP greeting and capability negotiation; connect() has no bound of its own, so a timer
        shuts the socket if it stalls (a stopped QEMU), which makes connect() fail."""
        guard = threading.Timer(max(by - time.monotonic(), QMP_TIMEOUT_S), _shut, (sock,))
        guard.start()
        try:
            return qmp.connect()
        except Exception as e:
            gone = _wait(process, 0.5) is not None
            raise self._start_failure(process, evidence, "QEMU exited at start-up during the QMP handshake"
                                      if gone else f"QMP handshake failed ({e!r})") from None
        finally:
            guard.cancel()

    def replay_argv(self) -> list[str] | None:
        """This target's command for a run by hand: serial on stdio, no QMP, not paused, the payload
        copy in the current directory (QEMU leaves through isa-debug-exit after the terminal record).
        None if argv() no longer has the shape this expects."""
        argv = self.argv(_ElfOnly(Path("payload.elf")), Path("/run-dir"), Path("."))
        out: list[str] = []
        swapped = 0
        it = iter(argv)
        for a in it:
            if a == "-S":
                continue
            if a == "-chardev":
                spec = next(it)
                if spec.startswith(("socket,id=qmp,", "socket,id=ser0,")):
                    swapped += 1
                    continue
                out += [a, spec]
            elif a == "-mon":
                spec = next(it)
                if spec == "chardev=qmp,mode=control":
                    swapped += 1
                    continue
                out += [a, spec]
            elif a == "-serial":
                spec = next(it)
                out += [a, "stdio" if spec == "chardev:ser0" else spec]
                swapped += spec == "chardev:ser0"
            elif a == "-D":
                out += [a, "replay-" + next(it)]
            else:
                out.append(a)
        return out if swapped == 4 else None

    def _write_replay(self, evidence: Path) -> None:
        argv = self.replay_argv()
        if argv is None:
            write_replay(evidence, "echo 'replay.sh: the QEMU command line could not be turned into a "
                                   "manual one; see cmdline.sh' >&2\nexit 2\n")
        else:
            write_replay(evidence, "exec " + shlex.join(argv) + ' "$@"\n')

    def _start_failure(self, process: subprocess.Popen, evidence: Path, what: str) -> InfraError:
        status = _wait(process, 0.5)
        err = (evidence / "qemu.stderr").read_bytes().decode(errors="replace").strip()[-500:]
        return InfraError(f"target {self.name}: QEMU did not start: {what}; exit status {status}; "
                          f"stderr: {err or '(empty)'}; evidence: {evidence}", stage="start",
                          evidence=str(evidence))

    def _diagnose(self, process: subprocess.Popen | None, qmp: QEMUMonitorProtocol,
                  transcript: "QmpTranscript", evidence: Path) -> str:
        """For a timeout message: QEMU's registers, or why QEMU could not give them."""
        state = _process_state(process.pid) if process is not None else None
        if state == "T":
            return f"QEMU is unresponsive: process {process.pid} is stopped (state T); no register dump"
        qmp.settimeout(DIAGNOSE_TIMEOUT_S)
        try:
            return self._register_dump(qmp, transcript, evidence)
        except (TimeoutError, asyncio.TimeoutError):
            return (f"QEMU is unresponsive: QMP did not answer 'info registers' within "
                    f"{DIAGNOSE_TIMEOUT_S:.0f} s (process state {state or 'gone'})")
        except Exception as e:  # a dying QEMU may not answer either
            return f"register dump failed: {e!r}"

    def _register_dump(self, qmp: QEMUMonitorProtocol, transcript: "QmpTranscript", evidence: Path) -> str:
        regs = transcript.cmd(qmp, "human-monitor-command", {"command-line": "info registers"})
        (evidence / "registers.txt").write_text(str(regs))
        wanted = ("RIP=", "RFL=", "CPL=", "HLT=", "CR0=", "CR2=", "CR3=")
        picked = [w for w in str(regs).split() if w.startswith(wanted)]
        return f"registers: {' '.join(picked)} (all in registers.txt)"


MEMORY_READ_QWORDS = 512    # one HMP ``xp`` reads at most this many qwords (4 KiB)
EVENT_POLL_S = 0.1


class QmpControl(HostControl):
    """The QMP vocabulary of sync actions (issue 14): every command and reply, and every event
    pulled, goes to the run's qmp.jsonl.  Works alike on local and remote QEMU (the same QMP
    connection the target already holds)."""

    def __init__(self, target: str, evidence: Path, qmp: QEMUMonitorProtocol, transcript: "QmpTranscript"):
        super().__init__(target, evidence)
        self.qmp = qmp
        self.transcript = transcript

    def command(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Any QMP command; its ``return`` value (an error reply is an InfraError)."""
        return self.transcript.cmd(self.qmp, name, args)

    def hmp(self, command_line: str) -> str:
        """A human-monitor command through QMP; its text."""
        return str(self.command("human-monitor-command", {"command-line": command_line}))

    def inject_nmi(self) -> None:
        """An NMI to every CPU (QMP ``inject-nmi``)."""
        self.command("inject-nmi")

    def stop(self) -> None:
        self.command("stop")

    def cont(self) -> None:
        self.command("cont")

    def status(self) -> str:
        """``query-status``: 'running', 'paused', ..."""
        return str(self.command("query-status")["status"])

    def system_reset(self) -> None:
        """A platform reset (QMP ``system_reset``): the payload boots again and its record stream
        starts over; this sync point is not released (the payload that waited there is gone).
        QEMU runs with -no-reboot, which turns every reset into an exit: ``set-action`` makes this
        one a reset, and ``booted_again`` restores the exit once the payload runs again (SeaBIOS
        resets the machine once more on the way, which must not become an exit)."""
        self.command("set-action", {"reboot": "reset"})
        self.command("system_reset")
        self.rebooting = True

    def booted_again(self) -> None:
        self.command("set-action", {"reboot": "shutdown"})

    def device_del(self, device_id: str) -> None:
        """Ask for the unplug of ``device_id``; behind a PCIe root port the guest completes it by
        powering the slot off (PCIe 5.0, 6.7.1.8), then QEMU emits DEVICE_DELETED (``wait_event``)."""
        self.command("device_del", {"id": device_id})

    def device_add(self, driver: str, device_id: str, **props: Any) -> None:
        """Plug a device (``props``: bus, addr, ... exactly as QEMU names them)."""
        self.command("device_add", {"driver": driver, "id": device_id, **props})

    def query_pci(self) -> list[dict[str, int]]:
        """Every PCI function QEMU has (``query-pci``), bridges' buses included, as dicts with
        bus, slot, function, vendor, device, class."""
        found: list[dict[str, int]] = []

        def walk(devices: list[dict[str, Any]]) -> None:
            for d in devices:
                found.append({"bus": d["bus"], "slot": d["slot"], "function": d["function"],
                              "vendor": d["id"]["vendor"], "device": d["id"]["device"],
                              "class": d["class_info"]["class"]})
                walk(d.get("pci_bridge", {}).get("devices", []))
        for bus in self.command("query-pci"):
            walk(bus["devices"])
        return found

    def read_memory(self, address: int, nbytes: int) -> bytes:
        """Guest-physical memory, read by QEMU (HMP ``xp``; qword multiples)."""
        if nbytes <= 0 or nbytes % 8 or address % 8:
            raise ValueError(f"read_memory({address:#x}, {nbytes}): address and length must be qword-aligned")
        out = bytearray()
        while len(out) < nbytes:
            n = min((nbytes - len(out)) // 8, MEMORY_READ_QWORDS)
            at = address + len(out)
            text = self.hmp(f"xp /{n}gx {at:#x}")
            words = [int(w, 16) for line in text.splitlines() if ":" in line
                     for w in line.split(":", 1)[1].split()]
            if len(words) != n:
                raise InfraError(f"target {self.target}: xp at {at:#x} gave {len(words)} qwords, expected {n}: "
                                 f"{text[:200]!r}", stage="qmp")
            out += b"".join(w.to_bytes(8, "little") for w in words)
        return bytes(out)

    def wait_event(self, name: str, timeout: float = 5.0, **data: Any) -> dict[str, Any]:
        """The next QMP event ``name`` whose data holds ``data`` (bounded; others are logged)."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        backlog = self.transcript.backlog
        for ev in list(backlog):                 # pulled (and logged) by the run's GuestStopWatch
            backlog.remove(ev)
            seen.append(str(ev.get("event")))
            if ev.get("event") == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                return ev
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise InfraError(f"target {self.target}: sync point {self.point!r}: no QMP event {name} "
                                 f"{data or ''} within {timeout:.1f} s (events seen: {seen or 'none'}); "
                                 f"evidence: {self.evidence}", stage="qmp", evidence=str(self.evidence))
            try:
                ev = self.qmp.pull_event(wait=float(min(left, EVENT_POLL_S)))
            except (TimeoutError, asyncio.TimeoutError):
                continue
            if ev is None:
                continue
            self.transcript.log_event(ev)
            seen.append(str(ev.get("event")))
            if ev.get("event") == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                return ev


class _ElfOnly:
    """Stands in for an Image inside argv(): only ``elf`` is used."""

    def __init__(self, elf: Path):
        self.elf = elf


# Run states in which QEMU keeps running with the guest stopped for good (qapi/run-state.json):
# a KVM internal error (e.g. nested KVM cannot map a VMCS12 page), a guest panic, an I/O error.
STOPPED_FOR_GOOD = frozenset({"internal-error", "guest-panicked", "io-error", "shutdown"})


class GuestStopWatch:
    """A console loop's ``check_alive`` for QEMU: QEMU does not exit when KVM reports an internal
    error (or the guest panics); it stops the guest and waits.  On a STOP event this asks for the
    run state, and a state the guest cannot leave ends the run at once instead of at its timeout.
    Events it pulls stay in the transcript's backlog for a later ``wait_event``."""

    def __init__(self, label: str, qmp: QEMUMonitorProtocol, transcript: "QmpTranscript", evidence: Path):
        self.label, self.qmp, self.transcript, self.evidence = label, qmp, transcript, evidence

    def __call__(self) -> None:
        stopped = False
        while True:
            try:
                ev = self.qmp.pull_event(wait=False)
            except Exception:
                return                              # the console loop notices a dead QEMU itself
            if ev is None:
                break
            self.transcript.log_event(ev)
            self.transcript.backlog.append(ev)
            stopped = stopped or ev.get("event") == "STOP"
        if not stopped:
            return
        state = str((self.transcript.cmd(self.qmp, "query-status", check=False) or {}).get("status", "?"))
        if state in STOPPED_FOR_GOOD:
            raise InfraError(f"{self.label}: QEMU stopped the guest for good (run state {state!r}; for "
                             f"'internal-error' KVM refused to run it: its reason is in qemu.stderr); "
                             f"evidence: {self.evidence}", stage="run", evidence=str(self.evidence))


class QmpTranscript:
    """Every QMP command, reply and event of a run, one JSON object per line."""

    def __init__(self, path: Path, label: str = "QEMU"):
        self.label = label
        self.file = open(path, "w")
        self.entries: list[dict[str, Any]] = []
        self.backlog: list[dict[str, Any]] = []   # events pulled between sync points, not yet waited for
        self.t0 = time.monotonic()

    def _log(self, entry: dict[str, Any]) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 4), **entry}
        self.entries.append(entry)
        self.file.write(json.dumps(entry, default=str) + "\n")

    def greeting(self, msg: Any) -> None:
        self._log({"greeting": msg})

    def cmd(self, qmp: QEMUMonitorProtocol, name: str, args: dict | None = None, check: bool = True) -> Any:
        self._log({"execute": name, "arguments": args or {}})
        try:
            reply = qmp.cmd_raw(name, args)
        except Exception as e:
            self._log({"error": repr(e)})
            if not check:
                return None
            if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
                raise InfraError(f"{self.label}: QEMU is unresponsive: QMP '{name}' was not answered within "
                                 f"its bound ({e!r}); evidence: {self.file.name}", stage="qmp") from None
            raise
        self._log({"reply": reply})
        if check and isinstance(reply, dict) and "error" in reply:
            raise InfraError(f"QMP {name} failed: {reply['error']}", stage="qmp")
        return reply.get("return") if isinstance(reply, dict) else reply

    def log_event(self, ev: Any) -> None:
        self._log({"event": ev})

    def events(self, qmp: QEMUMonitorProtocol) -> None:
        try:
            for ev in qmp.get_events(wait=False):
                self._log({"event": ev})
        except Exception as e:
            self._log({"error": f"events not read: {e!r}"})

    def close(self) -> None:
        self.file.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, T for stopped, Z, ...) or None when it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def _wait(p: subprocess.Popen, timeout: float) -> int | None:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def kvm_offers_vmx() -> bool:
    """True when this host's KVM can give a guest VMX (Intel with nested on)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        nested = Path("/sys/module/kvm_intel/parameters/nested").read_text().strip()
    except OSError:
        return False
    return " vmx" in cpuinfo and nested in ("Y", "1")
