"""Crop DIOR into one chip per object, in the dataset layout every stage reads.

    python data/prepare_dior.py --src /path/to/DIOR --out DATA/DIOR --workers 8

--src is the unpacked official release: JPEGImages-trainval/ and JPEGImages-test/ (or one
JPEGImages/), Annotations/Horizontal Bounding Boxes/ (or Annotations/) with one Pascal-VOC
XML per image, and ImageSets/Main/{train,val,test}.txt. Each folder has its own flag.

Chips are DATA/<subset>/<class_id>/<image_id>_<k>.jpg, k being the object's position in the
image's XML; class ids follow DIOR's official alphabetical order (0 airplane ... 19 windmill).
A chip is crop(xmin, ymin, xmax, ymax) of the XML's numbers as written, read as pixel edges
(not shifted by one as 1-based VOC pixel indices would be).

Which official lists form our train and test sets: the paper's 68,025 train + 124,440 test
chips = 192,465, all the objects of DIOR's train+val+test (the DIOR paper counts 192,472
instances; a few degenerate boxes would explain the gap). The default, --train-sets train,val
--test-sets test, follows the official README's layout, whose test/0 starts at 11726_0.jpg:
image 11726 is the first of DIOR's test release (train and val are 00001 to 11725), so no val
image went into the official test set. --train-sets train --test-sets val,test is the other
choice. The totals this script prints show whether a choice reproduces the paper's split.
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xml.etree.ElementTree as ElementTree  # noqa: E402
from collections import Counter  # noqa: E402

from data.chips import (  # noqa: E402
    ChipObject, SourceImage, add_crop_arguments, check_disjoint, class_lookup,
    comma_list, default_dir, existing_dir, find_class, index_images, prepare_chips, read_release_text,
)
from data.output import add_output_arguments  # noqa: E402
from tgn.class_names import DIOR_CLASSES  # noqa: E402
from tgn.cli import make_parser  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402

DATASET = "DIOR"
IMAGE_DIRS = ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages")
ANNOTATION_DIRS = ("Annotations/Horizontal Bounding Boxes", "Annotations")
IMAGE_SET_DIRS = ("ImageSets/Main", "ImageSets")


def parse_args(argv):
    parser = make_parser(__doc__)
    parser.add_argument("--src", type=Path, required=True, help="the unpacked DIOR release")
    parser.add_argument("--images", type=comma_list, default=None,
                        help=f"comma-separated image folders (if unset: those of {', '.join(IMAGE_DIRS)} in --src)")
    parser.add_argument("--annotations", type=Path, default=None,
                        help=f"folder of VOC XML files (if unset: {' or '.join(ANNOTATION_DIRS)} in --src)")
    parser.add_argument("--image-sets", type=Path, default=None,
                        help=f"folder of the id lists <set>.txt (if unset: {' or '.join(IMAGE_SET_DIRS)} in --src)")
    parser.add_argument("--train-sets", type=comma_list, default="train,val",
                        help="official lists that form our train set (the official layout's: see above)")
    parser.add_argument("--test-sets", type=comma_list, default="test", help="official lists that form our test set")
    add_crop_arguments(parser)
    add_output_arguments(parser)
    return parser.parse_args(argv)


def resolve_inputs(args):
    """Image, annotation and id-list folders: the flags, or the release's own names in --src."""
    existing_dir(args.src, "--src")
    if args.images:
        # '~' after a comma is left to us by the shell
        image_dirs = [existing_dir(Path(folder).expanduser(), "--images") for folder in args.images]
    else:
        image_dirs = [args.src / name for name in IMAGE_DIRS if (args.src / name).is_dir()]
        if not image_dirs:
            raise UserError(f"--images: none of {', '.join(IMAGE_DIRS)} is in {args.src}; pass --images")
    annotations = existing_dir(args.annotations, "--annotations") if args.annotations else (
        default_dir(args.src, ANNOTATION_DIRS, "--annotations"))
    image_sets = existing_dir(args.image_sets, "--image-sets") if args.image_sets else (
        default_dir(args.src, IMAGE_SET_DIRS, "--image-sets"))
    return image_dirs, annotations, image_sets


