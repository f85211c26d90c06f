"""One run per out_dir: an exclusive lock on OUT_DIR/.fastvae.lock for the life of a run.

Two runs in one folder interleave their metrics lines and their checkpoints alternate between
the two (a probe of 875e167 did this). The lock is flock(2): the kernel drops it when its process
dies, however it dies, so a lock never outlives its run; Linux carries flock over NFS as a POSIX
lock, which is what clusters' shared file systems honour. Where a file system refuses flock (e.g.
Lustre mounted without `flock`), the lock is the file itself, created exclusively, and a file left
by a process that is gone (same host, pid not running) is named and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from fastvae.errors import UserError

LOCK_FILE = ".fastvae.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


class RunLock:
    def __init__(self, out_dir: str | Path, announce=print) -> None:
        self.path, self.announce, self.fd = Path(out_dir) / LOCK_FILE, announce, None

    def acquire(self) -> "RunLock":
        for _ in range(10):  # a holder may remove the file between our open and our lock: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use(self._read_holder()) from None
            except OSError as err:
                os.close(fd)
                if err.errno in NO_FLOCK:
                    return self._acquire_by_creation()
                raise
            if self._still_the_file(fd):
                self._took_over(os.pread(fd, 512, 0).decode(errors="replace").strip())
                self._write_holder(fd)
                self.fd = fd
                return self
            os.close(fd)
        raise UserError(f"out_dir lock '{self.path}' keeps changing; expected one run per out_dir")

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a waiting run then sees a new file)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        if self.fd >= 0:  # -1: held by the file's existence (no flock), nothing to close
            os.close(self.fd)
        self.fd = None

    def __del__(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)

    # ---------------------------------------------------------------- helpers

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _read_holder(self) -> str:
        try:
            return self.path.read_text().strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    def _in_use(self, holder: str) -> UserError:
        return UserError(f"out_dir '{self.path.parent}' is in use by another run ({holder}); expected one run per "
                         f"out_dir: wait for it to end, stop it, or use another out_dir")

    def _took_over(self, previous: str) -> None:
        if previous:  # left by a run that died without releasing it (the kernel dropped its flock)
            self.announce(f"fastvae: out_dir lock of a run that is gone ({previous}) taken over")

    @staticmethod
    def _write_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_line() + "\n").encode(), 0)

    def _acquire_by_creation(self) -> "RunLock":
        """No flock here: the lock is the file, created exclusively; a stale one (this host, pid gone)
        is named and replaced."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if not self._is_stale(holder):
                    raise self._in_use(holder) from None
                self.path.unlink(missing_ok=True)
                self._took_over(holder)
                continue
            self._write_holder(fd)
            os.close(fd)
            self.fd = -1  # held by the file's existence
            return self
        raise self._in_use(self._read_holder())

    @staticmethod
    def _is_stale(holder: str) -> bool:
        parts = holder.split()
        if len(parts) < 4 or parts[0] != "pid" or parts[2] != "on" or parts[3] != socket.gethostname():
            return False  # another host's (or unreadable): it cannot be checked from here
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False
