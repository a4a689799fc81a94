"""The head/tail split: computed once by KMDN/dataset_split.py, read by every later stage.

A split folder holds `split.json` and four annotation lists (head/tail x train/test) in
the dataset's own format, pointing into DATA (nothing is copied). Within a group the
model's output index follows the ranking (training count, descending), as the official
scripts list their classes (DIOR head: 13, 18, 15, 0, 16, 2, 11, 19), so that official
KMDN and CDTG weights, which record no class order, map to the right classes;
`split.json` spells the order out.
"""
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tgn.class_names import class_name_key, names_unlike_dior, refuse_renamed_class
from tgn.data import SUBSETS, changed_entries, changed_text, check_files_exist, read_annotation, samples_for, \
    write_annotation
from tgn.errors import UserError, speaks
from tgn.io import absolute_path, atomic_write_json, make_folder, read_json, remove_temp_files
from tgn.runlock import claim_folder

SPLIT_FORMAT = "tgn-split/1"
GROUPS = ("head", "tail")
# DIOR's head and tail classes as the official KMDN scripts list them (UModel.py, RModel.py
# and Distill.py's `specific_classes`; by the official release's training counts,
# descending): official weights' output k is the k-th of their group. CDTG's official
# dataset_split.py numbers the tail folders in the same order.
OFFICIAL_DIOR_HEAD = [13, 18, 15, 0, 16, 2, 11, 19]
OFFICIAL_DIOR_TAIL = [4, 3, 10, 12, 7, 5, 8, 14, 1, 9, 6, 17]
OFFICIAL_DIOR_GROUPS = {"head": (OFFICIAL_DIOR_HEAD, "KMDN/UModel.py"),
                        "tail": (OFFICIAL_DIOR_TAIL, "KMDN/RModel.py (and CDTG/train.py)")}


def head_count(num_classes, threshold_percent):
    """How many classes are head: floor(threshold% of the classes), at least one of each group."""
    if num_classes < 2:
        raise UserError(f"a head/tail split needs at least 2 classes, the dataset has {num_classes}")
    if not 0 < threshold_percent < 100:
        raise UserError(f"--threshold must be above 0 and below 100 (percent of classes), got {threshold_percent}")
    # The small epsilon keeps e.g. 20 * 40 / 100 = 8 from flooring to 7 on float error.
    count = math.floor(num_classes * threshold_percent / 100 + 1e-9)
    return min(max(count, 1), num_classes - 1)


def rank_classes(train_counts):
    """Class ids by training count, descending; ties broken by ascending class id."""
    return sorted(train_counts, key=lambda cid: (-train_counts[cid], cid))


def head_and_tail(train_counts, threshold_percent):
    """(head, tail) class ids, each by training count, descending: the top threshold% are head."""
    ranking = rank_classes(train_counts)
    n_head = head_count(len(ranking), threshold_percent)
    return ranking[:n_head], ranking[n_head:]


def check_official_order(source, listing, ids, counts, names):
    """Official KMDN and CDTG weights record no classes: their output k is the k-th class of
    its group by the official release's training counts, descending. Refuse a listing in
    another order (splits and tail data made by earlier versions of this code list classes
    by ascending id), and DIOR's head or tail group ranked otherwise than the official
    scripts list it. Other datasets' groups cannot be checked: say what is assumed. `ids`,
    `counts`, `names`: the listing's classes in output order."""
    if any(later > earlier for earlier, later in zip(counts, counts[1:])):
        raise UserError(f"{source} is an official file, whose outputs follow the training counts (descending), "
                        f"but {listing} lists its classes in another order (made by an earlier version?); "
                        "make the split (and the CDTG tail data) again")
    ids = list(ids)
    for group, (official, script) in OFFICIAL_DIOR_GROUPS.items():
        if set(ids) != set(official) or names_unlike_dior(ids, names):
            continue
        if ids != official:
            raise UserError(f"{source} is an official file: its outputs are DIOR's {group} classes as the official "
                            f"scripts rank them ({', '.join(map(str, official))}), but this DIOR's training counts "
                            f"rank them {', '.join(map(str, ids))} (prepared otherwise than the official release?), "
                            f"so its outputs would name other classes; train the {group} model on this data with "
                            f"{script} instead")
        return
    if speaks():
        print(f"note: {source} records no classes: its output k is taken as the k-th class of {listing} by "
              "training count, which is the ranking its training data had only if this dataset was prepared as "
              "that data was (CDTG/evaluate.py --teacher shows the tail model's accuracy per class)")


def check_model_classes(source, checkpoint, num_classes, ids, counts, listing, names):
    """A ResNet's outputs against the classes `listing` holds (check_recorded_classes); an
    official file is a bare state dict."""
    check_recorded_classes(source, checkpoint, num_classes, ids, counts, listing, names,
                           official="state_dict" not in checkpoint)


