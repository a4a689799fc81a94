"""Generated tail images against the real ones, per tail class: FID, KID, LPIPS, class consistency.

The real images are the tail training images of the CDTG data (what the GAN learnt from),
scored once and shared by every generated folder. Each set is at most --max-per-class
images of a class, a seeded random subset, resized to one square size; every model sees
those images (FID's Inception resizes again to 299 px, CLIP to its own resolution).
Subsets and LPIPS pairs depend only on (seed, class, image count), the same for real and
generated sets, so a folder holding copies of the real images scores FID 0 and the real
LPIPS, the floor of those metrics, and a KID below 0: copies are not independent draws,
and the unbiased estimate then comes out at -2/n times the mean gap between an image's
kernel value with itself and with the others (n images), far from 0 at small n.
"""
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from CDTG.checkpoint import load_cdtg_checkpoint
from CDTG.clip_loss import ClipConsistencyLoss, load_clip
from CDTG.eval_report import (SHEET_IMAGES, build_evaluation, evaluation_markdown, metric_notes,
                              plot_sample_sheet, write_evaluation)
from CDTG.fidelity import fid, kid, load_inception, load_lpips, mean_pairwise_lpips
from CDTG.tail_data import check_distinct_prompts, load_tail_classes, load_teacher
from tgn.data import check_files_exist, check_outside_dataset, drop_unreadable, read_annotation
from tgn.distributed import make_shared_folder, planned_world_size, resolve_device
from tgn.engine import worker_context, workers_starting
from tgn.errors import UserError
from tgn.handoff import GENERATED_ANNOTATION, GENERATION_UNFINISHED, read_generation_settings
from tgn.images import REWRITE_GENERATED, ImageList, normalize_pixels
from tgn.io import remove_temp_files, same_path
from tgn.progress import progress_bar
from tgn.run_folder import check_run_dir, save_options
from tgn.stopping import leave_signals_to_the_trainer

REAL = "real (training)"  # the sample sheet's first column group
LPIPS_MIN_SIZE = 31  # AlexNet's second max-pool has nothing to pool below it


def recorded_inputs(folder):
    """{'data', 'teacher'} the folder was generated with, where known: as generation.json
    records them (generation.py's own --data / --teacher included), else as the checkpoint
    it names records them; 'gone': that checkpoint, where it is needed and not found."""
    settings = read_generation_settings(folder)
    recorded = {key: settings[key] for key in ("data", "teacher") if settings.get(key)}
    ckpt = settings.get("ckpt")
    if len(recorded) < 2 and ckpt and Path(ckpt).is_file():
        checkpoint = load_cdtg_checkpoint(ckpt)
        recorded = {**{key: checkpoint[key] for key in ("data", "teacher") if checkpoint.get(key)}, **recorded}
    elif len(recorded) < 2 and ckpt:
        recorded["gone"] = ckpt
    return recorded


def folder_labels(folders):
    """'r=0.05' from generation.json, else the folder name; made unique with the path."""
    labels = []
    for folder in folders:
        r = read_generation_settings(folder).get("r")
        labels.append(f"r={r:g}" if isinstance(r, (int, float)) else Path(folder).name)
    return [f"{label} ({folder})" if labels.count(label) > 1 else label for label, folder in zip(labels, folders)]


def check_generated_folders(folders):
    """Each folder is there, once, and finished: one a run is still adding to (or stopped in)
    holds part of its classes, and the overall row would cover those alone."""
    seen = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"generated folder not found: {folder}")
        twice = next((earlier for earlier in seen if same_path(earlier, folder)), None)  # a link, a case-blind spelling
        if twice is not None:  # its rows would repeat, and its samples would take one column group
            raise UserError(f"generated folder {folder} is given twice (also as {twice})")
        seen.append(folder)
        if (Path(folder) / GENERATION_UNFINISHED).exists():
            raise UserError(f"{folder} holds {GENERATION_UNFINISHED}: its generation.py run stopped (or still runs) "
                            "before every class was written; rerun it with the same flags to finish, then evaluate")
        if not (Path(folder) / GENERATED_ANNOTATION).is_file():  # before its settings are looked for
            raise UserError(f"{folder}: no {GENERATED_ANNOTATION}; is it a CDTG/generation.py output folder?")


