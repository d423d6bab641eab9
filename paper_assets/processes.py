"""Process identity and processes bound to their starter (Linux /proc and prctl; no Dagster).

A pid alone does not name a process: a restarted container or a long-lived host hands pids out again. Where a run,
an update or a supervisor records "who runs this", it records the pid *and* its start (:func:`process_start`), and
:func:`process_alive` checks both. :func:`start_bound` starts a service (a worker, a webserver, an S3 server, a
daemon) that must not outlive the process that started it, whatever that process's signal mask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def process_start(pid: int) -> str | None:
    """When the kernel started `pid`, as '<boot id>/<clock ticks since boot>' (unique to one process on a host, unlike
    the pid), or None where there is no /proc, the pid is gone, or it is a zombie (ended, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    except OSError:
        return None
    state, start_ticks = fields[0], fields[19]  # stat(5) fields 3 and 22
    return None if state in ("Z", "X") else f"{_boot_id()}/{start_ticks}"


def _boot_id() -> str:
    """This boot's id ("" where the kernel does not expose it: then the start ticks alone tell processes apart, and a
    live process is never taken for a dead one for want of this file)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        return ""


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` still runs and, where `started` was recorded, is the same process that recorded it."""
    if os.path.exists("/proc/self/stat"):
        now = process_start(pid)
        return now is not None and (not started or now == started)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bind_to(parent: int) -> Callable[[], None]:
    """The child's side of :func:`start_bound`, run between fork and exec.

    The parent-death signal is SIGTERM, so the child must be able to receive it: a blocked mask and an ignored
    disposition are both inherited through fork and exec (a starter that runs with SIGTERM blocked, as some library
    threads and signal-deferring contexts do, would otherwise leave the signal pending in the service for ever).
    The disposition is reset through libc because Python's ``signal.signal`` refuses to run outside the main thread,
    and a service may be started from any thread."""

    def bind() -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(int(signal.SIGTERM), ctypes.c_void_p(0))  # SIG_DFL
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the starter died before the request above took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return bind


def start_bound(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv)`` in a session of its own (so :func:`stop_process_group` stops it with its children)
    that Linux sends SIGTERM when this process dies, even by SIGKILL: a killed test run or bench leaves no worker
    polling its broker for the next run's steps, and a supervisor killed with kill -9 leaves no orphaned daemon.

    Linux sends the signal when the *thread* that started the child ends, so call this from the main thread or from a
    thread that lives as long as the service should (one that waits on it)."""
    return subprocess.Popen(list(argv), start_new_session=True, preexec_fn=_bind_to(os.getpid()), **popen_kwargs)


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started in a session of its own and everything it started (TERM, then KILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=timeout)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def wait_until(what: str, ready: Callable[[], object], timeout: float, process: subprocess.Popen | None = None,
               log: str | os.PathLike | None = None, poll: float = 0.5) -> object:
    """``ready()``'s first truthy value, polled every ``poll`` seconds; a RuntimeError naming ``what`` (with the
    tail of ``log``) once ``timeout`` passes or ``process`` ends first."""
    deadline = time.time() + timeout
    while True:
        value = ready()
        if value:
            return value
        ended = process is not None and process.poll() is not None
        if ended or time.time() > deadline:
            tail = ""
            if log is not None and os.path.exists(log):
                with open(log, errors="replace") as handle:
                    tail = handle.read()[-3000:]
            why = f"its process ended (exit {process.returncode})" if ended else f"not within {timeout:.0f} s"
            raise RuntimeError(f"{what} did not happen: {why}\n{tail}")
        time.sleep(poll)
