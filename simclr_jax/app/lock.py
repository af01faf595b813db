"""One run per workdir: an exclusive `fcntl.flock` on `<workdir>/.lock`, held while the run lives.

A second run started on the same workdir stops at once with an error naming the holder (the pid
and host written into the file). The kernel releases the lock of a process that dies, even by
SIGKILL, so a lock left behind by a killed run never blocks the next one: only a live holder does.
Multi-host runs: process 0 alone takes it (pipeline.run); the others learn the outcome from it.
"""

import fcntl
import json
import os
import socket
import sys
import time

from simclr_jax.errors import WorkdirError
from simclr_jax.runtime.files import LOCK_FILE


def _holder(path: str) -> str:
    """Who holds the lock, from the file's contents (best effort: it may be mid-write)."""
    try:
        with open(path) as f:
            info = json.load(f)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"process {info['pid']} on {info['host']} (started {started}: {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock, or raises WorkdirError at once."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkdirError(
                    f"--workdir {os.path.dirname(self.path)!r} is in use by {_holder(self.path)}. "
                    f"Two runs in one workdir would mix their checkpoints and metrics: wait for "
                    f"that one to finish (or stop it), or choose another --workdir."
                ) from None
            # A holder that was releasing may have unlinked the file we locked: lock the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still held: nobody can lock this file after it is gone
        except FileNotFoundError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
