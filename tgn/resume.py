"""--resume continues a run as it was started.

The flags that define the run (model, optimisation, seed) must be the ones it was
started with, as recorded in OUT/options.json; a resumed run may change only how it runs
(device, workers, precision, compilation, caching), how long it runs (--epochs / --iter,
never below what is done) and what it reports. Path flags are not compared: files and
folders may move or be named from elsewhere; the checkpoints check what they hold instead
(class ids, image counts, the teacher's weights).
"""
import json
import shlex
import warnings
from pathlib import Path

import torch

from tgn import distributed as dist
from tgn.checkpoint import load_failure, map_tensors
from tgn.class_names import refuse_renamed_class
from tgn.cli import check_repeated_milestones, recorded_value
from tgn.errors import UserError, speaks, speaks_for_the_run
from tgn.io import absolute_path, map_paths, read_json
from tgn.runlock import running_run

# How a run goes, not what it trains: every trainer's may change on --resume (its length
# too, never below what is done: check_resume's `length`).
HOW_IT_RUNS = frozenset({"resume", "overwrite", "device", "workers", "amp", "channels_last", "compile", "pin_memory",
                         "skip_bad_images", "sync_bn"})
# Where the inputs and outputs are: files and folders may move or be named from elsewhere;
# the checkpoints check what they hold instead. A script adds its own (`may_change`).
PATH_FLAGS = frozenset({"out", "data_root", "split", "data", "cache"})


def _flag(key):
    return "--" + key.replace("_", "-")


def _setting(key, value, repeated=()):
    """A flag as it is written: a switch is there or not; a value with spaces quoted; a
    list after the flag, or the flag before each value where it is `repeated`."""
    if isinstance(value, bool):
        return _flag(key) if value else f"no {_flag(key)}"
    if isinstance(value, list) and key in repeated:
        return " ".join(f"{_flag(key)} {shlex.quote(str(item))}" for item in value) or f"no {_flag(key)}"
    if isinstance(value, list):
        return " ".join([_flag(key), *(shlex.quote(str(item)) for item in value)])
    return f"{_flag(key)} {shlex.quote(str(value))}"


# Run-defining flags newer than some runs, as those runs went: an options.json without one.
ADDED_SINCE = {"full_decode": False}

# How a run uses the machine it runs on: a --resume that leaves them out takes this call's
# defaults, not the run's (another machine, another GPU).
MACHINE_FLAGS = frozenset({"resume", "overwrite", "out", "device", "workers", "amp", "channels_last", "compile",
                           "pin_memory", "sync_bn", "cache"})


def take_the_runs_flags(args, run_dir, *, not_taken=frozenset(), taken_without=None, compared=None,
                        checkpoint=None):
    """With --resume, each flag this call leaves out (not in args.given, tgn.cli.ParsedFlags)
    takes the value the run's options.json records, but for MACHINE_FLAGS and the script's
    `not_taken`: `--resume` alone continues a run as it was started, its length, inputs,
    checkpointing and reports included; the flags given are compared by check_resume.
    `taken_without`: {flag: flags that, given, keep it from being taken} (--data-root is
    the run's only when --split is left out too: a split given names its own dataset).
    `compared`, as check_resume's: a flag it leaves out of both calls' options plays no
    part, and is not taken. Without options.json (deleted, or lost with a copied folder), the
    copy of the options in `checkpoint` (the one the run resumes from), as check_resume
    compares with. Call it once the folder is known to be the script's own run; prints what
    it took, and returns the names."""
    given = getattr(args, "given", None)
    record = Path(run_dir) / "options.json"
    if not args.resume or given is None:
        return []
    try:
        if record.is_file():
            saved = read_json(record, "options")
        else:
            saved = (last_state(checkpoint, needs=()) or {}).get("options") if checkpoint is not None else None
    except UserError:  # check_resume says what is wrong with it
        return []
    if not isinstance(saved, dict):
        return []
    now, taken, skipped = vars(args), [], MACHINE_FLAGS | not_taken
    acting = compared(saved, json.loads(json.dumps(now, default=str)))[0] if compared else saved
    for key, value in saved.items():
        if (key in given or key in skipped or key not in args.flags or key not in acting
                or given & set((taken_without or {}).get(key, ()))):
            continue
        if key in args.paths:  # recorded absolute
            if map_paths(now[key], lambda path: str(absolute_path(path))) == value:
                continue
        elif json.loads(json.dumps(now[key], default=str)) == value:
            continue
        try:
            value = recorded_value(args.flags[key], value)
        except ValueError as exc:
            if not trained_with(checkpoint, key, value):  # else an earlier version's flag let it through: taken
                source = record if record.is_file() else f"the options that {checkpoint} holds"
                raise UserError(f"--resume: {source} records {_flag(key)} {json.dumps(value)}, which {_flag(key)} "
                                f"refuses ({exc}); correct it there, or pass --overwrite instead of --resume to "
                                "start again") from None
        if key in args.paths and value is not None:  # the flag's own form is a Path (or a list of them)
            value = [Path(v) for v in value] if isinstance(value, list) else Path(value)
        setattr(args, key, value)
        taken.append(key)
    if taken and speaks_for_the_run():
        repeated = getattr(args, "repeated", ())
        taken_text = ", ".join(_setting(key, saved[key], repeated) for key in taken)
        print(f"--resume: left out, as the run was started: {taken_text}")
    return taken


