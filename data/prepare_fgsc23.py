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

import os  # noqa: E402
import shutil  # noqa: E402

from PIL import Image, UnidentifiedImageError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.chips import (  # noqa: E402
    IMAGE_SUFFIXES, Tally, add_output_arguments, existing_dir, make_class_dirs, prepare_output, report,
    write_dataset,
)
from tgn.data import Entry  # noqa: E402
from tgn.cli import make_parser  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import read_json  # noqa: E402

DATASET = "FGSC23"
FGSC23_CLASSES = (
    "non-ship", "air carrier", "destroyer", "landing craft", "frigate", "amphibious transport dock",
    "cruiser", "Tarawa-class amphibious assault ship", "amphibious assault ship", "command ship",
    "submarine", "medical ship", "combat boat", "auxiliary ship", "container ship", "car carrier",
    "hovercraft", "bulk carrier", "oil tanker", "fishing boat", "passenger ship", "liquefied gas ship",
    "barge",
)


def parse_args(argv):
    parser = make_parser(__doc__)
    parser.add_argument("--src", type=Path, required=True, help="the unpacked FGSC-23 release")
    parser.add_argument("--train-dir", type=Path, default=None, help="training class folders (if unset: SRC/train)")
    parser.add_argument("--test-dir", type=Path, default=None, help="test class folders (if unset: SRC/test)")
    parser.add_argument("--class-map", type=Path, default=None,
                        help='JSON {"folder name": class_id} for folders not named 0..22')
    parser.add_argument("--link", choices=("hard", "symlink"), default=None,
                        help="link the images instead of copying them")
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
    """(source path, class id) for every image of every class folder in `subset_dir`, each
    checked to decode; other entries are counted and named."""
    pairs, ignored = [], []
    for entry in sorted(subset_dir.iterdir()):
        if not entry.is_dir():
            ignored.append(entry)
            continue
        if entry.name not in class_ids:
            remedy = "add it to --class-map" if mapped else "pass --class-map to name it"
            raise UserError(f"{flag}: folder {entry} is not {'in --class-map' if mapped else 'a class id 0..22'}; "
                            f"{remedy}")
        for path in sorted(entry.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                check_image(path)
                pairs.append((path, class_ids[entry.name]))
            else:
                ignored.append(path)
    if not pairs:
        raise UserError(f"{flag}: no images in the class folders of {subset_dir}")
    if ignored:
        print(f"{flag}: ignored {len(ignored)} entries that are not images in class folders, e.g. {ignored[0]}")
    return pairs


def check_image(path):
    """Copying never decodes: check here that the file is an image, as cropping does."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def place(source, target, link):
    try:
        if link == "hard":
            os.link(source, target)
        elif link == "symlink":
            os.symlink(source.resolve(), target)
        else:
            shutil.copyfile(source, target)
    except OSError as exc:
        hint = " (hard links need --out on the same file system; try --link symlink)" if link == "hard" else ""
        raise UserError(f"cannot place {source} at {target}: {exc.strerror or exc}{hint}") from exc


@cli_main
def main(argv=None):
    args = parse_args(argv)
    existing_dir(args.src, "--src")
    subset_dirs = {
        "train": existing_dir(args.train_dir or args.src / "train", "--train-dir"),
        "test": existing_dir(args.test_dir or args.src / "test", "--test-dir"),
    }
    class_ids = folder_class_ids(args.class_map)
    sources = {subset: list_images(folder, class_ids, f"--{subset}-dir", args.class_map is not None)
               for subset, folder in subset_dirs.items()}
    class_names = dict(enumerate(FGSC23_CLASSES))
    out = prepare_output(args.out, args.overwrite, inputs=[args.src, *subset_dirs.values()])
    make_class_dirs(out, class_names)
    tally = Tally()
    for subset, pairs in sources.items():
        for source, class_id in tqdm(pairs, desc=subset, unit="image", dynamic_ncols=True):
            relpath = f"{class_id}/{source.name}"
            target = out / subset / relpath
            if target.exists():
                raise UserError(f"{source}: two folders map to class {class_id} with the same file name {source.name}")
            place(source, target, args.link)
            tally.entries[subset].append(Entry(relpath, class_id))
    write_dataset(out, DATASET, class_names, tally)
    report(DATASET, out, class_names, tally)


if __name__ == "__main__":
    main()