def check_recorded_classes(source, checkpoint, num_classes, ids, counts, listing, names, *, official):
    """A model's outputs (a ResNet's classes, a generator's labels) against the classes
    `listing` holds (`ids`, their training `counts` and `names`, in output order): their
    number always; an official file, which records no classes, by the training-count order;
    ours by the class ids and names they record (another dataset of as many images per class
    names them otherwise)."""
    if num_classes != len(ids):
        raise UserError(f"{source} has {num_classes} classes, {listing} has {len(ids)}")
    if official:
        check_official_order(source, listing, ids, counts, names)
    elif checkpoint.get("class_ids") is not None and list(checkpoint["class_ids"]) != list(ids):
        raise UserError(f"{source} was trained on classes {checkpoint['class_ids']}, {listing} has {list(ids)} "
                        "(another split?)")
    else:
        refuse_renamed_class(checkpoint.get("class_names"), names, ids, source, listing, " (another dataset?)")


def fingerprint(class_names, train_counts):
    """Identifies the dataset a split was made from (class ids, names, training counts)."""
    text = ";".join(f"{cid}:{class_names[cid]}:{train_counts[cid]}" for cid in sorted(class_names))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Split:
    """Everything later stages need to know about the classes and their groups."""

    dataset: str
    data_root: Path
    threshold: float
    class_names: dict  # class id -> name
    train_counts: dict  # class id -> number of training images
    test_counts: dict
    head: list  # class ids in head-model output order
    tail: list  # class ids in tail-model output order
    folder: Path = None
    ranking: list = field(default_factory=list)

    def ids(self, group):
        if group not in GROUPS:
            raise ValueError(group)
        return self.head if group == "head" else self.tail

    def names(self, group):
        return [self.class_names[cid] for cid in self.ids(group)]

    def label_of(self, group):
        """Dataset class id -> output index of the group's model."""
        return {cid: index for index, cid in enumerate(self.ids(group))}

    def annotation_path(self, group, subset):
        return self.folder / f"{group}_{subset}.txt"

    def entries(self, group, subset):
        return read_annotation(self.annotation_path(group, subset))

    def samples(self, group, subset):
        """(image path, model label) pairs of a group's images in DATA/<subset>, all checked to exist."""
        entries = self.entries(group, subset)
        check_files_exist(self.data_root / subset, entries, self.annotation_path(group, subset))
        return samples_for(self.data_root / subset, entries, self.label_of(group))

    @property
    def fingerprint(self):
        return fingerprint(self.class_names, self.train_counts)

    def to_json(self):
        classes = [
            {
                "id": cid,
                "name": self.class_names[cid],
                "train_count": self.train_counts[cid],
                "test_count": self.test_counts.get(cid, 0),
                "group": "head" if cid in self.head else "tail",
            }
            for cid in sorted(self.class_names)
        ]
        return {
            "format": SPLIT_FORMAT,
            "dataset": self.dataset,
            "data_root": str(self.data_root),
            "threshold_percent": self.threshold,
            "ranking": self.ranking,
            "head": self.head,
            "tail": self.tail,
            "fingerprint": self.fingerprint,
            "classes": classes,
        }


def compute_split(info, threshold_percent):
    """Count the training images per class and split the ranking at the threshold."""
    train_entries = info.entries("train")
    test_entries = info.entries("test")
    train_counts = {cid: 0 for cid in info.class_names}
    for entry in train_entries:
        train_counts[entry.class_id] += 1
    empty = [cid for cid, count in train_counts.items() if count == 0]
    if empty:
        cid = empty[0]
        raise UserError(
            f"class {cid} ({info.class_names[cid]}) has no training image in {info.annotation_path('train')}"
        )
    test_counts = {cid: 0 for cid in info.class_names}
    for entry in test_entries:
        test_counts[entry.class_id] += 1
    head, tail = head_and_tail(train_counts, threshold_percent)
    split = Split(
        dataset=info.name,
        data_root=absolute_path(info.root),
        threshold=threshold_percent,
        class_names=dict(info.class_names),
        train_counts=train_counts,
        test_counts=test_counts,
        head=head,
        tail=tail,
        ranking=head + tail,
    )
    return split, {"train": train_entries, "test": test_entries}


def write_split(split, entries_by_subset, folder):
    """split.json plus head/tail annotation lists; the lists keep DATA-relative paths."""
    folder = make_folder(folder)
    claim_folder(folder)  # a second split into it is refused: it would remove this one's temp files
    remove_temp_files(folder)  # what a split killed mid-write left
    split.folder = folder
    for group in GROUPS:
        members = set(split.ids(group))
        for subset, entries in entries_by_subset.items():
            write_annotation(split.annotation_path(group, subset), [e for e in entries if e.class_id in members])
    atomic_write_json(folder / "split.json", split.to_json())


