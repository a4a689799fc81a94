"""Images of the classifier: DATA's own plus generated ones (--extra), labelled by output index.

The model's output index of a class is the position of its id among DATA's sorted class
ids (DIOR: identity 0..19, as in result.pth). A generated folder given with --extra holds

    <DIR>/anno.txt            lines "<class_id>/<file> <class_id>", paths relative to <DIR>
    <DIR>/<class_id>/<file>

(the dataset's annotation format with <DIR> as the image root). An image listed twice, in
one folder or across folders, is used once.
"""
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tgn.class_names import class_name_key
from tgn.data import check_files_exist, drop_unreadable, read_annotation, samples_for
from tgn.errors import UserError
from tgn.handoff import GENERATED_ANNOTATION, GENERATION_UNFINISHED, TAIL_MANIFEST, read_generation_settings
from tgn.io import same_path



def class_order(info):
    """DATA's class ids in output order, and the map class id -> output index."""
    class_ids = sorted(info.class_names)
    return class_ids, {cid: index for index, cid in enumerate(class_ids)}


def count_per_class(entries, class_ids):
    counts = {cid: 0 for cid in class_ids}
    for entry in entries:
        counts[entry.class_id] += 1
    return [counts[cid] for cid in class_ids]


def read_extra(folder, class_names, names_known=True):
    """Entries of one generated folder, checked: known class ids, existing images, and
    (`names_known`: DATA has a class list) the class names it was generated for."""
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"--extra {folder} is a file; pass the generation folder that holds it")
    if not folder.is_dir():
        raise UserError(f"--extra {folder}: folder not found")
    if (folder / GENERATION_UNFINISHED).exists():
        raise UserError(f"--extra {folder}: its generation has not finished ({GENERATION_UNFINISHED}: stopped or still "
                        "running); run CDTG/generation.py again with the same flags to finish it")
    annotation = folder / GENERATED_ANNOTATION
    if not annotation.is_file():
        raise UserError(f"--extra {folder}: no {GENERATED_ANNOTATION} (lines '<class_id>/<file> <class_id>')")
    entries = read_annotation(annotation)
    if not entries:  # training would silently be the baseline
        raise UserError(f"--extra {folder}: {annotation} lists no images")
    unknown = sorted({entry.class_id for entry in entries} - set(class_names))
    if unknown:
        raise UserError(f"{annotation}: class id {unknown[0]} is not a class of the dataset")
    recorded = generated_class_names(folder) if names_known else {}
    for cid in sorted({entry.class_id for entry in entries}):
        if cid in recorded and class_name_key(recorded[cid]) != class_name_key(class_names[cid]):
            raise UserError(f"--extra {folder}: its class {cid} is '{recorded[cid]}', the dataset's class {cid} is "
                            f"'{class_names[cid]}': generated for another dataset or class numbering (adding a class "
                            "folder renumbers the ones after it)")
    check_files_exist(folder, entries, annotation)
    return entries


