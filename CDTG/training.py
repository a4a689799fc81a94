"""A CDTG/train.py run from its flags: the checks, the models and the trainer that fits them."""
import warnings
from pathlib import Path

import numpy as np
import torch

from CDTG.checkpoint import (checkpoint_steps, is_official, load_cdtg_checkpoint, newest_checkpoint,
                             numbered_checkpoints, official_not_resumable)
from CDTG.clip_loss import ClipConsistencyLoss, load_clip
from CDTG.config import RESUME_MAY_CHANGE, GanConfig, ada_interval, resume_view, uses_clip_loss
from CDTG.fusion import NoiseFusion
from CDTG.swagan import STDDEV_GROUP, Discriminator, Generator
from CDTG.tail_data import check_prompts_name_classes, load_tail_classes, load_teacher, tail_image_dataset
from CDTG.trainer import SAMPLES_PER_CLASS, CdtgTrainer, accumulate
from tgn.checkpoint import check_fits, weights_fingerprint
from tgn import distributed as dist
from tgn.compat import check_compile
from tgn.data import check_outside_dataset
from tgn.engine import seed_everything
from tgn.errors import UserError, alike_in_every_process, speaks_for_the_run
from tgn.io import absolute_path, remove_temp_files
from tgn.resume import check_resume, last_state, take_the_runs_flags
from tgn.run_folder import check_own_run_folder, save_options
from tgn.runlock import refuse_folder_in_use
from tgn.split import check_recorded_classes


def gan_config(args):
    return GanConfig(
        iterations=args.iter, batch=args.batch, lr=args.lr, r1=args.r1, path_regularize=args.path_regularize,
        path_batch_shrink=args.path_batch_shrink, d_reg_every=args.d_reg_every, g_reg_every=args.g_reg_every,
        mixing=args.mixing, fusion_noise=args.fusion_noise, lambda_cls=args.lambda_cls,
        lambda_clip=0.0 if args.clip == "none" else args.lambda_clip, augment=args.augment, flip=args.flip,
        augment_p=args.augment_p, ada_target=args.ada_target, ada_length=args.ada_length, ada_every=args.ada_every,
        save_every=args.save_every, keep_full=args.keep_full, sample_every=args.sample_every,
        log_every=args.log_every, seed=args.seed, workers=args.workers, amp=args.amp, compile=args.compile,
    )


def sample_set(dataset, num_classes, latent_dim, device):
    """Fixed inputs of the sample grids: up to 8 rows of classes, SAMPLES_PER_CLASS each."""
    classes = list(range(min(num_classes, 8)))
    labels = torch.tensor([c for c in classes for _ in range(SAMPLES_PER_CLASS)])
    first_of_class = {}
    for index, label in enumerate(dataset.targets()):
        first_of_class.setdefault(label, index)
    real = torch.stack([dataset[first_of_class[int(c)]][0] for c in labels])
    z = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(0))
    return z.to(device), labels.to(device), real.to(device)


def starting_weights(path, tail, generator, discriminator, g_ema):
    """--init's checkpoint, checked before anything is written: whole (G and D, not cut to
    what generation reads), of these tail classes in this order, of these models' shapes."""
    state = load_cdtg_checkpoint(path)
    if state.get("generation_only") or "g" not in state or "d" not in state:
        raise UserError(f"--init {path} keeps only what generation reads, not G and D (an older checkpoint, cut by "
                        "--keep-full): pass one of the run's newest checkpoints")
    # Its labels would draw other classes. An official file records none: they follow the training counts.
    check_recorded_classes(f"--init {path}", state, state["generator_config"]["num_classes"], tail.ids,
                           [cls["train_count"] for cls in tail.classes], f"--data {tail.folder}", tail.names,
                           official=state.get("official"))
    check_same_models(path, state, generator, discriminator, FUNCTION_SETTINGS)
    try:
        for module, key in ((generator, "g"), (discriminator, "d"), (g_ema, "g_ema")):
            check_fits(module, state[key], f"--init {path}")
    except UserError:
        check_same_models(path, state, generator, discriminator)  # the flag behind the shapes, where one is
        raise
    return state


# The model flags behind each recorded constructor argument (num_classes comes from --data).
MODEL_FLAGS = {"size": "--size", "style_dim": "--latent", "label_dim": "--latent", "n_mlp": "--n-mlp",
               "channel_multiplier": "--channel-multiplier", "channel_max": "--channel-max", "lr_mlp": "--lr-mlp"}


# Settings that change what the weights compute without changing their shapes: the mapping
# network stores its weights divided by --lr-mlp (another value scales every latent).
FUNCTION_SETTINGS = ("lr_mlp", "blur_kernel")


def check_same_models(path, state, generator, discriminator, keys=None):
    """--init's models were built as this run's, in `keys` (all by default) of their
    constructor arguments; compares what the checkpoint records (the official format records
    only some). Other settings matter only where they change shapes (widths are capped at
    --channel-max anyway): check_fits finds those, and this names the flag."""
    for what, recorded, own in (("generator", state.get("generator_config"), generator.config),
                                ("discriminator", state.get("discriminator_config"), discriminator.config)):
        for key, value in own.items():
            if keys is not None and key not in keys:
                continue
            saved = (recorded or {}).get(key, value)
            saved = list(saved) if isinstance(saved, tuple) else saved  # blur_kernel, as the config holds it
            if saved != value:
                flag = MODEL_FLAGS.get(key)
                remedy = f"pass {flag} {saved}" if flag else "it cannot start this run"
                raise UserError(f"--init {path}: its {what} was built with {key} {saved}, this run's with {value}, "
                                f"which the weights do not carry over to; {remedy}")


def clear_run(out):
    """--overwrite: remove an earlier run's checkpoints, metrics and sample grids, so that
    neither the log nor a later --resume mixes the two runs."""
    for path in (out / "checkpoint").glob("*.pt"):
        if path.stem.isdigit():  # <step>.pt, zero-padded or not
            path.unlink()
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for grid in (out / "sample").glob("[0-9]*.png"):
        grid.unlink()


def check_gan_flags(args):
    """Refuse the ADA and CLIP flags that would act on nothing; --ada-every resolved."""
    defaults = GanConfig()
    inert = [flag for flag, value, default in (
        ("--augment-p", args.augment_p, defaults.augment_p), ("--ada-target", args.ada_target, defaults.ada_target),
        ("--ada-length", args.ada_length, defaults.ada_length), ("--ada-every", args.ada_every, None))
        if value != default]
    if inert and not args.augment:  # the official code ignores them without it: say so instead
        raise UserError(f"{', '.join(inert)} act only with --augment (ADA): add --augment or leave them out")
    if args.clip == "none" and args.lambda_clip not in (0, defaults.lambda_clip):
        raise UserError(f"--lambda-clip {args.lambda_clip} acts only with a CLIP model: leave it out with --clip none")
    args.ada_every = ada_interval(args)  # recorded as a number: a resumed run keeps its interval
    check_compile(args.compile)


def check_stddev_groups(batch, resumed=False):
    """Each process's share of --batch must form the discriminator's minibatch-std groups
    as one process would: a multiple of STDDEV_GROUP, or the whole --batch of at most
    STDDEV_GROUP images on one process (shares smaller than a group change training). A
    `resumed` run keeps its --batch: only fewer processes are offered."""
    local = dist.local_batch(batch, "--batch")  # divisible by the torchrun processes, checked before joining
    if local > STDDEV_GROUP and local % STDDEV_GROUP:
        share = f"each process's share ({local})" if local != batch else "it"
        raise UserError(f"--batch {batch}: {share} must be at most {STDDEV_GROUP} or a multiple of "
                        f"{STDDEV_GROUP}, the discriminator's minibatch-std group")
    if local < min(batch, STDDEV_GROUP):  # each process groups its own images: smaller groups than one process's
        world = batch // local
        fewer = f"use at most {max(1, batch // STDDEV_GROUP)} processes"
        remedy = f"{fewer} (a resumed run keeps its --batch)" if resumed else \
            f"{fewer} or --batch {STDDEV_GROUP * world}"
        raise UserError(f"--batch {batch} over {world} processes leaves {local} image(s) each, fewer than the "
                        f"discriminator's minibatch-std group of {STDDEV_GROUP}, which changes training; {remedy}")


def build_models(args, num_classes, teacher):
    """The generator, discriminator, EMA generator (a copy of the generator) and the noise
    fusion layer for `teacher`'s layer3 map at --size."""
    generator = Generator(args.size, args.latent, args.n_mlp, num_classes=num_classes,
                          channel_multiplier=args.channel_multiplier, lr_mlp=args.lr_mlp, channel_max=args.channel_max)
    discriminator = Discriminator(args.size, num_classes, label_dim=args.latent,
                                  channel_multiplier=args.channel_multiplier, channel_max=args.channel_max)
    g_ema = Generator(**generator.config)
    accumulate(g_ema, generator, 0)
    for module in (generator, g_ema):
        module.set_fused_modconv(args.modconv == "fused")
    channels, height, width = teacher.feature_shape(args.size)
    if not 0 <= args.fusion_pool <= min(height, width):
        raise UserError(f"--fusion-pool {args.fusion_pool}: M_T's layer3 map is {height}x{width} at {args.size} px; "
                        f"use 0 (off) to {min(height, width)}")
    fusion = NoiseFusion(channels * height * width, args.latent, pool=args.fusion_pool or None, channels=channels,
                         lr_mul=args.fusion_lr_mul)
    return generator, discriminator, g_ema, fusion


