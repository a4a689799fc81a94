"""What the preparers of datasets that come as one folder per class share (FGSC-23, your own):
listing the class folders' images, checking that each decodes, copying or linking them."""
import difflib
import os
import shutil
import unicodedata
import warnings
from pathlib import Path

from tqdm import tqdm

from data.chips import (
    IMAGE_SUFFIXES, Tally, check_disjoint, is_hidden, make_class_dirs, report, warn_of_dark_16_bit_images,
    write_dataset,
)
from data.output import building_dataset, check_output
from tgn.class_names import class_name_key
from tgn.data import Entry, check_readable
from tgn.errors import UserError


def composed(name):
    """`name` in Unicode's composed form (NFC). macOS stores names decomposed (NFD): 'é' as
    'e' plus an accent. Names are compared, sorted and seeded in this form, so that the
    same folders give the same classes and test images on every system."""
    return unicodedata.normalize("NFC", name)


def case_aside(name):
    """The one name that `name` and its other letter cases and Unicode forms are on macOS
    and Windows."""
    return composed(name).casefold()


def by_name(path):
    """Sort key of files by name alone: Windows' paths sort case aside, Linux's do not."""
    return composed(path.name), path.name


def is_image_file(path):
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def is_broken_image_link(path):
    """A link named as an image whose target is gone (moved, deleted, on a drive not mounted)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_symlink() and not path.exists()


# Hidden folders that tools make beside data, which may hold images and never hold a class.
TOOL_FOLDERS = frozenset({".ipynb_checkpoints", ".git", ".thumbnails", ".Trash", ".Trashes", ".cache"})


def holds_images(entry):
    """A folder with an image file directly inside (not a macOS '._' resource copy); False
    for one that cannot be listed (a volume's .Spotlight-V100 is the system's alone)."""
    try:
        return entry.is_dir() and any(path.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(path)
                                      and path.is_file() for path in entry.iterdir())
    except OSError:
        return False


def holds_images_within(folder):
    """Whether an image (of any type) lies under `folder`, outside hidden and system folders
    (a NAS's thumbnails); stops at the first."""
    try:
        for root, folders, files in os.walk(folder):
            folders[:] = [name for name in folders if not is_hidden(Path(root) / name)]
            if any(Path(name).suffix.lower() in IMAGE_SUFFIXES + OTHER_IMAGE_TYPES and not is_hidden(Path(name))
                   for name in files):
                return True
    except OSError:  # a folder that cannot be listed holds nothing read
        return False
    return False


def class_folders(subset_dir):
    return [entry for entry in sorted(subset_dir.iterdir()) if entry.is_dir() and not is_hidden(entry)]


def check_listable_name(path, flag):
    """The annotation files and classes.json are UTF-8 text, one image per line: a name that
    is not UTF-8 (bytes from an archive made on another system) or holds a line break cannot
    be written into them."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag}: the name of {str(path)!r} is not UTF-8 text; rename it (convmv converts "
                        "such names)") from None
    if "\n" in path.name or "\r" in path.name:
        raise UserError(f"{flag}: the name of {str(path)!r} holds a line break; rename it")


def file_identity(path, folders=None):
    """Which file a path lists, through links and however a file system that ignores case
    (macOS, Windows) spells its folders: its folder's device and number, and its name. Not
    the file's own number: a hard link under another name is a copy (warn_copies warns of
    it, as of any copy). Where the file system numbers no folders (st_ino 0), the path.
    `folders` ({folder: its stat}) keeps each folder's stat for the next of its files."""
    resolved = Path(path).resolve()
    folders = {} if folders is None else folders
    if resolved.parent not in folders:
        folders[resolved.parent] = os.stat(resolved.parent)
    stat = folders[resolved.parent]
    return (stat.st_dev, stat.st_ino, resolved.name) if stat.st_ino else os.path.normcase(resolved)


