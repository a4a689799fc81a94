"""Knowledge mutual distillation of the head model M_H and the tail model M_T.

    python KMDN/Distill.py --split runs/dior/split --out runs/dior/kmdn

Reads OUT/head/best.pth and OUT/tail/best.pth (from UModel.py / RModel.py; official bare
state dicts work too via --head-ckpt / --tail-ckpt). For the first --distill-interval
epochs M_T teaches M_H on head data, then M_H teaches M_T on tail data, alternating.
Loss = CE + alpha * MSE(student layer3, teacher layer3); the teacher is frozen.
Writes OUT/distill/M_T.pth (the distilled tail model that CDTG/train.py reads by
default), OUT/distill/M_H.pth, last.pth (for --resume), metrics.jsonl, options.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from KMDN.flags import OFFICIAL_IMAGE_SIZE  # noqa: E402
from tgn.cli import (add_output_args, add_runtime_args, add_split_args, add_training_args, make_parser,  # noqa: E402
                     non_negative_float, positive_int)
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    add_split_args(parser)
    parser.add_argument("--head-ckpt", type=Path, default=None, help="M_H checkpoint (default OUT/head/best.pth)")
    parser.add_argument("--tail-ckpt", type=Path, default=None, help="M_T checkpoint (default OUT/tail/best.pth)")
    parser.add_argument("--alpha", type=non_negative_float, default=0.2, help="weight of the layer3 feature MSE")
    parser.add_argument("--distill-interval", type=positive_int, default=50, help="epochs before the roles switch")
    parser.add_argument("--keep-fc", action="store_true",
                        help="each student keeps its trained classifier (fc); by default, as in the official Distill, "
                             "which loads M_H and M_T without it, the fc layer is drawn again when the model first "
                             "learns (its layer3 features are what the teacher is compared on)")
    add_training_args(parser, epochs=100, batch_size=64, image_size=None,
                      image_size_help="images are resized to this square size (default: the size M_H and M_T were "
                                      f"trained at; {OFFICIAL_IMAGE_SIZE} for official files)")
    add_runtime_args(parser)
    add_output_args(parser, "runs/kmdn",
                    "folder of the KMDN runs: writes OUT/distill (M_H and M_T from OUT/head, OUT/tail)")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from KMDN.distillation import run_distillation  # torch loads after the flags: --help answers at once
    return run_distillation(args)


if __name__ == "__main__":
    main()
