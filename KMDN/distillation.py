"""Knowledge mutual distillation between the head model M_H and the tail model M_T.

Epochs alternate in blocks of `interval`: in even blocks M_T teaches M_H on head data,
in odd blocks M_H teaches M_T on tail data. The student's loss is
CE(student logits, labels) + alpha * MSE(student layer3, teacher layer3); the teacher is
frozen (eval mode, no gradients) and sees the student's batch.
"""
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tgn import distributed as dist
from tgn.checkpoint import load_checkpoint, load_weights, save_checkpoint
from tgn.compat import grad_scaler
from tgn.engine import (epoch_seed, evaluate, keep_evaluation_workers, make_loader, make_optimizer, prepare_model,
                        ran_with, restore_optimizer, seed_everything, step_lr, train_one_epoch, uses_cuda_graphs)
from tgn.errors import UserError, alike_in_every_process
from tgn.io import append_jsonl, trim_jsonl
from tgn.metrics import format_percent
from tgn.resume import resuming_line

OUTPUT_NAMES = {"head": "M_H.pth", "tail": "M_T.pth"}


def student_of_epoch(epoch, interval):
    """'head' when M_H learns in this (0-indexed) epoch, 'tail' when M_T does."""
    if interval < 1:
        raise UserError("--distill-interval must be at least 1")
    return "head" if (epoch // interval) % 2 == 0 else "tail"


def teacher_of(student):
    return "tail" if student == "head" else "head"


def distillation_loss(student_logits, labels, student_feature, teacher_feature, alpha):
    """CE on the labels plus alpha times the mean squared distance of the layer3 features."""
    return F.cross_entropy(student_logits, labels) + alpha * F.mse_loss(student_feature, teacher_feature)


def make_distill_loss_fn(teacher, alpha):
    def loss_fn(student, images, labels):
        with torch.no_grad():
            _, teacher_feature = teacher(images)
        logits, student_feature = student(images)
        if student_feature.shape != teacher_feature.shape:
            raise UserError(
                f"the head and tail models give layer3 features of different shapes "
                f"({tuple(student_feature.shape[1:])} vs {tuple(teacher_feature.shape[1:])}); use the same --arch/--width"
            )
        return distillation_loss(logits, labels, student_feature, teacher_feature.detach(), alpha), logits

    return loss_fn


def freeze(model):
    """Eval mode (BatchNorm statistics stay put) and no parameter gradients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def unfreeze(model):
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def student_loaders(datasets, cfg, device, epoch):
    """The student group's (train, test) loaders, made when it becomes the student. The
    training workers live through its `interval` epochs; the order of each epoch depends
    only on (seed, epoch), so new loaders draw what kept ones would."""
    train_set, test_set = datasets
    return (make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed, epoch=epoch,
                        device=device, persistent=True, pin_memory=cfg.pin_memory),
            make_loader(test_set, cfg.batch_size, train=False, workers=cfg.workers, device=device,
                        persistent=keep_evaluation_workers(), pin_memory=cfg.pin_memory))


def distill(models, datasets, metas, cfg, device, out_dir, *, alpha, interval, resume=False):
    """Run the alternating schedule; returns the best test accuracy of each model.

    `models`, `datasets` (train, test) and `metas` are dicts keyed by 'head' and 'tail'.
    Writes last.pth (both models, both optimizers: for --resume), M_H.pth and M_T.pth
    (each model at its best test accuracy while it was the student) and metrics.jsonl.
    Under torchrun the student trains through DistributedDataParallel and rank 0 writes.
    """
    out_dir = Path(out_dir)
    main = dist.is_main()
    models, nets, optimizers, scalers = dict(models), {}, {}, {}
    for group in models:
        models[group], nets[group] = prepare_model(models[group], cfg, device)
        optimizers[group] = make_optimizer(models[group], cfg)
        scalers[group] = grad_scaler(device) if cfg.amp == "fp16" else None
    best = {group: -math.inf for group in models}
    start_epoch = 0
    if resume and (out_dir / "last.pth").exists():
        with alike_in_every_process():  # every process reads the same file: one line, from rank 0
            state = load_checkpoint(out_dir / "last.pth", "checkpoint to resume")
            for group in models:
                load_weights(models[group], state["models"][group], out_dir / "last.pth")
                restore_optimizer(optimizers[group], state["optimizers"][group])
                if scalers[group] is not None and (state.get("scalers") or {}).get(group):
                    scalers[group].load_state_dict(state["scalers"][group])
        best = state["best"]
        start_epoch = state["epoch"] + 1
        if main:
            print(resuming_line(out_dir / "last.pth", start_epoch, cfg.epochs))
    if main:  # lines logged after the checkpoint (or, without one, by a run killed before it) go
        trim_jsonl(out_dir / "metrics.jsonl", "epoch", start_epoch)  # logged epochs are 1-based
    loaders, loaders_group = None, None
    precision = {"amp": cfg.amp, "channels_last": cfg.channels_last}
    cuda_graphs = uses_cuda_graphs(cfg.compile)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        student_group = student_of_epoch(epoch, interval)
        student, teacher = models[student_group], models[teacher_of(student_group)]
        freeze(teacher)
        unfreeze(student)
        seed_everything(epoch_seed(cfg.seed, epoch))
        lr = step_lr(optimizers[student_group], cfg.lr, epoch, cfg.milestones)
        if loaders_group != student_group:
            loaders = None  # the idle group's workers stop: they would hold memory through its teacher epochs
            loaders, loaders_group = student_loaders(datasets[student_group], cfg, device, epoch), student_group
        train_loader, test_loader = loaders
        train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(nets[student_group], train_loader, optimizers[student_group],
                                make_distill_loss_fn(teacher, alpha), device, scaler=scalers[student_group],
                                desc=f"distill {epoch + 1}/{cfg.epochs} ({student_group} learns)",
                                cuda_graphs=cuda_graphs, **precision)
        dist.broadcast_buffers_(student)  # BatchNorm statistics differ per process without SyncBatchNorm
        _, summary = evaluate(student, test_loader, device, len(metas[student_group]["class_ids"]),
                              **precision)
        accuracy = summary["overall_accuracy"]
        improved = not math.isnan(accuracy) and accuracy > best[student_group]
        if improved:
            best[student_group] = accuracy
        if not main:
            continue
        if improved:
            save_checkpoint(out_dir / OUTPUT_NAMES[student_group],
                            {**metas[student_group], "state_dict": student.state_dict(), "epoch": epoch,
                             "metrics": summary, "distilled": True})
        append_jsonl(out_dir / "metrics.jsonl", {"epoch": epoch + 1, "student": student_group, "lr": lr, **stats,
                                                  **summary, "seconds": round(time.time() - started, 2),
                                                  **ran_with(cfg)})
        save_checkpoint(out_dir / "last.pth", {
            "format": "tgn-distill-state/1",
            "split_fingerprint": metas["head"]["split_fingerprint"],  # --resume continues on the same data only
            "models": {group: model.state_dict() for group, model in models.items()},
            "optimizers": {group: opt.state_dict() for group, opt in optimizers.items()},
            "scalers": {group: scaler.state_dict() for group, scaler in scalers.items() if scaler is not None},
            "best": best,
            "epoch": epoch,
        })
        print(f"epoch {epoch + 1}/{cfg.epochs} student {student_group} lr {lr:.1e} loss {stats['train_loss']:.4f} "
              f"test OA {format_percent(accuracy)} macro-F1 {format_percent(summary['macro_f1'])}"
              + (" *best" if improved else ""))
    # A model that never was the student (too few epochs) is passed on unchanged, marked as such.
    for group, model in models.items():
        if main and not (out_dir / OUTPUT_NAMES[group]).exists():
            # Its weights are the given model's: so is the size it was trained at, which the
            # next Distill or CDTG reads from the options.
            options = {**metas[group]["options"], "image_size": getattr(model, "training_size", None)}
            save_checkpoint(out_dir / OUTPUT_NAMES[group], {**metas[group], "options": options,
                                                            "state_dict": model.state_dict(), "distilled": False})
    dist.barrier()  # the outputs are complete before any process reads them
    return best
