"""What the dataset preparers share: boxes, chip cropping, the layout's lists, the counts.

Boxes are (x0, y0, x1, y1) in pixel edges, half-open like `PIL.Image.crop`: the chip of
(4, 6, 20, 18) is 16 x 12 pixels. The releases' numbers are taken as such edges as written:
DIOR's VOC xmin, ymin, xmax, ymax become crop(xmin, ymin, xmax, ymax), not shifted by one
as 1-based VOC pixel indices would be. A preparer parses its release into `SourceImage`s (one
per scene, with its objects and whether it goes to train or test) and hands them to
`prepare_chips`, which crops one JPEG chip per object into the layout of tgn/data.py,
writes classes.json and the annotation lists, and prints the counts.
"""
import codecs
import ctypes
import filecmp
import math
import multiprocessing
import os
import signal
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.output import building_dataset
from tgn.class_names import class_name_key, display_width, padded
from tgn.data import SUBSETS, Entry, to_8_bit, write_annotation, write_classes_json
from tgn.errors import UserError
from tgn.progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp")
JPEG_QUALITY = 95

# Folders that file systems and archivers add beside the data (Synology thumbnails, macOS
# resource forks unzipped, Windows' recycle bin): never a class, never images of one.
SYSTEM_FOLDERS = frozenset({"@eaDir", "__MACOSX", "$RECYCLE.BIN", "System Volume Information"})


def is_hidden(path):
    """Hidden entries (.DS_Store, macOS's ._name copies, .ipynb_checkpoints) and the system
    folders above are no data: neither images, labels nor classes."""
    return path.name.startswith(".") or path.name in SYSTEM_FOLDERS


@dataclass(frozen=True)
class ChipObject:
    """One annotated object: its position k in the image's annotation, class id, box."""

    index: int
    class_id: int
    box: tuple


@dataclass(frozen=True)
class SourceImage:
    """One scene of the release and the subset ("train" or "test") its chips go to."""

    path: Path
    image_id: str
    subset: str
    objects: tuple


@dataclass(frozen=True)
class CropOptions:
    out: Path
    context: float = 0.0
    min_size: float = 0
    in_worker: bool = False  # cropping in a worker process of the preparer's pool


@dataclass
class Tally:
    """The entries written and the objects skipped (by reason), per subset."""

    entries: dict = field(default_factory=lambda: {subset: [] for subset in SUBSETS})
    skipped: dict = field(default_factory=lambda: {subset: Counter() for subset in SUBSETS})

    def counts(self, subset):
        return Counter(entry.class_id for entry in self.entries[subset])

    def all_skipped(self):
        return sum(self.skipped.values(), Counter())


# ---------------------------------------------------------------- boxes

def polygon_bounds(xs, ys):
    """The axis-aligned rectangle around a polygon; all NaN if a coordinate is not a number
    (min and max would pass over a NaN after the first), which is_degenerate then counts."""
    if not all(math.isfinite(value) for value in (*xs, *ys)):
        return (math.nan,) * 4
    return min(xs), min(ys), max(xs), max(ys)


def is_degenerate(box):
    """Zero or negative size, or not a number, as written: before any rounding (rounding
    outward would otherwise give it a pixel) or clipping (which would hide which it is)."""
    x0, y0, x1, y1 = box
    return not all(math.isfinite(value) for value in box) or x1 <= x0 or y1 <= y0


