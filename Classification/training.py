"""A Classification/train.py run from its flags: real and generated training images, the
classifier, its training and the report of its best epoch."""
import warnings

import torch

from Classification.flags import default_report_folder
from Classification.long_tail import make_loss, make_sampler_weights
from Classification.model import build_classifier, checkpoint_meta, initialise_backbone
from Classification.samples import class_order, readable_training_images, training_images
from Classification.stage import (dataset_root, describe_classes, evaluation_set, grouping_split, read_baseline,
                                  report_and_figures)
from tgn.checkpoint import check_fits, load_checkpoint, load_weights
from tgn.class_names import padded
from tgn.cli import training_config
from tgn.data import check_outside_dataset, open_dataset
from tgn import distributed as dist
from tgn.cache import ResizeCache
from tgn.engine import check_one_image_batches, fit, seed_everything
from tgn.errors import UserError, alike_in_every_process
from tgn.images import ImageList, build_transform
from tgn.metrics import format_percent
from tgn.resume import check_resume, check_same_data, check_same_names, epochs_done, last_state, take_the_runs_flags
from tgn.run_folder import TRAINING_RESULTS, check_run_dir, prepare_run_dir, save_options

RESULTS = (*TRAINING_RESULTS, "report-best")  # with LOGS, what --overwrite replaces
# test.py's reports of the earlier run's checkpoints, beside them: stale once they are replaced.
LOGS = ("metrics.jsonl", *(default_report_folder(name).name for name in TRAINING_RESULTS))
# What a --resume may change besides how any run goes (tgn.resume): what the report says,
# the --extra folders (their images are checked instead), and --pretrained (a resumed run
# starts from last.pth).
RESUME_MAY_CHANGE = frozenset({"name", "threshold", "baseline_report", "extra", "pretrained"})


def method_name(args):
    if args.name:
        return args.name
    parts = ["TGN"] if args.extra else []
    parts += ["re-sampling"] if args.sampler == "class-balanced" else []
    parts += ["balanced softmax"] if args.loss == "balanced-softmax" else []
    return " + ".join(parts) or "baseline"


