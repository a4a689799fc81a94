"""The training engine of the ResNet stages: UModel, RModel and Classification train with
`fit`; Distill runs the same epochs (train_and_test_epoch, resume_from_last) in a loop of
its own, whose student changes every few epochs.

Determinism: every epoch reseeds all generators from (seed, epoch), and the data order
and each image's augmentation come from (seed, epoch) too (tgn/sampling.py), so a run
resumed at an epoch boundary continues exactly as the uninterrupted run would have
(bit-identical on CPU), whatever the number of DataLoader workers. Nothing draws from the
generators within an epoch, so a run stopped midway by Ctrl-C or SIGTERM (tgn/stopping.py)
resumes exactly too, after the last step it saved.

Under torchrun (tgn/distributed.py) the model is wrapped in DistributedDataParallel,
each process takes its share of every global batch, training statistics and confusion
matrices are summed over the processes, and rank 0 alone logs and writes.
"""
import contextlib
import math
import multiprocessing as mp
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tgn import distributed as dist
from tgn.checkpoint import load_checkpoint, load_weights, save_checkpoint
from tgn.compat import grad_scaler, mark_cuda_graph_step
from tgn.errors import CollectiveError, UserError, alike_in_every_process, signals_held
from tgn.images import normalize_pixels
from tgn.io import append_jsonl, trim_jsonl
from tgn.metrics import confusion_matrix, format_percent, summarize
from tgn.optim import make_optimizer, restore_optimizer, step_lr
from tgn.progress import progress_bar
from tgn.resnet import ONE_PIXEL_MAPS
from tgn.resume import check_same_data, resuming_line
from tgn.sampling import EpochSampler, SeededItems, epoch_seed
from tgn.stopping import (EpochProgress, Stopped, leave_signals_to_the_trainer, saved_if_stopped,
                          stop_between_steps, stop_if_requested)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_one_image_batches(train_size, batch_size, image_size, device, sync_bn="auto", what="training images"):
    """Refuse, before anything is written, a run in which some process would train on a
    batch of one image at 32 px or less: the ResNets' last map is then 1x1, and BatchNorm
    cannot normalise one value (unless synchronised over the processes: on GPUs under
    torchrun). One image per process comes from a global batch of N over N processes, or
    from a training set of at most N images (the sampler's only, padded batch)."""
    world = dist.planned_world_size()
    synchronised = world > 1 and (sync_bn == "on" or (sync_bn == "auto" and device.type == "cuda"))
    if image_size > ONE_PIXEL_MAPS or synchronised:
        return
    cannot = f"at --image-size {image_size} ({ONE_PIXEL_MAPS} or less) BatchNorm cannot train on one image"
    if batch_size // world == 1:
        raise UserError(f"--batch-size {batch_size} gives each of the {world} processes one image per step; {cannot}: "
                        f"use --batch-size {2 * world} or more, or a larger --image-size")
    if train_size <= world:
        processes = f"{world} processes would each train on one" if world > 1 else "every batch is that one image"
        raise UserError(f"{what}: {train_size} in all, so {processes}; {cannot}: use a larger --image-size or "
                        "more images")


def make_loader(dataset, batch_size, *, train, workers=0, seed=0, epoch=0, device=None, weights=None,
                persistent=False, pin_memory="auto"):
    """A DataLoader of this process's share of the data, in an order (and, when training,
    with augmentations) that depend only on (seed, epoch): call `loader.sampler.set_epoch`
    before each epoch. `batch_size` is the global batch (when evaluating, a process's share
    is rounded up: no statistic depends on it, so it need not divide); `persistent` keeps
    the workers (and their decoded-image pipelines) alive across epochs."""
    image_size = getattr(dataset, "image_size", None)  # unknown: as if small
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, epoch=epoch, weights=weights,
                           batch_size=batch_size, drop_single=image_size is None or image_size <= ONE_PIXEL_MAPS)
    return DataLoader(
        SeededItems(dataset) if train else dataset,
        batch_size=dist.local_batch(batch_size) if train else -(-batch_size // dist.world_size()),
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory == "on" or (pin_memory == "auto" and device is not None and device.type == "cuda"),
        persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
        worker_init_fn=leave_signals_to_the_trainer,
        multiprocessing_context=worker_context(workers),
    )


# CPython before 3.11.8 (gh-112275): a forked child can deadlock for good on an interpreter
# lock another thread of the parent held at the fork. Seen under torchrun (2 runs in 9 on
# CPU): a rank's evaluation worker hung at its start, the other ranks in their next collective.
FORK_MAY_HANG = sys.version_info < (3, 11, 8)


def default_start_method():
    return mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]  # unset: the platform's default


