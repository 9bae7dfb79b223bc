"""A process that outlives the scan only to end what the scan started: ``python -m
deepscan.watchdog PID``.

A local Ray runtime (``--ray local``) is started by the scanning process: Ray ties its raylet and
GCS to that process, but not the agents the raylet starts (DashboardAgent, RuntimeEnvAgent), nor
their workers; a scan killed with SIGKILL left them running for 30-70 s. This watchdog, in a session
of its own, notes the scanning process's descendants every POLL_S and, once that process is gone,
kills those that are still the processes it noted (same pid and start time: never a newcomer
that reused a pid). Written with /proc only: it must start in a blink and import nothing heavy.
No library does this: Ray's own fate-sharing covers the processes it starts directly.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.5  # a scan of /proc each time: ~5 ms, 1 % of a core


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every descendant of ``root``."""
    parents, starts = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents[int(name)], starts[int(name)] = st
    out, todo = {}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out and child != os.getpid():
                out[child] = starts[child]
                todo.append(child)
    return out


def watch(pid: int) -> None:
    seen: dict[int, int] = {}
    me = _stat(pid)
    if me is None:
        return
    while True:
        now = _stat(pid)
        if now is None or now[1] != me[1]:
            break
        seen.update(descendants(pid))
        time.sleep(POLL_S)
    for child, start in seen.items():
        st = _stat(child)
        if st is not None and st[1] == start:
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass


def start(pid: int | None = None) -> None:
    """Start a watchdog for ``pid`` (this process) in a session of its own."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "deepscan.watchdog", str(pid or os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
