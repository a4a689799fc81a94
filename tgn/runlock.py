"""One run at a time per output folder; one download at a time per shared file.

A second run started on a folder that a running one writes to (a command started twice, a
cluster job requeued while the first still runs) is refused in one line, instead of the two
overwriting each other's checkpoints and logs, or its --overwrite deleting a live run's
results. The lock is an advisory POSIX record lock on OUT/.lock, held until the script's
main() ends. The system drops it when the process dies, so a killed run leaves no stale
lock; unlike flock's, it is not shared with forked children, so DataLoader workers still
winding down after their run was killed hold nothing. Where the platform or file system
has no such locks (Windows, some network file systems), runs go unguarded, as before.
"""
import contextlib
import errno
import os
import socket
from pathlib import Path

from tgn.errors import UserError, under_torchrun

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
_held = {}  # lock path -> (file descriptor, writable), for this process's current script


def claim_folder(folder, *, create=True, flag="--out"):
    """Hold `folder`'s lock until release_folders(); refuse a folder another process holds.
    create=False (the checks before anything is written) takes an existing lock file only;
    create=True (the folder is being prepared) makes one. Whoever holds the lock writes its
    process and host in the file, for the refusal of a second run to name it. A lock file
    of another user that this one may only read is locked shared: it still refuses, and is
    refused by, a run that holds it."""
    if fcntl is None:
        return
    path = Path(os.path.abspath(Path(folder) / LOCK_NAME))
    if path not in _held:
        fd, writable = _open_lock(path, create)
        if fd is None:  # no lock file yet, or none can be made there: writing the run will say why
            return
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # this file system keeps no locks
                return
            raise UserError(f"{flag} {folder} is in use by another run{f' ({holder})' if holder else ''}: wait for "
                            f"it to end, or choose another {flag}") from None
        _held[path] = (fd, writable)
        if writable:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            except OSError:  # a full disk: the lock holds all the same, and the run's own writes will say so
                pass


def _open_lock(path, create):
    """(descriptor, writable) of the lock file, or (None, False) where there is none to open."""
    try:
        return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644), True
    except PermissionError:  # another user's lock file
        try:
            return os.open(path, os.O_RDONLY), False
        except OSError:
            return None, False
    except OSError:
        return None, False


def _holder(fd):
    """The process and host written in a lock file ('' where it cannot be read)."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:  # a file system that enforces the lock on reads too
        return ""


def refuse_folder_in_use(folder, flag="--out"):
    """Before a run's checks: refuse a folder a running run holds (said first, whatever
    the folder holds); from then on this run holds it. Not under torchrun: there rank 0
    claims the folder once the processes have joined (tgn.distributed.make_shared_folder,
    before anything is removed), so that all stop together."""
    if not under_torchrun():
        claim_folder(folder, create=False, flag=flag)


def running_run(folder):
    """The running run (its process and host, or 'another run') that holds `folder`, else
    None: for a checkpoint read from a run folder, which may still change once read."""
    path = Path(os.path.abspath(Path(folder) / LOCK_NAME))
    if fcntl is None or holds(path):  # closing another descriptor of a held lock file would drop its lock
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError as exc:
        return (_holder(fd) or "another run") if exc.errno in (errno.EACCES, errno.EAGAIN) else None
    finally:
        os.close(fd)


def holds(path):
    """Whether this process holds the lock file `path`, under any spelling (a link, another
    letter case): the same file as one of its held descriptors."""
    try:
        identity = os.stat(path)
    except OSError:
        return False
    for fd, _ in _held.values():
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) == (identity.st_dev, identity.st_ino):
            return True
    return False


def release_folders():
    """Let go of every folder this process holds (the script is done)."""
    while _held:
        os.close(_held.popitem()[1][0])


@contextlib.contextmanager
def one_at_a_time(lock_path):
    """Wait until no other process holds `lock_path`, and hold it for the block: the
    processes of a torchrun job (or jobs sharing a cache) that fetch the same file then
    download it once, one after the other finding it there, instead of writing it all at
    once. Unguarded where there are no locks or the lock file cannot be made."""
    fd = None
    if fcntl is not None:
        try:
            Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock
