"""Knowledge mutual distillation between the head model M_H and the tail model M_T.

Epochs alternate in blocks of `interval`: in even blocks M_T teaches M_H on head data,
in odd blocks M_H teaches M_T on tail data. The student's loss is
CE(student logits, labels) + alpha * MSE(student layer3, teacher layer3); the teacher is
frozen (eval mode, no gradients) and sees the student's batch.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from KMDN.flags import OFFICIAL_IMAGE_SIZE
from KMDN.stage import checkpoint_meta, group_datasets, open_split
from tgn import distributed as dist
from tgn.checkpoint import check_fits, load_weights, save_checkpoint
from tgn.cli import training_config
from tgn.compat import grad_scaler
from tgn.data import check_outside_dataset
from tgn.engine import (check_one_image_batches, keep_evaluation_workers, make_loader, prepare_model, ran_with,
                        resume_from_last, seed_everything, train_and_test_epoch)
from tgn.errors import UserError, alike_in_every_process, speaks_for_the_run
from tgn.io import append_jsonl, read_json
from tgn.metrics import format_percent
from tgn.optim import make_optimizer, restore_optimizer, step_lr
from tgn.resnet import FeatureResNet, load_feature_resnet
from tgn.resume import check_resume, epochs_done, last_state, take_the_runs_flags, warn_if_unfinished
from tgn.run_folder import check_folder_of_runs, check_run_dir, prepare_run_dir, save_options
from tgn.sampling import epoch_seed
from tgn.split import check_model_classes
from tgn.stopping import EpochProgress, stop_between_steps, stop_if_requested

OUTPUT_NAMES = {"head": "M_H.pth", "tail": "M_T.pth"}
RESULTS = ("last.pth", *OUTPUT_NAMES.values())  # with metrics.jsonl, what --overwrite replaces
# What a --resume may change besides how any run goes (tgn.resume): where M_H and M_T are
# read from (a resumed run continues from last.pth, which records both models).
RESUME_MAY_CHANGE = frozenset({"head_ckpt", "tail_ckpt"})


def student_of_epoch(epoch, interval):
    """'head' when M_H learns in this (0-indexed) epoch, 'tail' when M_T does."""
    return "head" if (epoch // interval) % 2 == 0 else "tail"


def teacher_of(student):
    return "tail" if student == "head" else "head"


def first_student_epoch(group, interval):
    return 0 if group == "head" else interval


def distillation_loss(student_logits, labels, student_feature, teacher_feature, alpha):
    """CE on the labels plus alpha times the mean squared distance of the layer3 features."""
    return F.cross_entropy(student_logits, labels) + alpha * F.mse_loss(student_feature, teacher_feature)


def make_distill_loss_fn(teacher, alpha):
    def loss_fn(student, images, labels):
        with torch.no_grad():
            _, teacher_feature = teacher(images)
        logits, student_feature = student(images)  # of the teacher's shape: run_distillation checked
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


def distill(models, datasets, metas, cfg, device, out_dir, *, alpha, interval, resume=False, keep_fc=False):
    """Run the alternating schedule; returns the best test accuracy of each model.

    `models`, `datasets` (train, test) and `metas` are dicts keyed by 'head' and 'tail'.
    Writes last.pth (both models, both optimizers: for --resume), M_H.pth and M_T.pth
    (each model at its best test accuracy while it was the student) and metrics.jsonl.
    Under torchrun the student trains through DistributedDataParallel and rank 0 writes.
    Without `keep_fc`, a model's classifier (fc) is drawn again when the model first learns.
    """
    out_dir = Path(out_dir)
    main = dist.is_main()
    models, nets, optimizers, scalers = dict(models), {}, {}, {}
    for group in models:
        models[group], nets[group] = prepare_model(models[group], cfg, device)
        optimizers[group] = make_optimizer(models[group], cfg)
        scalers[group] = grad_scaler(device) if cfg.amp == "fp16" else None
    best = {group: -math.inf for group in models}

    def restore(state):
        for group in models:
            load_weights(models[group], state["models"][group], out_dir / "last.pth")
            restore_optimizer(optimizers[group], state["optimizers"][group])
            if scalers[group] is not None and (state.get("scalers") or {}).get(group):
                scalers[group].load_state_dict(state["scalers"][group])
        best.update(state["best"])

    start_epoch, unfinished = resume_from_last(out_dir, resume, cfg.epochs, restore)
    loaders, loaders_group = None, None

    def checkpoint(epoch, **extra):
        return {
            "format": "tgn-distill-state/1",
            "split_fingerprint": metas["head"]["split_fingerprint"],  # --resume continues on the same data only
            "options": metas["head"]["options"],  # what --resume compares with, should options.json be gone
            # What a resumed run rebuilds the models from: M_H and M_T as given need not stay.
            "model_configs": {group: metas[group]["model_config"] for group in models},
            "trained_at": {group: getattr(model, "training_size", None) for group, model in models.items()},
            "models": {group: model.state_dict() for group, model in models.items()},
            "optimizers": {group: opt.state_dict() for group, opt in optimizers.items()},
            "scalers": {group: scaler.state_dict() for group, scaler in scalers.items() if scaler is not None},
            "best": best,
            "epoch": epoch,
            **extra,
        }

    with stop_between_steps() as stop_requested:
        for epoch in range(start_epoch, cfg.epochs):
            progress = unfinished if epoch == start_epoch else EpochProgress()
            started = time.time() - progress.seconds
            student_group = student_of_epoch(epoch, interval)
            student, teacher = models[student_group], models[teacher_of(student_group)]
            freeze(teacher)
            unfreeze(student)
            seed_everything(epoch_seed(cfg.seed, epoch))
            if not keep_fc and epoch == first_student_epoch(student_group, interval) and not progress.steps:
                # As the official Distill, which loads M_H and M_T without their fc layers: the
                # student's classifier starts afresh (drawn from the epoch's seed, so a resumed
                # run draws it alike; one resumed within the epoch has it trained already); a
                # model that never learns is passed on with its own.
                student.fc.reset_parameters()
            lr = step_lr(optimizers[student_group], cfg.lr, epoch, cfg.milestones)
            if loaders_group != student_group:
                loaders = None  # the idle group's workers stop: they would hold memory through its teacher epochs
                loaders, loaders_group = student_loaders(datasets[student_group], cfg, device, epoch), student_group
            stats, _, summary = train_and_test_epoch(
                nets[student_group], student, loaders, optimizers[student_group], make_distill_loss_fn(teacher, alpha),
                cfg, device, len(metas[student_group]["class_ids"]), epoch=epoch, progress=progress,
                stop_requested=stop_requested, save_stopped=lambda **extra: checkpoint(epoch - 1, **extra),
                last_path=out_dir / "last.pth", desc=f"distill {epoch + 1}/{cfg.epochs} ({student_group} learns)",
                scaler=scalers[student_group])
            accuracy = summary["overall_accuracy"]
            improved = not math.isnan(accuracy) and accuracy > best[student_group]
            if improved:
                best[student_group] = accuracy
            if main:
                if improved:
                    save_checkpoint(out_dir / OUTPUT_NAMES[student_group],
                                    {**metas[student_group], "state_dict": student.state_dict(), "epoch": epoch,
                                     "metrics": summary, "distilled": True})
                append_jsonl(out_dir / "metrics.jsonl", {"epoch": epoch + 1, "student": student_group, "lr": lr,
                                                          **stats, **summary,
                                                          "seconds": round(time.time() - started, 2),
                                                          **ran_with(cfg)})
                save_checkpoint(out_dir / "last.pth", checkpoint(epoch))
                print(f"epoch {epoch + 1}/{cfg.epochs} student {student_group} lr {lr:.1e} "
                      f"loss {stats['train_loss']:.4f} test OA {format_percent(accuracy)} "
                      f"macro-F1 {format_percent(summary['macro_f1'])}" + (" *best" if improved else ""))
            stop_if_requested(stop_requested, epoch)
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


def load_group_model(path, split, group):
    """M_H or M_T, checked against the split: the class count always; for our checkpoints
    also the group and class ids they were trained on (official files record neither)."""
    model, checkpoint = load_feature_resnet(path, f"{group} model checkpoint")
    warn_if_unfinished(path, f"the {group} model")
    model.training_size = (checkpoint.get("options") or {}).get("image_size", OFFICIAL_IMAGE_SIZE)
    if checkpoint.get("group", group) != group:  # first: the likeliest mix-up, and the clearest message
        raise UserError(f"{path} is the {checkpoint['group']} model; the {group} model is needed here")
    check_model_classes(path, checkpoint, model.config["num_classes"], split.ids(group),
                        [split.train_counts[cid] for cid in split.ids(group)], f"the split's {group} group",
                        split.names(group))
    return model


def resumed_group_model(state, group):
    """M_H or M_T as last.pth records it, its weights yet to be restored: a resumed run
    needs neither given file (runs of earlier versions recorded no configs: they read them)."""
    model = FeatureResNet(**state["model_configs"][group])
    model.training_size = state["trained_at"][group]
    return model


def run_distillation(args):
    """Distill.py: M_H and M_T loaded and checked against the split, then `distill`."""
    check_folder_of_runs(args.out)
    check_run_dir(args.out / "distill", resume=args.resume, overwrite=args.overwrite, results=RESULTS, args=args)
    take_the_runs_flags(args, args.out / "distill", taken_without={"data_root": {"split"}},
                        checkpoint=args.out / "distill" / "last.pth")
    dist.local_batch(args.batch_size)  # divisible by the torchrun processes, checked before joining
    split = open_split(args)
    check_outside_dataset(args.out, split.data_root)
    check_outside_dataset(args.cache, split.data_root, "--cache")
    device = dist.process_device(args.device)
    state = last_state(args.out / "distill" / "last.pth", needs=("models", "optimizers", "epoch", "best"))
    # Before the models are read: a last.pth that cannot be read is named, not the files it
    # stands in for. Runs of earlier versions recorded no split: theirs is not checked.
    check_resume(args.out / "distill", args, done=epochs_done(state), state=state,
                 data={"split_fingerprint": split.fingerprint}, may_change=RESUME_MAY_CHANGE)
    recorded = args.out / "distill" / "options.json"
    started_with = read_json(recorded, "options") if args.resume and recorded.is_file() else {}
    if state is not None and started_with and "keep_fc" not in started_with and not args.keep_fc:
        raise UserError(f"--resume: {args.out / 'distill'} was started by an earlier version, which kept M_H's and "
                        "M_T's classifiers: resume it with --keep-fc")
    paths = {"head": args.head_ckpt or args.out / "head" / "best.pth",
             "tail": args.tail_ckpt or args.out / "tail" / "best.pth"}
    if args.resume and state and "model_configs" in state:  # last.pth's weights replace the given ones
        models = {group: resumed_group_model(state, group) for group in paths}
        given = [f"--{key.replace('_', '-')}" for key in ("head_ckpt", "tail_ckpt")
                 if key in getattr(args, "given", ()) and getattr(args, key)]  # not those taken from the run
        if given and speaks_for_the_run():
            print(f"note: {' and '.join(given)} not read: the run resumes from {args.out / 'distill' / 'last.pth'}")
    else:
        models = {group: load_group_model(paths[group], split, group) for group in paths}
    if args.image_size is None:  # a resumed run's is the size it started with (take_the_runs_flags)
        sizes = {group: model.training_size for group, model in models.items()}
        if sizes["head"] != sizes["tail"]:
            raise UserError(f"M_H was trained at {sizes['head']} px, M_T at {sizes['tail']} px; pass --image-size")
        args.image_size = sizes["head"]
    shapes = {group: model.feature_shape(args.image_size) for group, model in models.items()}
    if shapes["head"] != shapes["tail"]:  # the feature loss compares them: found now, not at the first batch
        raise UserError(f"the head and tail models give layer3 features of different shapes ({shapes['head']} vs "
                        f"{shapes['tail']}): {paths['head']} and {paths['tail']} need the same --arch and --width")
    cfg = training_config(args, device)  # its flags' errors found before any image is read
    if args.resume and state is not None:  # weights of another shape are refused before anything is written
        with alike_in_every_process():  # every process reads the same file: one line
            for group, model in models.items():
                check_fits(model, state["models"].get(group, {}), args.out / "distill" / "last.pth")
    datasets = {group: group_datasets(split, group, args.image_size, args.skip_bad_images, args.cache,
                                       draft=not args.full_decode)
                for group in paths}
    for group, (train_set, _) in datasets.items():
        check_one_image_batches(len(train_set), args.batch_size, args.image_size, device, args.sync_bn,
                                f"the {group} classes' training images")
    # Inputs are valid: only now is anything written (by rank 0 alone under torchrun).
    dist.init(args.device)  # joined after the input checks: an input error prints once per node
    run_dir = prepare_run_dir(args.out / "distill", resume=args.resume, overwrite=args.overwrite, results=RESULTS)
    main = dist.is_main()
    options = save_options(run_dir, args, write=main, resumed=args.resume and state is not None)
    metas = {group: checkpoint_meta(split, group, models[group], options) for group in paths}
    best = distill(models, datasets, metas, cfg, device, run_dir,
                   alpha=args.alpha, interval=args.distill_interval, resume=args.resume, keep_fc=args.keep_fc)
    if not main:
        return
    for group, accuracy in best.items():
        shown = f"{format_percent(accuracy)}%" if accuracy > -1 else "not trained"
        print(f"{group}: best test accuracy while student {shown}")
    if best["tail"] > -1:
        print(f"distilled tail model: {run_dir / 'M_T.pth'}")
    else:  # CDTG reads M_T.pth: say loudly that it is the tail model as given
        print(f"warning: M_T was not distilled: the tail model learns in epochs {args.distill_interval + 1} to "
              f"{2 * args.distill_interval}, this run has {args.epochs}; {run_dir / 'M_T.pth'} is the tail model as "
              "given (continue with --resume --epochs N to distill it)", file=sys.stderr)
