"""Train the head model (UModel.py) or the tail model (RModel.py) on its own classes."""
import warnings

from KMDN.stage import build_group_model, checkpoint_meta, group_datasets, open_split
from tgn.checkpoint import check_fits
from tgn.cli import training_config
from tgn import distributed as dist
from tgn.data import check_outside_dataset
from tgn.engine import check_one_image_batches, fit, seed_everything
from tgn.errors import UserError, alike_in_every_process
from tgn.metrics import format_percent
from tgn.resume import check_resume, epochs_done, last_state, take_the_runs_flags
from tgn.run_folder import check_folder_of_runs, check_run_dir, prepare_run_dir, save_options


# What a --resume may change besides how any run goes (tgn.resume): --pretrained, only the
# first epoch's start (a resumed run starts from last.pth).
RESUME_MAY_CHANGE = frozenset({"pretrained"})


def train_group(args):
    """Writes OUT/<group>/{best,last}.pth, metrics.jsonl and options.json."""
    group = args.group
    check_folder_of_runs(args.out)
    check_run_dir(args.out / group, resume=args.resume, overwrite=args.overwrite, args=args)
    take_the_runs_flags(args, args.out / group, taken_without={"data_root": {"split"}},
                        checkpoint=args.out / group / "last.pth")
    dist.local_batch(args.batch_size)  # divisible by the torchrun processes, checked before joining
    split = open_split(args)
    check_outside_dataset(args.out, split.data_root)
    check_outside_dataset(args.cache, split.data_root, "--cache")
    if not split.ids(group):
        raise UserError(f"the split in {args.split} has no {group} classes")
    # Said when the split was made; a run of days deserves it again (one without test images is refused below).
    if len(split.ids(group)) == 1 and split.entries(group, "test"):
        warnings.warn(f"the {group} group of {args.split} has one class: cross-entropy over one class is 0, so this "
                      "model learns nothing from it (its test accuracy is 100% from the first epoch)")
    state = last_state(args.out / group / "last.pth")
    check_resume(args.out / group, args, done=epochs_done(state), state=state,
                 data={"class_ids": split.ids(group), "split_fingerprint": split.fingerprint},
                 may_change=RESUME_MAY_CHANGE)
    device = dist.process_device(args.device)
    cfg = training_config(args, device)
    seed_everything(args.seed)
    resuming = args.resume and state is not None
    model = build_group_model(split, group, args, resumed=resuming)
    if resuming:  # weights of another shape are refused before anything is written
        with alike_in_every_process():  # every process reads the same file: one line
            check_fits(model, state["state_dict"], args.out / group / "last.pth")
    train_set, test_set = group_datasets(split, group, args.image_size, args.skip_bad_images, args.cache,
                                         draft=not args.full_decode)
    check_one_image_batches(len(train_set), args.batch_size, args.image_size, device, args.sync_bn,
                            f"the {group} classes' training images")
    # Inputs are valid: only now is anything written (by rank 0 alone under torchrun).
    dist.init(args.device)  # joined after the input checks: an input error prints once per node
    run_dir = prepare_run_dir(args.out / group, resume=args.resume, overwrite=args.overwrite)
    main = dist.is_main()
    options = save_options(run_dir, args, write=main, resumed=resuming)
    if main:
        print(f"{group} model: {len(split.ids(group))} classes, {len(train_set)} train / {len(test_set)} test "
              f"images, device {device}{dist.describe()}, amp {cfg.amp}")
    result = fit(model, train_set, test_set, cfg, device, run_dir,
                 meta=checkpoint_meta(split, group, model, options), resume=args.resume, desc=group)
    if main:
        print(f"best test accuracy {format_percent(result.best_accuracy)}% at epoch {result.best_epoch + 1}; "
              f"checkpoints in {run_dir}")
    return result
