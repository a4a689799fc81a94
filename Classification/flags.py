"""Flags that train.py and test.py share, kept free of torch so that --help and a mistyped
flag answer at once (importing torch and torchvision takes seconds)."""
from pathlib import Path

from tgn.cli import HEAD_PERCENT, head_percent

SAMPLERS = ("random", "class-balanced")  # see long_tail.py
LOSSES = ("ce", "balanced-softmax")
DEFAULT_IMAGE_SIZE = 224  # test.py's, for checkpoints that do not record theirs (result.pth)


def default_report_folder(ckpt):
    """Where test.py writes the report of `ckpt` without --out."""
    return Path(ckpt).parent / f"test-{Path(ckpt).stem}"


def add_report_args(parser, from_run=False):
    """`from_run`: --split and --threshold default to the ones the checkpoint's run used
    (test.py), so that its report groups the classes as the run's own report did."""
    group = parser.add_argument_group("report")
    split_default = " (default: the split the checkpoint's run used, if any)" if from_run else ""
    threshold_default = (f"the checkpoint's run's, else {HEAD_PERCENT:g}" if from_run
                         else f"{HEAD_PERCENT:g}")
    group.add_argument("--split", type=Path, default=None,
                       help="head/tail from this split folder (KMDN/dataset_split.py); without it they are "
                            f"recomputed from DATA's real training counts with --threshold{split_default}")
    group.add_argument("--threshold", type=head_percent, default=None,  # None: not given, so --split may set it
                       help="percent of classes (ranked by real training count) that are head, without --split "
                            f"(default: {threshold_default})")
    group.add_argument("--name", default=None,
                       help="method name in the report and comparison table (default: train.py names the method "
                            "from its flags, e.g. 'TGN', 're-sampling', 'baseline'; test.py takes the checkpoint's)")
    baseline_default = " (default: the one the checkpoint's run drew, if any)" if from_run else ""
    group.add_argument("--baseline-report", type=Path, default=None,
                       help="report.json (or its folder) of the baseline: its accuracy line joins long_tail.png "
                            "('none': without one, where a resumed run or a checkpoint recorded one)"
                            + baseline_default)
    return group
