"""One run per run directory: an exclusive lock held for the life of a run, and moving a run aside.

`lock_run_dir(run_dir)` is a context manager around the whole of `flowgrpo train`. The lock is
`fcntl.flock(LOCK_EX | LOCK_NB)` on `run_dir/.flowgrpo.lock`, a file holding the holder's PID,
host, start time and command line (JSON). The kernel releases a flock when its holder dies, however
it dies, so a lock file left by a SIGKILLed run never blocks the next one: the next run takes the
lock and says whose stale lock it took over (and whether that PID is gone, when it ran on this
host). A second run while the first lives fails at once with `RunDirLocked` naming the holder,
before it writes anything: opening the existing lock file does not modify it.

Releasing unlinks the lock file, then closes it. A process that opened the file just before the
unlink could lock the unlinked inode while a third creates a new file and locks that, so after
locking, the holder checks that its descriptor is still the file at the path and retries if not.

flock is advisory and per open file description: it holds against every `flowgrpo train`, not
against other programs, and on network file systems only where the server supports locks.

`move_aside(run_dir)` moves everything in the directory except the lock into a new sibling
`<run_dir>.old-<UTC timestamp>` (each entry one `rename`: nothing is copied or deleted).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from engine.preflight import UsageError, check_run_dir

LOCK_FILE = ".flowgrpo.lock"


class RunDirLocked(UsageError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        info = json.loads(raw) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "a process that has not written its details yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"PID {info.get('pid')} on {info.get('host')} (since {since}: {info.get('command', '?')})"


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, *, notes: list[str] | None = None) -> Iterator[Path]:
    """Hold `run_dir` exclusively (created if missing) for the `with` block; see the module doc."""
    root = check_run_dir(run_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"run directory {root} is in use by {_describe(info)}; wait for that run to end, stop it, "
                    f"or pass another --run-dir"
                ) from None
            raise UsageError(f"cannot lock run directory {root} ({e.strerror}); use a local file system") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder unlinked this file while we opened it: lock the current one
    try:
        old = _holder(fd)
        host = socket.gethostname()
        if old and notes is not None:
            pid = old.get("pid")
            if old.get("host") == host and isinstance(pid, int):
                state = "alive, but not holding the lock: its PID was reused" if _pid_alive(pid) else "gone"
            else:
                state = f"on host {old.get('host')}, not holding the lock"
            notes.append(f"took over a stale lock of {root}: {_describe(old)}, {state}")
        info = {"pid": os.getpid(), "host": host, "started": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        yield root
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when the run left nothing (an error before it wrote anything)


def move_aside(run_dir: str | Path) -> Path | None:
    """Move the directory's contents (all but the lock) into `<run_dir>.old-<UTC time>`; None if empty."""
    root = Path(run_dir)
    entries = sorted(p for p in root.iterdir() if p.name != LOCK_FILE) if root.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in range(1000):
        dest = root.with_name(f"{root.name}.old-{stamp}" + (f"-{i}" if i else ""))
        try:
            dest.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise UsageError(f"cannot find a free name for moving {root} aside next to it")
    for p in entries:
        os.rename(p, dest / p.name)
    for d in (dest, root, root.parent):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dest


@contextlib.contextmanager
def prepared_run(config, *, resume: bool = False, restart: bool = False) -> Iterator[list[str]]:
    """Everything `flowgrpo train` does before building anything, holding the lock for the `with` block.

    In order: the configuration checks (`engine.preflight.check_run`, nothing touched yet), the lock,
    then --restart moves an earlier run aside, --resume checks there is a checkpoint to continue, and
    neither refuses a directory that holds an earlier run (`check_fresh`); then leftovers of interrupted checkpoint writers are removed. Yields notes for the run's output."""
    from engine.checkpoint import clean_leftovers
    from engine.preflight import check_fresh, check_resume, check_run

    if resume and restart:
        raise UsageError("--resume continues the earlier run and --restart moves it aside; pass one of them")
    check_run(config)
    notes: list[str] = []
    with lock_run_dir(config.run_dir, notes=notes) as root:
        if restart and (moved := move_aside(root)) is not None:
            notes.append(f"--restart: moved the earlier run in {root} aside to {moved}")
        if resume:
            check_resume(root)
        elif not restart:
            check_fresh(root)
        removed = clean_leftovers(root)
        if removed:
            notes.append(f"removed leftovers of an interrupted run: {', '.join(removed)}")
        yield notes
