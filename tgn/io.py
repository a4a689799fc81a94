"""Files that must never be left half-written: atomic writes, JSON, JSON lines, folders."""
import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tgn.errors import UserError


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (os.umask can only be read by setting it, which is not thread-safe).
FILE_MODE = 0o666 & ~_current_umask()
# Windows has os.fchmod from Python 3.13 only; mkstemp's owner-only mode is a Unix matter.
_set_mode = getattr(os, "fchmod", lambda fd, mode: None)


def _write_temp(path, write, sync):
    """Write through `write(file_object)` into a hidden temp file beside `path` (fsynced if
    `sync`); returns the temp file's path. The file gets the permissions open() would give
    it (mkstemp's are owner-only)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only or full file system
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                _set_mode(handle.fileno(), FILE_MODE)
            except OSError:  # file systems without Unix permissions keep their own
                pass
            write(handle)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        failure = failure_behind(exc)
        if isinstance(failure, KeyboardInterrupt) and failure is not exc:
            raise KeyboardInterrupt from exc  # Ctrl-C while saving: the scripts' "interrupted", exit 130
        if not isinstance(failure, OSError):
            raise
        raise UserError(f"cannot write {path}: {failure.strerror or failure}") from exc
    return tmp


def failure_behind(exc):
    """The OSError or KeyboardInterrupt that `exc` is or arose from, else `exc`. torch.save's
    zip writer reports either as a RuntimeError ("unexpected pos") raised while handling it:
    a full disk, or Ctrl-C in the middle of a write."""
    seen, first = set(), exc
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (OSError, KeyboardInterrupt)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return first


# The hidden temp files _write_temp names ".<name>.<random>.tmp".
TEMP_FILE = re.compile(r"\..+\.[^.]+\.tmp")


def remove_temp_files(folder):
    """Remove the temp files a killed process left in `folder` (whole files only ever get
    their names by a rename, so a temp file is always an unfinished write). Not in its
    subfolders: another job may be saving into a run folder below this one."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            if TEMP_FILE.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)


# Windows refuses to replace a file another program has open (test.py reading best.pth, a
# virus scanner): a save tries again for about 8 s before the run stops for it.
REPLACE_RETRIES_S = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0) if os.name == "nt" else ()


def sync_folder(folder):
    """Put a rename in `folder` on disk: a file's new name is an entry of its folder, which a
    power cut right after the rename could otherwise lose, leaving the old file or none.
    Best effort: Windows cannot open a folder, and some file systems refuse to sync one."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_into_place(tmp, path):
    waits = list(REPLACE_RETRIES_S)
    while True:
        try:
            os.replace(tmp, path)
            return
        except OSError as exc:
            if isinstance(exc, PermissionError) and waits:
                time.sleep(waits.pop(0))
                continue
            Path(tmp).unlink(missing_ok=True)
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _atomic_replace(path, write):
    """Write into a temp file beside `path`, fsync, rename, fsync the folder."""
    _rename_into_place(_write_temp(path, write, sync=True), path)
    sync_folder(Path(path).parent)


def _find_syncfs():
    """Linux's syncfs(2), which flushes one file system (None elsewhere). ctypes releases
    Python's lock during the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except OSError:
        return None


SYNCFS = _find_syncfs()


def write_pending(path, write):
    """The first half of an atomic write that `publish` finishes for many files at once:
    `write(file object)` fills a hidden temp file beside `path`; returns (temp, path).
    Without syncfs the temp file is fsynced here, as a single atomic write does."""
    return _write_temp(path, write, sync=SYNCFS is None), path


def publish(pending):
    """Rename each (temp, path) of `write_pending` into place once their data are on disk,
    so that a file under its final name is complete even after a crash. With syncfs, one
    flush per folder's file system serves them all: on a 2-core test machine generation's
    JPEG writers managed 922 images/s with one fsync per file, 1,214 with this (1,131 with
    no flush at all; medians of five runs, before the folder's own sync after the renames).
    The flush guards against power loss and system crashes (a file system that ignores
    syncfs, as some FUSE mounts may, loses that); a killed process leaves whole files either
    way, since they get their names last."""
    pending = list(pending)
    if SYNCFS is not None:
        for folder in sorted({Path(path).parent for _, path in pending}):
            failure = flush_file_system(folder)
            if failure:
                for tmp, _ in pending:
                    Path(tmp).unlink(missing_ok=True)
                raise UserError(f"cannot write into {folder}: {failure}")
    for position, (tmp, path) in enumerate(pending):
        try:
            _rename_into_place(tmp, path)
        except BaseException:
            for later, _ in pending[position + 1:]:  # no temp file is left behind
                Path(later).unlink(missing_ok=True)
            raise
    for folder in sorted({Path(path).parent for _, path in pending}):
        sync_folder(folder)  # the renames themselves, one sync per folder


def flush_file_system(folder):
    """Flush the file system holding `folder`; the reason it failed, or None."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if SYNCFS(fd) != 0:
            return os.strerror(ctypes.get_errno())
        return None
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    _atomic_replace(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_csv(path, text):
    """UTF-8 with a byte-order mark: without it Excel reads a class name outside ASCII (Chinese
    names, accents) as another code page. Python reads it with encoding="utf-8-sig", pandas as is."""
    _atomic_replace(path, lambda handle: handle.write(text.encode("utf-8-sig")))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path, data):
    _atomic_replace(path, lambda handle: handle.write(data))


def json_safe(value):
    """`value` with every NaN or infinite float (an accuracy with no test images) as None:
    JSON has no NaN, and strict readers (jq, JavaScript) refuse Python's NaN token."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(path, obj):
    import torch  # here, not above: the stages that save no checkpoint start without torch

    _atomic_replace(path, lambda handle: torch.save(obj, handle))


def require_file(path, what="file", folder_hint=""):
    """A one-line error for a path that is missing or a folder where a file is read."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file{folder_hint}")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def read_json(path, what="file"):
    path = require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark: Windows editors write one
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from exc


def trim_jsonl(path, key, last):
    """Keep the records with record[key] <= last: a resumed run redoes what came after
    its checkpoint, and must not log it twice. Unparsable (half-written) lines go too."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get(key, last + 1) <= last:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def append_jsonl(path, record):
    """Append one metrics record; a line is small enough to be written whole."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def make_folder(path, flag="--out"):
    """mkdir -p with a one-line error (a read-only or full file system, a file in the way)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from exc
    return path


def appendable_file(path, flag="--out"):
    """A file that lines are appended to (the benchmarks' records): a folder in its place is
    refused and its own folder made, each with one line, before anything is measured."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file")
    make_folder(path.parent, flag)
    return path


def remove_path(path):
    """Remove a file, a symlink (never what it points to) or a folder with its contents;
    nothing if it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def same_path(a, b):
    """Whether two paths name one file or folder: through links, and however a file system
    that ignores case (macOS's, Windows') spells it; False when either is not there."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def absolute_path(path):
    """`path` made absolute for a file that records it: a later stage may run from another
    folder. Symlinks are kept (a link pointed elsewhere later is followed) and '..' folded."""
    return Path(os.path.abspath(os.fspath(path)))


def map_paths(value, fn):
    """`fn` applied to a Path, or to each Path of a list of them (a repeatable path flag);
    any other value as it is."""
    if isinstance(value, Path):
        return fn(value)
    if isinstance(value, (list, tuple)) and any(isinstance(item, Path) for item in value):
        return [map_paths(item, fn) for item in value]
    return value
