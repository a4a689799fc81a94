"""The folder generation fills: one JPEG per image under its class id, the settings that
made them (generation.json) and anno.txt listing them, and the run that adds the missing
images, written a batch at a time and published atomically."""
import json
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from CDTG.synthesis import TRUNCATION_CENTRE, TailSynthesizer
from tgn import distributed as dist
from tgn.class_names import padded
from tgn.compat import check_compile
from tgn.data import Entry, check_outside_dataset, write_annotation
from tgn.errors import UserError
from tgn.handoff import GENERATED_ANNOTATION, GENERATION_SETTINGS, GENERATION_UNFINISHED, read_generation_settings
from tgn.io import atomic_write_json, publish, remove_path, remove_temp_files, write_pending
from tgn.progress import progress_bar
from tgn.run_folder import check_own_run_folder
from tgn.runlock import refuse_folder_in_use

# What image_name writes: six digits, more from index 1,000,000 on (never a leading zero there).
IMAGE_NAME = re.compile(r"gen_(\d{6}|[1-9]\d{6,})\.jpg")


def image_name(index):
    return f"gen_{index:06d}.jpg"


class HostImages:
    """A device batch copied to pinned CPU memory without blocking the caller; `numpy()`
    waits for the copy (and so for the kernels that made the batch)."""

    def __init__(self, images):
        if images.device.type == "cuda":
            self.host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
            self.host.copy_(images, non_blocking=True)
            self.ready = torch.cuda.Event(blocking=True)  # waiting threads sleep instead of spinning
            self.ready.record(torch.cuda.current_stream(images.device))
        else:
            self.host, self.ready = images, None

    def numpy(self):
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


def existing_indices(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for p in folder.iterdir() if (m := IMAGE_NAME.fullmatch(p.name))}


class JpegWriter:
    """Encodes and writes batches in worker threads (PIL releases the GIL while encoding)
    while the caller generates the next batch. A batch's images go into hidden temp files
    and are renamed into place once on disk (tgn.io.publish), so an image under its final
    name is always complete. One flush of the file system serves every batch whose images
    are all written by the time the oldest one is: a flush can take tens of milliseconds (a
    virtual machine's disk), and one per batch would then set the pace. At most
    `max_pending` batches wait, so memory stays bounded when the disk is slower than the
    generator."""

    def __init__(self, workers, quality, max_pending=4):
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.publisher = ThreadPoolExecutor(max_workers=1)  # batches reach their names in order
        self.quality, self.max_pending = quality, max_pending
        self.pending = deque()  # a future per batch, done once its images have their names
        self.unpublished = deque()  # (image writes, that future), oldest first: the publisher's

    def submit(self, folder, indices, images):
        """Queue a batch: a uint8 array [N, H, W, 3] or HostImages still on its way."""
        folder.mkdir(parents=True, exist_ok=True)
        while len(self.pending) >= self.max_pending:
            self._finish_oldest()
        if not isinstance(images, HostImages):
            images = HostImages(torch.as_tensor(np.asarray(images)))
        writes = [self.pool.submit(self._write_one, folder / image_name(i), images, k) for k, i in enumerate(indices)]
        published = Future()
        self.unpublished.append((writes, published))
        self.pending.append(published)
        self.publisher.submit(self._publish_ready)

    def _write_one(self, path, images, position):
        return self._write(path, images.numpy()[position])

    def _write(self, path, pixels):
        # PIL encodes into a real file without holding the GIL, so the threads encode in
        # parallel (into a BytesIO they took turns).
        image = Image.fromarray(np.ascontiguousarray(pixels))
        return write_pending(path, lambda handle: image.save(handle, format="JPEG", quality=self.quality))

    def _publish_ready(self):
        """Once the oldest unpublished batch is written, publish it with every later batch
        already written: one flush, then their renames. A batch with an image that failed
        gets none of its images (its error is raised to the caller); the others still go."""
        if not self.unpublished:
            return  # this call's batch went with an earlier one
        batches = [self.unpublished.popleft()]
        wait(batches[0][0])
        while self.unpublished and all(job.done() for job in self.unpublished[0][0]):
            batches.append(self.unpublished.popleft())
        try:
            self._publish(batches)
        except BaseException as exc:  # never leave the caller waiting for a batch
            for _, published in batches:
                if not published.done():
                    published.set_exception(exc)

    @staticmethod
    def _publish(batches):
        ready = []
        for writes, published in batches:
            written, error = [], None
            for job in writes:
                try:
                    written.append(job.result())
                except BaseException as exc:
                    error = error or exc
            if error is None:
                ready.append((written, published))
            else:
                for tmp, _ in written:
                    Path(tmp).unlink(missing_ok=True)
                published.set_exception(error)
        try:
            publish([pair for written, _ in ready for pair in written])
        except BaseException as exc:
            for _, published in ready:
                published.set_exception(exc)
        else:
            for _, published in ready:
                published.set_result(None)

    def _finish_oldest(self):
        self.pending.popleft().result()

    def drain(self):
        """Wait until every submitted image is on disk."""
        # One more publishing call, which finds nothing to do unless a Ctrl-C cut `submit`
        # short between queueing a batch and queueing its call: that batch is published too.
        self.publisher.submit(self._publish_ready)
        while self.pending:
            self._finish_oldest()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        try:
            self.drain()  # images already generated are still written (each batch atomically)
        except BaseException:
            if exc_type is None:
                raise
            # The first error (or Ctrl-C) is the one reported, not a later batch's.
        finally:
            self.pool.shutdown()
            self.publisher.shutdown()


