"""Crop DOTA v1.0 into one chip per object, in the dataset layout every stage reads.

    python data/prepare_dota.py --src /path/to/DOTA --out DATA/DOTA --workers 8

--src holds one folder per official split, each with images/ (PNG scenes) and labelTxt/
(one file per scene, one object per line: "x1 y1 x2 y2 x3 y3 x4 y4 class difficult", after
optional "imagesource:..." and "gsd:..." header lines). Our train set comes from the train
split and our test set from val (DOTA's test labels are not public); --train-splits,
--test-splits, --images-subdir and --labels-subdir change that.

Each chip is the polygon's axis-aligned bounding rectangle, clipped to the scene, saved as
DATA/<subset>/<class_id>/<scene>_<k>.jpg (k: the object's line among the object lines).
Class ids follow the DOTA devkit order (0 plane ... 14 helicopter); classes.json keeps it.
"""
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections import Counter  # noqa: E402

from data.chips import (  # noqa: E402
    ChipObject, SourceImage, add_crop_arguments, check_disjoint, class_lookup,
    comma_list, existing_dir, find_class, index_images, is_hidden, polygon_bounds, prepare_chips, read_release_text,
)
from data.output import add_output_arguments  # noqa: E402
from tgn.class_names import DOTA_CLASSES, class_name_key  # noqa: E402
from tgn.cli import make_parser  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402

DATASET = "DOTA"
SKIP_DIFFICULT = "difficult (--skip-difficult)"
SKIPPED_CLASS = "class {} (--skip-classes)"
LATER_CLASSES = frozenset(map(class_name_key, ("container-crane", "airport", "helipad")))  # of v1.5 and 2.0


def parse_args(argv):
    parser = make_parser(__doc__)
    parser.add_argument("--src", type=Path, required=True, help="folder holding the DOTA split folders")
    parser.add_argument("--train-splits", type=comma_list, default="train",
                        help="split folders in --src that form our train set")
    parser.add_argument("--test-splits", type=comma_list, default="val",
                        help="split folders in --src that form our test set")
    parser.add_argument("--images-subdir", default="images", help="scene folder inside each split")
    parser.add_argument("--labels-subdir", default="labelTxt", help="label folder inside each split")
    parser.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult")
    parser.add_argument("--skip-classes", type=comma_list, default=[], metavar="NAMES",
                        help="leave out (and count) objects of these classes of later DOTA versions, which labels "
                             "of v1.5 and 2.0 hold besides the 15 of v1.0: container-crane; 2.0 also airport, helipad")
    add_crop_arguments(parser)
    add_output_arguments(parser)
    return parser.parse_args(argv)


