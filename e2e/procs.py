"""Child processes of the harness: each in its own process group, logged to a file, stopped for sure.

Own process groups let teardown signal exactly what the harness started (and anything those spawned),
never a process found by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 40


class ComponentError(RuntimeError):
    """A component failed to start or become healthy; the message ends with the tail of its log."""


@dataclass
class Component:
    """One started process: its Popen (absent after ``cluster up`` re-attaches by PID) and log file."""

    name: str
    pid: int
    log_path: Path
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = None
    port: int = 0
    """Its main (secure) loopback port, when it has one: metrics and health live there."""

    def alive(self) -> bool:
        """True while the process exists and is not a zombie."""
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Last lines of the component's log, for error messages."""
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _die_with_parent() -> None:
    """Runs in the child: the kernel kills it if the harness dies without tearing down."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(name: str, argv: Sequence[str], log_path: Path, detached: bool = False) -> Component:
    """Start ``argv`` in a new session (own process group) with stdout+stderr to ``log_path``.

    Unless ``detached``, the child also gets PDEATHSIG=SIGKILL so a crashed test run leaves nothing behind.
    That signal follows the thread that forked, so it is only armed from the main thread.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    arm = not detached and threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if arm else None,
        )
    return Component(name=name, pid=popen.pid, log_path=log_path, argv=list(argv), popen=popen)


def stop(component: Component, grace_s: float = 10.0) -> None:
    """SIGTERM the component's process group, SIGKILL it if still alive after ``grace_s``, and reap it."""
    pgid = component.pid  # leader of its own session, so pgid == pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    if component.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            component.popen.wait(timeout=grace_s)
    while time.monotonic() < deadline and component.alive():
        time.sleep(0.1)
    if component.alive():
        _signal_group(pgid, signal.SIGKILL)
    if component.popen is not None:
        component.popen.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_until(
    component: Component,
    check: Callable[[], bool],
    what: str,
    timeout_s: float,
    interval_s: float = 0.1,
) -> None:
    """Poll ``check`` until it is true; fail fast, with the log tail, if the component exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not component.alive():
            code = component.popen.poll() if component.popen else None
            raise ComponentError(f"{component.name} exited (code {code}) before {what}:\n{component.log_tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ComponentError(f"{component.name}: no {what} after {timeout_s:.0f}s:\n{component.log_tail()}")
        time.sleep(interval_s)


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False