def write_generated_annotation(out_dir, class_ids):
    """anno.txt listing exactly the images on disk, in the dataset's annotation format."""
    entries = [Entry(f"{cid}/{image_name(i)}", cid) for cid in class_ids
               for i in sorted(existing_indices(Path(out_dir) / str(cid)))]
    write_annotation(Path(out_dir) / GENERATED_ANNOTATION, entries)
    return entries


def _visible(entry):
    """Not a hidden file (.gitkeep, .DS_Store) or a file system's lost+found."""
    return not entry.name.startswith(".") and entry.name != "lost+found"


def check_settings(out_dir, settings, overwrite):
    """A folder keeps one set of generation settings: adding images must not mix them. A
    non-empty folder that generation did not write is refused, --overwrite or not: its
    class-id folders may be someone else's."""
    path = Path(out_dir) / GENERATION_SETTINGS
    if not path.is_file() and Path(out_dir).is_dir() and any(_visible(entry) for entry in Path(out_dir).iterdir()):
        raise UserError(f"{out_dir} holds other files and no generation.json; generation writes into a new or empty "
                        "folder or one it wrote: choose another --out")
    if path.is_file() and not overwrite:
        previous = read_generation_settings(out_dir)
        # Folders written by earlier versions: fp32, JPEG quality 95, a truncation centre over
        # noise alone (the same images as now when --truncation is 1), and the real images'
        # JPEGs decoded in draft mode (the official checkpoint's too: now whole, as its run's).
        previous.setdefault("amp", "off")
        previous.setdefault("decode", "draft")
        previous.setdefault("quality", 95)
        previous.setdefault("truncation_centre", TRUNCATION_CENTRE if previous.get("truncation", 1.0) == 1.0
                            else "noise only")
        # Folders of earlier versions are not checked for these.
        unrecorded_before = ("data", "teacher", "weights", "real_images", "class_names", "real_features")
        # Where the files are does not matter once what they hold is compared (the weights, the
        # real features' inputs): a run folder moved elsewhere may still add images.
        moved = ("ckpt", "data", "teacher") if "real_features" in previous else ()
        changed = [key for key in settings if previous.get(key) != settings[key]
                   and not (key not in previous and key in unrecorded_before) and key not in moved]
        if changed:
            raise UserError(f"{out_dir} holds images generated with other settings ({', '.join(changed)}); "
                            "use another --out or pass --overwrite")


def unfinished_classes(out_dir, tail_ids, per_class):
    """{class id: images it needs} of the classes runs stopped in `out_dir` left unfinished,
    from GENERATION_UNFINISHED (every tail class for the empty marker of an earlier version,
    which named none; `per_class` where a marker records no count); {} without the marker."""
    path = Path(out_dir) / GENERATION_UNFINISHED
    if not path.is_file():
        return {}
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        targets = marker.get("targets", {})
        return {int(cid): int(targets.get(str(cid), per_class)) for cid in marker["classes"]}
    except (ValueError, KeyError, TypeError, AttributeError):  # empty (an earlier version's) or not ours
        return {cid: per_class for cid in tail_ids}


