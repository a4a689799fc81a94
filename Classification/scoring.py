"""A Classification/test.py run from its flags: one checkpoint scored on DATA's test images."""
import sys
from pathlib import Path

import torch

from Classification.flags import DEFAULT_IMAGE_SIZE, default_report_folder
from Classification.model import check_classes, load_classifier
from Classification.report import REPORT_JSON
from Classification.samples import class_order, count_per_class
from Classification.stage import (dataset_root, describe_classes, evaluation_set, grouping_split, read_baseline,
                                  report_and_figures)
from tgn import distributed as dist
from tgn.cli import HEAD_PERCENT
from tgn.compat import check_amp
from tgn.data import check_outside_dataset, open_dataset
from tgn.engine import resolve_precision
from tgn.errors import UserError, speaks
from tgn.run_folder import check_run_dir


def groups_from_run(args, options):
    """Without --split and --threshold, head/tail as the checkpoint's run grouped them (its
    options; the official result.pth has none: the paper's 40%)."""
    if args.split is not None or args.threshold is not None:  # grouping_split checks the two agree
        return
    if options.get("split") and Path(options["split"]).is_dir():
        args.split = Path(options["split"])  # its threshold comes with it
        return
    args.threshold = options.get("threshold", HEAD_PERCENT)
    if options.get("split") and speaks():  # before the processes join: once per node
        print(f"warning: the split the checkpoint's run used, {options['split']}, is not found; head/tail from "
              f"DATA's training counts with --threshold {args.threshold:g} (pass --split)", file=sys.stderr)


def run_baseline(args, options, info, class_ids):
    """Without --baseline-report, the one the checkpoint's run drew in its long_tail.png, so
    that the report is the one the run wrote (report-best/); passed over, with a warning,
    when it is gone or no longer fits DATA."""
    recorded = options.get("baseline_report")
    if not recorded or "baseline_report" in getattr(args, "given", ()):  # given: 'none' leaves it out
        return None
    args.baseline_report = Path(recorded)
    try:
        return read_baseline(args, info, class_ids)
    except UserError as exc:
        if speaks():
            print(f"warning: the baseline report the checkpoint's run drew is passed over: {exc}", file=sys.stderr)
        args.baseline_report = None
        return None


def score_checkpoint(args):
    """Classification/test.py: a checkpoint checked against DATA, scored on its test images, reported."""
    planned_device = dist.process_device(args.device)
    args.amp, args.channels_last = resolve_precision(args.amp, args.channels_last, planned_device)
    check_amp(args.amp, planned_device, training=False)
    out_dir = args.out or default_report_folder(args.ckpt)
    check_run_dir(out_dir, overwrite=args.overwrite, results=(REPORT_JSON,), resumable=False, args=args,
                  writes=REPORT_JSON)
    # Read first only when it names the dataset: else the cheaper checks of DATA and --out come first.
    loaded = load_classifier(args.ckpt) if args.data_root is None and args.split is None else None
    info = open_dataset(dataset_root(args, loaded and loaded[1].get("options", {}).get("data_root"), args.ckpt))
    check_outside_dataset(out_dir, info.root, "--out" if args.out else "the report folder (beside --ckpt; pass --out)")
    class_ids, label_of = class_order(info)
    baseline = read_baseline(args, info, class_ids)
    model, meta = loaded or load_classifier(args.ckpt)
    # Without classes.json the names are not the dataset's own (ids, or DIOR's or FGSC-23's official list).
    named = [info.class_names[cid] for cid in class_ids] if info.has_class_list else None
    check_classes(meta, model, class_ids, args.ckpt, args.data_root, named)
    data_counts = count_per_class(info.entries("train", check_files=False), class_ids)
    train_counts = meta.get("train_counts") or data_counts  # the official result.pth records none
    grouped_by_flags = args.split is not None or args.threshold is not None
    # What DATA listed when the run started: with --skip-bad-images it trained on fewer (train_counts).
    listed_counts = meta.get("listed_counts") or train_counts
    if list(listed_counts) != list(data_counts) and speaks():
        how = "counts them as its run did, grouped by the flags given" if grouped_by_flags else \
            "counts and groups them as its run did"
        print(f"warning: {args.data_root} has other training images per class than {args.ckpt} was trained on; "
              f"the report {how}", file=sys.stderr)
    stopped = meta.get("unfinished_epoch")
    if stopped and speaks():  # a last.pth saved by Ctrl-C or SIGTERM
        print(f"warning: {args.ckpt} was saved when its run stopped within epoch {stopped['epoch'] + 1} (step "
              f"{stopped['steps']}): its weights are of no whole epoch; --resume the run to finish it",
              file=sys.stderr)
    options = meta.get("options", {})
    groups_from_run(args, options)
    if baseline is None and args.baseline_report is None:
        baseline = run_baseline(args, options, info, class_ids)
    run_counts = None if grouped_by_flags else dict(zip(class_ids, listed_counts))  # a split counts what DATA lists
    classes = describe_classes(info, args, class_ids, train_counts, meta.get("generated_counts"),
                               grouping_split(args, info, run_counts), listed_counts)
    image_size = args.image_size or options.get("image_size", DEFAULT_IMAGE_SIZE)
    # As its run decoded them: a bare state dict (the released result.pth), as the official code, whole.
    full_decode = args.full_decode or (bool(options.get("full_decode")) if meta else True)
    dataset = evaluation_set(info, label_of, image_size, args.skip_bad_images, draft=not full_decode)

    device = dist.init(args.device)
    dist.make_shared_folder(out_dir)  # from here on this report alone writes there (rank 0 holds it)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    method = args.name or meta.get("method") or args.ckpt.name
    if dist.is_main():
        print(f"{method}: {args.ckpt} on {len(dataset)} test images of {info.name} at {image_size} px, "
              f"device {device}{dist.describe()}")
    return report_and_figures(model, dataset, classes, out_dir, method=method, source=args.ckpt, device=device,
                              batch_size=args.batch_size, workers=args.workers, pin_memory=args.pin_memory,
                              amp=args.amp, channels_last=args.channels_last, baseline=baseline)
