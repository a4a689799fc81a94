"""Prepare the tail-class data of CDTG from the head/tail split.

    python CDTG/dataset_split.py --split runs/dior/split --out runs/dior/cdtg/data

Writes tail_classes.json (generator label -> dataset class id, name, CLIP prompt) and
train.txt (the tail training images, pointing into DATA: nothing is copied). Edit the
prompts in tail_classes.json if a class name reads badly in English.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from CDTG.config import DEFAULT_PROMPT  # noqa: E402
from tgn.cli import add_split_args, make_parser, output_folder  # noqa: E402
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    add_split_args(parser)
    parser.add_argument("--out", type=output_folder, default=Path("runs/cdtg/data"),
                        help="folder for the tail-class data")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="CLIP prompt template; {name} is the class name")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tail-class data in --out")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from CDTG.tail_data import write_tail_data  # torch loads after the flags: --help answers at once
    write_tail_data(args)


if __name__ == "__main__":
    main()