def mark_unfinished(out_dir, pending):
    """GENERATION_UNFINISHED naming the classes `pending` ({class id: images it needs})."""
    atomic_write_json(Path(out_dir) / GENERATION_UNFINISHED,
                      {"classes": list(pending), "targets": {str(cid): target for cid, target in pending.items()}})


def run_generation(synth, out_dir, *, class_ids, per_class, ratio, seed, truncation, batch_size, quality, workers):
    """Generate the missing images of each class; returns {class id: images written}.
    Under torchrun process r generates every N-th missing image (positions r, r + N, ...).
    GENERATION_UNFINISHED names the classes still to generate, a class leaving it once it is
    written: those of this run, and those a stopped run left (a run of other --classes keeps
    them, and says so)."""
    out_dir = Path(out_dir)
    written = {}
    if dist.is_main():  # before any process writes: the first listing below waits for it
        remove_temp_files(out_dir)  # the lists a killed run had not yet published
        out_dir.mkdir(parents=True, exist_ok=True)
        left = {cid: target for cid, target in unfinished_classes(out_dir, synth.tail.ids, per_class).items()
                if cid in synth.tail.ids}
        # A stopped run's class needs its own count: a later run asking fewer does not finish it.
        pending = {**left, **{cid: max(left.get(cid, 0), per_class) for cid in class_ids}}
        mark_unfinished(out_dir, pending)

    with JpegWriter(workers, quality) as writer, ThreadPoolExecutor(max_workers=1) as prefetch:
        for class_id in class_ids:
            folder = out_dir / str(class_id)
            existing = None
            if dist.is_main():
                remove_temp_files(folder)  # the images a killed run had not yet published
                existing = existing_indices(folder)
            # One listing for all processes (nodes may see a shared folder differently), made
            # before any process writes to it.
            existing = dist.broadcast_object(existing)
            missing = [i for i in range(per_class) if i not in existing]
            mine = dist.shard(missing)
            chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
            synth.num_real(class_id)  # the teacher's pass, before the prefetch thread starts
            name = synth.tail.names[synth.tail.ids.index(class_id)]

            def draw(chunk, class_id=class_id):
                return synth.batch_inputs(class_id, chunk, seed=seed)

            upcoming = prefetch.submit(draw, chunks[0]) if chunks else None
            for position in progress_bar(range(len(chunks)), transient=True, desc=f"class {class_id} ({name})",
                                         disable=not dist.is_main()):
                inputs = upcoming.result()
                if position + 1 < len(chunks):
                    upcoming = prefetch.submit(draw, chunks[position + 1])
                images = synth.render(class_id, inputs, ratio=ratio, truncation=truncation, batch_size=batch_size)
                writer.submit(folder, chunks[position], HostImages(images))
            writer.drain()  # anno.txt lists the images on disk
            dist.barrier()
            written[class_id] = len(missing)
            if dist.is_main():
                write_generated_annotation(out_dir, synth.tail.ids)
                if not existing and pending[class_id] > per_class:  # a stopped run's class it never started
                    pending[class_id] = per_class
                have = existing | set(missing)  # every process has written its share (the barrier above)
                if all(index in have for index in range(pending[class_id])):
                    del pending[class_id]
                    mark_unfinished(out_dir, pending)
    if dist.is_main():
        if pending:
            counts = sorted(set(pending.values()))
            print(f"note: a stopped run left classes {', '.join(f'{cid} ({n} images)' for cid, n in pending.items())} "
                  f"unfinished: {GENERATION_UNFINISHED} stays, and the folder is not used, until a run generates "
                  f"them (with --per-class {counts[-1]}{'' if len(counts) == 1 else ' or as listed'}, and without "
                  f"--classes or with --classes {' '.join(map(str, pending))})")
        else:
            (out_dir / GENERATION_UNFINISHED).unlink()
    return written