def generated_paths(folder, tail):
    """{tail class id: [image paths]} from the folder's anno.txt (check_generated_folders
    found it there)."""
    annotation = Path(folder) / GENERATED_ANNOTATION
    entries = read_annotation(annotation)
    unknown = sorted({entry.class_id for entry in entries} - set(tail.ids))
    if unknown:
        raise UserError(f"{annotation}: class id {unknown[0]} is not a tail class of {tail.folder} ({tail.ids})")
    check_files_exist(folder, entries, annotation)
    paths = {cid: [] for cid in tail.ids}
    for entry in entries:
        paths[entry.class_id].append(str(Path(folder) / entry.relpath))
    return paths


def real_paths(tail, skip_bad_images=False):
    """{tail class id: [real training image paths]}; with `skip_bad_images` (as training
    and generation had) without the unreadable ones."""
    paths = {cid: [] for cid in tail.ids}
    for path, label in drop_unreadable(tail.samples(), skip_bad_images, "real tail images"):
        paths[tail.ids[label]].append(path)
    return paths


def subsample(paths, limit, rng):
    if len(paths) <= limit:
        return list(paths)
    return [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]


def first_image_size(folders, generated):
    """The side of the first generated image: the GAN's size (folders of other sizes are
    resized to it, with a warning)."""
    sizes = {}
    for folder, paths_of in zip(folders, generated):
        first = next((paths[0] for paths in paths_of.values() if paths), None)
        if first is not None:
            try:
                with Image.open(first) as image:
                    sizes[str(folder)] = max(image.size)
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise UserError(f"cannot read image {first}: {exc} ({REWRITE_GENERATED})") from exc
    if not sizes:
        raise UserError(f"no generated image in {', '.join(str(folder) for folder in folders)}")
    size = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        warnings.warn(f"the folders hold images of different sizes ({sizes}); all are resized to {size} px "
                      "(--size to choose)")
    return size


def load_groups(groups, size, batch_size, workers, generated_from, draft=True):
    """Yields each group's images, uint8 [N, 3, size, size], in the order of `groups`, a list
    of (description, paths). One DataLoader reads them all, so its workers start once: under
    spawn (macOS, Windows) each start costs seconds, and a loader per class and folder made an
    evaluation of 3 classes 5x slower. Groups from index `generated_from` on hold generated
    images (an unreadable one is written again, not skipped); `draft=False` decodes JPEGs whole."""
    samples, batches, counts = [], [], []
    for number, (_, paths) in enumerate(groups):
        start = len(samples)
        samples += [(path, number) for path in paths]
        group_batches = [list(range(begin, min(begin + batch_size, len(samples))))
                         for begin in range(start, len(samples), batch_size)]
        batches += group_batches
        counts.append(len(group_batches))
    dataset = ImageList(samples, transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()]),
                        size, generated_from=sum(len(paths) for _, paths in groups[:generated_from]), draft=draft)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         worker_init_fn=leave_signals_to_the_trainer,
                                         multiprocessing_context=worker_context(workers))
    with workers_starting(workers):  # Ctrl-C held while they start (seconds each where spawned)
        started = iter(loader)
    with progress_bar(started, transient=True, total=len(batches)) as progress:
        batch_iterator = iter(progress)
        for (description, paths), count in zip(groups, counts):
            progress.set_description(description)
            # Filled in place: a list of batches and its concatenation held each group twice over.
            images, filled = torch.empty((len(paths), 3, size, size), dtype=torch.uint8), 0
            for _ in range(count):
                batch = next(batch_iterator)[0]
                images[filled:filled + len(batch)] = batch
                filled += len(batch)
            yield images


@dataclass
class SetScores:
    """One class's images of one set (real, or a generated folder)."""

    count: int
    features: np.ndarray = None  # Inception pool features, None without --inception
    lpips: float = math.nan
    clip_correct: int = None
    teacher_correct: int = None
    sheet: torch.Tensor = field(default=None, repr=False)  # the first SHEET_IMAGES images


