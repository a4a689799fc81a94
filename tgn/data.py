"""The dataset layout every stage reads.

    DATA/classes.json             {"dataset": "DIOR", "classes": [{"id": 0, "name": "airplane"}, ...]}
    DATA/anno/<NAME>_train.txt    lines "<class_id>/<file> <class_id>", relative to DATA/train
    DATA/anno/<NAME>_test.txt     the same, relative to DATA/test
    DATA/train/<class_id>/<file>
    DATA/test/<class_id>/<file>

File names may contain spaces: the label is the last field of a line. Without
classes.json (the official preprocessed downloads have none) DIOR's and FGSC-23's classes are
named in their official order, others by id.
"""
import codecs
import re
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tgn.class_names import official_class_names
from tgn.cli import cpus_per_process
from tgn.errors import UserError, speaks
from tgn.io import atomic_write_text, read_json, same_path
from tgn.progress import progress_bar

SUBSETS = ("train", "test")
CLASS_ID = re.compile(r"-?[0-9]+")  # ASCII digits: str.isdigit also takes "²", which int() refuses


@dataclass(frozen=True)
class Entry:
    """One image: its path relative to the subset folder and its dataset class id."""

    relpath: str
    class_id: int


def lines_of(text):
    """The lines of an annotation file: split at newlines only (str.splitlines would also
    split at U+2028, U+0085 and other separators, which a file name may hold); a CR-LF
    file's carriage returns go."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_annotation(path):
    """Parse an annotation file into a list of Entry, naming the line of any error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")  # a byte-order mark (Windows editors) is not part of the first path
    except UnicodeDecodeError as exc:
        line = raw[:bom + exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[bom + exc.start]:02x}); "
                        "save the file as UTF-8") from None
    entries = []
    for number, line in enumerate(lines_of(text), start=1):
        if not line.strip():
            continue
        fields = line.rstrip().rsplit(None, 1)
        if len(fields) != 2 or not CLASS_ID.fullmatch(fields[1]):
            raise UserError(f"{path}:{number}: expected '<class_id>/<file> <class_id>', got {line!r}")
        entries.append(Entry(fields[0].strip(), int(fields[1])))
    return entries


def format_annotation(entries):
    return "".join(f"{entry.relpath} {entry.class_id}\n" for entry in entries)


def write_annotation(path, entries):
    atomic_write_text(path, format_annotation(entries))


def changed_entries(kept, current):
    """How a list written earlier (`kept`: a split's or the tail data's) differs from the one
    DATA lists now (`current`), order aside: (listed only in `kept`, listed only in `current`)."""
    kept, current = Counter(kept), Counter(current)
    return sum((kept - current).values()), sum((current - kept).values())


def changed_text(only_kept, only_current):
    """Says how two image lists differ, for changed_entries' counts."""
    parts = []
    if only_kept:
        parts.append(f"{only_kept} of its images {'is' if only_kept == 1 else 'are'} no longer listed there")
    if only_current:
        parts.append(f"{only_current} listed there {'is' if only_current == 1 else 'are'} new to it")
    return ", ".join(parts)


def check_files_exist(root, entries, source):
    """Fail on the first entry whose image is missing (cheap: a stat per file), naming the
    annotation line when `source` is the annotation file."""
    root = Path(root)
    for entry in entries:
        if not (root / entry.relpath).is_file():
            raise UserError(f"{_line_of(source, entry.relpath)}: image {root / entry.relpath} does not exist "
                            "(fix or remove the line)")


def _line_of(source, relpath):
    """'FILE:LINE' of the first line of annotation file `source` listing `relpath`; else `source`."""
    try:
        for number, line in enumerate(lines_of(Path(source).read_bytes().decode("utf-8-sig")), start=1):
            if [field.strip() for field in line.rstrip().rsplit(None, 1)[:1]] == [relpath]:
                return f"{source}:{number}"
    except (OSError, UnicodeDecodeError):
        pass
    return str(source)