def check_not_training_images(train_paths, test_paths):
    """Refuse test images that are training images: the same folder given as --train-dir and
    --test-dir, reached through a link, or spelled in another letter case (macOS, Windows)."""
    folders = {}  # a class folder's stat once, not once per image
    training = {file_identity(path, folders) for path in train_paths}
    both = [str(Path(path).resolve()) for path in test_paths if file_identity(path, folders) in training]
    check_disjoint(both, both, "--train-dir/--test-dir")  # names them as a preparer's shared ids


def meant_class(folder, class_ids):
    """' (is it X?)' for the class folder a mistyped or respelled folder name likely means."""
    same = [name for name in class_ids if class_name_key(name) == class_name_key(folder)]
    close = same or difflib.get_close_matches(folder, sorted(class_ids), n=1, cutoff=0.8)
    return f" (is it {close[0]!r}?)" if close else ""


def list_class_images(subset_dir, class_ids, flag, unknown_folder):
    """{folder name: [image paths]} for the class folders of `subset_dir` named in
    `class_ids`; `unknown_folder(path)` is the error for any other folder. Other entries are
    counted and named once; images in subfolders of a class folder are not read, and said so."""
    images, folder_of, stray, other_files, nested, unknown, hidden, broken = {}, {}, [], [], [], [], [], []
    # Accented names may be stored composed or decomposed (macOS writes the latter): a test
    # folder copied from another system still matches its training folder.
    by_form = {composed(name): name for name in class_ids}
    for entry in sorted(subset_dir.iterdir(), key=by_name):
        if is_hidden(entry):
            if entry.name.startswith(".") and entry.name not in TOOL_FOLDERS and holds_images(entry):
                hidden.append(entry)
            continue
        if not entry.is_dir():
            stray.append(entry)
            continue
        check_listable_name(entry, flag)
        name = by_form.get(composed(entry.name))
        if name is None:
            unknown.append(entry)
            continue
        if name in images:  # two folders that print alike: neither may silently replace the other
            raise UserError(f"{flag}: folders {folder_of[name]} and {entry} are one name in two Unicode forms "
                            "(composed and decomposed, as macOS stores names); merge them into one folder")
        images[name], folder_of[name] = [], entry
        for path in sorted(entry.iterdir(), key=by_name):  # hold_out shuffles this order
            if is_hidden(path):
                continue
            if is_image_file(path):
                check_listable_name(path, flag)
                images[name].append(path)
            elif path.is_dir():
                if holds_images_within(path):  # an empty __pycache__ is nothing to warn of
                    nested.append(path)
            elif is_broken_image_link(path):
                broken.append(path)
            else:
                other_files.append(path)
    if unknown:  # all of them at once, with the class each may have meant
        others = [entry.name for entry in unknown[1:]]
        more = f" ({len(others)} more: {', '.join(others[:4])}{', ...' if len(others) > 4 else ''})" if others else ""
        raise UserError(f"{unknown_folder(unknown[0])}{meant_class(unknown[0].name, class_ids)}{more}")
    if broken:  # images the user meant to give: left out, a class could lose them all unseen
        raise UserError(f"{flag}: {len(broken)} links to images lead nowhere (their targets moved or were deleted), "
                        f"e.g. {broken[0]} -> {os.readlink(broken[0])}; restore the targets, or remove the links")
    if not any(images.values()):
        raise UserError(f"{flag}: no images in the class folders of {subset_dir}")
    report_ignored(flag, subset_dir, stray, other_files)
    alike = [pair for paths in images.values() for pair in names_alike(paths)]
    if alike:
        warnings.warn(f"{flag}: {len(alike)} image names differ from another in their class folder only in letter "
                      f"case or Unicode form (e.g. {alike[0][0].name!r} and {alike[0][1].name!r}): one file on macOS "
                      "and Windows, where the prepared dataset would lose one of them; rename them")
    if hidden:  # a class named '.net' would be skipped as .DS_Store is, with nothing said
        warnings.warn(f"{flag}: hidden folders (name starting with '.') are not classes, and {len(hidden)} of "
                      f"them hold images, e.g. {hidden[0]}; rename it without the dot if it is a class")
    if nested:
        warnings.warn(f"{flag}: images in folders inside a class folder are not read ({len(nested)} such folders, "
                      f"e.g. {nested[0]}); move them up into the class folder")
    return images


