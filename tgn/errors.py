"""User-facing errors: one line naming the file or flag, exit status 2, no traceback.
Warnings are one line too.

Under torchrun every process runs the same checks. Before the processes join their group
they read the same files, so on each node only LOCAL_RANK 0 prints an error (one line per
node, not one per process); a ProcessError, this process's own problem, prints anyway.
After joining, rank 0 prints as usual and every other process that fails prefixes its
line with its rank, since only it may have seen the problem (say, an unreadable image in
its share), except a CollectiveError, which all raise together. A process whose collective
fails because another one stopped (with gloo at once; with nccl, if at all, when its timeout
ends) says so in one line instead of a traceback.
"""
import contextlib
import errno
import functools
import os
import signal
import sys
import warnings


# How a node without internet gets the public weights (ImageNet ResNets, CLIP, Inception,
# LPIPS): every stage's "cannot download" error names it.
FETCH_WEIGHTS_HINT = "run data/fetch_weights.py where there is internet and use what it prints"

# What the system refuses (permissions, a read-only, full or over-quota disk), wherever a
# script reads or writes: one line naming the file, not a traceback.
REFUSED_BY_THE_SYSTEM = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class UserError(Exception):
    """A problem with the user's input (path, data, checkpoint, flag)."""


class ProcessError(UserError):
    """A problem of this process alone under torchrun (its GPU, say): always printed."""


class CollectiveError(UserError):
    """Raised by every process of a torchrun job together (after a collective decided it,
    or from a check every process makes alike): rank 0 alone prints it."""


@contextlib.contextmanager
def alike_in_every_process():
    """For what every process of a joined torchrun job does alike (reading the run's own
    checkpoint to resume it): a UserError inside becomes a CollectiveError, which rank 0
    alone prints, instead of one line per process."""
    try:
        yield
    except (CollectiveError, ProcessError):
        raise
    except UserError as exc:
        raise CollectiveError(str(exc)) from exc


def _one_line(exc):
    text = str(exc)
    # A UserError raised inside a DataLoader worker comes back re-wrapped with the
    # worker's traceback in its message; the original message is the last line.
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait (the kernel keeps them pending) inside the block, and come on
    leaving it. Around the start of DataLoader workers: a worker starts with torch's or
    Python's own handling (torch's SIGTERM handler, Python's KeyboardInterrupt), which ends
    it before leave_signals_to_the_trainer has set its own, and a worker ended in that gap
    crashed the run before its save; the workers inherit the held signals and take them once
    their handlers are set. Around the scripts' import of torch: a library swallows a
    KeyboardInterrupt raised within its import (a Ctrl-C in a run's first second was lost)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no SIGTERM from schedulers
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def one_line_warning(message, category, filename, lineno, line=None):
    """warnings.formatwarning for the scripts: the message, not the source line that warned;
    under torchrun only from the process that speaks for the others (speaks())."""
    if not speaks():
        return ""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def under_torchrun():
    """Started by torchrun with several processes (tgn.distributed.launched)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def speaks():
    """Whether this process prints what every process finds (warnings, notes): always
    alone; under torchrun rank 0 once joined, before that LOCAL_RANK 0 of each node."""
    if not under_torchrun():
        return True
    rank = _joined_rank()
    return os.environ["LOCAL_RANK"] == "0" if rank is None else rank == 0


def speaks_for_the_run():
    """Whether this process prints what concerns the run folder, which rank 0 alone writes
    (what --resume takes and notes of it): once per job, before joining too (torchrun sets
    RANK from the start), where speaks() says once per node what each node finds."""
    return int(os.environ.get("RANK", "0")) == 0


def _joined_rank():
    """This process's rank once it joined a torchrun process group, else None. Only a
    torch.distributed imported already is asked: a process joins after importing it, and
    a Ctrl-C that came while torch was being imported leaves a torch that fails to import
    again (the scripts' "interrupted" would become tracebacks)."""
    dist = sys.modules.get("torch.distributed")
    try:
        return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else None
    except AttributeError:  # one whose own import was cut short
        return None


# What a collective raises when another process of the job has stopped (gloo: a plain
# RuntimeError naming the peer; nccl: DistBackendError, a RuntimeError too).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def _print_error(exc):
    if not under_torchrun():
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return
    rank = _joined_rank()
    if not speaks() and (isinstance(exc, CollectiveError) or (rank is None and not isinstance(exc, ProcessError))):
        return  # rank 0 (before joining: LOCAL_RANK 0 of this node) says it
    who = os.environ["LOCAL_RANK"] if rank is None else str(rank)
    prefix = "" if who == "0" else f"{_new_line()}[{'local ' if rank is None else ''}rank {who}] "
    print(f"{prefix}error: {_one_line(exc)}", file=sys.stderr)


def _new_line():
    """What starts another process's line on a terminal: rank 0's progress bar may be drawn
    there without its line ended, and the error would be appended to it."""
    return "\n" if sys.stderr.isatty() else ""


def escape_unencodable_output():
    """Print what the console cannot encode as escapes: a class name such as '港口' would
    otherwise stop a stage midway where stdout is not UTF-8 (a Windows console or a log
    file redirected there, a Latin-1 locale)."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _torch_imported():
    """Whether torch was imported whole: a Ctrl-C during its import leaves parts of it in
    sys.modules (its DataLoader module among them), and importing it again then fails with
    a traceback after the 'interrupted' line."""
    torch = sys.modules.get("torch")
    return torch is not None and not getattr(getattr(torch, "__spec__", None), "_initializing", False)


def cli_main(main):
    """Decorate a script's main(argv) so user errors print one line and exit 2, and
    warnings print one line; the output folders it held are free when it returns."""

    @functools.wraps(main)
    def wrapper(argv=None):
        warnings.formatwarning = one_line_warning
        escape_unencodable_output()
        returned = False
        try:
            result = main(argv)
            returned = True
            return result
        except UserError as exc:
            _print_error(exc)
            sys.exit(2)
        except KeyboardInterrupt:
            if speaks():  # Ctrl-C reaches every process of a torchrun job
                print("interrupted", file=sys.stderr)
            sys.exit(130)
        except OSError as exc:
            if exc.errno not in REFUSED_BY_THE_SYSTEM:
                raise
            _print_error(UserError(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)))
            sys.exit(2)
        except RuntimeError as exc:
            rank = _joined_rank()
            if rank is None or not any(sign in str(exc) for sign in PEER_GONE):
                raise
            print(f"{_new_line() if rank else ''}[rank {rank}] error: another process of this torchrun job stopped; "
                  "its error, or torchrun's report of how it ended (a process killed says nothing itself), is above "
                  "or in its node's log",
                  file=sys.stderr)
            sys.exit(2)
        finally:
            from tgn.runlock import release_folders  # tgn.runlock raises UserError: imported here

            try:
                if not returned and _torch_imported() and \
                        getattr(sys.modules.get("torch.utils.data.dataloader"), "DataLoader", None):
                    from tgn.stopping import end_worker_processes  # (only where a DataLoader can have run)

                    end_worker_processes()
            finally:
                release_folders()

    return wrapper