@dataclass
class DatasetInfo:
    """What DATA holds: its name, the class names by id, and where the lists are."""

    root: Path
    name: str
    class_names: dict
    has_class_list: bool = True  # False: classes were read off the training annotation
    name_from_class_list: bool = True  # False: the name was read off anno/<NAME>_train.txt

    def annotation_path(self, subset):
        return self.root / "anno" / f"{self.name}_{subset}.txt"

    def image_root(self, subset):
        return self.root / subset

    def entries(self, subset, check_files=True):
        path = self.annotation_path(subset)
        if not path.is_file() and self.name_from_class_list:
            raise UserError(f"annotation file not found: {path} (its name comes from the \"dataset\" field of "
                            f"{self.root / 'classes.json'}: {self.name!r})")
        entries = read_annotation(path)
        if not entries:
            raise UserError(f"{path} lists no images")
        unknown = sorted({e.class_id for e in entries} - set(self.class_names))
        if unknown:
            where = self.root / "classes.json" if self.has_class_list else self.annotation_path("train")
            raise UserError(f"{path}: class id {unknown[0]} is not a class of {where} (a class absent from training?)")
        folders = [entry.relpath.split("/", 1)[0] for entry in entries]
        elsewhere = [e for e, folder in zip(entries, folders) if folder.isdigit() and folder != str(e.class_id)]
        if elsewhere:  # the official layout keeps each image in its class's folder: likely a typo
            warnings.warn(f"{path}: {len(elsewhere)} lines list an image in another class's folder (e.g. "
                          f"'{elsewhere[0].relpath} {elsewhere[0].class_id}'); the label, the last field, is used")
        other = "test" if subset == "train" else "train"
        check_listed_images(path, entries, self.image_root(subset), self.annotation_path(other),
                            self.image_root(other))
        if check_files:
            check_files_exist(self.image_root(subset), entries, self.annotation_path(subset))
        return entries


def full_paths(root, entries):
    """Each entry's image as a normalised path (case folded where the file system ignores case)."""
    return [os.path.normcase(os.path.normpath(os.path.join(root, entry.relpath))) for entry in entries]


def check_listed_images(path, entries, root, other_path, other_root):
    """Refuse an image listed under two classes, or listed by the other subset's list too (a
    training image in the test set inflates its accuracy); warn of an image listed twice (it
    counts twice) or outside its subset's folder `root`."""
    listed = full_paths(root, entries)
    labels = {}
    for entry, full in zip(entries, listed):
        if labels.setdefault(full, entry.class_id) != entry.class_id:
            raise UserError(f"{path}: {entry.relpath} is listed with classes {labels[full]} and {entry.class_id}: "
                            "an image has one label")
    if other_path.is_file():
        others = set(full_paths(other_root, read_annotation(other_path)))
        shared = next((entry.relpath for entry, full in zip(entries, listed) if full in others), None)
        if shared is not None:
            raise UserError(f"{path} lists {shared}, which {other_path} lists too: training and test images must "
                            "differ")
    inside = os.path.join(os.path.normcase(os.path.normpath(root)), "")  # with its separator: not 'train2/'
    outside = [entry.relpath for entry, full in zip(entries, listed) if not full.startswith(inside)]
    if outside:
        warnings.warn(f"{path}: {len(outside)} lines list an image outside {root} (e.g. {outside[0]!r})")
    if len(labels) < len(listed):
        warnings.warn(f"{path}: {len(listed) - len(labels)} lines list an image listed before: each line counts as "
                      "one image")


def _find_dataset_name(root):
    # Not hidden ones: macOS leaves ._NAME_train.txt beside each file it copies to other disks.
    candidates = sorted(path for path in (root / "anno").glob("*_train.txt") if not path.name.startswith("."))
    if not candidates:
        raise UserError(f"no annotation file {root / 'anno' / '<NAME>_train.txt'} found under {root}"
                        f"{_not_a_dataset_hint(root)}")
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise UserError(f"several training annotation files in {root / 'anno'} ({names}); write classes.json to pick one")
    return candidates[0].name[: -len("_train.txt")]


DATASET_FOLDERS = ("anno", "train", "test")