def trained_with(checkpoint, key, value):
    """Whether the checkpoint a run resumes from records `value` for `key` too: the run was
    trained with it (an earlier version's flag took it; --seed took any integer), not a
    hand edit of options.json."""
    if checkpoint is None:
        return False
    state = last_state(checkpoint, needs=())
    options = (state or {}).get("options") if isinstance(state, dict) else None
    return isinstance(options, dict) and key in options and options[key] == value


def check_resume(out_dir, args, *, done, length="epochs", state=None, data=None, may_change=frozenset(),
                 compared=None):
    """Refuse a --resume whose run-defining flags differ from the run's, whose --epochs
    (`length`) is below the `done` epochs (steps) already trained, or (given the run's last
    `state` and this call's `data`: class ids, image counts, split) whose data differs. Prints
    a note when there is nothing to resume (`done` None). Call it before anything is written.

    Every flag is run-defining but those of HOW_IT_RUNS, PATH_FLAGS, `length` and the
    script's own `may_change`; `compared(saved, now)` gives what of the run's options and of
    this call's (as options.json holds them) must be alike, where it is not all their values."""
    out_dir = Path(out_dir)
    if not args.resume:
        return
    if state is not None and "unreadable" in state:
        raise UserError(f"--resume: cannot read {out_dir / 'last.pth'} ({state['unreadable']}); restore it from a "
                        "copy, or pass --overwrite instead of --resume to start again")
    if done is None:
        # A new run after all. Epoch 0 stays allowed here: earlier versions' commands passed
        # "--milestones 0 --resume" to start and to continue alike.
        if hasattr(args, "milestones"):
            check_repeated_milestones(args.milestones)
        if speaks_for_the_run():
            print(f"note: nothing to resume in {out_dir}: starting a new run")
        return
    options_file = out_dir / "options.json"
    # Without options.json (deleted, or lost with a copied folder), the checkpoint's copy of them.
    saved = read_json(options_file, "options") if options_file.is_file() else (state or {}).get("options")
    if isinstance(saved, dict):
        # A number recorded as text is that number; a flag newer than the run, its old way.
        saved = {**ADDED_SINCE, **saved, **parsed_record(saved, args)}
        now = json.loads(json.dumps(vars(args), default=str))  # the form options.json holds
        free = HOW_IT_RUNS | PATH_FLAGS | may_change | {length}
        saved_view, now_view = compared(saved, now) if compared else (saved, now)
        changed = [key for key in now if key in saved and key not in free
                   and saved_view.get(key) != now_view.get(key)]
        if changed:
            repeated = getattr(args, "repeated", ())
            was = ", ".join(_setting(key, saved[key], repeated) for key in changed)
            now_text = ", ".join(_setting(key, now[key], repeated) for key in changed)
            raise UserError(f"--resume: {out_dir} was started with {was}, this call has {now_text}; resume with the "
                            "flags it was started with, or pass --overwrite instead of --resume to start again")
        note_process_count(out_dir, saved.get("processes"))
    requested = getattr(args, length)
    if requested < done:
        raise UserError(f"--resume: {out_dir} has already trained {done} {'steps' if length == 'iter' else 'epochs'};"
                        f" {_flag(length)} {requested} is fewer")
    if (state or {}).get("unfinished_epoch") and requested <= done:  # last.pth would keep weights of no epoch
        raise UserError(f"--resume: {out_dir} was stopped within epoch {done + 1}; pass {_flag(length)} {done + 1} "
                        "or more to finish it, or --overwrite instead of --resume to start again")
    if state is not None and data is not None:
        check_same_data(state, data, out_dir / "last.pth")


def parsed_record(saved, args):
    """The values of the script's flags that `saved` (options.json) records and that they
    accept, as they parse them (take_the_runs_flags refuses the others)."""
    flags, parsed = getattr(args, "flags", {}), {}
    for key, value in saved.items():
        if key in flags:
            try:
                parsed[key] = recorded_value(flags[key], value)
            except ValueError:
                pass
    return parsed


def note_process_count(out_dir, saved):
    """A run resumed by another number of processes goes on correctly, but not as one that
    kept its count would: say so."""
    processes = dist.planned_world_size()
    if saved is not None and saved != processes and speaks_for_the_run():
        print(f"note: {out_dir} was trained by {saved} process(es) and resumes with {processes}: per-process "
              "BatchNorm statistics, the last batch of each epoch and CDTG's minibatch-stddev groups and ADA "
              "draws differ from a run that kept its count")


