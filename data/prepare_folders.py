"""Lay out your own dataset, one folder per class, in the layout every stage reads.

    python data/prepare_folders.py --train-dir MINE/train --test-dir MINE/test --out datasets/mine
    python data/prepare_folders.py --train-dir MINE/images --test-fraction 0.2 --out datasets/mine

Each folder in --train-dir is a class. Its name, with underscores read as spaces, becomes
the class name, which CDTG turns into the CLIP prompt "A photo of a {name}"; --class-names
gives other names. Class ids 0, 1, ... follow the folders' names in order, case aside (by
Unicode code point: accented initials after z), or numeric order when every folder name is
a number. --test-dir holds folders of the same names (a class may have none); without a
test set, --test-fraction holds out that fraction of every class's images (at least one of
a class with two or more), chosen at random with --seed. Images (.jpg .jpeg .jfif .png .bmp
.tif .tiff .webp) directly inside the class folders are read; hidden entries are not, and
hidden folders of images and images of other types are named in a warning. Each is decoded once as a check, then copied
under its own file name, or linked with --link hard|symlink.
"""
import random
import re
import sys
import unicodedata
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.chips import existing_dir, is_hidden  # noqa: E402
from data.folders import (  # noqa: E402
    OTHER_IMAGE_TYPES, add_link_argument, case_aside, check_not_training_images, class_folders, composed,
    is_broken_image_link, is_image_file, list_class_images, prepare_folder_dataset,
)
from data.output import add_output_arguments  # noqa: E402
from tgn.class_names import class_name_key  # noqa: E402
from tgn.cli import make_parser, open_fraction, seed_value  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import file_sha256, read_json  # noqa: E402

# The dataset's name becomes the annotation files' names: anno/<NAME>_train.txt.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_args(argv):
    parser = make_parser(__doc__)
    parser.add_argument("--train-dir", type=Path, required=True, help="one folder of training images per class")
    parser.add_argument("--test-dir", type=Path, default=None,
                        help="one folder of test images per class, named as in --train-dir")
    parser.add_argument("--test-fraction", type=open_fraction, default=None,
                        help="without --test-dir: hold out this fraction of each class's images as the test set")
    parser.add_argument("--seed", type=seed_value, default=0, help="which images --test-fraction holds out")
    parser.add_argument("--class-names", type=Path, default=None,
                        help='JSON {"folder name": "class name", ...} for names other than the folders\'')
    parser.add_argument("--dataset", default=None,
                        help="the dataset's name, used in anno/NAME_train.txt (default: --out's folder name)")
    add_link_argument(parser)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if (args.test_dir is None) == (args.test_fraction is None):
        parser.error("give either --test-dir or --test-fraction")
    return args


def folder_order(folders):
    """By name, case aside (code-point order of the composed form), or numeric when every
    name is a number ('2' before '10')."""
    if all(name.isdecimal() for name in folders):
        return sorted(folders, key=int)
    return sorted(folders, key=lambda name: (case_aside(name), composed(name)))


def class_names_for(folders, names_path):
    """{class id: name} in folder order, from the folder names or --class-names."""
    names = {folder: " ".join(composed(folder).replace("_", " ").split()) or folder for folder in folders}
    if names_path is not None:
        given = read_json(names_path, "--class-names")
        if not isinstance(given, dict) or not all(isinstance(name, str) for name in given.values()):
            raise UserError(f'--class-names {names_path}: expected a JSON object {{"folder name": "class name"}}')
        empty = [folder for folder, name in given.items() if not name.strip()]
        if empty:
            raise UserError(f"--class-names {names_path}: the class name of {empty[0]!r} is empty; give it a name, or "
                            "leave the folder out of the file to keep its folder name")
        broken = [name for name in given.values() if any(unicodedata.category(char) == "Cc" for char in name.strip())]
        if broken:  # a line break or tab would split the name in prompts, tables and reports
            raise UserError(f"--class-names {names_path}: the class name {broken[0]!r} holds a control character "
                            "(a line break, a tab); write it on one line")
        # A name typed in one Unicode form matches a folder stored in the other (macOS: NFD).
        by_form = {composed(folder): folder for folder in folders}
        unknown = sorted(key for key in given if composed(key) not in by_form)
        if unknown:
            raise UserError(f"--class-names {names_path}: {unknown[0]!r} is not a class folder of --train-dir")
        names.update({by_form[composed(key)]: name.strip() for key, name in given.items()})
    seen = {}
    # CLIP's tokenizer lower-cases ('Ship' and 'ship' are one prompt), and checkpoints, reports and
    # generated folders compare names with spelling aside ('storage-tank', 'storage tank').
    for folder in folders:
        key = class_name_key(names[folder])
        if key in seen:
            first = names[seen[key]]
            named = (f"both have the class name {first!r}" if first == names[folder]
                     else f"have the class names {first!r} and {names[folder]!r}")
            raise UserError(f"class folders {seen[key]!r} and {folder!r} {named} (letter case, spaces, hyphens and "
                            "underscores aside: one name); give them distinct names with --class-names")
        seen[key] = folder
    if all(folder.isdecimal() for folder in folders) and names_path is None:
        warnings.warn("the class folders are numbers, so the class names (and CDTG's CLIP prompts, 'A photo "
                         "of a 3') are too; --class-names gives them names")
    return {cid: names[folder] for cid, folder in enumerate(folders)}