def clip_box(box, width, height):
    """Round a box outward to whole pixels and clip it to the image; None if nothing is left
    (a degenerate box, or one wholly outside the image)."""
    if is_degenerate(box):
        return None
    x0, y0, x1, y1 = box
    x0, y0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
    x1, y1 = min(math.ceil(x1), width), min(math.ceil(y1), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def pad_box(box, context):
    """Grow a box as written by `context` times its width/height on each side (before it is
    clipped: an object at the border gets the context of the same object elsewhere)."""
    x0, y0, x1, y1 = box
    pad_x, pad_y = (x1 - x0) * context, (y1 - y0) * context
    return x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y


def visible_size(box, width, height):
    """Width and height of the part of a box as written that lies in the image (before the
    outward rounding to whole pixels, which can add up to 2 pixels)."""
    x0, y0, x1, y1 = box
    return min(x1, width) - max(x0, 0), min(y1, height) - max(y0, 0)


# ---------------------------------------------------------------- reading the release

def class_lookup(class_names):
    """{name key: class id}: the releases spell the names otherwise ('Expressway-Service-area',
    'basketballcourt', 'baseball-diamond')."""
    return {class_name_key(name): cid for cid, name in class_names.items()}


def find_class(lookup, name, source, dataset):
    try:
        return lookup[class_name_key(name)]
    except KeyError:
        known = f"not one of the {len(lookup)} {dataset} classes"
        raise UserError(f"{source}: unknown class name {name!r}, {known}") from None


def read_release_text(path):
    """A text file of the release (an id list, a labelTxt file), decoded as UTF-8 after any
    byte-order mark. Their fields are ASCII, so a byte that is not UTF-8 means another kind
    of file (UTF-16 from an editor, a damaged download): refused by name, since decoding it
    leniently would only turn the bytes into ids or class names that fail later, or never."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:bom + exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[bom + exc.start]:02x}); "
                        "save the file as UTF-8") from None


def comma_list(text):
    """argparse type for 'train,val': a list of non-empty names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("expected a comma-separated list of names")
    return names


def existing_dir(path, flag):
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag}: folder not found: {path}")
    return path


def default_dir(src, candidates, flag):
    """The first of `candidates` (relative to --src) that exists, for a flag left unset."""
    for candidate in candidates:
        if (Path(src) / candidate).is_dir():
            return Path(src) / candidate
    tried = ", ".join(str(Path(src) / candidate) for candidate in candidates)
    raise UserError(f"{flag}: none of {tried} exists; pass {flag} to say where it is")