def _not_a_dataset_hint(root):
    """What a folder without annotation files may be instead: a folder of a prepared
    dataset (its parent is the dataset), or class folders data/prepare_folders.py takes."""
    if root.name in DATASET_FOLDERS and any((root.parent / "anno").glob("*_train.txt")):
        return f"; it is the {root.name}/ folder of the dataset {root.parent}: pass that"
    if (root / "anno").is_dir():
        return ""
    train = root / "train"
    if train.is_dir() and any(entry.is_dir() for entry in train.iterdir()):  # MINE/train/<class>/
        test = f" --test-dir {root / 'test'}" if (root / "test").is_dir() else " --test-fraction 0.2"
        return (f"; for a dataset in class folders, run data/prepare_folders.py --train-dir {train}{test} --out "
                "DATASET first, and pass DATASET")
    if not train.is_dir():
        return "; for a dataset in class folders, run data/prepare_folders.py first"
    return ""


def check_outside_dataset(out, root, flag="--out"):
    """Refuse to write into the dataset itself: its folder, or its anno/, train/ or test/ (a
    split's head_train.txt beside the dataset's X_train.txt would leave two annotation files
    to choose from). `out` None (a flag not given): nothing to check."""
    if out is None:
        return
    guarded = [Path(root) / folder for folder in DATASET_FOLDERS]
    resolved = Path(out).resolve()
    if same_path(resolved, root) or any(same_path(place, folder) for place in (resolved, *resolved.parents)
                                           for folder in guarded):
        raise UserError(f"{flag} {out} is the dataset folder {root} or inside its {'/, '.join(DATASET_FOLDERS)}/: "
                        "write beside the dataset, not into it (e.g. runs/NAME/...)")


def read_classes_json(path):
    """Return (dataset name or None, {class_id: name}) from a classes.json file."""
    data = read_json(path, "class list")
    try:
        items = [(item["id"], item["name"]) for item in data["classes"]]
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: expected {{'dataset': NAME, 'classes': [{{'id': 0, 'name': ...}}, ...]}}") from exc
    names = {}
    for cid, name in items:
        whole = (isinstance(cid, int) or (isinstance(cid, float) and cid.is_integer())
                 or (isinstance(cid, str) and CLASS_ID.fullmatch(cid.strip())))
        if isinstance(cid, bool) or not whole:
            raise UserError(f"{path}: class id {cid!r} is not a whole number")
        if isinstance(name, bool) or not isinstance(name, (str, int)) or not str(name).strip():
            # It would become the CLIP prompt "A photo of a None".
            raise UserError(f"{path}: class {cid} has no name ({name!r}); name it as its CLIP prompt should read")
        if int(cid) in names:
            raise UserError(f"{path}: class id {int(cid)} is listed twice")
        names[int(cid)] = str(name)
    return data.get("dataset"), names


def write_classes_json(path, dataset, class_names):
    items = [{"id": int(cid), "name": name} for cid, name in sorted(class_names.items())]
    atomic_write_text(path, json.dumps({"dataset": dataset, "classes": items}, indent=2) + "\n")


def open_dataset(root):
    """Read DATA's metadata, with one-line errors for the usual mistakes."""
    root = Path(root)
    if root.is_file():
        raise UserError(f"dataset folder {root} is a file; pass the folder that holds anno/, train/ and test/")
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    if (root / "split.json").is_file() and not (root / "anno").is_dir():
        raise UserError(f"{root} is a split (KMDN/dataset_split.py's output), not a dataset: pass the dataset folder, "
                        "the one that holds anno/, train/ and test/")
    classes_file = root / "classes.json"
    if classes_file.is_dir():
        raise UserError(f"{classes_file} is a folder; the class list is a file: "
                        '{"dataset": NAME, "classes": [{"id": 0, "name": ...}, ...]}')
    if classes_file.is_file():
        name, class_names = read_classes_json(classes_file)
        if not name:
            return DatasetInfo(root, _find_dataset_name(root), class_names, name_from_class_list=False)
    else:
        name = _find_dataset_name(root)
        ids = sorted({entry.class_id for entry in read_annotation(root / "anno" / f"{name}_train.txt")})
        class_names = official_class_names(name, ids)
        if class_names is None:
            class_names = {cid: str(cid) for cid in ids}
            warnings.warn(f"{classes_file} not found: classes are named by id (CLIP prompts need real names)")
        return DatasetInfo(root, name, class_names, has_class_list=False, name_from_class_list=False)
    return DatasetInfo(root, name, class_names)