def parse_label_file(path, lookup, skip_difficult, skipped, skip_classes=frozenset()):
    """The objects of one labelTxt file; header lines are skipped, k counts object lines.
    `skip_classes`: case-folded names of classes to leave out."""
    objects = []
    index = 0
    for number, line in enumerate(read_release_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields or (len(fields) < 9 and ":" in fields[0]):
            continue
        try:
            if len(fields) not in (9, 10):
                raise ValueError
            coords = [float(value) for value in fields[:8]]
            difficult = len(fields) == 10 and int(fields[9]) != 0
        except ValueError:
            expected = "'x1 y1 x2 y2 x3 y3 x4 y4 class difficult'"
            spaced = len(fields) > 10 or (len(fields) == 10 and not fields[9].isdigit())
            hint = " (a class name with spaces? DOTA writes them with hyphens: large-vehicle)" if spaced else ""
            raise UserError(f"{path}:{number}: expected {expected}, got {line!r}{hint}") from None
        if class_name_key(fields[8]) in skip_classes:
            skipped[SKIPPED_CLASS.format(fields[8])] += 1
            index += 1
            continue
        if class_name_key(fields[8]) in LATER_CLASSES:  # DOTA v1.5 or 2.0: the way on is a flag away
            raise UserError(f"{path}:{number}: class {fields[8]!r} is one DOTA v1.5 or 2.0 adds to the 15 of v1.0: "
                            "leave such classes out with --skip-classes (container-crane for v1.5, "
                            "container-crane,airport,helipad for 2.0)")
        class_id = find_class(lookup, fields[8], f"{path}:{number}", DATASET)
        if difficult and skip_difficult:
            skipped[SKIP_DIFFICULT] += 1
        else:
            objects.append(ChipObject(index, class_id, polygon_bounds(coords[0::2], coords[1::2])))
        index += 1
    return objects


def collect_split(src, split, subset, args, lookup, skipped):
    existing_dir(src / split, f"--{subset}-splits")
    image_dir = existing_dir(src / split / args.images_subdir, "--images-subdir")
    label_dir = existing_dir(src / split / args.labels_subdir, "--labels-subdir")
    index = index_images([image_dir])
    images = []
    # Not hidden ones: macOS leaves a ._NAME.txt (not text) beside each file it copies to other disks.
    labels = sorted(path for path in label_dir.iterdir() if path.suffix.lower() == ".txt" and not is_hidden(path))
    stems = [path.stem for path in labels]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:  # P0004.txt and P0004.TXT: one scene's chips would be cut twice, over each other
        names = ", ".join(path.name for path in labels if path.stem == twice[0])
        raise UserError(f"{label_dir}: two label files for scene {twice[0]} ({names}); keep one")
    unlabelled = sorted(set(index) - set(stems))
    if unlabelled:  # every DOTA v1.0 image has a label file: a partial download or extraction?
        warnings.warn(f"{len(unlabelled)} images in {image_dir} have no label file in {label_dir} (e.g. "
                      f"{index[unlabelled[0]].name}): their objects are not read")
    for label_path in labels:
        scene = label_path.stem
        if scene not in index:
            raise UserError(f"{label_path}: no image {scene}.* in {image_dir}")
        objects = parse_label_file(label_path, lookup, args.skip_difficult, skipped,
                                   frozenset(class_name_key(name) for name in args.skip_classes))
        images.append(SourceImage(index[scene], scene, subset, tuple(objects)))
    return images, [image_dir, label_dir]


def check_splits_disjoint(args):
    """Train and test from different folders: compared resolved, as 'val', './val' and a
    symlink to val are one folder under three names."""
    folders = {subset: {(args.src / split).resolve(): split for split in splits}
               for subset, splits in (("train", args.train_splits), ("test", args.test_splits))}
    shared = sorted(folders["train"].keys() & folders["test"].keys())
    if shared:
        raise UserError(f"--train-splits {folders['train'][shared[0]]} and --test-splits {folders['test'][shared[0]]} "
                        f"are one folder ({shared[0]}); train and test need different splits")


def collect_images(args, class_names):
    existing_dir(args.src, "--src")
    check_splits_disjoint(args)
    lookup = class_lookup(class_names)
    kept = [name for name in args.skip_classes if class_name_key(name) in lookup]
    if kept:  # classes.json lists every v1.0 class: one without images would stop the stages
        raise UserError(f"--skip-classes: {kept[0]} is one of the 15 DOTA v1.0 classes, which stay; it takes the "
                        "classes later versions add (container-crane, airport, helipad)")
    skipped = {"train": Counter(), "test": Counter()}
    images, inputs = [], []
    for subset, splits in (("train", args.train_splits), ("test", args.test_splits)):
        seen = set()
        for split in splits:
            split_images, split_inputs = collect_split(args.src, split, subset, args, lookup, skipped[subset])
            clash = seen & {image.image_id for image in split_images}
            if clash:
                raise UserError(f"scene {sorted(clash)[0]} appears in two {subset} splits ({', '.join(splits)})")
            seen |= {image.image_id for image in split_images}
            images += split_images
            inputs += split_inputs
    prefix, suffix = SKIPPED_CLASS.split("{}")
    left_out = {class_name_key(key[len(prefix):-len(suffix)]) for counts in skipped.values() for key in counts
                if key.startswith(prefix) and key.endswith(suffix)}
    unseen = [name for name in args.skip_classes if class_name_key(name) not in left_out]
    if unseen:  # a misspelt name skips nothing; an object of the class meant then stops the run as unknown
        warnings.warn(f"--skip-classes: no object is labelled {', '.join(unseen)}; nothing of it was left out")
    # Copies of one scene in two split folders would put it in train and test alike.
    check_disjoint([image.image_id for image in images if image.subset == "train"],
                   [image.image_id for image in images if image.subset == "test"], "--train-splits/--test-splits")
    return images, inputs, skipped


@cli_main
def main(argv=None):
    args = parse_args(argv)
    class_names = dict(enumerate(DOTA_CLASSES))
    images, inputs, skipped = collect_images(args, class_names)
    objects = Counter(image.subset for image in images for _ in image.objects)
    print(f"{len(images)} scenes, {objects['train']} train and {objects['test']} test objects to crop")
    prepare_chips(args, DATASET, class_names, images, inputs=[args.src, *inputs], skipped=skipped,
                  empty_class_hint=" (DOTA's train split has objects of all 15 v1.0 classes: is part of it missing?)")


if __name__ == "__main__":
    main()