def index_images(folders):
    """{file stem: path} for the images in `folders`; the first folder (then the first name)
    wins a shared stem, and a stem of several files is warned about: a JPEG kept beside a
    scene's PNG, or a resized copy, is one of them."""
    index, others = {}, []
    for folder in folders:
        for path in sorted(Path(folder).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(path):
                if path.stem not in index:
                    index[path.stem] = path
                elif not same_image_file(index[path.stem], path):  # a folder linked or copied twice is no matter
                    others.append(path)
    if others:
        warnings.warn(f"{len(others)} images share their name with another image file (e.g. {index[others[0].stem]} "
                      f"and {others[0]}): the first of each is cropped; remove the others if that is not the scene "
                      "the labels were made on")
    return index


def same_image_file(first, second):
    """One file reached twice (a linked folder), or a copy of it (the same bytes: scenes of
    one size, as uncompressed BMP or TIFF scenes all are, may differ)."""
    try:
        return os.path.samefile(first, second) or filecmp.cmp(first, second, shallow=False)
    except OSError:
        return False


def check_disjoint(train_ids, test_ids, what):
    shared = sorted(set(train_ids) & set(test_ids))
    if shared:
        more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
        raise UserError(f"{what}: {shared[0]}{more} in both train and test")


def _at_least(minimum, kind):
    """argparse type: a number of `kind` no smaller than `minimum`."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value):  # nan passes any comparison's test by failing it
            raise ValueError("must be a finite number")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    parse.__name__ = f"{kind.__name__} >= {minimum}"  # argparse names the type in its error
    return parse


def add_crop_arguments(parser):
    parser.add_argument("--min-size", type=_at_least(0, float), default=0,
                        help="skip objects whose shorter side (within the image, as written) is below this many "
                             "pixels")
    parser.add_argument("--context", type=_at_least(0, float), default=0.0,
                        help="pad each box by this fraction of its width/height on every side, then clip it to the "
                             "image (0: the box only)")
    parser.add_argument("--workers", type=_at_least(1, int), default=4,
                        help="processes cropping in parallel (1: crop in this process)")


def make_class_dirs(out, class_ids):
    for subset in SUBSETS:
        for cid in class_ids:
            (Path(out) / subset / str(cid)).mkdir(parents=True, exist_ok=True)


def write_dataset(out, dataset, class_names, tally):
    """classes.json and the sorted annotation lists of every subset."""
    out = Path(out)
    for subset in SUBSETS:
        entries = sorted(tally.entries[subset], key=lambda entry: (entry.class_id, entry.relpath))
        write_annotation(out / "anno" / f"{dataset}_{subset}.txt", entries)
    write_classes_json(out / "classes.json", dataset, class_names)


def report(dataset, out, class_names, tally):
    """Per-class counts, totals and skips, as a table on stdout."""
    counts = {subset: tally.counts(subset) for subset in SUBSETS}
    width = max(display_width(name) for name in class_names.values())
    print(f"{dataset} -> {out}")
    print(f"{'id':>4}  {'class':<{width}}  {'train':>8}  {'test':>8}")
    for cid, name in sorted(class_names.items()):
        print(f"{cid:>4}  {padded(name, width)}  {counts['train'][cid]:>8}  {counts['test'][cid]:>8}")
    totals = {subset: sum(counts[subset].values()) for subset in SUBSETS}
    print(f"{'':>4}  {'total':<{width}}  {totals['train']:>8}  {totals['test']:>8}"
          f"  ({totals['train'] + totals['test']} images)")
    skipped = tally.all_skipped()
    if skipped:
        print(f"skipped {sum(skipped.values())} objects ({reasons(skipped)})")


def reasons(skipped):
    return ", ".join(f"{reason}: {number}" for reason, number in sorted(skipped.items()))


# ---------------------------------------------------------------- cropping

@contextmanager
def scenes_of_any_size():
    """Scenes open past PIL's decompression-bomb guard: DOTA's reach 20000 x 20000 pixels,
    and they are the public release the user downloaded. Only scenes: a chip past it is
    skipped (crop_chips), and a folder dataset's image keeps it, as every stage reading
    them does."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def crop_chips(image, options):
    """Save one chip per object of one scene; return (subset, entries, skipped)."""
    entries, skipped = [], Counter()
    # What every stage reading a chip allows: PIL refuses past twice its limit (and warns past it).
    chip_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    with scenes_of_any_size():  # PIL checks crops too: an airport's chip may be large
        try:
            scene = Image.open(image.path)
            scene.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise UserError(f"cannot read image {image.path}: {exc}") from exc
        with scene:
            if scene.mode == "F":  # PIL's convert would clip 0..1 values to black chips
                raise UserError(f"cannot read image {image.path}: 32-bit float pixels have no fixed range; convert "
                                "the scene to 8 or 16 bits")
            _crop_objects(scene, image, options, entries, skipped, chip_limit)
    return image.subset, entries, skipped


def _crop_objects(scene, image, options, entries, skipped, chip_limit=None):
    width, height = scene.size
    for obj in image.objects:
        box = clip_box(obj.box, width, height)
        if box is None:
            skipped["degenerate box" if is_degenerate(obj.box) else "outside the image"] += 1
            continue
        if min(visible_size(obj.box, width, height)) < options.min_size:
            skipped["smaller than --min-size"] += 1
            continue
        box = clip_box(pad_box(obj.box, options.context), width, height)
        if chip_limit and (box[2] - box[0]) * (box[3] - box[1]) > chip_limit:  # every stage would refuse it
            skipped["past twice PIL's image limit"] += 1
            continue
        relpath = f"{obj.class_id}/{image.image_id}_{obj.index}.jpg"
        target = options.out / image.subset / relpath
        if options.in_worker and preparer_gone():  # so is its build: nothing to write into
            os._exit(1)
        try:
            chip = chip_pixels(scene.crop(box))
        except ValueError as exc:
            raise UserError(f"cannot read image {image.path}: {exc}; convert the scene to 8 or 16 bits") from None
        try:
            chip.save(target, quality=JPEG_QUALITY)
        except OSError as exc:
            raise UserError(f"cannot write chip {target}: {exc.strerror or exc}") from exc
        entries.append(Entry(relpath, obj.class_id))


def chip_pixels(chip):
    """A chip as training would load it from the scene (tgn.data.load_image): 16-bit grey
    scaled to 0..255, not clipped at 255 by PIL's convert. Scaled per chip, as it is pointwise:
    the same pixels as scaling the scene, without a 20000 x 20000 scene in float64 (3.2 GB)."""
    if chip.mode.startswith("I"):
        chip = to_8_bit(chip)
    return chip.convert("RGB")


def crop_all(images, options, workers, tally):
    progress = dict(total=len(images), unit="image", desc="cropping", dynamic_ncols=True)
    if workers == 1:
        _collect(tqdm(map(partial(crop_chips, options=options), images), **progress), tally)
        return
    work = partial(crop_chips, options=replace(options, in_worker=True))
    with Pool(workers, initializer=start_cropping_worker) as pool:
        _collect(tqdm(pool.imap_unordered(work, images, chunksize=8), **progress), tally)


def start_cropping_worker():
    """A cropping worker leaves Ctrl-C to the preparer, which ends the pool (each worker
    printed its own traceback), and ends with the preparer: one orphaned by a kill (SIGKILL,
    SIGTERM, the OOM killer) went on writing chips into the build folder of the next run.
    It ends before its next chip (preparer_gone); on Linux at once, by the kernel
    (PR_SET_PDEATHSIG: the death of the process that forked it, the preparer or, under the
    forkserver start method, the server, which ends with the preparer)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl to call: the check before each chip serves
            pass
    if preparer_gone():  # before the request above was made
        os._exit(1)


def preparer_gone():
    """Whether the process that started this worker has ended. Not os.getppid(): under the
    forkserver start method (Linux's default from Python 3.14) the parent is the server, and
    Windows keeps a dead parent's id; the parent's sentinel tells under every start method."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _collect(results, tally):
    for subset, entries, skipped in results:
        tally.entries[subset].extend(entries)
        tally.skipped[subset].update(skipped)


def check_subsets_found(counts, hint):
    """Refuse a source in which a subset has nothing: a wrong layout, not an empty dataset."""
    for subset in SUBSETS:
        if not counts.get(subset):
            raise UserError(f"no {subset} objects found; {hint}")


def check_chips_written(tally, class_names, hint=""):
    """Refuse a subset whose objects were all skipped (a --min-size above them all, boxes
    off the image): objects were found, so the reasons say what emptied it. Refuse a class
    left without training chips too (classes.json lists it: every stage would stop at it),
    and warn of classes without test chips."""
    for subset in SUBSETS:
        if not tally.entries[subset]:
            skipped = tally.skipped[subset]
            raise UserError(f"no {subset} chips: all {sum(skipped.values())} {subset} objects were skipped "
                            f"({reasons(skipped)}); --out is left as it was")
    counts = {subset: tally.counts(subset) for subset in SUBSETS}
    untrained = [cid for cid in sorted(class_names) if not counts["train"][cid]]
    if untrained:
        skipped = tally.skipped["train"]
        why = f" (skipped objects of every class: {reasons(skipped)})" if skipped else ""
        raise UserError(f"class {untrained[0]} ({class_names[untrained[0]]}) has no training chips{why}: every "
                        f"stage needs training images of each class{hint}; --out is left as it was")
    warn_of_untested_classes([cid for cid in sorted(class_names) if not counts["test"][cid]], class_names)


def warn_of_untested_classes(untested, class_names, what="test chips"):
    if untested:
        warnings.warn(f"{len(untested)} of {len(class_names)} classes have no {what}, e.g. {untested[0]} "
                      f"({class_names[untested[0]]}): their accuracy is n/a, and KMDN stops if all head or all tail "
                      "classes have none")


def sixteen_bit_peak(image):
    """The brightest value, out of 65535, of a 16-bit image; None for other depths. PIL
    opens 16-bit colour (PNG, TIFF) as 8-bit RGB of each value's high byte, so only the
    undecoded tile's raw mode tells it was 16-bit."""
    if image.mode.startswith("I"):
        return image.getextrema()[1]
    if image.tile and ";16" in str(image.tile[0][3]):
        # The colour's high bytes: the 16-bit peak to 1/256. Not alpha's (dropped on loading),
        # which an opaque image holds at its top.
        return max(high for band, (_, high) in zip(image.getbands(), image.getextrema()) if band != "A") * 257
    return None


def warn_of_dark_16_bit_images(paths):
    """16-bit images load scaled from 0..65535 to 0..255 (grey: tgn.data.to_8_bit; colour:
    PIL keeps the high byte), so data of fewer bits in 16-bit files (a 12-bit sensor's
    0..4095) loads nearly black: say so before the dataset is built on them."""
    dark = []
    for path in progress_bar(paths, transient=True, desc="checking bit depths", unit="image"):
        try:
            with Image.open(path) as image:  # reads the header; only 16-bit images are decoded
                peak = sixteen_bit_peak(image)
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError):
            continue  # said in one line where it is read for its pixels
        if peak is not None and peak < 2 ** 14:
            dark.append((path, peak))
    if dark:
        path, peak = dark[0]
        warnings.warn(f"{len(dark)} 16-bit images use at most 14 of their 16 bits (e.g. {path}, brightest value "
                      f"{peak}): they are scaled from 0..65535 to 0..255 and load dark (brightest {round(peak / 257)} "
                      "of 255); scale them to 8 bits before preparing them")


def check_classes_annotated(images, class_names, left_out, hint=""):
    """Refuse, before any cropping, a class no training object is labelled with (lists
    that leave out its scenes, a partial download), or none the preparer kept (`left_out`:
    the reasons it left objects out, --skip-difficult)."""
    annotated = Counter(obj.class_id for image in images if image.subset == "train" for obj in image.objects)
    missing = [cid for cid in sorted(class_names) if not annotated[cid]]
    if missing:
        more = f" and {len(missing) - 1} more classes have" if len(missing) > 1 else " has"
        kept = f" (left out: {reasons(left_out)})" if left_out else ""
        raise UserError(f"class {missing[0]} ({class_names[missing[0]]}){more} no training object in the train "
                        f"subset's annotations{kept}: every stage needs training images of each class{hint}")


def prepare_chips(args, dataset, class_names, images, inputs, skipped=None, empty_class_hint=""):
    """The common tail of the chip preparers: output folder, crops, lists, counts.
    `skipped`: {subset: Counter of reasons} for objects the preparer left out itself;
    `empty_class_hint` ends the error for a class without training chips (what to do)."""
    tally = Tally(skipped={subset: Counter((skipped or {}).get(subset, {})) for subset in SUBSETS})
    annotated = Counter(image.subset for image in images for _ in image.objects)
    check_subsets_found(annotated + Counter({subset: sum(tally.skipped[subset].values()) for subset in SUBSETS}),
                        "check --src and the layout its --help describes")
    check_classes_annotated(images, class_names, tally.skipped["train"], empty_class_hint)
    with scenes_of_any_size():
        warn_of_dark_16_bit_images([image.path for image in images])
    with building_dataset(args.out, args.overwrite, inputs) as folder:
        make_class_dirs(folder, class_names)
        options = CropOptions(out=folder, context=args.context, min_size=args.min_size)
        crop_all(images, options, args.workers, tally)
        check_chips_written(tally, class_names, empty_class_hint)  # inside: a dataset written before stays in --out
        write_dataset(folder, dataset, class_names, tally)
    report(dataset, Path(args.out), class_names, tally)
    return tally
