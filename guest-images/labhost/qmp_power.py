#!/usr/bin/env python3
"""A "power switch" for the lab-host VM: ``qmp_power.py <qmp socket> on|off|cycle|status``.

Used as the bare-metal target's ``command`` power driver in tests: cycle is QMP system_reset (the
VM reboots into its -kernel/-initrd Linux), off pauses the VM, on resumes it.
"""

import sys

from qemu.qmp.legacy import QEMUMonitorProtocol


def main() -> int:
    sock, action = sys.argv[1], sys.argv[2]
    qmp = QEMUMonitorProtocol(sock)
    qmp.connect()
    qmp.settimeout(10)
    try:
        if action == "status":
            running = qmp.cmd_raw("query-status")["return"]["running"]
            print("Chassis Power is", "on" if running else "off")
        elif action == "cycle":
            qmp.cmd_raw("system_reset")
            qmp.cmd_raw("cont")
        elif action == "off":
            qmp.cmd_raw("stop")
        elif action == "on":
            qmp.cmd_raw("cont")
        else:
            print(f"unknown action {action!r}", file=sys.stderr)
            return 2
    finally:
        qmp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
