"""Run folders: whose a folder is, when a run may reuse it, what it records of its flags."""
from pathlib import Path

from tgn.errors import UserError
from tgn.io import absolute_path, atomic_write_json, map_paths, read_json, remove_path, remove_temp_files
from tgn.runlock import refuse_folder_in_use

# What a ResNet trainer's run folder holds from its training: either marks a run. Its log
# alone does not (a run killed in its first epoch); a new run drops the log's lines.
TRAINING_RESULTS = ("last.pth", "best.pth")


# Which script wrote a run folder's options.json, told by flags only that script has (runs
# of every version record them).
RUN_FOLDER_OWNERS = (
    ("CDTG/train.py", {"iter"}),
    ("CDTG/evaluate.py", {"inception", "folders"}),
    ("KMDN/Distill.py", {"alpha", "distill_interval"}),
    ("Classification/train.py", {"extra", "sampler"}),
    ("KMDN/UModel.py or RModel.py", {"group"}),  # they write OUT/head and OUT/tail
)


def run_folder_owner(options):
    """The script whose flags `options` holds; None for anything else."""
    if not isinstance(options, dict):
        return None
    return next((script for script, flags in RUN_FOLDER_OWNERS if flags & options.keys()), None)


# What the scripts that write no options.json beside it, or no training run, leave in their
# --out: another script writing there would mix its files into that folder's.
OUTPUT_MARKERS = (("split.json", "KMDN/dataset_split.py"), ("tail_classes.json", "CDTG/dataset_split.py"),
                  ("generation.json", "CDTG/generation.py"), ("report.json", "Classification/test.py or train.py"),
                  ("evaluation.json", "CDTG/evaluate.py"))


def check_own_run_folder(out_dir, args, writes=None):
    """Refuse (with --resume, --overwrite or neither) an --out that another script's run
    uses: its options.json and log would be replaced, and it could not be resumed; or, where
    no run is, one that holds another script's output (check_no_other_output)."""
    recorded = Path(out_dir) / "options.json"
    if not recorded.is_file():
        check_no_other_output(out_dir, writes)
        return
    try:
        owner = run_folder_owner(read_json(recorded, "options"))
    except UserError as exc:  # unreadable: whose it is cannot be told
        raise UserError(f"{exc}; delete it if it is this run's, or choose another --out") from None
    if owner is None:
        raise UserError(f"{recorded} was not written by one of this project's training scripts; choose another --out")
    if owner != run_folder_owner(vars(args)):
        raise UserError(f"{out_dir} is a run folder of {owner} (its options.json); choose another --out")
    # This script's own run: earlier versions let it share its folder with another script's
    # output, and such a run still resumes.


def check_folder_of_runs(out_dir):
    """Refuse as KMDN's --out, which holds its runs (OUT/head, OUT/tail, OUT/distill) and
    writes nothing itself, a run folder (an options.json there is another run's, one of
    KMDN's own given as OUT included) or another script's output."""
    if any((Path(out_dir) / run / "options.json").is_file() for run in ("head", "tail", "distill")):
        return  # KMDN's runs are there already (earlier versions let them share a folder): they go on
    recorded = Path(out_dir) / "options.json"
    if recorded.is_file():
        try:
            owner = run_folder_owner(read_json(recorded, "options")) or "another program"
        except UserError:
            owner = "another run"
        raise UserError(f"{out_dir} is a run folder of {owner} (its options.json); --out is the folder that holds "
                        "the KMDN runs (OUT/head, OUT/tail, OUT/distill): choose another --out")
    check_no_other_output(out_dir)


def check_no_other_output(out_dir, writes=None):
    """Refuse a folder holding another script's output (OUTPUT_MARKERS), unless it holds
    this script's own too (`writes`: generation adding to a folder an earlier version let
    it share)."""
    if writes is not None and (Path(out_dir) / writes).is_file():
        return
    for marker, script in OUTPUT_MARKERS:
        if marker != writes and (Path(out_dir) / marker).is_file():
            raise UserError(f"{out_dir} is an output folder of {script} (its {marker}); choose another --out")


def check_run_dir(out_dir, *, resume=False, overwrite=False, results=TRAINING_RESULTS, resumable=True, args=None,
                  writes=None):
    """Refuse to reuse a folder that holds any of `results` unless told how (creates
    nothing). `resumable=False`: the script has no --resume, so the message offers
    --overwrite or another --out. A --resume with results but without last.pth (the
    checkpoint it continues; users delete it to save space) is refused too: it would start
    again over them. Given the script's `args`, another script's folder is refused first
    (check_own_run_folder; `writes`: the marker file this script writes)."""
    out_dir = Path(out_dir)
    refuse_folder_in_use(out_dir)
    if args is not None:
        check_own_run_folder(out_dir, args, writes)
    existing = [name for name in results if (out_dir / name).exists()]
    if existing and not (resume or overwrite):
        remedy = ("pass --resume to continue or --overwrite to start again" if resumable
                  else "pass --overwrite to replace them or choose another --out")
        raise UserError(f"{out_dir} already holds results ({existing[0]}); {remedy}")
    if resumable and resume and existing and not (out_dir / "last.pth").exists():
        raise UserError(f"--resume: {out_dir} holds results ({existing[0]}) but no last.pth to continue from; "
                        "pass --overwrite instead to start again")
    return out_dir


def prepare_run_dir(out_dir, *, resume=False, overwrite=False, results=TRAINING_RESULTS, logs=("metrics.jsonl",)):
    """check_run_dir, then create the folder and remove what a run killed mid-save left
    (temp files); with --overwrite (and no --resume) the earlier run's `results` and `logs`
    are removed first, by rank 0, so that a new run stopped early leaves none of them for a
    later --resume to take for its own. Call it once the inputs are validated, so that a
    bad input leaves nothing behind. Under torchrun (after dist.init) every process must
    see the same folder."""
    from tgn import distributed as dist  # imports torch; training only

    out_dir = check_run_dir(out_dir, resume=resume, overwrite=overwrite, results=results)
    dist.make_shared_folder(out_dir)
    if dist.is_main():
        remove_temp_files(out_dir)  # what a run killed mid-save left
        if overwrite and not resume:
            for name in (*results, *logs):
                remove_path(out_dir / name)
    dist.barrier()  # no process looks into the folder before the old results are gone
    return out_dir


# Flags that say only how a run started (CDTG's --init, the ResNets' --pretrained): a resumed
# run keeps the first call's values in options.json, whatever this call passes.
START_FLAGS = ("init", "pretrained")


def save_options(out_dir, args, write=True, resumed=False):
    """Resolved command-line options, next to the results they produced (`write=False`:
    only the dict, for the processes that do not write under torchrun). Paths are recorded
    absolute: test.py reads the run's --split from any folder. A `resumed` run keeps the
    START_FLAGS its options.json records."""
    from tgn import distributed as dist  # imports torch; training only

    options = {key: map_paths(value, lambda path: str(absolute_path(path))) for key, value in vars(args).items()}
    saved_file = Path(out_dir) / "options.json"
    if resumed and saved_file.is_file():
        saved = read_json(saved_file, "options")
        # What the run started from stays recorded: a resumed run starts from its checkpoint.
        options.update({key: saved[key] for key in START_FLAGS if isinstance(saved, dict) and key in saved})
    options["processes"] = dist.planned_world_size()  # --resume notes a change of count
    if write:
        atomic_write_json(Path(out_dir) / "options.json", options)
    return options