def remove_class_folder(folder):
    """Remove a class folder for --overwrite, wholly: an image left (Windows keeps a file another
    program holds open) would be counted as generated, and the folder would mix two runs'
    images. A link to a folder is removed, not what it points to; a file of that name is
    not generation's, and stays."""
    if not folder.is_dir():
        return
    try:
        remove_path(folder)
    except OSError as exc:
        raise UserError(f"--overwrite: cannot remove {exc.filename or folder} ({exc.strerror or exc}); remove it "
                        "yourself (or close what holds it open), then run again") from exc


def generate(args):
    """CDTG/generation.py: the synthesizer loaded and the folder checked, then the missing images."""
    check_compile(args.compile)
    device = dist.process_device(args.device)
    synth = TailSynthesizer.from_checkpoint(args.ckpt, device, data=args.data, data_root=args.data_root,
                                            teacher=args.teacher, modconv=args.modconv, amp=args.amp,
                                            compile=args.compile, skip_bad_images=args.skip_bad_images)
    class_ids = list(dict.fromkeys(args.classes)) if args.classes else synth.tail.ids  # an id given twice: once
    unknown = [cid for cid in class_ids if cid not in synth.tail.ids]
    if unknown:
        raise UserError(f"--classes: {unknown[0]} is not a tail class (tail classes: {synth.tail.ids})")
    # Each image fuses the feature of one of its class's real images, drawn by position:
    # the same count of real images, and the same weights, give the same images.
    settings = {"ckpt": str(args.ckpt.resolve()), "r": args.r, "truncation": args.truncation, "seed": args.seed,
                "amp": args.amp, "quality": args.quality, "truncation_centre": TRUNCATION_CENTRE,
                "decode": "draft" if synth.draft else "full", **synth.sources,
                "weights": synth.weights_fingerprint(), "real_images": synth.real_counts(synth.tail.ids),
                "real_features": synth.real_features_fingerprint(),
                # Classification/train.py --extra checks them against the dataset it trains on.
                "class_names": {str(cid): name for cid, name in zip(synth.tail.ids, synth.tail.names)}}
    check_outside_dataset(args.out, synth.tail.data_root)
    refuse_folder_in_use(args.out)
    check_own_run_folder(args.out, args, writes=GENERATION_SETTINGS)  # not a run folder, a split, a report
    check_settings(args.out, settings, args.overwrite)
    in_the_way = [args.out / str(cid) for cid in class_ids
                  if ((args.out / str(cid)).exists() or (args.out / str(cid)).is_symlink())
                  and not (args.out / str(cid)).is_dir()]
    if in_the_way:  # not removed, even with --overwrite: generation removes only its own class folders
        raise UserError(f"{in_the_way[0]} is a file where generation writes the images of class {in_the_way[0].name}: "
                        "move it away")
    dist.init(args.device)  # joined after the input checks: an input error prints once per node
    # Rank 0 lists every process's images in anno.txt. Checked before anything is removed;
    # its collective also means every process checked the old settings.
    dist.make_shared_folder(args.out)
    if dist.is_main():
        if args.overwrite:
            for cid in synth.tail.ids:
                remove_class_folder(args.out / str(cid))
            for name in (GENERATED_ANNOTATION, GENERATION_UNFINISHED):  # what the replaced run left
                (args.out / name).unlink(missing_ok=True)
        atomic_write_json(args.out / GENERATION_SETTINGS, settings)
    dist.barrier()
    started = time.perf_counter()
    written = run_generation(synth, args.out, class_ids=class_ids, per_class=args.per_class, ratio=args.r,
                             seed=args.seed, truncation=args.truncation, batch_size=args.batch, quality=args.quality,
                             workers=args.workers)
    seconds = time.perf_counter() - started
    if not dist.is_main():
        return
    for cid in class_ids:
        name = synth.tail.names[synth.tail.ids.index(cid)]
        total = len(existing_indices(args.out / str(cid)))  # more than --per-class if an earlier run made more
        print(f"  class {cid:4d} {padded(name, 28)} {written[cid]:6d} new, {total:6d} in all")
    count = sum(written.values())
    rate = f" ({count / seconds:,.0f} images/s over {dist.world_size()} process(es))" if count and seconds > 0 else ""
    print(f"wrote {count} images in {seconds:.1f} s{rate}; annotation: {args.out / GENERATED_ANNOTATION}")