def read_id_list(image_sets, name):
    path = Path(image_sets) / f"{name}.txt"
    if not path.is_file():
        raise UserError(f"image list not found: {path} (check --image-sets and the set names)")
    return [line.strip() for line in read_release_text(path).splitlines() if line.strip()]


def read_ids(image_sets, names):
    """Image ids of several official lists, in order, each once."""
    return list(dict.fromkeys(image_id for name in names for image_id in read_id_list(image_sets, name)))


def parse_declared_encoding(path, exc):
    """The root of an XML file in an encoding expat cannot read itself (GBK, which Chinese
    annotation tools write): decoded by Python's codec of the declared name, then parsed."""
    data = path.read_bytes()
    declared = re.match(rb"\s*<\?xml[^>]*encoding=[\"']([A-Za-z0-9._-]+)[\"']", data)
    reason = exc
    if declared:
        try:
            text = data.decode(declared.group(1).decode("ascii"))
        except (LookupError, UnicodeDecodeError) as error:
            reason = error
        else:
            try:
                return ElementTree.fromstring(text)
            except ElementTree.ParseError as error:
                raise UserError(f"{path}: not valid XML ({error})") from error
    raise UserError(f"{path}: cannot read its XML encoding ({reason}); save the file as UTF-8") from exc


def parse_voc(path, lookup):
    """The objects of one VOC XML file, in file order, with their class ids and boxes."""
    if not path.is_file():
        raise UserError(f"annotation not found: {path} (check --annotations)")
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise UserError(f"{path}: not valid XML ({exc})") from exc
    except (ValueError, LookupError) as exc:  # an encoding expat cannot read (multi-byte, unknown)
        root = parse_declared_encoding(path, exc)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    objects = []
    for index, node in enumerate(root.iter("object")):
        name = (node.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{path}: object {index} has no <name>")
        class_id = find_class(lookup, name, f"{path}: object {index}", DATASET)
        try:
            box = tuple(float(node.find("bndbox").findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            if node.find("robndbox") is not None:  # DIOR-R's oriented boxes
                horizontal = "the folder of horizontal boxes (DIOR's Annotations/'Horizontal Bounding Boxes')"
                raise UserError(f"{path}: object {index} has an oriented box (robndbox, DIOR-R); pass --annotations "
                                f"{horizontal}") from None
            raise UserError(f"{path}: object {index} has no numeric bndbox xmin/ymin/xmax/ymax") from None
        objects.append(ChipObject(index, class_id, box))
    return objects


def annotation_file(annotations, image_id):
    """<id>.xml, or <id>.XML as some copies (a Windows tool, a FAT drive) name it."""
    path = annotations / f"{image_id}.xml"
    upper = path.with_suffix(".XML")
    return upper if not path.is_file() and upper.is_file() else path


def collect_images(args, class_names):
    image_dirs, annotations, image_sets = resolve_inputs(args)
    ids = {"train": read_ids(image_sets, args.train_sets), "test": read_ids(image_sets, args.test_sets)}
    check_disjoint(ids["train"], ids["test"], "--train-sets/--test-sets")
    index = index_images(image_dirs)
    lookup = class_lookup(class_names)
    images = []
    for subset, image_ids in ids.items():
        for image_id in image_ids:
            if image_id not in index:
                folders = ", ".join(map(str, image_dirs))
                raise UserError(f"image {image_id} (listed in --{subset}-sets) not found in {folders}")
            objects = parse_voc(annotation_file(annotations, image_id), lookup)
            images.append(SourceImage(index[image_id], image_id, subset, tuple(objects)))
    return images, [*image_dirs, annotations, image_sets]


@cli_main
def main(argv=None):
    args = parse_args(argv)
    class_names = dict(enumerate(DIOR_CLASSES))
    images, inputs = collect_images(args, class_names)
    objects = Counter(image.subset for image in images for _ in image.objects)
    print(f"{len(images)} images, {objects['train']} train and {objects['test']} test objects annotated")
    prepare_chips(args, DATASET, class_names, images, inputs=[args.src, *inputs],
                  empty_class_hint=" (check --train-sets and the lists in --image-sets)")


if __name__ == "__main__":
    main()