def worker_start_method():
    """How DataLoader workers start: the default (fork on Linux), but from a fork server
    under torchrun on a Python whose forked children may hang (FORK_MAY_HANG); the server
    forks them from a process of one thread, with torch already imported."""
    method = default_start_method()
    if method == "fork" and FORK_MAY_HANG and dist.planned_world_size() > 1:
        return "forkserver"
    return method


def worker_context(workers):
    """The multiprocessing context a DataLoader of `workers` workers takes (None: the default)."""
    method = worker_start_method()
    if not workers or method == default_start_method():
        return None
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["torch", "tgn.engine", "tgn.images"])  # the server imports them once
    return context


@contextlib.contextmanager
def workers_starting(workers):
    """Around the start of a loader's `workers`: Ctrl-C and SIGTERM held (signals_held)
    until they have set their own handling. Spawned workers (macOS, Windows) and a fork
    server's need multiprocessing's resource tracker, and its first start unblocks both
    signals in the thread that starts it (the standard library does so, 3.9 to 3.13): the
    workers would start without them held. So it is started first, outside the block."""
    if workers and worker_start_method() != "fork" and hasattr(signal, "pthread_sigmask"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    with signals_held():
        yield


def keep_evaluation_workers():
    """Whether evaluation loaders keep their workers between epochs (training loaders always
    do): where workers are spawned (macOS, Windows) or come from a fork server, each start
    imports torch anew, seconds an epoch; forked ones start at once, and kept idle through
    every training epoch they would only hold memory (per process under torchrun)."""
    return worker_start_method() != "fork"


def native_bf16(device):
    """Whether the GPU computes bf16 itself (compute capability 8, Ampere, and later).
    torch.cuda.is_bf16_supported() also says yes on older GPUs, where bf16 is emulated and
    slower than fp32."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(amp, channels_last, device):
    """--amp auto: bf16 on GPUs (fp16 with a GradScaler where bf16 is missing), off on CPUs;
    --channels-last auto: on with GPUs. Explicit values are kept."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else "bf16" if native_bf16(device) else "fp16"
    if channels_last in ("auto", None):
        channels_last = device.type == "cuda"
    elif isinstance(channels_last, str):
        channels_last = channels_last == "on"
    return amp, bool(channels_last)


def autocast(device, amp):
    """Mixed precision where asked for; a no-op context on 'off'."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def logits_of(output):
    """Feature ResNets return (logits, feature); torchvision models return logits."""
    return output[0] if isinstance(output, tuple) else output


def cross_entropy_loss(model, images, labels):
    logits = logits_of(model(images))
    return F.cross_entropy(logits, labels), logits


def model_input(images, device, channels_last=False):
    """A batch on the device as the models take it. The DataLoader's uint8 pixels cross to
    the device as they are and are scaled there (tgn.images.normalize_pixels), after the
    change of layout, which also moves a quarter of the bytes; float batches are taken as
    already scaled."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize_pixels(images) if images.dtype == torch.uint8 else images


def train_one_epoch(model, loader, optimizer, loss_fn, device, *, desc="train", amp="off", scaler=None,
                    channels_last=False, check_every=20, cuda_graphs=False, progress=None, stop_requested=None):
    """One pass over `loader`; returns mean loss and training accuracy over all processes.

    Sums stay on the device and are read back every `check_every` steps (a non-finite
    loss stops the run there), so the GPU is not waited for after every step.
    `cuda_graphs`: the model was compiled in a mode that replays CUDA graphs.
    `progress` (tgn.stopping.EpochProgress) is updated at the end, or when `stop_requested`,
    asked after every step, gives a signal: Stopped is raised then. A stopped epoch's
    progress holds the steps it trained, which the loader leaves out (EpochSampler.set_epoch)."""
    model.train()
    progress = progress if progress is not None else EpochProgress()
    first, last = progress.steps + 1, progress.steps + len(loader)
    progress.total_steps = last
    # (loss * batch, correct) and images; rank 0 carries those of the steps a stopped run trained.
    carried = dist.is_main()
    sums = torch.tensor([progress.loss_sum, progress.correct] if carried else [0.0, 0.0], dtype=torch.float64,
                        device=device)
    seen = progress.seen if carried else 0

    def update(steps):  # a collective under torchrun
        loss_sum, correct, images = dist.sum_numbers([*sums.tolist(), seen], device)
        progress.steps, progress.loss_sum, progress.correct, progress.seen = steps, loss_sum, correct, int(images)

    with workers_starting(getattr(loader, "num_workers", 0)):  # they set their signal handling first
        batches = iter(loader)
    with progress_bar(batches, transient=True, desc=desc, disable=not dist.is_main(), initial=first - 1,
                      total=last) as bar:
        for step, (images, labels) in enumerate(bar, start=first):
            if cuda_graphs:  # each batch is a new training step: its graph replay may reuse the last one's outputs
                mark_cuda_graph_step()
            images = model_input(images, device, channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, amp):
                loss, logits = loss_fn(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            batch = labels.numel()
            sums += torch.stack([loss.detach().double() * batch, (logits.argmax(1) == labels).sum().double()])
            seen += batch
            if step % check_every == 0 or step == last:
                # Summed over the processes (each has as many steps), so all stop together.
                total_loss, total_seen = dist.sum_numbers([sums[0].item(), seen], device)
                if not math.isfinite(total_loss):
                    raise CollectiveError(f"the training loss became {total_loss / total_seen}; lower --lr or check "
                                          "the data")
                bar.set_postfix(loss=f"{total_loss / total_seen:.4f}")
            signal_number = stop_requested() if stop_requested else None
            if signal_number:
                update(step)
                raise Stopped(signal_number)
    update(last)
    return progress.stats()


@torch.no_grad()
def predict(model, loader, device, *, amp="off", channels_last=False, desc="test", stop_requested=None):
    """Targets and argmax predictions over `loader` (this process's share), as numpy arrays.
    `stop_requested` is asked after each batch every process has (their shares differ by an
    image at most), and Stopped raised on a signal."""
    model.eval()
    targets, predictions = [], []
    asked = loader.sampler.fewest_batches(loader.batch_size) if stop_requested else 0
    with workers_starting(getattr(loader, "num_workers", 0)):  # they set their signal handling first
        batches = iter(loader)
    with progress_bar(batches, transient=True, desc=desc, disable=not dist.is_main(), total=len(loader)) as bar:
        for index, (images, labels) in enumerate(bar):
            images = model_input(images, device, channels_last)
            with autocast(device, amp):
                logits = logits_of(model(images))
            predictions.append(logits.argmax(1).cpu())
            targets.append(labels)
            signal_number = stop_requested() if index < asked else None
            if signal_number:
                raise Stopped(signal_number)
    if not targets:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(targets).numpy(), torch.cat(predictions).numpy()


def evaluate(model, loader, device, num_classes, *, head=None, tail=None, amp="off", channels_last=False,
             stop_requested=None):
    """Confusion matrix and summary; under torchrun every process evaluates its share (a
    loader from make_loader) and the matrices are summed, so all get the whole test set's."""
    targets, predictions = predict(model, loader, device, amp=amp, channels_last=channels_last,
                                   stop_requested=stop_requested)
    cm = confusion_matrix(targets, predictions, num_classes)
    if dist.active():
        cm = dist.all_reduce_(torch.as_tensor(cm, dtype=torch.int64, device=device)).cpu().numpy()
    return cm, summarize(cm, head=head, tail=tail)


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    milestones: list
    seed: int = 0
    workers: int = 0
    amp: str = "off"
    channels_last: bool = False
    sync_bn: str = "auto"  # under torchrun: SyncBatchNorm on GPUs (see tgn/distributed.py)
    compile: str = "off"  # or a torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune
    pin_memory: str = "auto"  # auto: pinned host memory when training on a GPU


@dataclass
class TrainResult:
    best_accuracy: float = -math.inf
    best_epoch: int = -1
    confusion: np.ndarray = None


def uses_cuda_graphs(compile_mode):
    """torch.compile modes that replay CUDA graphs: each training step must be marked."""
    return compile_mode in ("reduce-overhead", "max-autotune")


def prepare_model(model, cfg, device):
    """Put `model` on the device in its memory format; returns (model, what to train through):
    DistributedDataParallel under torchrun, compiled with cfg.compile, else the model."""
    model = dist.sync_batchnorm(model, device, cfg.sync_bn)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = dist.wrap(model, device)
    if cfg.compile == "off":
        return model, net
    return model, torch.compile(net, mode=None if cfg.compile == "default" else cfg.compile)


def ran_with(cfg):
    """How an epoch ran, for its metrics line: a --resume may change these, and options.json
    holds the latest call's flags (--amp auto, not what it chose)."""
    return {"amp": cfg.amp, "channels_last": cfg.channels_last, "processes": dist.world_size()}


def resume_from_last(out_dir, resume, epochs, restore):
    """Where a run goes on: (first epoch to train, its EpochProgress).
    With `resume` and an OUT/last.pth, `restore(state)` loads its weights and optimizers, in
    every process alike, and rank 0 says where the run resumes. Rank 0 then drops the lines of
    metrics.jsonl logged after the checkpoint (or, without one, by a run killed before it)."""
    out_dir = Path(out_dir)
    start_epoch, unfinished = 0, EpochProgress()
    if resume and (out_dir / "last.pth").exists():
        with alike_in_every_process():  # every process reads the same file: one line, from rank 0
            state = load_checkpoint(out_dir / "last.pth", "checkpoint to resume")
            restore(state)
        start_epoch = state["epoch"] + 1
        unfinished = EpochProgress.saved(state, start_epoch)
        if dist.is_main():
            print(resuming_line(out_dir / "last.pth", start_epoch, epochs, unfinished.steps))
    if dist.is_main():
        trim_jsonl(out_dir / "metrics.jsonl", "epoch", start_epoch)  # logged epochs are 1-based
    return start_epoch, unfinished


def train_and_test_epoch(net, model, loaders, optimizer, loss_fn, cfg, device, num_classes, *, epoch, progress,
                         stop_requested, save_stopped, last_path, desc, scaler=None, head=None, tail=None):
    """One epoch of `fit` and of Distill: training (the sampler's order drawn for the
    epoch, from the step a stopped run reached), rank 0's BatchNorm statistics shared, then
    the test. A stop anywhere in it saves `save_stopped(**extra)` to `last_path` (tgn.stopping).
    Returns (training stats, confusion matrix, summary)."""
    train_loader, test_loader = loaders
    train_loader.sampler.set_epoch(epoch, progress.steps)
    with saved_if_stopped(progress, epoch, save_stopped, last_path):
        stats = train_one_epoch(net, train_loader, optimizer, loss_fn, device, desc=desc, amp=cfg.amp, scaler=scaler,
                                channels_last=cfg.channels_last, cuda_graphs=uses_cuda_graphs(cfg.compile),
                                progress=progress, stop_requested=stop_requested)
        dist.broadcast_buffers_(model)  # BatchNorm statistics differ per process without SyncBatchNorm
        cm, summary = evaluate(model, test_loader, device, num_classes, head=head, tail=tail, amp=cfg.amp,
                               channels_last=cfg.channels_last, stop_requested=stop_requested)
    return stats, cm, summary


def fit(model, train_set, test_set, cfg, device, out_dir, *, meta, loss_fn=cross_entropy_loss, resume=False,
        head=None, tail=None, train_weights=None, desc="epoch"):
    """Train with Adam and step learning rates; evaluate, log and checkpoint every epoch.

    Writes `last.pth` (for --resume) and `best.pth` (highest overall test accuracy) in
    `out_dir`, and one JSON line per epoch to `metrics.jsonl`. `meta` (model config,
    class ids and names, options) is stored in every checkpoint. Ctrl-C or SIGTERM saves
    `last.pth` after the step it comes in (its "unfinished_epoch": tgn.stopping.EpochProgress)
    and stops.
    """
    out_dir = Path(out_dir)
    main = dist.is_main()
    model, net = prepare_model(model, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scaler = grad_scaler(device) if cfg.amp == "fp16" else None
    result = TrainResult()

    def restore(state):
        check_same_data(state, meta, out_dir / "last.pth")
        load_weights(model, state["state_dict"], out_dir / "last.pth")
        restore_optimizer(optimizer, state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        result.best_accuracy = state.get("best_accuracy", -math.inf)
        result.best_epoch = state.get("best_epoch", -1)

    start_epoch, unfinished = resume_from_last(out_dir, resume, cfg.epochs, restore)
    num_classes = len(meta["class_ids"])
    test_loader = make_loader(test_set, cfg.batch_size, train=False, workers=cfg.workers, device=device,
                              persistent=keep_evaluation_workers(), pin_memory=cfg.pin_memory)
    loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                         epoch=start_epoch, device=device, weights=train_weights, persistent=True,
                         pin_memory=cfg.pin_memory)

    def checkpoint(epoch, **extra):
        return {**meta, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                "best_accuracy": result.best_accuracy, "best_epoch": result.best_epoch, **extra}

    with stop_between_steps() as stop_requested:
        for epoch in range(start_epoch, cfg.epochs):
            progress = unfinished if epoch == start_epoch else EpochProgress()
            started = time.time() - progress.seconds
            seed_everything(epoch_seed(cfg.seed, epoch))
            lr = step_lr(optimizer, cfg.lr, epoch, cfg.milestones)
            train_stats, cm, summary = train_and_test_epoch(
                net, model, (loader, test_loader), optimizer, loss_fn, cfg, device, num_classes, epoch=epoch,
                progress=progress, stop_requested=stop_requested,
                save_stopped=lambda **extra: checkpoint(epoch - 1, **extra), last_path=out_dir / "last.pth",
                desc=f"{desc} {epoch + 1}/{cfg.epochs}", scaler=scaler, head=head, tail=tail)
            accuracy = summary["overall_accuracy"]
            improved = not math.isnan(accuracy) and accuracy > result.best_accuracy
            if improved:
                result.best_accuracy, result.best_epoch = accuracy, epoch
            result.confusion = cm
            if main:
                record = {"epoch": epoch + 1, "lr": lr, **train_stats, **summary,
                          "seconds": round(time.time() - started, 2), **ran_with(cfg)}
                append_jsonl(out_dir / "metrics.jsonl", record)
                payload = checkpoint(epoch, metrics=summary)
                if improved:
                    save_checkpoint(out_dir / "best.pth",
                                    {k: v for k, v in payload.items() if k not in ("optimizer", "scaler")})
                save_checkpoint(out_dir / "last.pth", payload)
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.1e} loss {train_stats['train_loss']:.4f} "
                    f"test OA {format_percent(accuracy)} mean-acc {format_percent(summary['mean_class_accuracy'])} "
                    f"macro-F1 {format_percent(summary['macro_f1'])}" + (" *best" if improved else "")
                )
            stop_if_requested(stop_requested, epoch)
    dist.barrier()  # the checkpoints are complete before any process reads them
    return result