@dataclass
class Evaluator:
    """The scoring models; any may be None (that metric is skipped)."""

    inception: object
    lpips: torch.nn.Module
    clip: torch.nn.Module  # a ClipConsistencyLoss over the tail prompts
    teacher: torch.nn.Module  # M_T, outputs in tail label order
    device: torch.device
    pairs: int = 1000
    batch_size: int = 64

    @torch.no_grad()
    def score(self, images, label, seed):
        scores = SetScores(len(images), sheet=images[:SHEET_IMAGES].clone())  # not a view: frees the rest
        features, clip_correct, teacher_correct = [], 0, 0
        for start in range(0, len(images), self.batch_size):
            batch = normalize_pixels(images[start:start + self.batch_size].to(self.device))  # as M_T trained
            if self.inception is not None:
                features.append(self.inception(batch))
            if self.clip is not None:
                clip_correct += int((self.clip.logits(batch).argmax(1) == label).sum())
            if self.teacher is not None:
                teacher_correct += int((self.teacher(batch)[0].argmax(1) == label).sum())
        if self.inception is not None:
            scores.features = np.concatenate(features) if features else np.zeros((0, 1))
        if self.lpips is not None:
            scores.lpips = mean_pairwise_lpips(self.lpips, images, self.pairs, seed, self.batch_size)
        scores.clip_correct = clip_correct if self.clip is not None else None
        scores.teacher_correct = teacher_correct if self.teacher is not None else None
        return scores


def _accuracy(correct, count):
    return None if correct is None or count == 0 else correct / count


def _nan_to_none(value):
    return None if value is None or math.isnan(value) else value


def class_row(cid, name, real, generated, device=None):
    """A table row of one class; KID computed on `device` where it is a GPU."""
    return {
        "id": cid, "name": name, "real_images": real.count, "generated_images": generated.count,
        "fid": None if real.features is None else _nan_to_none(fid(real.features, generated.features)),
        "kid": None if real.features is None else _nan_to_none(kid(real.features, generated.features, device=device)),
        "lpips_generated": _nan_to_none(generated.lpips), "lpips_real": _nan_to_none(real.lpips),
        "clip_accuracy_generated": _accuracy(generated.clip_correct, generated.count),
        "clip_accuracy_real": _accuracy(real.clip_correct, real.count),
        "teacher_accuracy_generated": _accuracy(generated.teacher_correct, generated.count),
        "teacher_accuracy_real": _accuracy(real.teacher_correct, real.count),
    }


def pooled(sets, class_ids, feature_rows=None, lpips_ids=None):
    """The sets of several classes as one: features stacked (of each class the rows
    `feature_rows[cid]`, all without it), LPIPS averaged (over `lpips_ids`, by default the
    classes that have one), counts summed."""
    scores = SetScores(sum(sets[cid].count for cid in class_ids))
    if class_ids and all(sets[cid].features is not None for cid in class_ids):
        scores.features = np.concatenate([sets[cid].features if feature_rows is None
                                          else sets[cid].features[feature_rows[cid]] for cid in class_ids])
    lpips_ids = class_ids if lpips_ids is None else lpips_ids
    lpips_values = [sets[cid].lpips for cid in lpips_ids if not math.isnan(sets[cid].lpips)]
    scores.lpips = float(np.mean(lpips_values)) if lpips_values else math.nan
    for metric in ("clip_correct", "teacher_correct"):
        values = [getattr(sets[cid], metric) for cid in class_ids]
        setattr(scores, metric, None if None in values else sum(values))
    return scores


