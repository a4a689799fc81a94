"""The tail-class data of CDTG: a manifest written by CDTG/dataset_split.py.

The manifest (`tail_classes.json`) fixes the generator's label order (label k is the
k-th tail class of the split: by training count, descending, ties by class id; the tail
model's output order too), the
class names and the CLIP prompts; `train.txt` lists the tail training images in the
dataset's annotation format, pointing into DATA (nothing is copied).
"""
import re
import string
import unicodedata
import warnings
from pathlib import Path

import torch
from torchvision import transforms

from CDTG.clip_loss import tokenize_prompts
from CDTG.parallel import epoch_order_seed
from tgn import distributed as dist
from tgn.data import (CLASS_ID, changed_entries, changed_text, check_files_exist, check_outside_dataset,
                      drop_unreadable, open_dataset, read_annotation, samples_for, write_annotation)
from tgn.errors import UserError
from tgn.handoff import TAIL_MANIFEST
from tgn.images import ImageList
from tgn.io import absolute_path, atomic_write_json, make_folder, read_json, remove_temp_files
from tgn.resnet import load_feature_resnet
from tgn.resume import warn_if_unfinished
from tgn.run_folder import check_own_run_folder
from tgn.runlock import claim_folder
from tgn.split import check_model_classes, check_recorded_dataset, check_split_matches, load_split

IMAGE_LIST = "train.txt"
MANIFEST_FORMAT = "tgn-cdtg-data/1"


class TailClasses:
    """Tail classes in generator label order, with names, prompts and training images."""

    def __init__(self, folder, data_root, classes, split_fingerprint=None):
        self.folder = Path(folder)
        self.data_root = absolute_path(data_root)  # recorded in the manifest, read from any folder
        self.classes = classes  # list of {"label", "id", "name", "prompt", "train_count"}
        self.split_fingerprint = split_fingerprint

    @property
    def ids(self):
        return [c["id"] for c in self.classes]

    @property
    def names(self):
        return [c["name"] for c in self.classes]

    @property
    def prompts(self):
        return [c["prompt"] for c in self.classes]

    def label_of(self):
        return {c["id"]: c["label"] for c in self.classes}

    def entries(self):
        return read_annotation(self.folder / IMAGE_LIST)

    def samples(self):
        """(image path, generator label) of every tail training image, checked to exist."""
        entries = self.entries()
        self.check_matches_dataset(entries)
        check_files_exist(self.data_root / "train", entries, self.folder / IMAGE_LIST)
        return samples_for(self.data_root / "train", entries, self.label_of())

    def check_matches_dataset(self, entries):
        """train.txt is DATA's training list cut to the tail classes: refuse it once DATA lists
        other images (prepared again, images added), as KMDN refuses its split then."""
        with warnings.catch_warnings():  # only DATA's list is read here: its warnings were given by the splits
            warnings.simplefilter("ignore")
            info = open_dataset(self.data_root)
            tail_ids = set(self.ids)
            current = [entry for entry in info.entries("train", check_files=False) if entry.class_id in tail_ids]
        only_kept, only_current = changed_entries(entries, current)
        if only_kept or only_current:
            raise UserError(f"{self.folder / IMAGE_LIST} lists other tail images than {info.annotation_path('train')} "
                            f"({changed_text(only_kept, only_current)}): DATA changed since the tail data was made; "
                            "make the splits again (KMDN/dataset_split.py, then CDTG/dataset_split.py)")

    def write(self):
        atomic_write_json(self.folder / TAIL_MANIFEST, {
            "format": MANIFEST_FORMAT,
            "data_root": str(self.data_root),
            "split_fingerprint": self.split_fingerprint,
            "classes": self.classes,
        })


def load_tail_classes(folder, data_root=None):
    folder = Path(folder)
    path = folder / TAIL_MANIFEST if folder.is_dir() or not folder.suffix else folder
    if not path.is_file():
        raise UserError(f"tail-class data not found: {path} (run CDTG/dataset_split.py first)")
    data = read_json(path, "tail-class manifest")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a manifest written by CDTG/dataset_split.py")
    if not isinstance(data.get("data_root"), str) or not isinstance(data.get("classes"), list):
        raise UserError(f"{path} was edited by hand (its 'data_root' or 'classes' is gone): make it again with "
                        "CDTG/dataset_split.py")
    check_manifest_classes(data["classes"], path)
    classes = sorted(data["classes"], key=lambda c: c["label"])
    if [c["label"] for c in classes] != list(range(len(classes))):
        raise UserError(f"{path}: labels must be 0..{len(classes) - 1}")
    check_recorded_dataset(data["data_root"], path, data_root)
    return TailClasses(path.parent, data_root or data["data_root"], classes, data.get("split_fingerprint"))


