"""What the preparers of datasets that come as one folder per class share (FGSC-23, your own):
listing the class folders' images, checking that each decodes, copying or linking them."""
import os
import shutil

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.chips import IMAGE_SUFFIXES, Tally, make_class_dirs, prepare_output, report, write_dataset
from tgn.data import Entry
from tgn.errors import UserError


def list_class_images(subset_dir, class_ids, flag, unknown_folder):
    """{folder name: [image paths]} for the class folders of `subset_dir` named in
    `class_ids`, each image checked to decode; `unknown_folder(path)` is the error for any
    other folder. Entries that are not images are counted and named once."""
    images, ignored = {}, []
    for entry in sorted(subset_dir.iterdir()):
        if not entry.is_dir():
            ignored.append(entry)
            continue
        if entry.name not in class_ids:
            raise UserError(unknown_folder(entry))
        images[entry.name] = []
        for path in sorted(entry.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                check_image(path)
                images[entry.name].append(path)
            else:
                ignored.append(path)
    if not any(images.values()):
        raise UserError(f"{flag}: no images in the class folders of {subset_dir}")
    if ignored:
        print(f"{flag}: ignored {len(ignored)} entries that are not images in class folders, e.g. {ignored[0]}")
    return images


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


def place_images(out, sources, link, tally):
    """Put each subset's (source path, class id) pairs at OUT/<subset>/<class id>/<file name>
    and record the entries in `tally`."""
    for subset, pairs in sources.items():
        for source, class_id in tqdm(pairs, desc=subset, unit="image", dynamic_ncols=True):
            relpath = f"{class_id}/{source.name}"
            target = out / subset / relpath
            if target.exists():
                raise UserError(f"{source}: two folders map to class {class_id} with the same file name {source.name}")
            place(source, target, link)
            tally.entries[subset].append(Entry(relpath, class_id))


def add_link_argument(parser):
    parser.add_argument("--link", choices=("hard", "symlink"), default=None,
                        help="link the images instead of copying them")


def prepare_folder_dataset(args, dataset, class_names, sources, inputs):
    """The common tail of the class-folder preparers: output folder, images, lists, counts."""
    out = prepare_output(args.out, args.overwrite, inputs=inputs)
    make_class_dirs(out, class_names)
    tally = Tally()
    place_images(out, sources, args.link, tally)
    write_dataset(out, dataset, class_names, tally)
    report(dataset, out, class_names, tally)
