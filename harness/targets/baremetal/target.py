"""The bare-metal target: lease -> console -> boot -> records -> restore -> release.

Every infrastructure failure is an InfraError (pytest: error, not failure) whose message starts
``target <name> (host <host>): <stage>:`` with stage one of lease, console, boot, records,
timeout.  After a run, whatever happened, the host is returned to a known state (a power cycle
back to its own OS, then an SSH check when SSH is configured); the outcome is in restore.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ...errors import ConfigError, InfraError, RunTimeout
from ...payload.image import Image
from ..base import ConsoleWatch, HostControl, RawRun, Target, write_records
from ..config import Field, duration, safe_component, show
from ..ssh import SSH_SCHEMA, SshConnection, settings_or_error
from . import boot as boot_mod, console as console_mod, lease as lease_mod, power as power_mod
from .common import driver_config

_DRIVER = Field(dict, required=True)
# Power and console may be left out when the lease supplies them (a labgrid place's resources).
_SUPPLIABLE = Field((dict, type(None)), default=None)


class BareMetalTarget(Target):
    KIND = "baremetal"
    SECTION = "baremetal"
    EMULATED = False
    SCHEMA = {
        "host": Field(str, required=True, check=safe_component,
                      doc="the host's name: lease key (a file name) and label in every message"),
        "power": _SUPPLIABLE, "console": _SUPPLIABLE, "boot": _DRIVER,
        "lease": Field(dict, default={"backend": "file"}),
        "ssh": Field((dict, type(None)), default=None, schema=SSH_SCHEMA, doc="the host's own OS"),
        "boot_timeout_s": duration(300.0, "bound on the first record after boot"),
        "restore": Field(dict, default={"action": "cycle"}, schema={
            "action": Field(str, default="cycle", choices=("cycle", "none"),
                            doc="cycle: power-cycle back to the host's OS after every run"),
            "ssh_wait_s": duration(300.0, "bound on the OS answering SSH again"),
        }),
    }

    @classmethod
    def check_config(cls, config) -> None:
        """Every driver section against its driver's schema, and the rules across them: checked
        when the file is loaded, so pytest refuses a broken lab file at start-up."""
        cls.drivers(config)

    @staticmethod
    def drivers(config) -> dict[str, Any]:
        """The chosen driver classes and their validated sections (ConfigError naming the key)."""
        s, where = config.section, config.source
        out: dict[str, Any] = {}
        supplied: frozenset[str] = frozenset()
        for part, registry, key in (("lease", lease_mod.BACKENDS, "backend"), ("power", power_mod.DRIVERS, "driver"),
                                    ("console", console_mod.DRIVERS, "driver"), ("boot", boot_mod.METHODS, "method")):
            path = f"baremetal.{part}"
            if s[part] is None:
                if part not in supplied:
                    raise ConfigError(f"{where}: {path}: missing (expected a mapping with '{key}'; only a lease "
                                      "backend that supplies it, such as labgrid, lets it be left out)")
                out[part] = None
                continue
            section = dict(s[part])
            if part == "lease":
                section.setdefault("backend", "file")
            name = section.get(key)
            if not isinstance(name, str) or name not in registry:
                raise ConfigError(f"{where}: {path}.{key}: expected one of {', '.join(sorted(registry))}, "
                                  f"got {show(name)}")
            driver_cls = registry[name]
            rest = section if part == "lease" else {k: v for k, v in section.items() if k != key}
            out[part] = (driver_cls, driver_config(rest, driver_cls.SCHEMA, where, f"{path}."))
            if part == "lease":
                driver_cls.check_config(out[part][1], f"{where}: {path}.")
                supplied = driver_cls.SUPPLIES
        boot_cls, boot_cfg = out["boot"]
        if boot_cls.NEEDS_SSH and s["ssh"] is None and "ssh" not in supplied:
            raise ConfigError(f"{where}: baremetal.ssh: missing (boot method {boot_cls.NAME} needs it)")
        boot_cls.check_config(boot_cfg, f"{where}: baremetal.boot.")
        return out

    def __init__(self, config):
        super().__init__(config)
        s, where = config.section, config.source
        self.host = s["host"]
        self.label = f"target {self.name} (host {self.host})"
        self.ssh = settings_or_error(s["ssh"], where) if s["ssh"] else None
        drivers = self.drivers(config)
        boot_cls, boot_cfg = drivers["boot"]
        # None when the lease supplies it (LabgridLease.attach puts the place's driver in its place).
        self.power = drivers["power"][0](drivers["power"][1], self.label, where) if drivers["power"] else None
        self.console = drivers["console"][0](drivers["console"][1], self.label, where) if drivers["console"] else None
        self.boot = boot_cls(boot_cfg, self.label, self.ssh)
        self.lease_cls, self.lease_cfg = drivers["lease"]

    def make_lease(self) -> lease_mod.Lease:
        return self.lease_cls(self.host, self.lease_cfg, self.label)

    def run(self, image: Image, evidence: Path, timeout: float | None = None) -> RawRun:
        timeout = timeout if timeout is not None else self.config.timeout_s
        s = self.config.section
        evidence.mkdir(parents=True, exist_ok=True)
        image.copy_to(evidence)
        lease = self.make_lease()
        lease.acquire(f"vtx run {evidence.name}")
        try:
            placed = lease.attach(self)      # self, or a copy driven by the leased place's resources
        except BaseException:
            try:
                lease.release()
            except Exception:
                pass                         # the attach error is the one to report
            raise
        return placed._run_leased(image, evidence, timeout, lease)

    def _run_leased(self, image: Image, evidence: Path, timeout: float, lease: lease_mod.Lease) -> RawRun:
        """The run proper, with the host leased; releases the lease on every path."""
        s = self.config.section
        watch: ConsoleWatch | None = None
        notes: list[str] = []
        try:
            self.console.open()
            boot_bound = s["boot_timeout_s"]
            watch = ConsoleWatch(evidence / "serial.log", boot_bound + timeout, self.label, self.sync_actions)
            # Sync points: release tokens go back over the same console (SOL, TCP, serial, command).
            watch.sync.connect(self.console.write, HostControl(self.name, evidence))
            notes.append(self.boot.boot(image, self.power))
            boot_deadline = time.monotonic() + boot_bound

            def booted() -> None:
                if not watch.parser.records and time.monotonic() > boot_deadline:
                    raise InfraError(f"{self.label}: boot: no record within {boot_bound:.1f} s of "
                                     f"booting ({notes[-1]}); console: {self.console.describe()}; "
                                     f"last console text: {_tail(watch)}; evidence: {evidence}",
                                     stage="boot", evidence=str(evidence))

            def read(wait: float) -> bytes | None:
                try:
                    return self.console.read(wait)
                except console_mod.ConsoleLost as e:
                    if watch.parser.ended:
                        return None              # the stream may end after END
                    raise InfraError(f"{e} after {watch.received} bytes and {len(watch.parser.records)} "
                                     f"records; evidence: {evidence}", stage="console",
                                     evidence=str(evidence)) from None

            # After END, read on until a quiet second: SOL and terminal servers are slower than
            # emulators, and anything that follows END is stream damage.
            watch.follow(read, lambda: f"console: {self.console.describe()}", check_alive=booted,
                         quiet_s=1.0)
            watch.check(evidence)
            return RawRun(target=self.name, records=watch.parser.records, console=bytes(watch.raw),
                          exit_status=None, exit_expected=None,
                          duration_s=time.monotonic() - watch.started, evidence=evidence, notes=notes)
        finally:
            # Each clean-up step runs even when an earlier one fails, and none of them may replace
            # the error that ended the run: their own failures go to restore.json and the notes.
            for step in (self.console.close, watch.close if watch is not None else None,
                         (lambda: write_records(evidence, watch.parser.records)) if watch is not None else None,
                         lambda: self._restore(evidence, notes), lease.release):
                if step is not None:
                    try:
                        step()
                    except Exception as e:
                        notes.append(f"clean-up step failed: {type(e).__name__}: {e}")

    def _restore(self, evidence: Path, notes: list[str]) -> None:
        """Disarm the boot method, power-cycle back to the host's OS and record whether it came back."""
        action = self.config.section["restore"]["action"]
        result: dict[str, Any] = {"host": self.host, "action": action}
        t0 = time.monotonic()
        try:
            disarmed = self.boot.disarm()
            if disarmed:
                result["boot"] = disarmed
            if action == "cycle":
                self.power.cycle()
                if self.ssh is not None:
                    result["ssh"] = self.wait_for_ssh(self.config.section["restore"]["ssh_wait_s"])
            result["ok"] = True
        except Exception as e:            # a ConfigError too (e.g. a secret): never replaces the run's error
            result.update(ok=False, error=str(e) or type(e).__name__)
        result["seconds"] = round(time.monotonic() - t0, 2)
        (evidence / "restore.json").write_text(json.dumps(result, indent=2) + "\n")
        notes.append(f"restore: {action} {'ok' if result['ok'] else 'FAILED: ' + result.get('error', '')}")

    def wait_for_ssh(self, bound: float) -> str:
        """Wait (bounded) until the host's OS answers SSH with its verified host key."""
        assert self.ssh is not None
        deadline = time.monotonic() + bound
        last = ""
        while time.monotonic() < deadline:
            try:
                with SshConnection(self.ssh, self.label).connect("restore") as c:
                    _, out, _ = c.run(["uname", "-r"], stage="restore", timeout=15)
                    return f"up after {bound - (deadline - time.monotonic()):.1f} s: {out.decode().strip()}"
            except InfraError as e:
                last = str(e)
                if "host key mismatch" in last:
                    raise
                time.sleep(1.0)
        raise RunTimeout(f"{self.label}: restore: the host's OS did not answer SSH within {bound:.0f} s; "
                         f"last error: {last}")


def _tail(watch: ConsoleWatch) -> str:
    text = bytes(watch.raw[-200:]).decode(errors="replace").strip()
    return repr(text) if text else "(nothing)"
