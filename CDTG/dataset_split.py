"""Prepare the tail-class data of CDTG from the head/tail split.

    python CDTG/dataset_split.py --split runs/dior/split --out runs/dior/cdtg/data

Writes tail_classes.json (generator label -> dataset class id, name, CLIP prompt) and
train.txt (the tail training images, pointing into DATA: nothing is copied). Edit the
prompts in tail_classes.json if a class name reads badly in English.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from CDTG.clip_loss import tokenize_prompts  # noqa: E402
from CDTG.tail_data import DEFAULT_PROMPT, IMAGE_LIST, MANIFEST, TailClasses  # noqa: E402
from tgn.cli import make_parser, output_folder  # noqa: E402
from tgn.data import open_dataset, write_annotation  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import make_folder  # noqa: E402
from tgn.split import check_split_matches, load_split  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--split", type=Path, default=Path("runs/split"), help="folder made by KMDN/dataset_split.py")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved since the split")
    parser.add_argument("--out", type=output_folder, default=Path("runs/cdtg/data"),
                        help="folder for the tail-class data")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="CLIP prompt template; {name} is the class name")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tail-class data in --out")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if "{name}" not in args.prompt:
        raise UserError("--prompt must contain {name}")
    try:
        args.prompt.format(name="")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--prompt {args.prompt!r}: only {{name}} may stand in braces (write {{{{ and }}}} for a "
                        f"brace itself); {type(exc).__name__}: {exc}") from exc
    if (args.out / MANIFEST).exists() and not args.overwrite:
        raise UserError(f"{args.out / MANIFEST} exists; pass --overwrite to replace it")
    split = load_split(args.split, data_root=args.data_root)
    check_split_matches(split, open_dataset(split.data_root))
    entries = split.entries("tail", "train")
    classes = [
        {"label": label, "id": cid, "name": split.class_names[cid],
         "prompt": args.prompt.format(name=split.class_names[cid]), "train_count": split.train_counts[cid]}
        for label, cid in enumerate(split.tail)
    ]
    tokenize_prompts([cls["prompt"] for cls in classes])  # CLIP takes at most 77 tokens
    tail = TailClasses(args.out, split.data_root, classes, split.fingerprint)
    make_folder(args.out)
    write_annotation(args.out / IMAGE_LIST, entries)
    tail.write()
    print(f"{len(classes)} tail classes, {len(entries)} training images")
    for cls in classes:
        print(f"  label {cls['label']:2d}  class {cls['id']:4d}  {cls['train_count']:6d} images  \"{cls['prompt']}\"")
    print(f"wrote {args.out / MANIFEST}")


if __name__ == "__main__":
    main()