# What each class of the manifest holds. Its prompts may be edited (the README says how).
MANIFEST_CLASS_KEYS = (("label", int), ("id", int), ("name", str), ("prompt", str), ("train_count", int))


def check_manifest_classes(classes, path):
    """Refuse, in one line, a class of the manifest without one of its keys or with a value of
    another type, an empty prompt, or a prompt template left unfilled."""
    for position, cls in enumerate(classes, 1):
        for key, kind in MANIFEST_CLASS_KEYS:
            value = cls.get(key) if isinstance(cls, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserError(f"{path}: class {position} of its list needs a {key!r} ({kind.__name__}): was it "
                                "edited by hand? Make it again with CDTG/dataset_split.py")
        prompt = cls["prompt"]
        if not prompt.strip():
            raise UserError(f"{path}: tail class {cls['id']} has an empty prompt; write one (e.g. 'A photo of a "
                            f"{cls['name']}')")
        if "{name}" in prompt:
            raise UserError(f"{path}: the prompt of tail class {cls['id']} is a template ({prompt!r}): write the "
                            "class name in it")


def gan_transform(size):
    """Resize to the GAN resolution and map to [-1, 1]; --flip flips are drawn per step on the batch."""
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])


def tail_image_dataset(tail, size, skip_bad_images=False, draft=True):
    """The real tail images at `size`; `draft=False` (--full-decode) decodes JPEGs in full."""
    samples = drop_unreadable(tail.samples(), skip_bad_images, "tail training images")
    counts = {label: 0 for label in range(len(tail.classes))}
    for _, label in samples:
        counts[label] += 1
    empty = [label for label, count in counts.items() if count == 0]
    if empty:
        cls = tail.classes[empty[0]]
        raise UserError(f"tail class {cls['id']} ({cls['name']}) has no training image in {tail.folder / IMAGE_LIST}")
    return ImageList(samples, gan_transform(size), size, draft=draft)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch indices for steps start..end-1, as the official loader draws them: shuffled
    epochs without replacement, each epoch's last partial batch dropped (RandomSampler,
    drop_last=True). Epoch e's order depends only on (seed, e), so step s's batch depends
    only on (seed, s) and an interrupted run resumes on exactly the batches the
    uninterrupted run would have seen. A tail set smaller than one batch (where the official
    loader yields nothing and its training loop never ends) fills each batch by cycling its
    shuffled images. `batch_size` is the global batch: under torchrun each process takes its
    share (positions rank, rank + N, ...).
    """

    def __init__(self, dataset_size, batch_size, seed, start, end):
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.seed, self.start, self.end = seed, start, end
        self.steps_per_epoch = max(dataset_size // batch_size, 1)
        dist.local_batch(batch_size, "--batch")

    def __len__(self):
        return max(self.end - self.start, 0)

    def epoch_order(self, epoch):
        generator = torch.Generator().manual_seed(epoch_order_seed(self.seed, epoch))
        order = torch.randperm(self.dataset_size, generator=generator)
        return order.repeat(-(-self.batch_size // self.dataset_size))  # once, unless smaller than a batch

    def __iter__(self):
        order, order_epoch = None, None
        for step in range(self.start, self.end):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            yield dist.shard(order[position * self.batch_size:(position + 1) * self.batch_size].tolist())


def check_distinct_prompts(tail):
    """Refuse two tail classes of one prompt where CLIP reads them (the loss, the evaluation's
    CLIP accuracy): CLIP could not tell the two classes apart."""
    prompts = [" ".join(cls["prompt"].lower().split()) for cls in tail.classes]
    shared = next((cls for cls, prompt in zip(tail.classes, prompts) if prompts.count(prompt) > 1), None)
    if shared is not None:
        raise UserError(f"{tail.folder / TAIL_MANIFEST}: two tail classes have the prompt {shared['prompt']!r}; CLIP "
                        "tells the classes apart by their prompts, so give each its own (or leave CLIP out, --clip "
                        "none)")


def check_prompts_name_classes(tail):
    """The CLIP loss pulls each tail class's images towards its prompt: refuse a prompt made
    of a number for a name (a dataset without classes.json names its classes by id, class
    folders numbered 1..N are named so), which would pull them towards 'A photo of a 4';
    warn of prompts in another script than Latin, which CLIP barely knows."""
    check_distinct_prompts(tail)
    for cls in tail.classes:
        name = str(cls["name"])
        if CLASS_ID.fullmatch(name) and re.search(rf"(?<![0-9]){name}(?![0-9])", cls["prompt"]):
            raise UserError(f"tail class {cls['id']} is named {name!r}, so its CLIP prompt reads {cls['prompt']!r}: "
                            f"write the class names in the prompts of {tail.folder / TAIL_MANIFEST}, or in "
                            "DATA/classes.json and run the splits again, or train without the CLIP loss (--clip none)")
    foreign = [cls for cls in tail.classes if any(char.isalpha() and not unicodedata.name(char, "").startswith("LATIN")
                                                  for char in cls["prompt"])]
    if foreign:  # a warning, not an error: a prompt of another script still tells the classes apart
        warnings.warn(f"the CLIP prompts of {len(foreign)} tail classes hold letters outside the Latin alphabet (e.g. "
                      f"{foreign[0]['prompt']!r}): CLIP learned from English captions and barely knows them; write "
                      f"English names in the prompts of {tail.folder / TAIL_MANIFEST}")


def load_teacher(path, tail):
    """The tail model M_T, checked against the tail classes (count, and ids where recorded)."""
    teacher, checkpoint = load_feature_resnet(path, "tail model (--teacher)")
    warn_if_unfinished(path, "--teacher")
    check_model_classes(f"--teacher {path}", checkpoint, teacher.config["num_classes"], tail.ids,
                        [c["train_count"] for c in tail.classes], "the tail data", tail.names)
    if checkpoint.get("distilled") is False:
        warnings.warn(f"--teacher {path} was written by a Distill.py run too short to distill it (the tail model "
                      "as given)")
    return teacher


def check_prompt(prompt):
    """A --prompt template holds {name}, and no other field, conversion or format in braces
    ({name.x}, {name!r}, {name:>9}): each class's prompt is the template with its name."""
    only_name = f"--prompt {prompt!r}: only {{name}} may stand in braces (write {{{{ and }}}} for a brace itself)"
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(prompt)
                  if field is not None]
    except ValueError as exc:  # an unmatched brace
        raise UserError(f"{only_name}; {exc}") from exc
    odd = [field for field in fields if field != ("name", "", None)]
    if odd:
        raise UserError(f"{only_name}; it holds {{{odd[0][0]}{'!' + odd[0][2] if odd[0][2] else ''}"
                        f"{':' + odd[0][1] if odd[0][1] else ''}}}")
    if not fields:
        raise UserError("--prompt must contain {name}")