def overall_row(real, generated, seed=0, device=None):
    """FID and KID of the pooled sets, LPIPS averaged over classes (diversity within a class),
    accuracies over all images; only the classes both sets hold count. For FID and KID each
    class gives both sets the same number of images (the smaller count, a seeded subset):
    pooled sets with other class proportions would differ by those proportions alone."""
    present = [cid for cid in generated if generated[cid].count > 0 and real[cid].count > 0]
    rows = {side: {} for side in ("real", "generated")}
    for cid in present:
        count = min(real[cid].count, generated[cid].count)
        for side, sets in (("real", real), ("generated", generated)):
            rng = np.random.default_rng([seed, cid, len(rows[side])])
            rows[side][cid] = np.sort(rng.choice(sets[cid].count, count, replace=False))
    # Diversity of both sides over the same classes: a class of one generated image has none.
    both = [cid for cid in present if not (math.isnan(real[cid].lpips) or math.isnan(generated[cid].lpips))]
    row = class_row("all", "all tail classes", pooled(real, present, rows["real"], both),
                    pooled(generated, present, rows["generated"], both), device)
    row["fid_images"] = sum(len(indices) for indices in rows["real"].values())
    return row


def scored_size(folders, generated, size, lpips):
    """The side every image is resized to: --size, else the first generated image's; checked
    against LPIPS's minimum before any model is loaded (or downloaded)."""
    size = size or first_image_size(folders, generated)
    if lpips and size < LPIPS_MIN_SIZE:
        raise UserError(f"LPIPS (AlexNet) needs images of at least {LPIPS_MIN_SIZE} px, these are {size} px: pass "
                        f"--size {LPIPS_MIN_SIZE + 1} (they are resized) or --lpips none")
    return size


def evaluate_folders(folders, generated, tail, evaluator, *, max_per_class, size, seed=0, workers=0,
                     skip_bad_images=False):
    """Per folder (its `generated` paths): a row per tail class and an overall row; the
    sample-sheet images. Every image is resized to `size`; the real ones decoded as the first
    folder's generation decoded them (its checkpoint's run: --full-decode, or draft mode)."""
    labels = folder_labels(folders)
    real = real_paths(tail, skip_bad_images)
    groups = [(f"real {cid} ({name})", subsample(real[cid], max_per_class, np.random.default_rng([seed, cid])))
              for cid, name in zip(tail.ids, tail.names)]
    for folder_label, paths_of in zip(labels, generated):
        groups += [(f"{folder_label}: {cid}", subsample(paths_of[cid], max_per_class,
                                                        np.random.default_rng([seed, cid]))) for cid in tail.ids]
    draft = read_generation_settings(folders[0]).get("decode", "draft") != "full"
    loaded = load_groups(groups, size, evaluator.batch_size, workers, generated_from=len(tail.ids), draft=draft)
    real_sets = {cid: evaluator.score(next(loaded), label, [seed, cid]) for label, cid in enumerate(tail.ids)}
    sheets = {REAL: {cid: scores.sheet for cid, scores in real_sets.items()}}
    results = []
    for folder, folder_label in zip(folders, labels):
        sets = {cid: evaluator.score(next(loaded), label, [seed, cid]) for label, cid in enumerate(tail.ids)}
        sheets[folder_label] = {cid: scores.sheet for cid, scores in sets.items()}
        rows = [class_row(cid, name, real_sets[cid], sets[cid], evaluator.device)
                for cid, name in zip(tail.ids, tail.names)]
        results.append({"label": folder_label, "path": str(folder), "generation": read_generation_settings(folder),
                        "overall": overall_row(real_sets, sets, seed, evaluator.device), "classes": rows})
    return results, sheets


def resolve_inputs(args):
    """--data and --teacher, defaulting to what the first folder's generation.json (else its
    generation checkpoint) records."""
    recorded = recorded_inputs(args.folders[0]) if args.data is None or args.teacher is None else {}
    data = args.data or recorded.get("data")
    source = (f"its generation checkpoint {recorded['gone']} is not found (moved?)" if "gone" in recorded
              else "its generation checkpoint records none")
    if data is None:
        raise UserError(f"{args.folders[0]}: no tail data: {source}; pass --data (CDTG/dataset_split.py output)")
    notes = []
    teacher = args.teacher if args.teacher is not None else recorded.get("teacher")
    if teacher is None:
        notes.append(f"M_T accuracy skipped: no --teacher, and {source}.")
    elif teacher != "none" and args.teacher is None and not Path(teacher).is_file():
        notes.append(f"M_T accuracy skipped: the recorded teacher {teacher} is not there; pass --teacher.")
        teacher = None
    for note in notes:  # on the console too: the report's M_T column would be empty without a word
        warnings.warn(note)
    check_same_tail_data(args.folders, data)
    return data, None if teacher == "none" else teacher, notes


