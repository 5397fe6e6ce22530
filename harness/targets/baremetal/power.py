"""Power drivers: ipmitool (chassis power), an external command per action, or a human."""

from __future__ import annotations

import sys
import time
from typing import Any

from ..config import Field, duration
from .common import ARGV_FIELD, IPMI_SCHEMA, HostError, argv_list, ipmi_argv, ipmi_env, run_argv

ACTIONS = ("on", "off", "cycle", "status")


class PowerDriver:
    """Switches a host: ``on``, ``off``, ``cycle`` and ``status`` (returns "on", "off" or text)."""

    NAME = ""
    SCHEMA: dict[str, Field] = {}

    def __init__(self, cfg: dict[str, Any], label: str, where: str):
        self.cfg, self.label, self.where = cfg, label, where

    def on(self) -> None:
        self._do("on")

    def off(self) -> None:
        self._do("off")

    def cycle(self) -> None:
        self._do("cycle")

    def status(self) -> str:
        return self._do("status")

    def _do(self, action: str) -> str:
        raise NotImplementedError


class IpmiPower(PowerDriver):
    """``ipmitool chassis power on|off|cycle|status``; the password comes from ``password_env``."""

    NAME = "ipmitool"
    SCHEMA = dict(IPMI_SCHEMA)

    def _do(self, action: str) -> str:
        argv = ipmi_argv(self.cfg) + ["chassis", "power", action]
        _, out = run_argv(argv, label=self.label, stage=f"power-{action}", timeout=self.cfg["timeout_s"],
                          env=ipmi_env(self.cfg, f"{self.label}: power-{action}"))
        if action == "status":                       # "Chassis Power is on"
            return out.rsplit(" ", 1)[-1].strip() if out else "unknown"
        return out


class CommandPower(PowerDriver):
    """An external argv per action (no shell), e.g. a PDU client or, in tests, a QMP script."""

    NAME = "command"
    SCHEMA = {
        "on": ARGV_FIELD,
        "off": ARGV_FIELD,
        "cycle": Field((list, type(None)), default=None, items=Field(str), check=argv_list,
                       doc="argv for a power cycle (default: off, wait off_s, on)"),
        "status": Field((list, type(None)), default=None, items=Field(str), check=argv_list,
                        doc="argv printing the power state (last word: on/off)"),
        "off_s": duration(5.0, "seconds to stay off in a cycle"),
        "timeout_s": duration(60.0),
    }

    def _do(self, action: str) -> str:
        argv = self.cfg[action]
        if argv is None:
            if action == "cycle":
                self._do("off")
                time.sleep(self.cfg["off_s"])
                return self._do("on")
            return "unknown"
        _, out = run_argv(argv, label=self.label, stage=f"power-{action}", timeout=self.cfg["timeout_s"])
        return out.split()[-1] if (action == "status" and out) else out


class ManualPower(PowerDriver):
    """A person switches the host: the request is printed, then the driver waits ``wait_s``."""

    NAME = "manual"
    SCHEMA = {"wait_s": duration(60.0, "seconds to allow for the person to act")}

    def _do(self, action: str) -> str:
        if action == "status":
            return "unknown"
        print(f"{self.label}: please power {action} the host now (waiting {self.cfg['wait_s']:g} s)",
              file=sys.stderr, flush=True)
        time.sleep(self.cfg["wait_s"])
        return ""


DRIVERS: dict[str, type[PowerDriver]] = {d.NAME: d for d in (IpmiPower, CommandPower, ManualPower)}


def unknown(name: str) -> HostError:  # pragma: no cover - config validation catches it first
    return HostError(f"unknown power driver {name!r}", stage="config")
