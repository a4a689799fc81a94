"""Lay FGSC-23 out in the dataset layout every stage reads (it is one ship per image already).

    python data/prepare_fgsc23.py --src /path/to/FGSC-23 --out DATA/FGSC23

--src holds train/ and test/ (flags --train-dir, --test-dir), each with one folder per
class named by its class id 0..22, as in the public release. A release whose folders are
named otherwise needs --class-map, a JSON object {"folder name": class_id, ...}.
Images keep their file names; they are copied, or linked with --link hard|symlink.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.chips import existing_dir, warn_of_untested_classes  # noqa: E402
from data.folders import (add_link_argument, check_not_training_images, list_class_images,  # noqa: E402
                          prepare_folder_dataset)
from data.output import add_output_arguments  # noqa: E402
from tgn.class_names import FGSC23_CLASSES  # noqa: E402
from tgn.cli import make_parser  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import read_json  # noqa: E402

DATASET = "FGSC23"


def parse_args(argv):
    parser = make_parser(__doc__)
    parser.add_argument("--src", type=Path, default=None,
                        help="the unpacked FGSC-23 release (not needed with --train-dir and --test-dir)")
    parser.add_argument("--train-dir", type=Path, default=None, help="training class folders (if unset: SRC/train)")
    parser.add_argument("--test-dir", type=Path, default=None, help="test class folders (if unset: SRC/test)")
    parser.add_argument("--class-map", type=Path, default=None,
                        help='JSON {"folder name": class_id} for folders not named 0..22')
    add_link_argument(parser)
    add_output_arguments(parser)
    return parser.parse_args(argv)


def folder_class_ids(class_map_path):
    """{folder name: class id}: the release's '0'..'22', or the user's --class-map."""
    if class_map_path is None:
        return {str(cid): cid for cid in range(len(FGSC23_CLASSES))}
    mapping = read_json(class_map_path, "--class-map")
    # JSON true/false are ints to Python: refuse them explicitly.
    if not isinstance(mapping, dict) or not all(isinstance(cid, int) and not isinstance(cid, bool)
                                                for cid in mapping.values()):
        raise UserError(f"--class-map {class_map_path}: expected a JSON object {{\"folder name\": class_id}}")
    bad = sorted(cid for cid in mapping.values() if not 0 <= cid < len(FGSC23_CLASSES))
    if bad:
        raise UserError(f"--class-map {class_map_path}: class id {bad[0]} is not in 0..{len(FGSC23_CLASSES) - 1}")
    return mapping


def list_images(subset_dir, class_ids, flag, mapped):
    """(source path, class id) for every image of every class folder in `subset_dir`."""
    def unknown_folder(folder):
        remedy = "add it to --class-map" if mapped else "pass --class-map to name it"
        return f"{flag}: folder {folder} is not {'in --class-map' if mapped else 'a class id 0..22'}; {remedy}"

    images = list_class_images(subset_dir, class_ids, flag, unknown_folder)
    return [(path, class_ids[folder]) for folder, paths in images.items() for path in paths]


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.src is None and (args.train_dir is None or args.test_dir is None):
        raise UserError("pass --src, the unpacked FGSC-23 release (or both --train-dir and --test-dir)")
    if args.src is not None:
        existing_dir(args.src, "--src")
    subset_dirs = {
        "train": existing_dir(args.train_dir or args.src / "train", "--train-dir"),
        "test": existing_dir(args.test_dir or args.src / "test", "--test-dir"),
    }
    class_ids = folder_class_ids(args.class_map)
    sources = {subset: list_images(folder, class_ids, f"--{subset}-dir", args.class_map is not None)
               for subset, folder in subset_dirs.items()}
    check_not_training_images([path for path, _ in sources["train"]], [path for path, _ in sources["test"]])
    class_names = dict(enumerate(FGSC23_CLASSES))
    trained = {cid for _, cid in sources["train"]}
    missing = [cid for cid in class_names if cid not in trained]
    if missing:  # classes.json lists all 23: every stage would stop at a class without training images
        folders = [folder for folder, cid in class_ids.items() if cid == missing[0]]
        where = f"its folder {folders[0]} is missing or empty" if folders else "no folder of --class-map maps to it"
        raise UserError(f"--train-dir {subset_dirs['train']}: class {missing[0]} ({class_names[missing[0]]}) has no "
                        f"training images ({where})")
    tested = {cid for _, cid in sources["test"]}
    warn_of_untested_classes([cid for cid in class_names if cid not in tested], class_names, "test images")
    inputs = [folder for folder in (args.src, *subset_dirs.values()) if folder is not None]
    prepare_folder_dataset(args, DATASET, class_names, sources, inputs=inputs)


if __name__ == "__main__":
    main()