def check_same_tail_data(folders, data):
    """Every folder is compared with the real images of the tail data it was generated
    from: refuse one whose generation.json names another tail data folder that still
    exists. A folder that has moved away, or a folder of an earlier version that names
    none, is let through (its checkpoint is not loaded for this: at 256 px it holds GBs)."""
    for folder in folders:
        recorded = read_generation_settings(folder).get("data")
        if recorded and Path(recorded).is_dir() and not same_path(recorded, data):
            raise UserError(f"{folder} was generated from the tail data {recorded}, this evaluation uses {data}; "
                            "evaluate folders of one tail data together (--data chooses it)")


def evaluate_generation(args):
    """CDTG/evaluate.py: the folders and models checked and loaded, every folder scored, the report written."""
    if planned_world_size() > 1:  # each process would score every folder and write the same files
        raise UserError("CDTG/evaluate.py runs in one process: start it with python, not torchrun")
    folders = [Path(folder) for folder in args.folders]
    check_run_dir(args.out, overwrite=args.overwrite, results=("evaluation.json",), resumable=False, args=args,
                  writes="evaluation.json")
    check_generated_folders(folders)
    data, teacher_path, notes = resolve_inputs(args)
    tail = load_tail_classes(data, args.data_root)
    check_outside_dataset(args.out, tail.data_root)
    if args.clip != "none":  # its accuracy is the prompt CLIP finds nearest: two alike could not both be right
        check_distinct_prompts(tail)
    generated = [generated_paths(folder, tail) for folder in folders]
    size = scored_size(folders, generated, args.size, lpips=args.lpips != "none")
    device = resolve_device(args.device)
    inception = load_inception(args.inception)
    lpips_model = load_lpips(args.lpips)
    clip_model = load_clip(args.clip, device, args.clip_root)
    teacher = load_teacher(teacher_path, tail) if teacher_path else None
    evaluator = Evaluator(
        inception=inception.to(device) if inception else None,
        lpips=lpips_model.to(device) if lpips_model else None,
        clip=ClipConsistencyLoss(clip_model, tail.prompts) if clip_model is not None else None,
        teacher=teacher.to(device).eval() if teacher else None,
        device=device, pairs=args.pairs, batch_size=args.batch)
    # Made before the scoring, as test.py makes its report folder: an --out that cannot be
    # created or written (a read-only mount) costs no evaluation.
    make_shared_folder(args.out)  # from here on this evaluation alone writes there
    remove_temp_files(args.out)  # what an evaluation killed mid-write left
    results, sheets = evaluate_folders(folders, generated, tail, evaluator, max_per_class=args.max_per_class,
                                       size=size, seed=args.seed, workers=args.workers,
                                       skip_bad_images=args.skip_bad_images)
    for result in results:  # the overall rows of folders holding other classes compare other classes
        held = [row["id"] for row in result["classes"] if row["generated_images"]]
        if held != tail.ids:
            notes.append(f"{result['label']} holds images of the tail classes {held} only (of {tail.ids}): its "
                         "overall row covers those classes.")
    options = save_options(args.out, args)
    evaluation = build_evaluation(
        results, extractor=inception.name if inception else None,
        lpips="LPIPS v0.1, AlexNet" if lpips_model else None, clip=None if clip_model is None else args.clip,
        teacher=None if teacher is None else str(Path(teacher_path).resolve()),
        settings={**options, "data": str(Path(data).resolve()), "size": size},
        notes=metric_notes(args, evaluator) + notes)
    write_evaluation(evaluation, args.out)
    plot_sample_sheet(sheets, tail.ids, tail.names, args.out / "samples.png")
    print(evaluation_markdown(evaluation).split("\n### ")[0].rstrip())
    print(f"wrote {args.out / 'evaluation.md'}, .csv, .json and {args.out / 'samples.png'}")
    return evaluation
