"""One live run per directory: an advisory ``flock`` on a lock file inside it, held for the whole run.

Training output directories, feature-store directories and pipeline workdirs each belong to one process
(rank 0 under torchrun) while it runs; a second one on the same directory is refused at once with one
line instead of interleaving its files with the first. The kernel drops the lock when the holder's file
is closed or the process dies (even by SIGKILL), so a stale lock file never blocks a later run. The file
is never unlinked: a process that opened it just before would lock an inode nobody else can find, and
a third process would then create and lock a new one beside it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import IO

import torch

from clusterssl.errors import PipelineError
from clusterssl.pipeline.train.world import DistributedEnv, follow_main_rank

LOCK_NAME = ".clusterssl.lock"


class DirectoryLock:
    """A held directory lock (or, on ranks other than 0, the record that rank 0 holds it)."""

    def __init__(self, path: Path, handle: IO[str] | None) -> None:
        self.path = path
        self._handle = handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Close the lock file, which releases the lock; the file stays (see the module note)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def lock_directory(
    directory: str | Path,
    *,
    owner: str,
    hint: str,
    env: DistributedEnv | None = None,
    device: torch.device | None = None,
) -> DirectoryLock:
    """Claim ``directory`` (created if missing) for this run, or raise PipelineError when another live
    process holds it. ``owner`` names the kind of run in the message (``training``), ``hint`` what the user
    can do instead (``choose another --out``).

    Under torchrun only rank 0 takes the lock and every rank follows its decision, so all ranks refuse
    together (a collective: every rank must call it).
    """
    env = env or DistributedEnv()
    directory = Path(directory)
    path = directory / LOCK_NAME
    handle, refusal = _try_lock(directory, path, owner, hint) if env.is_main else (None, None)
    if not follow_main_rank(env, refusal is None, device or torch.device("cpu")):
        raise PipelineError(
            refusal or f"{directory} is in use by another {owner} (refused on rank 0); {hint}"
        )
    return DirectoryLock(path, handle)


def _try_lock(directory: Path, path: Path, owner: str, hint: str) -> tuple[IO[str] | None, str | None]:
    """(open locked file, None) on success, (None, the refusal's message) when another process holds it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # no context manager: the open file is the lock, closed by DirectoryLock.release
        handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")  # noqa: SIM115
    except OSError as error:  # a refusal, not a raise: the other ranks are waiting for rank 0's answer
        return None, f"cannot use {directory}: {error.strerror or error}"
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip()
        handle.close()
        by = f" (pid {holder})" if holder.isdigit() else ""
        return None, f"{directory} is in use by another {owner}{by}; wait for it to end or {hint}"
    # the holder's pid, for the message a refused process prints (written only while holding the lock)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle, None
