#!/usr/bin/env python3
"""The lab-host VM's power switch as labgrid's ``rest`` power model sees one:
``power_rest.py <qmp socket> <port file>``.

Serves ``GET /power/0`` (body "1" when the VM runs, "0" when not) and ``PUT /power/0`` with body
"1" (on: QMP cont) or "0" (off: QMP stop, then system_reset, so the next "on" boots afresh as a
real power switch would) on 127.0.0.1 only, on a free port it writes to ``<port file>``.  An
exporter publishes it as ``NetworkPowerPort {model: rest, host: 'http://127.0.0.1:<port>/power/{index}',
index: 0}``; labgrid's own NetworkPowerDriver then switches the VM.
"""

import http.server
import os
import sys

from qmp_power import qmp_power

QMP_SOCKET = ""


class Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != "/power/0":
            return self._reply(404, b"only /power/0\n")
        self._reply(200, b"1" if qmp_power(QMP_SOCKET, "status") else b"0")

    def do_PUT(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(min(length, 16)).strip()
        if self.path != "/power/0" or value not in (b"0", b"1"):
            return self._reply(400, b"PUT /power/0 with body 0 or 1\n")
        qmp_power(QMP_SOCKET, "on" if value == b"1" else "off-reset")
        self._reply(200, value)

    def log_message(self, fmt: str, *args) -> None:
        sys.stderr.write("power_rest: " + (fmt % args) + "\n")


def main() -> int:
    global QMP_SOCKET
    QMP_SOCKET, port_file = sys.argv[1], sys.argv[2]
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(tmp, port_file)               # the reader never sees a half-written number
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
