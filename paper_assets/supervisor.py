"""`paper-assets ui`'s process supervisor: the Dagster webserver and daemon as two children, each restarted when it
dies, so one crashed service (kill -9, OOM) does not take the head down with it (``dagster dev`` exits as a whole
when either of its services dies).

The children are bound to the supervisor (:func:`paper_assets.processes.start_bound`): if the supervisor itself is
killed they end too, and the external supervisor that runs ``paper-assets ui`` (systemd, Kubernetes) starts the
whole head again. SIGTERM or SIGINT stops both children and exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .processes import start_bound, stop_process_group

POLL_SECONDS = 0.5
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
# A service that ran this long before it died is restarted after the first back-off again, not a longer one.
HEALTHY_AFTER_SECONDS = 60.0


@dataclass
class _Service:
    name: str
    argv: Sequence[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF_SECONDS
    restart_at: float | None = None
    restarts: int = field(default=0)


class Supervisor:
    """Keeps every service of ``services`` (name → argv) running until told to stop."""

    def __init__(self, services: Mapping[str, Sequence[str]], log: Callable[[str], None] = print, **popen_kwargs):
        self._services = [_Service(name, list(argv)) for name, argv in services.items()]
        self._log = log
        self._popen_kwargs = popen_kwargs
        self._stopping = False

    def _start(self, service: _Service) -> None:
        service.process = start_bound(service.argv, **self._popen_kwargs)
        service.started_at = time.monotonic()
        service.restart_at = None
        self._log(f"paper-assets ui: {service.name} started (pid {service.process.pid})")

    def _stop_signal(self, signum, _frame) -> None:
        self._stopping = True

    def _watch(self, service: _Service) -> None:
        now = time.monotonic()
        if service.restart_at is not None:
            if now >= service.restart_at:
                self._start(service)
            return
        code = service.process.poll() if service.process else None
        if code is None:
            return
        if now - service.started_at >= HEALTHY_AFTER_SECONDS:
            service.backoff = FIRST_BACKOFF_SECONDS
        service.restarts += 1
        self._log(f"paper-assets ui: {service.name} exited (code {code}); restarting it in {service.backoff:.0f} s "
                  f"(restart {service.restarts})")
        service.restart_at = now + service.backoff
        service.backoff = min(service.backoff * 2, MAX_BACKOFF_SECONDS)

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._stop_signal) for sig in handled}
        # A starter may hand its blocked signals down to us; a blocked SIGTERM would never reach the handler.
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        try:
            for service in self._services:
                self._start(service)
            while not self._stopping:
                for service in self._services:
                    self._watch(service)
                time.sleep(POLL_SECONDS)
        finally:
            for service in self._services:
                if service.process is not None and service.process.poll() is None:
                    stop_process_group(service.process, timeout=20)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
