"""Train the tail model M_T on the tail classes (official defaults: ResNet-50, ImageNet
init, Adam 1e-3, weight decay 1e-4, batch 32, 100 epochs, lr / 10 after epochs 30, 60, 90; the official RModel
file's 1 epoch is a leftover, the paper trains both models alike).

    python KMDN/RModel.py --split runs/dior/split --out runs/dior/kmdn

Writes runs/dior/kmdn/tail/{best,last}.pth, metrics.jsonl (one line per epoch) and options.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from KMDN.flags import group_parser  # noqa: E402
from tgn.errors import cli_main, signals_held  # noqa: E402


@cli_main
def main(argv=None):
    args = group_parser(__doc__, "tail").parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from KMDN.group_training import train_group  # torch loads after the flags: --help answers at once
    return train_group(args)


if __name__ == "__main__":
    main()