def write_tail_data(args):
    """CDTG/dataset_split.py: the manifest and image list of the split's tail classes."""
    check_prompt(args.prompt)
    check_own_run_folder(args.out, args, writes=TAIL_MANIFEST)  # a trainer's run folder: not tail data
    if (args.out / TAIL_MANIFEST).exists() and not args.overwrite:
        raise UserError(f"{args.out / TAIL_MANIFEST} exists; pass --overwrite to replace it")
    split = load_split(args.split, data_root=args.data_root)
    info = open_dataset(split.data_root)
    check_outside_dataset(args.out, info.root)
    check_split_matches(split, info)
    entries = split.entries("tail", "train")
    # The dataset's names, not the split's: a split of DIOR or FGSC-23 without classes.json
    # that an earlier version made names the classes by id, the dataset now in words.
    classes = [
        {"label": label, "id": cid, "name": info.class_names[cid],
         "prompt": args.prompt.format(name=info.class_names[cid]), "train_count": split.train_counts[cid]}
        for label, cid in enumerate(split.tail)
    ]
    tokenize_prompts([cls["prompt"] for cls in classes])  # CLIP takes at most 77 tokens
    tail = TailClasses(args.out, split.data_root, classes, split.fingerprint)
    make_folder(args.out)
    claim_folder(args.out)  # a second run into it is refused: it would remove this one's temp files
    remove_temp_files(args.out)  # what a run killed mid-write left
    write_annotation(args.out / IMAGE_LIST, entries)
    tail.write()
    print(f"{len(classes)} tail classes, {len(entries)} training images")
    for cls in classes:
        print(f"  label {cls['label']:2d}  class {cls['id']:4d}  {cls['train_count']:6d} images  \"{cls['prompt']}\"")
    print(f"wrote {args.out / TAIL_MANIFEST}")