def check_same_classes(recorded, class_ids, path, what="classes"):
    """A checkpoint resumes only on the class ids it was trained on, in its order (its
    outputs'): the same ones ranked otherwise (the data changed) are told apart."""
    if recorded == class_ids:
        return
    if recorded is not None and sorted(recorded) == sorted(class_ids):
        trained = f"the same {what} in another order ({recorded}, now {class_ids}: the data ranks them otherwise)"
    else:
        trained = f"other {what} ({recorded}, now {class_ids})"
    raise UserError(f"{path} was trained on {trained}; resume with the data it started with, use another --out, or "
                    "pass --overwrite instead of --resume to start again")


def check_same_data(state, meta, path):
    """A checkpoint resumes only on the classes and images it was trained on."""
    check_same_classes(state.get("class_ids"), meta.get("class_ids"), path)
    for key, what in (("split_fingerprint", "a split of other data"), ("train_counts", "other real images"),
                      ("generated_counts", "other generated images (--extra)"),
                      ("generated_fingerprint", "other generated images (--extra: other images or generation "
                                                "settings)")):
        if key in state and key in meta and state[key] != meta[key]:
            raise UserError(f"{path} was trained on {what}; resume with the data it started with, or pass "
                            "--overwrite instead of --resume to start again")


def check_same_names(state, class_ids, class_names, path):
    """A checkpoint resumes only on classes of the names it was trained on (another dataset
    laid out alike has as many images under the same ids); spelling aside, and a class named
    by its id on either side matches any name."""
    refuse_renamed_class(state.get("class_names"), class_names, class_ids, path, "the data",
                         ": resume with the data it started with, or pass --overwrite instead of --resume to start "
                         "again")


# What a ResNet trainer's last.pth holds to resume (its best.pth keeps no optimizer state).
RESUMABLE = ("state_dict", "optimizer", "epoch")


def last_state(path, needs=RESUMABLE):
    """What the checkpoint a run resumes from holds, its tensors as shapes only (meta
    tensors: the weights are not read, and the file is not left mapped, which Windows
    would not let the run replace or remove); None without one; {"unreadable": why} when
    it cannot be read or lacks one of `needs` (check_resume then says why, and a run
    started again with --overwrite does not need it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)  # torch 2.1 wants a str
    except Exception as exc:
        return {"unreadable": load_failure(path, exc)}
    if not isinstance(state, dict):
        return {"unreadable": "not one of this project's checkpoints"}
    missing = [key for key in needs if key not in state]
    if missing:
        return {"unreadable": f"it holds no {missing[0]!r} to resume from: a copy of best.pth or of another "
                              "checkpoint?"}
    return map_tensors(state, lambda tensor: torch.empty_like(tensor, device="meta"))


def resuming_line(path, done, epochs, steps=None):
    """What a resumed run prints first: where it goes on (after `steps` of the epoch, for a
    run stopped midway), or that nothing is left to train."""
    if done >= epochs:
        return f"{path} has trained all {epochs} epochs: nothing left to train (--epochs N to train longer)"
    return f"resuming from {path} at epoch {done + 1}/{epochs}" + (f", after its step {steps}" if steps else "")


def epochs_done(state):
    """Epochs trained by the run whose last_state is `state`; None without one."""
    return None if state is None else int(state.get("epoch", -1)) + 1


def stopped_early(folder):
    """(epochs trained, epochs planned) of the ResNet run in `folder` when it stopped before
    its last epoch (Ctrl-C, a crash, a job's time limit); None when it ended, or when the
    folder holds no run of ours (a released file's)."""
    folder = Path(folder)
    state = last_state(folder / "last.pth", needs=("epoch",))
    if state is None or "unreadable" in state or not (folder / "options.json").is_file():
        return None
    try:
        planned = read_json(folder / "options.json", "options").get("epochs")
    except (UserError, AttributeError):  # damaged, or not a dict: only a warning depended on it
        return None
    done = epochs_done(state)
    return (done, planned) if isinstance(planned, int) and done < planned else None


def warn_if_unfinished(path, what):
    """Warn when the model `path` (a best.pth, M_T.pth) lies in the folder of a run still
    going, whose model may yet change (the head and tail models may train at once, and
    Distill or CDTG be started before they end), or of a run stopped before its last epoch:
    either way it is the best model so far, not the run's."""
    if not speaks():
        return
    folder = Path(path).parent
    holder = running_run(folder)
    if holder:
        warnings.warn(f"{what} {path} is in the folder of a run still going ({holder}): it may change once read; "
                      "wait for that run to end")
        return
    stopped = stopped_early(folder)
    if stopped:
        warnings.warn(f"{what} {path} comes from a run stopped after epoch {stopped[0]} of {stopped[1]}: it is the "
                      "best model so far, not the run's; finish that run with --resume first, unless this one is "
                      "meant")
