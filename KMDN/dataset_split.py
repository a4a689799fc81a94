"""Split a dataset's classes into head and tail by training-sample count.

    python KMDN/dataset_split.py --data-root DATA --out runs/dior/split

Classes are sorted by training count (descending, ties by class id); the top
--threshold percent are head. Writes split.json (ids, names, counts, groups) and
head/tail annotation lists for train and test that point into DATA: nothing is copied.
"""
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from tgn.class_names import padded  # noqa: E402
from tgn.cli import HEAD_PERCENT, head_percent, make_parser, output_folder  # noqa: E402
from tgn.data import check_outside_dataset, open_dataset  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.run_folder import check_own_run_folder  # noqa: E402
from tgn.split import compute_split, write_split  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data-root", type=Path, required=True, help="dataset folder (train/, test/, anno/)")
    parser.add_argument("--out", type=output_folder, default=Path("runs/split"),
                        help="folder for split.json and the lists")
    parser.add_argument("--threshold", type=head_percent, default=HEAD_PERCENT,
                        help="percent of classes (by training count) that are head; the paper also tried 33")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split in --out")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_own_run_folder(args.out, args, writes="split.json")  # a trainer's run folder: not a split's
    if (args.out / "split.json").exists() and not args.overwrite:
        raise UserError(f"{args.out / 'split.json'} exists; pass --overwrite to replace it")
    info = open_dataset(args.data_root)
    check_outside_dataset(args.out, info.root)
    split, entries = compute_split(info, args.threshold)
    write_split(split, entries, args.out)
    print(f"{info.name}: {len(split.class_names)} classes, {len(split.head)} head / {len(split.tail)} tail "
          f"(threshold {args.threshold:g}%)")
    for rank, cid in enumerate(split.ranking, start=1):
        group = "head" if cid in split.head else "tail"
        print(f"  {rank:3d}. {group}  {cid:4d}  {padded(split.class_names[cid], 28)} train {split.train_counts[cid]:7d}"
              f"  test {split.test_counts[cid]:7d}")
    print(f"wrote {args.out / 'split.json'}")
    for group, trains in (("head", "UModel.py trains nothing"),
                          ("tail", "RModel.py trains nothing, and CDTG's classifier and CLIP losses are 0")):
        if len(getattr(split, group)) == 1:  # cross-entropy over one class is 0 whatever the model says
            hint = "; a --threshold that leaves 2 classes in each group avoids it" if len(split.ranking) >= 4 else ""
            warnings.warn(f"the {group} group has one class: cross-entropy over one class is 0, so {trains}{hint}")
    last_head, first_tail = split.head[-1], split.tail[0]
    if split.train_counts[last_head] == split.train_counts[first_tail]:
        # Ranked by count, then by class id: the folder order, not the data, decides here.
        tied = [cid for cid in split.ranking if split.train_counts[cid] == split.train_counts[last_head]]
        warnings.warn(f"classes {', '.join(map(str, tied))} have {split.train_counts[last_head]} training images each "
                      f"and the head/tail cut falls among them: the lower class ids went to head")
    for group in ("head", "tail"):
        if not sum(split.test_counts[cid] for cid in getattr(split, group)):
            warnings.warn(f"the {group} classes have no test images: KMDN keeps the epoch of best {group} test "
                          f"accuracy, so {'UModel' if group == 'head' else 'RModel'}.py will refuse this split")


if __name__ == "__main__":
    main()
