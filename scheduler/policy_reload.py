"""Reload the placement policy when its file changes, keeping the last good one when the new one is invalid.

A ConfigMap mounted as a volume is updated by swapping a symlink, so the file is polled by content, not by
inotify on the path.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from policies.config import PlacementPolicy, PolicyError, load_policy

log = logging.getLogger("gpu_extender.policy")


class PolicyReloader:
    def __init__(self, path: str | Path, interval_seconds: float = 2.0) -> None:
        self._path = Path(path)
        self._apply: Callable[[PlacementPolicy], None] = lambda policy: None
        self._report: Callable[[bool], None] = lambda ok: None
        self._interval = interval_seconds
        self._digest: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load_initial(self) -> PlacementPolicy:
        """The policy at start-up. An invalid file here is fatal: there is no last good policy to keep."""
        policy = load_policy(self._path)
        self._digest = self._current_digest()
        return policy

    def check(self) -> bool | None:
        """Reload if the content changed. Returns True (applied), False (invalid, kept old) or None (unchanged)."""
        digest = self._current_digest()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            policy = load_policy(self._path)
        except PolicyError as exc:
            log.error("policy file invalid; keeping the last good policy", extra={"error": str(exc)})
            self._report(False)
            return False
        self._apply(policy)
        log.info("policy reloaded", extra={"path": str(self._path)})
        self._report(True)
        return True

    def start(self, apply: Callable[[PlacementPolicy], None], report: Callable[[bool], None] = lambda ok: None) -> None:
        """Poll in the background; `apply` receives each new valid policy, `report` each reload's validity."""
        self._apply = apply
        self._report = report
        self._thread = threading.Thread(target=self._loop, name="policy-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # a reload problem must never stop the reloader
                log.exception("policy reload failed")

    def _current_digest(self) -> str:
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError as exc:
            return f"unreadable:{exc.errno}"
