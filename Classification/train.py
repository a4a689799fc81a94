"""Train the final classifier on DATA's training images plus generated tail images.

    python Classification/train.py --data-root DATA --extra runs/dior/generated --out runs/dior/cls

Without --extra this is the paper's baseline. Official defaults: torchvision ResNet-50 with
fc = Sequential(Linear(2048, C)) (the layout of result.pth), ImageNet init, Adam lr 1e-3,
weight decay 1e-4, batch 32, 50 epochs, lr / 10 after epoch 30, 224 px, horizontal flip,
Normalize(0.5, 0.5). Output index = rank of the class id among DATA's class ids.

--extra DIR (repeatable) adds a generated folder: DIR/anno.txt with lines
"<class_id>/<file> <class_id>" relative to DIR, images in DIR/<class_id>/<file>.
Long-tail baselines in the same harness:
    --sampler class-balanced   re-sampling: every class equally likely in a batch
    --loss balanced-softmax    cross-entropy on logits + log(class prior) (Ren et al. 2020)

Writes OUT/{best,last}.pth, metrics.jsonl (one line per epoch), options.json, and the
report of best.pth in OUT/report-best/ (report.md/.csv/.json, confusion_matrix.png,
long_tail.png), what `Classification/test.py --ckpt OUT/best.pth` writes (to OUT/test-best/).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from Classification.flags import LOSSES, SAMPLERS, add_report_args  # noqa: E402
from tgn.cli import add_model_args, add_output_args, add_runtime_args, add_training_args, make_parser  # noqa: E402
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset folder (train/, test/, anno/) (default: the one --split was made on)")
    parser.add_argument("--extra", action="append", default=[], metavar="DIR", type=Path,
                        help="generated folder with DIR/anno.txt; repeat for several")
    parser.add_argument("--sampler", choices=SAMPLERS, default="random",
                        help="class-balanced: re-sample so that every class is equally likely")
    parser.add_argument("--loss", choices=LOSSES, default="ce",
                        help="balanced-softmax: logit adjustment by the training class priors")
    add_model_args(parser, width=False)
    add_training_args(parser, epochs=50, batch_size=32)
    add_report_args(parser)
    add_runtime_args(parser)
    add_output_args(parser, "runs/cls")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from Classification.training import train_classifier  # torch loads after the flags: --help answers at once
    return train_classifier(args)


if __name__ == "__main__":
    main()