# Raster image types a class folder may hold that are not read: named in a warning.
OTHER_IMAGE_TYPES = (".gif", ".jp2", ".j2k", ".avif", ".heic", ".heif", ".tga", ".psd", ".ppm", ".pgm", ".pbm",
                     ".pnm", ".qoi", ".ico", ".dds", ".pcx", ".sgi")


def names_alike(paths):
    """Pairs of `paths` whose names are one name where case is ignored (macOS, Windows)."""
    seen, pairs = {}, []
    for path in paths:
        key = case_aside(path.name)
        if key in seen:
            pairs.append((seen[key], path))
        seen.setdefault(key, path)
    return pairs


def report_ignored(flag, subset_dir, stray, other_files):
    """Name what is left out: files beside the class folders, and files inside them that are
    not of the types read; images of other types (.gif, say) are warned about."""
    if stray:
        print(f"{flag}: ignored {len(stray)} files beside the class folders of {subset_dir}, e.g. {stray[0]}")
    images = [path for path in other_files if path.suffix.lower() in OTHER_IMAGE_TYPES]
    if images:
        types = " ".join(sorted({path.suffix.lower() for path in images}))
        warnings.warn(f"{flag}: left out {len(images)} images of types not read ({types}), e.g. {images[0]}; "
                      f"convert them to one of {' '.join(IMAGE_SUFFIXES)}")
    if len(other_files) > len(images):
        example = next(path for path in other_files if path not in images)
        print(f"{flag}: ignored {len(other_files) - len(images)} files in class folders that are not images, "
              f"e.g. {example}")


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


def check_distinct_names(sources):
    """Each image keeps its file name in its class's folder: two folders mapped to one class
    (FGSC-23's --class-map) must not hold the same name, nor names that differ only in
    letter case or Unicode form (one file on macOS and Windows: one image would replace
    the other there, or when the dataset is copied there)."""
    for subset, pairs in sources.items():
        seen = {}
        for source, class_id in pairs:
            earlier = seen.setdefault((class_id, case_aside(source.name)), source)
            if earlier.parent != source.parent:
                alike = "" if earlier.name == source.name else " on macOS and Windows"
                raise UserError(f"{source} and {earlier} would both be {subset}/{class_id}/{source.name}{alike}: two "
                                "folders map to one class with the same file name; rename one")


def place_images(out, sources, link, tally):
    """Put each subset's (source path, class id) pairs at OUT/<subset>/<class id>/<file name>
    and record the entries in `tally`."""
    for subset, pairs in sources.items():
        for source, class_id in tqdm(pairs, desc=subset, unit="image", dynamic_ncols=True):
            relpath = f"{class_id}/{source.name}"
            place(source, out / subset / relpath, link)
            tally.entries[subset].append(Entry(relpath, class_id))


def add_link_argument(parser):
    parser.add_argument("--link", choices=("hard", "symlink"), default=None,
                        help="link the images instead of copying them")


def prepare_folder_dataset(args, dataset, class_names, sources, inputs):
    """The common tail of the class-folder preparers: every image decoded, then the output
    folder, images, lists and counts; a failure midway leaves no partial dataset."""
    check_distinct_names(sources)
    check_output(args.out, args.overwrite, inputs)  # before the minutes decoding may take
    check_readable([pair for pairs in sources.values() for pair in pairs])  # copying never decodes
    warn_of_dark_16_bit_images([path for pairs in sources.values() for path, _ in pairs])
    tally = Tally()
    with building_dataset(args.out, args.overwrite, inputs) as folder:
        make_class_dirs(folder, class_names)
        place_images(folder, sources, args.link, tally)
        write_dataset(folder, dataset, class_names, tally)
    report(dataset, Path(args.out), class_names, tally)
