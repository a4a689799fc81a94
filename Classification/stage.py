"""What train.py and test.py share: head/tail groups, the test set, the report."""
from dataclasses import dataclass
from pathlib import Path

from Classification.figures import plot_confusion, plot_long_tail
from Classification.report import build_report, read_report, renamed_report_class, report_markdown, write_report
from tgn import distributed as dist
from tgn.cache import ResizeCache
from tgn.cli import HEAD_PERCENT
from tgn.data import drop_unreadable, samples_for
from tgn.engine import evaluate, make_loader
from tgn.errors import UserError
from tgn.images import ImageList, build_transform
from tgn.io import remove_temp_files
from tgn.split import check_split_matches, head_and_tail, load_split

@dataclass
class Classes:
    """DATA's classes in output order, with what the report says about each."""

    dataset: str
    ids: list
    names: list
    train_counts: list  # real training images only
    generated_counts: list  # None when unknown (official weights)
    head: list  # class ids
    tail: list
    grouping: str  # where head/tail come from, in words

    def indices(self, class_ids):
        return [self.ids.index(cid) for cid in class_ids]


def dataset_root(args, trained_on=None, recorded_in=None):
    """--data-root; without it the dataset --split was made on, else `trained_on`, as
    `recorded_in` records it (test.py: the checkpoint; train.py --resume: the run's
    options.json). Sets args.data_root, which options.json records."""
    if args.data_root is None and args.split is not None:
        args.data_root = load_split(args.split).data_root
    elif args.data_root is None and trained_on:
        if not Path(trained_on).is_dir():
            raise UserError(f"the dataset {recorded_in} was trained on, {trained_on}, is not found; pass --data-root")
        args.data_root = Path(trained_on)
    elif args.data_root is None:
        raise UserError("which dataset? pass --data-root DATA (or --split, made on it)")
    return args.data_root


def grouping_split(args, info, run_counts=None):
    """The --split that groups head and tail (None without one), read and checked against
    DATA and --threshold before any image is decoded. `run_counts` ({class id: training
    count} a checkpoint's run recorded; test.py, where --split is the run's own): a split
    of the data the run trained on groups as the run did, also when DATA grew since."""
    if args.split is None:
        return None
    split = load_split(args.split, data_root=info.root)
    try:
        check_split_matches(split, info, image_lists=False)  # DATA's test list may change: the groups stay
    except UserError:
        if run_counts is None:
            raise
        if {cid: split.train_counts.get(cid) for cid in run_counts} != run_counts:
            raise UserError(f"the split the checkpoint's run used, {split.folder}, counts other training images "
                            f"than the run and than {info.root}: pass --split or --threshold") from None
    if args.threshold is not None and args.threshold != split.threshold:
        raise UserError(f"--threshold {args.threshold:g} and --split {args.split} disagree: the split's head is "
                        f"its top {split.threshold:g}% of classes; pass one of the two")
    args.threshold = split.threshold  # recorded (options.json) as used: test.py's fallback if the split moves
    return split


def describe_classes(info, args, class_ids, train_counts, generated_counts, split=None, listed_counts=None):
    """Head/tail from `split` (grouping_split), or from the real training counts (never
    inflated by --extra) with --threshold: those DATA lists (`listed_counts`), as
    KMDN/dataset_split.py ranks them, also when --skip-bad-images trained on fewer."""
    if split is not None:
        head, tail = split.head, split.tail
        grouping = f"split {split.folder} ({split.threshold:g}% of classes are head)"
    else:
        args.threshold = HEAD_PERCENT if args.threshold is None else args.threshold
        ranked = train_counts if listed_counts is None else listed_counts
        head, tail = map(sorted, head_and_tail(dict(zip(class_ids, ranked)), args.threshold))
        grouping = f"real training counts (top {args.threshold:g}% of classes are head)"
    return Classes(info.name, list(class_ids), [info.class_names[cid] for cid in class_ids], list(train_counts),
                   None if generated_counts is None else list(generated_counts), head, tail, grouping)


def read_baseline(args, info, class_ids):
    """Read --baseline-report up front, so that a wrong path, or a report of other data
    (its line would join another dataset's chart), fails before any work."""
    if args.baseline_report is not None and str(args.baseline_report) == "none":  # as if left out (recorded so)
        args.baseline_report = None
    if args.baseline_report is None:
        return None
    report = read_report(args.baseline_report)
    ids = [row.get("id") for row in report.get("classes", [])]
    if report.get("dataset") != info.name or ids != list(class_ids):
        raise UserError(f"--baseline-report {args.baseline_report} is a report on {report.get('dataset')} with classes "
                        f"{ids}; DATA is {info.name} with {list(class_ids)}")
    # Without classes.json the names are not the dataset's own (ids, or DIOR's or FGSC-23's official list).
    renamed = renamed_report_class(report, info.class_names) if info.has_class_list else None
    if renamed:
        raise UserError(f"--baseline-report {args.baseline_report} names class {renamed[0]} '{renamed[1]}', DATA "
                        f"names it '{renamed[2]}': another dataset or class numbering")
    return report


def evaluation_set(info, label_of, image_size, skip_bad_images=False, cache_dir=None, check=False, draft=True):
    """The test images; `check` (training, which evaluates only after an epoch) decodes them
    all first, so that a bad one stops the run before it trains; `draft=False`
    (--full-decode) decodes JPEGs in full, as the official code does."""
    folder = info.image_root("test")
    if not folder.is_dir():
        raise UserError(f"test folder not found: {folder}")
    samples = drop_unreadable(samples_for(folder, info.entries("test"), label_of), skip_bad_images, "test images",
                              check=check)
    cache = ResizeCache(cache_dir, image_size, draft) if cache_dir is not None else None
    return ImageList(samples, build_transform(image_size, train=False), image_size, cache, draft=draft)


def report_and_figures(model, dataset, classes, out_dir, *, method, source, device, batch_size, workers,
                       pin_memory="auto", amp="off", channels_last=False, baseline=None, cm=None):
    """Evaluate (unless `cm` is given), then write report.{md,csv,json}, confusion_matrix.png and
    long_tail.png into `out_dir`, print the Markdown and return the report. `baseline` is
    another report whose accuracy line joins long_tail.png. Under torchrun every process
    evaluates its share and rank 0 alone writes (the others return None)."""
    if cm is None:
        loader = make_loader(dataset, batch_size, train=False, workers=workers, device=device,
                             pin_memory=pin_memory)
        cm, _ = evaluate(model, loader, device, len(classes.ids), amp=amp, channels_last=channels_last)
    if not dist.is_main():
        return None
    report = build_report(cm, method=method, source=source, dataset=classes.dataset, class_ids=classes.ids,
                          class_names=classes.names, train_counts=classes.train_counts,
                          generated_counts=classes.generated_counts, head=classes.head, tail=classes.tail,
                          grouping=classes.grouping)
    out_dir = Path(out_dir)
    remove_temp_files(out_dir)  # what a report killed mid-write left
    plot_confusion(report, out_dir / "confusion_matrix.png")
    plot_long_tail([baseline, report] if baseline else [report], out_dir / "long_tail.png")
    # report.json last: it marks a complete report (test.py refuses to replace one unasked),
    # so a run stopped while writing leaves none, and its rerun writes the whole report.
    write_report(report, out_dir)
    print(report_markdown(report))
    print(f"wrote {out_dir}/report.md, report.csv, report.json, confusion_matrix.png, long_tail.png")
    return report