def load_image(path, size=None):
    """Decode an RGB image; JPEG draft mode lets libjpeg decode near the target size."""
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("RGB", (size, size))
            if image.mode.startswith("I"):  # 16-bit grey: PIL's convert clips to 255 instead of scaling
                try:
                    image = to_8_bit(image)
                except ValueError as exc:
                    raise UserError(f"cannot read image {path}: {exc}; convert the image to 8 or 16 bits") from None
            elif image.mode == "F":  # no fixed range: PIL's convert would clip 0..1 values to black
                raise UserError(f"cannot read image {path}: 32-bit float pixels have no fixed range; convert the "
                                "image to 8 or 16 bits")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
        # A bomb error: a header claiming over ~179M pixels (a corrupt file, or a whole scene
        # where chips belong); a plain Exception, which --skip-bad-images must also skip.
        raise UserError(f"cannot read image {path}: {exc}") from exc


def to_8_bit(image):
    """A 16-bit (or 32-bit integer) grey image scaled to 8 bits: 0..65535 -> 0..255. Values
    outside that range (32-bit or signed integers) have no scale: ValueError."""
    pixels = np.asarray(image, dtype=np.float64)
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"its integer pixels reach {int(low if low < 0 else high)}, outside 0..65535, so they have "
                         "no fixed scale to 8 bits")
    return Image.fromarray(np.round(pixels / 257).astype(np.uint8), mode="L")


CHECK_CHUNK = 4096  # images queued at once for the decode check
# Decode-check threads: PIL decodes without the GIL, and on network file systems threads wait
# on reads, so a few more than the cores (ThreadPoolExecutor's own rule, on this process's share
# of them: under torchrun every process of a node checks the same images).
CHECK_THREADS = min(32, cpus_per_process() + 4)


def find_unreadable(samples, workers=CHECK_THREADS):
    """Paths among (path, label) samples that cannot be decoded (truncated, not an image)."""
    def unreadable(path):
        try:
            load_image(path, 64)  # a full decode (at reduced size): truncated files fail here
            return None
        except UserError:
            return path

    paths = [p for p, _ in samples]
    if not paths:
        return []
    bad = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            progress_bar(total=len(paths), transient=True, desc="checking images", unit="image",
                 disable=not speaks()) as progress:  # PIL decodes without the GIL
        # In chunks: map queues every path at once, 1.6 KB of bookkeeping an image (250 MB for 150k).
        for start in range(0, len(paths), CHECK_CHUNK):
            chunk = paths[start:start + CHECK_CHUNK]
            bad += [path for path in pool.map(unreadable, chunk) if path is not None]
            progress.update(len(chunk))
    return bad


def check_readable(samples, what="images", hint="", workers=CHECK_THREADS):
    """Decode every image of (path, label) samples once, in threads; stop at the first
    unreadable one with its reason, the others (the first few named) and `hint`."""
    bad = sorted(find_unreadable(samples, workers), key=str)
    if not bad:
        return
    others = [str(path) for path in bad[1:]]
    more = (f" ({len(others)} more unreadable {what}: {', '.join(others[:4])}{', ...' if len(others) > 4 else ''})"
            if others else "")
    try:
        load_image(bad[0])
    except UserError as exc:
        raise UserError(f"{exc}{more}{hint}") from None
    raise UserError(f"cannot read image {bad[0]}{more}{hint}")


def drop_unreadable(samples, skip_bad_images, what="images", workers=CHECK_THREADS, check=False):
    """With --skip-bad-images: check every image once, drop and count the bad ones.

    Without it, `check` decodes every image once and stops at the first bad one: for test
    sets, which training reads only after its first epoch, at less than an evaluation's
    cost. Otherwise images are decoded as training reads them, and the first bad one stops
    the run with its name.
    """
    if not skip_bad_images:
        if check:
            check_readable(samples, what, "; fix or remove it, or pass --skip-bad-images to leave such images out",
                           workers)
        return list(samples)
    bad = set(find_unreadable(samples, workers))
    if bad and speaks():  # every process finds the same ones
        print(f"skipped {len(bad)} unreadable {what} (--skip-bad-images), e.g. {sorted(bad)[0]}")
    return [sample for sample in samples if sample[0] not in bad]


def samples_for(image_root, entries, label_of):
    """(absolute path, model label) pairs for entries, labels mapped by `label_of[class_id]`."""
    image_root = Path(image_root)
    return [(str(image_root / entry.relpath), label_of[entry.class_id]) for entry in entries]
