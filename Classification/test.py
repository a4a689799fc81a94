"""Evaluate a classifier on DATA's test images and write its report.

    python Classification/test.py --data-root DATA --ckpt runs/dior/cls/best.pth --split runs/dior/split
    python Classification/test.py --data-root DATA --ckpt result.pth      # the released weights

--ckpt is one of our checkpoints (it names its classes) or the official bare state dict
result.pth (ResNet-50, fc.0.*; loaded with strict=True, its outputs are DATA's sorted class
ids). Head/tail come from --split, or from DATA's real training counts (top --threshold %
head); without either, from what the checkpoint's run used (40% for result.pth).
Reports overall accuracy, mean per-class accuracy, head and tail means, macro-F1 and a
per-class table; writes report.md/.csv/.json, confusion_matrix.png and long_tail.png to
--out (default: beside the checkpoint, test-<checkpoint name>/, next to the report-best/ that
train.py wrote); a report already there is replaced only with --overwrite. Under torchrun
each process evaluates its share of the test images and rank 0 writes the report.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import torch  # noqa: E402

from Classification.model import check_classes, load_classifier  # noqa: E402
from Classification.report import REPORT_JSON  # noqa: E402
from Classification.samples import class_order, count_per_class  # noqa: E402
from Classification.stage import (DEFAULT_THRESHOLD, add_report_args, default_report_folder,  # noqa: E402
                                  describe_classes, evaluation_set, grouping_split, read_baseline,
                                  report_and_figures)
from tgn import distributed as dist  # noqa: E402
from tgn.cli import add_runtime_args, make_parser, output_folder, positive_int  # noqa: E402
from tgn.compat import check_amp  # noqa: E402
from tgn.data import open_dataset  # noqa: E402
from tgn.errors import cli_main, speaks  # noqa: E402
from tgn.io import check_run_dir  # noqa: E402

DEFAULT_IMAGE_SIZE = 224


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data-root", type=Path, required=True, help="dataset folder (test/, anno/)")
    parser.add_argument("--ckpt", type=Path, required=True, help="our checkpoint or the official result.pth")
    parser.add_argument("--out", type=output_folder, default=None,
                        help="report folder (default CKPT_DIR/test-CKPT_NAME)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per model call")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"input size (default: the checkpoint's training size, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision on GPUs")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    add_report_args(parser, from_run=True)
    add_runtime_args(parser)
    return parser


def groups_from_run(args, options):
    """Without --split and --threshold, head/tail as the checkpoint's run grouped them (its
    options; the official result.pth has none: the paper's 40%)."""
    if args.split is not None or args.threshold is not None:  # grouping_split checks the two agree
        return
    if options.get("split") and Path(options["split"]).is_dir():
        args.split = Path(options["split"])  # its threshold comes with it
        return
    args.threshold = options.get("threshold", DEFAULT_THRESHOLD)
    if options.get("split") and speaks():  # before the processes join: once per node
        print(f"warning: the split the checkpoint's run used, {options['split']}, is not found; head/tail from "
              f"DATA's training counts with --threshold {args.threshold:g} (pass --split)", file=sys.stderr)


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_amp(args.amp, dist.process_device(args.device), training=False)
    out_dir = args.out or default_report_folder(args.ckpt)
    check_run_dir(out_dir, overwrite=args.overwrite, results=(REPORT_JSON,), resumable=False)
    info = open_dataset(args.data_root)
    class_ids, label_of = class_order(info)
    baseline = read_baseline(args, info, class_ids)
    model, meta = load_classifier(args.ckpt)
    named = [info.class_names[cid] for cid in class_ids] if info.has_class_list else None  # else names are ids
    check_classes(meta, model, class_ids, args.ckpt, args.data_root, named)
    data_counts = count_per_class(info.entries("train", check_files=False), class_ids)
    train_counts = meta.get("train_counts") or data_counts  # the official result.pth records none
    if list(train_counts) != list(data_counts) and speaks():
        print(f"warning: {args.data_root} has other training images per class than {args.ckpt} was trained on; "
              "the report counts and groups them as its run did", file=sys.stderr)
    options = meta.get("options", {})
    groups_from_run(args, options)
    classes = describe_classes(info, args, class_ids, train_counts, meta.get("generated_counts"),
                               grouping_split(args, info))
    image_size = args.image_size or options.get("image_size", DEFAULT_IMAGE_SIZE)
    dataset = evaluation_set(info, label_of, image_size, args.skip_bad_images)

    device = dist.init(args.device)
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


if __name__ == "__main__":
    main()
