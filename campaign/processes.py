"""What a campaign driver started, recorded so that the next driver can stop it if this one
is killed (SIGKILL leaves a local Ray cluster's processes running).

Each driver writes ``<registry>/<pid>.json``: its own pid and start time, and the pid and
start time of every process it started (its descendants). A later driver stops the recorded
processes of drivers that are gone, and only those: a pid counts only while its start time
still matches, so a reused pid is never touched. Linux only (/proc); elsewhere a no-op.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

PROC = Path("/proc")


def registry_dir() -> Path:
    """Per-user folder of driver records (``$BITFLIP_DRIVER_REGISTRY`` overrides it)."""
    return Path(os.environ.get("BITFLIP_DRIVER_REGISTRY") or Path(tempfile.gettempdir()) / f"bitflip-drivers-{os.getuid()}")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None if it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the fields after the command name: state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has ended; field 22 is the start time


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


_PREEXISTING: set[int] = set()  # descendants that ran before this driver started Ray: never ours to stop


def note_preexisting() -> None:
    """Remember the descendants that exist before Ray starts (a notebook's own subprocesses,
    say): only what appears after this is recorded as started by the campaign."""
    if PROC.is_dir():
        _PREEXISTING.update(descendants(os.getpid()))


def record_started(directory: Path | None = None) -> None:
    """Record this driver and the processes it has started so far (called again, it adds)."""
    if not PROC.is_dir():
        return
    directory = directory or registry_dir()
    path = directory / f"{os.getpid()}.json"
    known = {}
    if path.exists():
        known = {int(k): v for k, v in json.loads(path.read_text())["started"].items()}
    for pid in descendants(os.getpid()):
        if pid in _PREEXISTING:
            continue
        begun = start_time(pid)
        if begun is not None:
            known[pid] = begun
    if not known:
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"driver": os.getpid(), "driver_start": start_time(os.getpid()),
                               "started": {str(k): v for k, v in known.items()}}))
    os.replace(tmp, path)


def forget(directory: Path | None = None) -> None:
    """This driver is ending normally: drop its record."""
    (directory or registry_dir()).joinpath(f"{os.getpid()}.json").unlink(missing_ok=True)


def stop_orphans(directory: Path | None = None, grace_s: float = 5.0) -> list[int]:
    """Stop the recorded processes of drivers that no longer run; return their pids."""
    directory = directory or registry_dir()
    if not PROC.is_dir() or not directory.is_dir():
        return []
    stopped = []
    for path in sorted(directory.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            driver, driver_start = int(record["driver"]), record["driver_start"]
            started = {int(k): v for k, v in record["started"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if driver == os.getpid() or start_time(driver) == driver_start:
            continue  # that driver still runs
        alive = [pid for pid, begun in started.items() if start_time(pid) == begun]
        for pid in alive:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(start_time(p) == started[p] for p in alive):
            time.sleep(0.05)
        for pid in alive:
            if start_time(pid) == started[pid]:
                _signal(pid, signal.SIGKILL)
        stopped += alive
        path.unlink(missing_ok=True)
    return stopped


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