def generated_class_names(folder):
    """{class id: name} that a generation.py folder was made for, where known: its
    generation.json's, or (folders of earlier versions) those of the tail data it names."""
    settings = read_generation_settings(folder)
    try:
        if isinstance(settings.get("class_names"), dict):
            return {int(cid): name for cid, name in settings["class_names"].items()}
        manifest = json.loads((Path(settings["data"]) / TAIL_MANIFEST).read_text(encoding="utf-8"))
        return {int(cls["id"]): cls["name"] for cls in manifest["classes"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # not a generation.py folder, or its tail data is gone: nothing to compare


# What a generated folder's images are, as generation.json records it (not where the
# checkpoint, tail data or folder lie: a folder may move).
GENERATION_IDENTITY = ("weights", "real_features", "real_images", "r", "truncation", "truncation_centre", "seed",
                       "amp", "quality", "decode")
# Their values of folders made before they were recorded: left out, so that such a folder
# made again alike keeps its fingerprint.
IDENTITY_BEFORE = {"decode": "draft"}


def generated_identity(folder, entries):
    """A folder's generation settings that decide its images, and the images it lists."""
    settings = read_generation_settings(folder)
    return {"settings": {key: settings[key] for key in GENERATION_IDENTITY
                         if key in settings and not (key in IDENTITY_BEFORE and settings[key] == IDENTITY_BEFORE[key])},
            "images": sorted(entry.relpath for entry in entries)}


def warn_of_folders_generated_alike(folders, identities):
    """Two --extra folders generation.py made with the same checkpoint, --seed and settings
    hold the same images under the same names (each image follows from its class and
    index): a second generation "for more images" with the default --seed repeats the first."""
    seen = {}
    for folder, identity in zip(folders, identities):
        if "weights" not in identity["settings"]:  # not generation.py's (or of a version that recorded no weights)
            continue
        key = json.dumps(identity["settings"], sort_keys=True)
        if key in seen and not same_path(seen[key][0], folder):  # one folder twice: its images are used once
            earlier, names = seen[key]
            repeated = len(names & set(identity["images"]))
            if repeated:
                warnings.warn(f"--extra {folder} repeats {repeated} images of --extra {earlier}: both were generated "
                              "from the same checkpoint with the same --seed and settings, so images of the same name "
                              "are the same image, and each counts twice; generate more with another --seed")
            names |= set(identity["images"])
        elif key not in seen:
            seen[key] = (folder, set(identity["images"]))


@dataclass
class TrainingImages:
    samples: list  # (absolute path, output index)
    real_counts: list  # per output index: DATA's training images
    generated_counts: list  # per output index: images added from --extra
    duplicates: int  # listed images skipped because already present
    # --resume compares it: the same counts may be other images (another checkpoint's, another r).
    generated_fingerprint: str = None


def path_resolver():
    """path -> the file it names, as Path.resolve() finds it but resolving each folder once:
    per file it made a dozen system calls, 9 s for 150k images in every process (more on a
    network file system). A file that is itself a link is resolved whole. On Windows the
    case is folded too (os.path.normcase), as its file systems ignore it."""
    folders = {}

    def resolved(path):
        path = Path(path)
        if path.is_symlink():
            return os.path.normcase(path.resolve())
        if path.parent not in folders:
            folders[path.parent] = path.parent.resolve()
        return os.path.normcase(folders[path.parent] / path.name)

    return resolved


def training_images(info, extra_folders=()):
    """DATA's training images followed by the generated ones, without duplicates."""
    class_ids, label_of = class_order(info)
    real = info.entries("train")
    samples = samples_for(info.image_root("train"), real, label_of)
    resolved = path_resolver()
    label_by_path = {resolved(path): label for path, label in samples}
    generated = []
    duplicates = 0
    identities = []
    for folder in extra_folders:
        entries = read_extra(folder, info.class_names, info.has_class_list)
        identities.append(generated_identity(folder, entries))
        for entry, (path, label) in zip(entries, samples_for(folder, entries, label_of)):
            key = resolved(path)
            if key in label_by_path:
                if label_by_path[key] != label:
                    raise UserError(f"{Path(folder) / GENERATED_ANNOTATION}: {entry.relpath} is listed with another "
                                    "class elsewhere")
                duplicates += 1
                continue
            label_by_path[key] = label
            generated.append(entry)
            samples.append((path, label))
    warn_of_folders_generated_alike(extra_folders, identities)
    # In any order: a duplicate is one file, whichever folder lists it first.
    identities = sorted(json.dumps(identity, sort_keys=True) for identity in identities)
    fingerprint = hashlib.sha256("\n".join(identities).encode("utf-8")).hexdigest()[:16] if identities else None
    return TrainingImages(samples, count_per_class(real, class_ids), count_per_class(generated, class_ids),
                          duplicates, fingerprint)


def readable_training_images(images, skip_bad_images):
    """The training images less, with --skip-bad-images, the unreadable ones, counted again:
    the report, the checkpoint (which test.py groups head and tail by) and --resume count
    the images trained on."""
    n_real, n_classes = sum(images.real_counts), len(images.real_counts)
    # Counted apart: an unreadable generated image is --extra's, not DATA's, to mend.
    samples = drop_unreadable(images.samples[:n_real], skip_bad_images, "training images") + \
        drop_unreadable(images.samples[n_real:], skip_bad_images, "generated images (--extra)")
    if len(samples) == len(images.samples):
        return images
    kept = {path for path, _ in samples}  # unique: duplicates were left out above
    real = Counter(label for path, label in images.samples[:n_real] if path in kept)
    generated = Counter(label for path, label in images.samples[n_real:] if path in kept)
    return TrainingImages(samples, [real[index] for index in range(n_classes)],
                          [generated[index] for index in range(n_classes)], images.duplicates,
                          images.generated_fingerprint)
