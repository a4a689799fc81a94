"""Evaluate a classifier on DATA's test images and write its report.

    python Classification/test.py --data-root DATA --ckpt runs/dior/cls/best.pth --split runs/dior/split
    python Classification/test.py --data-root DATA --ckpt result.pth      # the released weights

--ckpt is one of our checkpoints (it names its classes) or the official bare state dict
result.pth (ResNet-50, fc.0.*; loaded with strict=True, its outputs are DATA's sorted class
ids). Head/tail come from --split, or from the real training counts the checkpoint recorded
(else DATA's; top --threshold % head); without either, from what the checkpoint's run used
(40% for result.pth).
Reports overall accuracy, mean per-class accuracy, head and tail means, macro-F1 and a
per-class table; writes report.md/.csv/.json, confusion_matrix.png and long_tail.png to
--out (default: beside the checkpoint, test-<checkpoint name>/, next to the report-best/ that
train.py wrote); a report already there is replaced only with --overwrite. Under torchrun
each process evaluates its share of the test images and rank 0 writes the report.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from Classification.flags import DEFAULT_IMAGE_SIZE, add_report_args  # noqa: E402
from tgn.cli import (  # noqa: E402
    add_full_decode_arg, add_precision_args, add_runtime_args, make_parser, output_folder, positive_int,
)
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset folder (test/, anno/) (default: the one --split was made on, else the one "
                             "the checkpoint's run trained on)")
    parser.add_argument("--ckpt", type=Path, required=True, help="our checkpoint or the official result.pth")
    parser.add_argument("--out", type=output_folder, default=None,
                        help="report folder (default CKPT_DIR/test-CKPT_NAME)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per model call")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"input size (default: the checkpoint's training size, else {DEFAULT_IMAGE_SIZE})")
    add_precision_args(parser, default="off")  # off: the report's figures in fp32, as the trainers' own reports
    add_full_decode_arg(parser, "; for figures comparable image for image with the official test.py's",
                        default="by default as the checkpoint's run decoded them: in full for a bare state dict "
                                "such as result.pth, else as its run's --full-decode said")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    add_report_args(parser, from_run=True)
    add_runtime_args(parser)
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from Classification.scoring import score_checkpoint  # torch loads after the flags: --help answers at once
    return score_checkpoint(args)


if __name__ == "__main__":
    main()
