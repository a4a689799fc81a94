"""Stopping a training run between two steps, with a checkpoint a --resume continues exactly.

Ctrl-C (SIGINT), or SIGTERM (what a cluster scheduler sends before it kills a job that is
preempted or out of time, and torchrun passes on to its processes), lets the current step
finish; the trainer then saves and stops. A second Ctrl-C stops at once, for a step that
never ends.
"""
import contextlib
import signal
import sys
import threading

from tgn import distributed as dist

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

    def note(number, _frame):
        if number == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt  # the second Ctrl-C: the step is not waited for
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


def leave_sigterm_to_the_trainer(_worker_id):
    """DataLoader workers outlive SIGTERM by WORKER_SIGTERM_GRACE_S seconds: a scheduler
    sends it to every process of the job, and a worker it ended at once would stop the run
    before its last save. The trainer ends them first; one stuck in a read (which
    DataLoader's own shutdown would have ended with SIGTERM) ends when the time is up."""
    grace = (lambda *_: signal.alarm(WORKER_SIGTERM_GRACE_S)) if hasattr(signal, "alarm") else signal.SIG_IGN
    signal.signal(signal.SIGTERM, grace)