def train_cdtg(args):
    """CDTG/train.py: the flags and inputs checked, the models built (or resumed), then training."""
    refuse_folder_in_use(args.out)
    check_own_run_folder(args.out, args)
    steps = checkpoint_steps(args.out / "checkpoint")
    newest_path = newest_checkpoint(args.out / "checkpoint")
    take_the_runs_flags(args, args.out, not_taken={"modconv"}, taken_without={"data_root": {"data"}},
                        compared=resume_view, checkpoint=newest_path)
    # Recorded absolute, as the path flags are: a --resume from another folder finds them.
    if args.clip != "none" and Path(args.clip).expanduser().is_file():  # a file, not a model name
        args.clip = str(absolute_path(Path(args.clip).expanduser()))
    if args.clip_root is not None:
        args.clip_root = str(absolute_path(Path(args.clip_root).expanduser()))
    check_gan_flags(args)
    # Before its steps are counted, and in any mode: --overwrite would delete a downloaded file,
    # wherever it stands among the run's checkpoints.
    held = numbered_checkpoints(args.out / "checkpoint").values() if args.overwrite else [newest_path] * bool(steps)
    for path in held:
        if is_official(path):
            raise official_not_resumable(path)
    if steps and not (args.resume or args.overwrite):
        raise UserError(f"{args.out / 'checkpoint'} holds checkpoints; pass --resume to continue or --overwrite to "
                        "start again")
    done = steps[-1] if steps else None
    # Without options.json (deleted, or lost with a copied folder), the flags are compared with the newest
    # checkpoint's (none in the official format; one that cannot be read is reported where it is loaded).
    newest = last_state(newest_path, needs=()) \
        if args.resume and steps and not (args.out / "options.json").is_file() else None
    check_resume(args.out, args, done=done, length="iter", state={"options": (newest or {}).get("options")},
                 may_change=RESUME_MAY_CHANGE, compared=resume_view)
    check_stddev_groups(args.batch, resumed=bool(args.resume and steps))
    tail = load_tail_classes(args.data, args.data_root)
    check_outside_dataset(args.out, tail.data_root)
    if uses_clip_loss(vars(args)):
        check_prompts_name_classes(tail)
    device = dist.process_device(args.device)
    seed_everything(args.seed)
    dataset = tail_image_dataset(tail, args.size, args.skip_bad_images, draft=not args.full_decode)
    teacher = load_teacher(args.teacher, tail)
    num_classes = len(tail.classes)
    generator, discriminator, g_ema, fusion = build_models(args, num_classes, teacher)
    # A run with checkpoints to resume continues from them: --init only starts runs.
    init = (starting_weights(args.init, tail, generator, discriminator, g_ema)
            if args.init is not None and not (args.resume and steps) else None)
    if args.init is not None and init is None and speaks_for_the_run() and "init" in getattr(args, "given", {"init"}):
        print(f"note: --init is not read: the run resumes from {newest_path}")
    clip_model = load_clip(args.clip, device, args.clip_root) if args.lambda_clip > 0 else None
    clip_loss = ClipConsistencyLoss(clip_model, tail.prompts) if clip_model is not None else None
    dist.init(args.device)  # joined after the input checks: an input error prints once per node
    dist.make_shared_folder(args.out)
    main = dist.is_main()  # under torchrun rank 0 alone prints and writes
    if main:
        for folder in (args.out, args.out / "checkpoint"):  # what a run killed mid-save left
            remove_temp_files(folder)
    if main and args.overwrite and not args.resume:
        clear_run(args.out)
    dist.barrier()  # no process looks for checkpoints before the old ones are gone
    options = save_options(args.out, args, write=False, resumed=bool(args.resume and steps))
    metadata = {
        "generator_config": generator.config,
        "discriminator_config": discriminator.config,
        "fusion_config": fusion.config,
        "class_ids": tail.ids,
        "class_names": tail.names,
        "prompts": tail.prompts,
        "train_counts": np.bincount(dataset.labels, minlength=num_classes).tolist(),
        "teacher": str(args.teacher.resolve()),
        "teacher_fingerprint": weights_fingerprint(teacher),
        "data": str(Path(args.data).resolve()),
        "data_root": str(tail.data_root),  # the dataset read (--data-root, else the tail data's): generation's too
        "clip_fingerprint": weights_fingerprint(clip_model) if clip_model is not None else None,
        "options": options,
    }
    trainer = CdtgTrainer(generator, discriminator, g_ema, fusion, teacher, clip_loss, gan_config(args), device,
                          args.out, metadata)
    if args.resume:
        with alike_in_every_process():  # every process reads the same checkpoint: one line, from rank 0
            trainer.resume()
    if init is not None:
        trainer.start_from(init, args.init)
        del init  # at 256 px about 3 GB
    # Written after the checkpoint's checks, so that a refused --resume leaves the run's own flags.
    save_options(args.out, args, write=main, resumed=bool(args.resume and steps))
    if main:
        print(f"CDTG: {num_classes} tail classes, {len(dataset)} images at {args.size} px, device {device}"
              f"{dist.describe()}, CLIP {'off' if clip_loss is None else args.clip}, steps {trainer.step}..{args.iter}")
        if num_classes == 1:  # cross-entropy over one class is 0 whatever the fake looks like
            warnings.warn("one tail class: its classifier and CLIP losses are 0, so only the adversarial loss "
                          "trains the generator")
    samples = sample_set(dataset, num_classes, args.latent, device) if main else None
    final_step = trainer.fit(dataset, samples)
    if main:
        print(f"done at step {final_step}: {args.out / 'checkpoint' / f'{final_step}.pt'}")
