#!/usr/bin/env python3
"""A "power switch" for the lab-host VM: ``qmp_power.py <qmp socket> on|off|cycle|status``.

Used as the bare-metal target's ``command`` power driver in tests: cycle is QMP system_reset (the
VM reboots into its -kernel/-initrd Linux), off pauses the VM, on resumes it.  ``power_rest.py``
serves the same actions as a labgrid power switch (its ``rest`` model).
"""

import sys

from qemu.qmp.legacy import QEMUMonitorProtocol


ACTIONS = {"cycle": ("system_reset", "cont"), "off": ("stop",), "on": ("cont",),
           # off as a power switch means it: the next "on" boots afresh (a reset while stopped)
           "off-reset": ("stop", "system_reset")}


def qmp_power(sock: str, action: str) -> bool:
    """Perform ``action`` ("status" or a key of ACTIONS) over QMP; return whether the VM runs."""
    qmp = QEMUMonitorProtocol(sock)
    qmp.connect()
    qmp.settimeout(10)
    try:
        for command in ACTIONS.get(action, ()):
            qmp.cmd_raw(command)
        return bool(qmp.cmd_raw("query-status")["return"]["running"])
    finally:
        qmp.close()


def main() -> int:
    sock, action = sys.argv[1], sys.argv[2]
    if action != "status" and action not in ACTIONS:
        print(f"unknown action {action!r}", file=sys.stderr)
        return 2
    running = qmp_power(sock, action)
    if action == "status":
        print("Chassis Power is", "on" if running else "off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
