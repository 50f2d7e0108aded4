"""One writer per output folder: an exclusive lock file in the folder, taken before any work.

Two `loraleak run` on the same `--out` (a second terminal, two Ray jobs with one output) used to
both run, duplicate work, remove each other's half-written files and print different numbers.
Now every command that writes a folder (`run`, `zoo build`, `attack train`, `evaluate`, a sweep
and each stage a sweep's trial builds) first takes `folder_lock(folder)`; a second writer gets one
line naming the holder and a nonzero exit, before it touches anything.

The lock is `flock` on `FOLDER/.loraleak.lock`, whose content is the holder's pid, host, start time
and command (JSON, for the message only). The kernel releases a flock when its holder dies, kill -9
included, so a lock left by a dead process is simply taken over: nothing to clean up, no pid
guessing, no race between two processes that both find it stale. Locks are per process and
reentrant: a stage that locks its own folder inside a pipeline that already holds it goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import LoraleakError

logger = logging.getLogger(__name__)

LOCK_FILE = ".loraleak.lock"

_held: dict[Path, int] = {}  # folder -> nesting depth, for the locks this process holds


class FolderInUseError(LoraleakError):
    """Another live process holds the folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def read_holder(folder: str | Path) -> dict[str, Any]:
    """What the last holder of `folder`'s lock wrote about itself ({} when nothing readable)."""
    try:
        data = json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _settled_holder(folder: Path, wait_s: float = 2.0) -> dict[str, Any]:
    """The holder record, waiting briefly for it: a holder writes it just after taking the lock, so a
    second writer that arrives in between would otherwise read an empty file and name no one."""
    deadline = time.monotonic() + wait_s
    while not (holder := read_holder(folder)).get("pid") and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    text = f"pid {holder['pid']} on {holder.get('host', '?')}, started {when}"
    if holder.get("command"):
        text += f" ({holder['command'][:120]})"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
        # A flock outlives its taker only in a child that inherited the descriptor (a forked worker).
        text += ", which has exited: a process it started still holds the lock"
    return text


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


@contextmanager
def folder_lock(folder: str | Path, what: str | None = None) -> Iterator[Path]:
    """Hold `folder`'s exclusive lock for the block (creating the folder); FolderInUseError at once if a
    live process holds it. `what` names the work in the holder record (default: this command line)."""
    folder = Path(folder).expanduser().resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LoraleakError(f"cannot lock {folder}: {e.strerror}") from None
            raise FolderInUseError(f"{folder} is in use by {describe_holder(_settled_holder(folder))}; wait for it "
                                   "to finish or stop it, or use another output folder") from None
        previous = read_holder(folder)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.debug("took over the lock of %s, left by %s", folder, describe_holder(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": what or _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[folder] = 1
        try:
            yield folder
        finally:
            del _held[folder]
            # The record stays: it names the last holder, and truncating it here would race the next one.
    finally:
        os.close(fd)  # releases the flock


def holds_lock(folder: str | Path) -> bool:
    """Whether this process holds `folder`'s lock."""
    return Path(folder).expanduser().resolve() in _held