def hold_out(train_images, fraction_held, seed):
    """Split each class's images into (train, test) pairs of lists: round(fraction x n) test
    images, at least 1 (every class is measured) and at most n - 1 (every class keeps a
    training image)."""
    train, test = {}, {}
    for folder, paths in train_images.items():
        # A generator per class: adding a class or images to one leaves the others' choice.
        shuffled = random.Random(f"{seed}/{composed(folder)}").sample(paths, len(paths))
        held = min(max(round(fraction_held * len(paths)), 1), len(paths) - 1)
        test[folder] = sorted(shuffled[:held])
        train[folder] = sorted(shuffled[held:])
    return train, test


def check_has_images(folder):
    """A training class folder must hold images (it may hold other files too)."""
    entries = [entry for entry in folder.iterdir() if not is_hidden(entry)]
    if any(is_image_file(entry) or is_broken_image_link(entry) for entry in entries):  # the latter: named later
        return
    if any(entry.is_dir() for entry in entries):
        raise UserError(f"--train-dir: class folder {folder} holds folders but no images; is --train-dir "
                        "one level above the class folders?")
    others = [entry.name for entry in entries if entry.suffix.lower() in OTHER_IMAGE_TYPES]
    if others:
        raise UserError(f"--train-dir: class folder {folder} holds no images of the types read ({len(others)} of "
                        f"other types, e.g. {others[0]}): convert them to JPEG or PNG")
    raise UserError(f"--train-dir: class folder {folder} holds no images (a class needs training images; "
                    "remove the folder or fill it)")


def list_subsets(args):
    """{subset: {folder: [image paths]}} and the class folders in id order."""
    train_dir = existing_dir(args.train_dir, "--train-dir")
    folders = folder_order([entry.name for entry in class_folders(train_dir)])
    if not folders:
        raise UserError(f"--train-dir {train_dir}: no class folders (one folder of images per class)")
    for folder in folders:
        check_has_images(train_dir / folder)
    train = list_class_images(train_dir, set(folders), "--train-dir", lambda folder: "")
    if args.test_dir is None:
        train, test = hold_out(train, args.test_fraction, args.seed)
        warn_copies(train, test, "--train-dir (the copies of a class may be held out apart)")
    else:
        test_dir = existing_dir(args.test_dir, "--test-dir")
        test = list_class_images(test_dir, set(folders), "--test-dir", lambda folder: (
            f"--test-dir: folder {folder} is not a class of --train-dir (a test class needs training images)"))
        check_not_training_images([path for paths in train.values() for path in paths],
                                  [path for paths in test.values() for path in paths])
        warn_copies(train, test, "--test-dir or --train-dir")
    without_test = [folder for folder in folders if not test.get(folder)]
    if len(without_test) == len(folders):
        raise UserError("no class has a test image: every class has one training image; give --test-dir")
    if without_test:
        warnings.warn(f"{len(without_test)} of {len(folders)} classes have no test images, e.g. {without_test[0]!r}: "
                      "their accuracy is n/a, and KMDN stops if all head or all tail classes have none")
    return {"train": train, "test": test}, folders


def warn_copies(train, test, remove_from):
    """Warn of images whose bytes are another image's: a test image that is a training image
    of its class inflates test accuracy; an image in two classes (in either subset) has one
    label wrong. Only files of one size with another file of another class or subset are
    read."""
    by_size = {}
    for subset, by_folder in (("train", train), ("test", test)):
        for folder, paths in by_folder.items():
            for path in paths:
                by_size.setdefault(path.stat().st_size, []).append((subset, folder, path))
    by_digest = {}
    for members in by_size.values():
        if len({(subset, folder) for subset, folder, _ in members}) > 1:
            for member in members:
                by_digest.setdefault(file_sha256(member[2]), []).append(member)
    test_copies, two_classes = [], []
    for members in by_digest.values():
        trained = {folder for subset, folder, _ in members if subset == "train"}
        test_copies += [(folder, path) for subset, folder, path in members if subset == "test" and folder in trained]
        folders = sorted({folder for _, folder, _ in members})
        if len(folders) > 1:
            two_classes.append([next(path for _, f, path in members if f == folder) for folder in folders[:2]])
    if test_copies:
        folder, path = test_copies[0]
        warnings.warn(f"{len(test_copies)} test images are copies of a training image of their class (the same "
                      f"bytes), e.g. {path.name!r} in {folder!r}: they inflate test accuracy; remove them from "
                      f"{remove_from}")
    if two_classes:
        first, second = two_classes[0]
        warnings.warn(f"{len(two_classes)} images are in two or more classes (the same bytes), e.g. {first} and "
                      f"{second}: one of their labels is wrong; remove the wrong copies")


def dataset_name(args):
    name = args.dataset or Path(args.out).resolve().name
    if not DATASET_NAME.fullmatch(name):
        given = "--dataset" if args.dataset else "the dataset name (--out's folder name)"
        raise UserError(f"{given} {name!r}: use letters, digits, '.', '_' and '-' (it names the annotation "
                        f"files){'' if args.dataset else '; pass --dataset NAME'}")
    return name


@cli_main
def main(argv=None):
    args = parse_args(argv)
    name = dataset_name(args)
    images, folders = list_subsets(args)
    class_names = class_names_for(folders, args.class_names)
    class_ids = {folder: cid for cid, folder in enumerate(folders)}
    sources = {subset: [(path, class_ids[folder]) for folder in folders for path in by_folder.get(folder, [])]
               for subset, by_folder in images.items()}
    prepare_folder_dataset(args, name, class_names, sources,
                           inputs=[args.train_dir] + ([args.test_dir] if args.test_dir else []))


if __name__ == "__main__":
    main()
