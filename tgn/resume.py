"""--resume continues a run as it was started.

The flags that define the run (model, data, optimisation, seed) must be the ones it was
started with, as recorded in OUT/options.json; a resumed run may change only how it runs
(device, workers, precision, compilation, caching), how long it runs (--epochs / --iter,
never below what is done) and what it reports. Path flags are not compared: the same file
may be named from another folder, and the checkpoints check their data themselves.
"""
import json
import os
from pathlib import Path

import torch

from tgn.errors import UserError
from tgn.io import read_json

MAY_CHANGE = frozenset({
    "epochs", "iter", "out", "resume", "overwrite", "device", "workers", "amp", "channels_last", "compile",
    "pin_memory", "cache", "skip_bad_images", "sync_bn", "log_every", "save_every", "sample_every", "modconv",
    "pretrained",  # only the first epoch's starting point: a resumed run starts from its checkpoint
    "name", "baseline_report", "threshold",  # what the report says, not what is trained
})


def _flag(key):
    return "--" + key.replace("_", "-")


def _is_path(value):
    return isinstance(value, Path) or (isinstance(value, (list, tuple)) and any(isinstance(v, Path) for v in value))


def check_resume(out_dir, args, *, done=None, length="epochs"):
    """Refuse a --resume whose run-defining flags differ from the run's, or whose --epochs
    (`length`) is below the `done` epochs (steps) already trained. Prints a note when there
    is nothing to resume. Call it before anything is written."""
    out_dir = Path(out_dir)
    if not args.resume:
        return
    if done is None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"note: nothing to resume in {out_dir}: starting a new run")
        return
    options_file = out_dir / "options.json"
    if options_file.is_file():
        saved = read_json(options_file, "options")
        now = {key: value for key, value in vars(args).items() if not _is_path(value)}
        now = json.loads(json.dumps(now))  # the form options.json holds: tuples as lists
        changed = [key for key, value in now.items()
                   if key in saved and key not in MAY_CHANGE and saved[key] != value]
        if changed:
            was = ", ".join(f"{_flag(key)} {saved[key]}" for key in changed)
            now_text = ", ".join(f"{_flag(key)} {now[key]}" for key in changed)
            raise UserError(f"--resume: {out_dir} was started with {was}, this call has {now_text}; resume with the "
                            "flags it was started with, or pass --overwrite to start again")
    requested = getattr(args, length)
    if requested < done:
        raise UserError(f"--resume: {out_dir} has already trained {done} {'steps' if length == 'iter' else 'epochs'};"
                        f" {_flag(length)} {requested} is fewer")


def epochs_done(last_checkpoint):
    """Epochs a last.pth has trained (memory-mapped: the weights are not read); None
    without one."""
    path = Path(last_checkpoint)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]) + 1
    except Exception:  # unreadable: resuming will say so with its own message
        return 0