def load_split(path, data_root=None):
    """Read a split folder (or its split.json); `data_root` overrides the recorded one."""
    path = Path(path)
    json_path = path / "split.json" if path.is_dir() else path
    if not json_path.is_file():
        raise UserError(f"split file not found: {json_path} (run KMDN/dataset_split.py first)")
    data = read_json(json_path, "split file")
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise UserError(f"{json_path} is not a split file made by KMDN/dataset_split.py")
    try:
        split = split_of_json(data, json_path, data_root)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a key gone, a value of another type
        what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else "a value of the wrong type"
        raise UserError(f"{json_path} was edited by hand ({what}): make it again with KMDN/dataset_split.py") from None
    if data.get("fingerprint") != split.fingerprint:
        raise UserError(f"{json_path} was edited by hand: its fingerprint does not match its classes")
    check_groups(split, json_path)
    return split


def check_groups(split, json_path):
    """Every class in exactly one group: a hand-edited head or tail list would train a model
    on classes it has no outputs for, or leave some out of every stage."""
    listed = split.head + split.tail
    unknown = [cid for cid in listed if cid not in split.class_names]
    twice = sorted({cid for cid in listed if listed.count(cid) > 1})
    missing = sorted(set(split.class_names) - set(listed))
    problem = (f"its groups name class {unknown[0]}, which it does not list" if unknown else
               f"class {twice[0]} is in its groups twice" if twice else
               f"class {missing[0]} is in neither group" if missing else None)
    if problem:
        raise UserError(f"{json_path} was edited by hand: {problem}; make it again with KMDN/dataset_split.py "
                        "(--threshold sets the groups)")


def check_recorded_dataset(recorded, recorded_in, data_root=None):
    """The dataset folder a split or tail data records must be there, unless --data-root
    (`data_root`) says where it moved."""
    if not data_root and not Path(recorded).is_dir():
        raise UserError(f"dataset folder not found: {recorded} (recorded in {recorded_in}); pass --data-root if the "
                        "dataset moved")


def split_of_json(data, json_path, data_root=None):
    check_recorded_dataset(data["data_root"], json_path, data_root)
    classes = {int(item["id"]): item for item in data["classes"]}
    return Split(
        dataset=data["dataset"],
        data_root=absolute_path(data_root) if data_root else Path(data["data_root"]),
        threshold=data["threshold_percent"],
        class_names={cid: item["name"] for cid, item in classes.items()},
        train_counts={cid: int(item["train_count"]) for cid, item in classes.items()},
        test_counts={cid: int(item["test_count"]) for cid, item in classes.items()},
        head=[int(c) for c in data["head"]],
        tail=[int(c) for c in data["tail"]],
        folder=json_path.parent,
        ranking=[int(c) for c in data.get("ranking", [])],
    )


def check_split_matches(split, info, image_lists=True):
    """Refuse a split made from another dataset than DATA: other class ids, training counts,
    class names or image lists. Names compare with spelling aside (DIOR prepared again names
    'basketballcourt' 'basketball court'), and a DIOR or FGSC-23 folder without classes.json
    also matches the split an earlier version made of it, naming its classes by id. Without
    `image_lists` (Classification, whose split only groups the classes, which the counts
    decide) the lists are not compared."""
    current = {"train": info.entries("train", check_files=False)}
    counts = {cid: 0 for cid in info.class_names}
    for entry in current["train"]:
        counts[entry.class_id] = counts.get(entry.class_id, 0) + 1
    same_classes = set(split.class_names) == set(info.class_names) and split.train_counts == counts
    named_alike = same_classes and all(class_name_key(split.class_names[cid]) == class_name_key(info.class_names[cid])
                                       for cid in info.class_names)
    named_by_id = same_classes and not info.has_class_list and all(
        split.class_names[cid] == str(cid) for cid in info.class_names)
    if not (named_alike or named_by_id):
        raise UserError(
            f"split {split.folder} was made from another dataset than {info.root} "
            "(class ids, names or training counts differ); rerun KMDN/dataset_split.py"
        )
    if not image_lists:
        return
    with warnings.catch_warnings():  # the test list's own warnings were given when the split was made
        warnings.simplefilter("ignore")
        current["test"] = info.entries("test", check_files=False)
    # The same counts may still list other files (DATA prepared again with another seed or
    # test fraction, images swapped): the split's lists are DATA's, cut by group.
    for subset in SUBSETS:
        kept = [entry for group in GROUPS for entry in split.entries(group, subset)]
        only_kept, only_current = changed_entries(kept, current[subset])
        if only_kept or only_current:
            raise UserError(f"split {split.folder} lists other {subset} images than {info.annotation_path(subset)} "
                            f"({changed_text(only_kept, only_current)}): DATA changed since the split was made; "
                            "rerun KMDN/dataset_split.py")

