"""Stopping a training run between two steps, with a checkpoint a --resume continues exactly.

Ctrl-C (SIGINT), or SIGTERM (what a cluster scheduler sends before it kills a job that is
preempted or out of time, and torchrun passes on to its processes), lets the current step
finish; the trainer then saves and stops. A second Ctrl-C stops at once, for a step that
never ends; not under torchrun, where Ctrl-C reaches torchrun alone, which passes it on and
kills its processes 30 s later, and where a SIGINT sent to every process of the job (by
pkill or a scheduler) reaches each directly and again through torchrun: the same stop. The
ResNet trainers save mid-epoch: last.pth then holds the
EpochProgress of the epoch it stopped in, and a resumed run trains that epoch's remaining
steps only.
"""
import contextlib
import dataclasses
import signal
import sys
import threading
import time
import warnings

from tgn import distributed as dist
from tgn.checkpoint import save_checkpoint
from tgn.errors import STOP_SIGNALS, escape_unencodable_output, one_line_warning, under_torchrun

WORKER_SIGTERM_GRACE_S = 60


@contextlib.contextmanager
def stop_between_steps():
    """Yields a function giving the signal to stop for (SIGTERM over SIGINT), else None.
    Under torchrun the processes agree on it at each call, through a collective on the
    host (a gloo group: no wait for the GPU), so every process must call it at the same
    steps, and all stop after the same one."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to it
        yield lambda: None
        return
    received = []
    repeat_stops_at_once = not under_torchrun()  # (there a repeat is torchrun passing the first on)

    def note(number, _frame):
        if number == signal.SIGINT and signal.SIGINT in received:
            if repeat_stops_at_once:
                raise KeyboardInterrupt  # the second Ctrl-C: the step is not waited for
            return
        received.append(number)

    previous = {number: signal.signal(number, note) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        dist.host_group()  # made by every process here, before the first step
        yield lambda: dist.agreed_max(max(received, default=0)) or None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stopping_line(signal_number, what):
    """What the trainer prints as it stops: "terminated: saving step 1200"."""
    return f"{'terminated' if signal_number == signal.SIGTERM else 'interrupted'}: {what}"


def stop_for(signal_number):
    """End the process as the signal would have, once its checkpoint is saved: SIGTERM with
    the shell's status of a process it ended, Ctrl-C as the scripts' "interrupted" (130)."""
    if signal_number == signal.SIGTERM:
        sys.exit(128 + signal.SIGTERM)
    raise KeyboardInterrupt




def leave_signals_to_the_trainer(_worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the trainer, which stops between steps
    and ends them after its save: a worker a signal ended crashed the run before it.
    Ctrl-C, which reaches every process of the terminal (on Windows, of the console), is
    ignored: forked workers inherit the trainer's handler, spawned ones (macOS, Windows) do
    not. SIGTERM, which a scheduler sends every process of the job, is outlived by
    WORKER_SIGTERM_GRACE_S seconds: one stuck in a read (which DataLoader's own shutdown
    would have ended with SIGTERM) ends when the time is up. Every loader of
    tgn.engine.make_loader sets it, test.py's and evaluate.py's too: there the workers end
    with their process, or at the latest when the time is up. Signals held since the worker started
    (signals_held) come now, to these handlers."""
    # Spawned workers (macOS, Windows) start without the script's setup: warnings in one line.
    warnings.formatwarning = one_line_warning
    escape_unencodable_output()
    grace = (lambda *_: signal.alarm(WORKER_SIGTERM_GRACE_S)) if hasattr(signal, "alarm") else signal.SIG_IGN
    signal.signal(signal.SIGTERM, grace)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def end_worker_processes():
    """End this process's DataLoader workers now, on an exit by an error or a signal. Python
    would end them at exit with SIGTERM, which they outlive by WORKER_SIGTERM_GRACE_S
    (leave_signals_to_the_trainer): the run hung that long after its error line, and torch
    then reported the workers' end as a second error. The loaders still running (the error's
    traceback holds their iterators) are shut down as when they are collected; a worker left
    (stuck in a read) is killed."""
    import gc

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for candidate in gc.get_objects():
        # type(): isinstance asks an object its __class__, and some warn when asked (torch's reduce_op)
        if issubclass(type(candidate), _MultiProcessingDataLoaderIter):
            try:
                candidate._shutdown_workers()  # asks them to end, then takes them from torch's SIGCHLD watch
            except Exception:  # noqa: BLE001 (one that failed while starting its workers is half made)
                pass
            for worker in getattr(candidate, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)


@dataclasses.dataclass
class EpochProgress:
    """How far an epoch got: its global batches trained (of `total_steps`) and, over all
    processes, their summed loss (times the batch), correct predictions and images; and
    its seconds."""
    steps: int = 0
    total_steps: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0
    seconds: float = 0.0

    @classmethod
    def saved(cls, state, epoch):
        """The progress a last.pth records of `epoch` (the one a resumed run starts with),
        else a new one."""
        unfinished = state.get("unfinished_epoch") or {}
        if unfinished.get("epoch") != epoch:
            return cls()
        return cls(**{field.name: unfinished.get(field.name, field.default) for field in dataclasses.fields(cls)})

    def record(self, epoch):
        """What last.pth keeps of it."""
        return {"epoch": epoch, **dataclasses.asdict(self)}

    def stats(self):
        return {"train_loss": self.loss_sum / max(self.seen, 1), "train_accuracy": self.correct / max(self.seen, 1)}


class Stopped(Exception):
    """A signal came: training or evaluation stopped after a whole step."""

    def __init__(self, signal_number):
        super().__init__(signal_number)
        self.signal_number = signal_number


@contextlib.contextmanager
def saved_if_stopped(progress, epoch, checkpoint, path):
    """Around an epoch's training and evaluation: when they raise Stopped, rank 0 saves
    `checkpoint(unfinished_epoch=...)` (the state after the epochs before, with this
    epoch's `progress`: all its steps when the stop came while evaluating, and a resumed
    run then evaluates first) to `path`, and every process ends as the signal would have."""
    started = time.time() - progress.seconds
    try:
        yield
    except Stopped as stop:
        progress.seconds = round(time.time() - started, 2)
        if dist.is_main():
            saving = f"saving epoch {epoch + 1} at step {progress.steps}/{progress.total_steps}"
            print(stopping_line(stop.signal_number, saving), flush=True)
            save_checkpoint(path, checkpoint(unfinished_epoch=progress.record(epoch)))
        dist.barrier()  # the checkpoint is whole before any process stops
        stop_for(stop.signal_number)


def stop_if_requested(stop_requested, epoch):
    """After `epoch` is saved: a signal that came while it was saved (or in an evaluation
    batch not every process has) stops the run there (a collective under torchrun)."""
    signal_number = stop_requested()
    if signal_number:
        if dist.is_main():
            print(stopping_line(signal_number, f"epoch {epoch + 1} is saved"), flush=True)
        dist.barrier()
        stop_for(signal_number)