def train_classifier(args):
    """Classification/train.py: the inputs checked, the classifier trained, the report of its best epoch."""
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, results=RESULTS, args=args)
    # A split given brings its own dataset and head/tail threshold.
    taken = take_the_runs_flags(args, args.out, taken_without={"data_root": {"split"}, "threshold": {"split"}},
                                checkpoint=args.out / "last.pth")
    if "split" in taken and not args.split.is_dir():  # it only groups the report's classes: passed over
        warnings.warn(f"--resume: the run's --split {args.split} is not found (moved?): head and tail are its top "
                      f"{args.threshold:g}% of classes by training count; pass --split to group them by it")
        args.split = None
    dist.local_batch(args.batch_size)  # divisible by the torchrun processes, checked before joining
    device = dist.process_device(args.device)
    cfg = training_config(args, device)  # its flags' errors found before any image is read
    info = open_dataset(dataset_root(args))
    check_outside_dataset(args.out, info.root)
    check_outside_dataset(args.cache, info.root, "--cache")
    class_ids, label_of = class_order(info)
    baseline = read_baseline(args, info, class_ids)
    split = grouping_split(args, info)
    images = training_images(info, args.extra)
    state = last_state(args.out / "last.pth")
    check_resume(args.out, args, done=epochs_done(state), state=state, may_change=RESUME_MAY_CHANGE)
    listed_counts = list(images.real_counts)  # as DATA lists them, which test.py compares with
    images = readable_training_images(images, args.skip_bad_images)  # decodes them only with --skip-bad-images
    train_samples = images.samples
    if args.resume and state is not None:  # the images trained on, as the checkpoint counted them
        check_same_data(state, {"class_ids": list(class_ids), "train_counts": list(images.real_counts),
                                "generated_counts": list(images.generated_counts),
                                "generated_fingerprint": images.generated_fingerprint}, args.out / "last.pth")
        # Grouped as when the run started (a run of an earlier version: by the images it trained on).
        listed_counts = list(state.get("listed_counts") or state.get("train_counts") or listed_counts)
        if info.has_class_list:  # without one the names are ids or the official list: test.py compares none either
            names = [info.class_names[cid] for cid in class_ids]
            check_same_names(state, list(class_ids), names, args.out / "last.pth")
    test_images = evaluation_set(info, label_of, args.image_size, args.skip_bad_images, args.cache, check=True,
                                 draft=not args.full_decode)
    classes = describe_classes(info, args, class_ids, images.real_counts, images.generated_counts, split,
                               listed_counts)
    present = {label for _, label in train_samples}
    for index, cid in enumerate(class_ids):
        if index not in present:  # none listed, or (with --skip-bad-images) none readable
            raise UserError(f"class {cid} ({info.class_names[cid]}) has no training image in "
                            f"{info.annotation_path('train')}{' or --extra' if args.extra else ''}")
    check_one_image_batches(len(train_samples), args.batch_size, args.image_size, device, args.sync_bn)
    cache = ResizeCache(args.cache, args.image_size, not args.full_decode) if args.cache is not None else None
    # DATA's images come first
    train_images = ImageList(train_samples, build_transform(args.image_size, train=True), args.image_size, cache,
                             generated_from=sum(images.real_counts), draft=not args.full_decode)
    seed_everything(args.seed)
    model = build_classifier(args.arch, len(class_ids))
    if args.resume and state is not None:  # weights of another shape are refused before anything is written
        with alike_in_every_process():  # every process reads the same file: one line
            check_fits(model, state["state_dict"], args.out / "last.pth")
    else:  # a resumed run starts from its checkpoint: no --pretrained to read or download
        model = initialise_backbone(model, args.pretrained)

    dist.init(args.device)  # joined after the input checks: an input error prints once per node
    run_dir = prepare_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, results=RESULTS, logs=LOGS)
    main = dist.is_main()  # under torchrun rank 0 alone prints and writes
    options = save_options(run_dir, args, write=main, resumed=args.resume and state is not None)
    method = method_name(args)
    if main:
        print(f"{method} on {info.name}: {len(train_images)} training images ({sum(images.generated_counts)} "
              f"generated{f', {images.duplicates} duplicates skipped' if images.duplicates else ''}), "
              f"{len(test_images)} test images, device {device}{dist.describe()}, amp {cfg.amp}")
        for index, cid in enumerate(class_ids):
            group = "head" if cid in classes.head else "tail"
            print(f"  {cid:4d} {padded(classes.names[index], 28)} {group}  real {images.real_counts[index]:7d}"
                  f"  generated {images.generated_counts[index]:7d}")
        if args.sampler == "class-balanced" and args.loss == "balanced-softmax":
            print("note: re-sampling and balanced softmax both correct for the class priors")

    labels = train_images.targets()
    meta = {**checkpoint_meta(model, class_ids, classes.names, images.real_counts, images.generated_counts, method,
                              options),
            "generated_fingerprint": images.generated_fingerprint, "listed_counts": listed_counts}
    result = fit(model, train_images, test_images, cfg, device, run_dir, meta=meta, resume=args.resume,
                 loss_fn=make_loss(args.loss, labels, len(class_ids)), head=classes.indices(classes.head),
                 tail=classes.indices(classes.tail),
                 train_weights=make_sampler_weights(args.sampler, labels, len(class_ids)), desc="cls")

    best = run_dir / "best.pth"
    last_is_best = result.confusion is not None and result.best_epoch == cfg.epochs - 1
    if best.exists() and not last_is_best:
        load_weights(model, load_checkpoint(best)["state_dict"], best)
    if best.exists() and main:
        print(f"best test OA {format_percent(result.best_accuracy)}% at epoch {result.best_epoch + 1}; "
              f"report of {best}:")
    source = best if best.exists() else run_dir / "last.pth"  # no best: the test set is empty
    # The report is computed as test.py computes it by default, in fp32 and the standard
    # memory layout, so that report-best/ is what `test.py --ckpt best.pth` writes; the
    # epochs' test accuracy (which chose best.pth) came from the training precision.
    as_tested = cfg.amp == "off" and not cfg.channels_last
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    if best.exists() and main and not as_tested:
        print(f"(the epochs were evaluated with --amp {cfg.amp}{' and channels_last' if cfg.channels_last else ''}; "
              "the report in fp32, as test.py)")
    return report_and_figures(model, test_images, classes, run_dir / "report-best", method=method, source=source,
                              device=device, batch_size=args.batch_size, workers=args.workers,
                              pin_memory=args.pin_memory, baseline=baseline,
                              cm=result.confusion if last_is_best and as_tested else None)
