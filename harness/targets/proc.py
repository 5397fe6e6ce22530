"""Emulator processes that cannot outlive the harness.

Every child is started in its own session (so a terminal's Ctrl-C reaches only the harness, which
then ends it deliberately), with PR_SET_PDEATHSIG=SIGKILL (so it dies with the harness process even
on SIGKILL or an xdist worker crash), and is tracked in a registry that ``atexit`` empties.  SIGTERM
and SIGHUP unwind the main thread like Ctrl-C (every ``finally`` runs), then the process dies of the
signal.  Ending escalates: a polite request (the caller's), SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_live: dict[int, subprocess.Popen] = {}
_lock = threading.Lock()
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent: int) -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:       # the parent died before prctl took effect
        os._exit(1)


def dies_with_parent():
    """A preexec_fn for children started by other libraries (pexpect): SIGKILL when we die."""
    parent = os.getpid()
    return lambda: _child_setup(parent)


# util-linux's setpriv (Essential on Debian); without it a preexec_fn does the same job.
SETPRIV = shutil.which("setpriv")


def spawn(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
          stdin=subprocess.DEVNULL, stdout=None, stderr=None) -> subprocess.Popen:
    """Start ``argv`` as a tracked child that dies with this process."""
    if SETPRIV:
        # setpriv sets the death signal and execs argv (same PID), so Popen can use vfork: a
        # preexec_fn forces fork, which costs 8-25 ms in a large pytest process per emulator start.
        p = subprocess.Popen([SETPRIV, "--pdeathsig", "KILL", "--", *argv], cwd=cwd, env=env, stdin=stdin,
                             stdout=stdout, stderr=stderr, start_new_session=True)
    else:
        parent = os.getpid()
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                             start_new_session=True, preexec_fn=lambda: _child_setup(parent))
    with _lock:
        _live[p.pid] = p
    return p


def adopt(pid: int, popen: subprocess.Popen | None = None) -> None:
    """Track a child started by another library (pexpect) so that it is ended on exit."""
    with _lock:
        _live[pid] = popen  # type: ignore[assignment]


def end(p: subprocess.Popen | int, grace: float = 1.0) -> int | None:
    """End a child: SIGTERM, then SIGKILL after ``grace`` seconds; reap it; return its status."""
    pid = p if isinstance(p, int) else p.pid
    try:
        if isinstance(p, subprocess.Popen):
            if p.poll() is None:
                _signal_group(pid, signal.SIGTERM)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    _signal_group(pid, signal.SIGKILL)
                    p.wait(5)
            return p.returncode
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.01)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
        return None
    finally:
        with _lock:
            _live.pop(pid, None)


def forget(p: subprocess.Popen) -> None:
    forget_pid(p.pid)


def forget_pid(pid: int) -> None:
    """Stop tracking a child that has already been reaped elsewhere."""
    with _lock:
        _live.pop(pid, None)


def live_pids() -> list[int]:
    with _lock:
        return list(_live)


def _signal_group(pid: int, sig: int) -> None:
    for send in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
        try:
            send()
        except (ProcessLookupError, PermissionError):
            continue


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def end_all() -> None:
    for pid in live_pids():
        with _lock:
            p = _live.get(pid)
        end(p if p is not None else pid, grace=0.5)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so that every ``finally`` runs (evidence
    written, runtime directory removed, emulator ended); the process then dies of that signal."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


_terminated_by: int | None = None


def _on_terminate(signum, frame):  # pragma: no cover - exercised by tests/targets/test_signals.py
    global _terminated_by
    if _terminated_by is not None:
        end_all()                    # a second signal while unwinding: end emulators, keep unwinding
        return
    _terminated_by = signum
    raise Terminated(signum)


def _die_of_the_signal() -> None:
    """At exit, after the unwinding: end with the signal's own status (128 + n) for the caller."""
    if _terminated_by is not None:
        end_all()
        signal.signal(_terminated_by, signal.SIG_DFL)
        os.kill(os.getpid(), _terminated_by)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind the main thread (where nobody else claimed them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_terminate)


atexit.register(_die_of_the_signal)       # registered first, so it runs last
atexit.register(end_all)
install_signal_handlers()
