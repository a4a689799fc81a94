"""Train CDTG: a class-conditional SWAGAN on the tail classes, with noise fused with the
tail model's features, the tail model's classification loss and a CLIP text loss.

    python CDTG/train.py --data runs/dior/cdtg/data --teacher runs/dior/kmdn/distill/M_T.pth --out runs/dior/cdtg

Official defaults: 256 px, latent 512, 8 mapping layers, channel multiplier 2, batch 8,
lr 0.002, 200,000 iterations, R1 10 every 16 steps, path length 2 every 4 steps, style
mixing 0.9, fusion 0.8 * noise + 0.2 * feature, CLIP ViT-B/32. Writes
OUT/checkpoint/<step>.pt every --save-every steps, OUT/sample/<step>.png grids,
OUT/metrics.jsonl and OUT/options.json. Quick CPU run: --size 32 --latent 64 --n-mlp 2
--channel-max 32 --batch 4 --iter 200 --clip none.

Several GPUs: `torchrun --nproc_per_node=N CDTG/train.py ...` with the same flags; --batch
stays the global batch (each GPU takes --batch / N, which must be 4 or more, the size of
the discriminator's minibatch-stddev groups).
"""
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import torch  # noqa: E402

from CDTG.clip_loss import ClipConsistencyLoss, load_clip  # noqa: E402
from CDTG.fusion import NoiseFusion  # noqa: E402
from CDTG.swagan import STDDEV_GROUP, Discriminator, Generator  # noqa: E402
from CDTG.tail_data import load_tail_classes, load_teacher, tail_image_dataset  # noqa: E402
from CDTG.trainer import ADA_STEPS, CdtgTrainer, GanConfig, accumulate, ada_interval  # noqa: E402
from tgn.checkpoint import weights_fingerprint  # noqa: E402
from tgn.cli import (DEFAULT_WORKERS, below_one, fraction, gan_size, make_parser, non_negative_float,  # noqa: E402
                     non_negative_int, output_folder, positive_float, positive_int, seed_value)
from tgn import distributed as dist  # noqa: E402
from tgn.compat import check_compile  # noqa: E402
from tgn.engine import seed_everything  # noqa: E402
from tgn.errors import UserError, alike_in_every_process, cli_main  # noqa: E402
from tgn.io import check_own_run_folder, remove_temp_files, save_options  # noqa: E402
from tgn.resume import check_resume  # noqa: E402
from tgn.runlock import refuse_folder_in_use  # noqa: E402
from CDTG.checkpoint import checkpoint_steps  # noqa: E402


def build_parser():
    defaults = GanConfig()
    parser = make_parser(__doc__)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--data", type=Path, default=Path("runs/cdtg/data"), help="folder made by CDTG/dataset_split.py")
    io.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved since the split")
    io.add_argument("--teacher", type=Path, default=Path("runs/kmdn/distill/M_T.pth"),
                    help="the distilled tail model M_T (KMDN/Distill.py); official bare state dicts work too")
    io.add_argument("--clip", default="ViT-B/32", help="CLIP model name (downloaded when online), a local file, or 'none'")
    io.add_argument("--clip-root", default=None, help="download folder of CLIP weights")
    io.add_argument("--out", type=output_folder, default=Path("runs/cdtg"), help="run folder")
    either = io.add_mutually_exclusive_group()  # continue the run, or replace it
    either.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoint")
    either.add_argument("--overwrite", action="store_true", help="start again even if OUT holds checkpoints")

    model = parser.add_argument_group("model (official defaults)")
    model.add_argument("--size", type=gan_size, default=256, help="image size of the GAN")
    model.add_argument("--latent", type=positive_int, default=512, help="latent (style) dimension")
    model.add_argument("--n-mlp", type=positive_int, default=8, help="layers of the mapping network")
    model.add_argument("--channel-multiplier", type=positive_int, default=2,
                       help="channel multiplier (2 = official config-f)")
    model.add_argument("--channel-max", type=positive_int, default=512,
                       help="cap on every layer's width (512 = official)")
    model.add_argument("--lr-mlp", type=positive_float, default=0.01,
                       help="learning-rate multiplier of the mapping network")

    train = parser.add_argument_group("training (official defaults)")
    train.add_argument("--iter", type=positive_int, default=defaults.iterations, help="total training steps")
    train.add_argument("--batch", type=positive_int, default=defaults.batch,
                       help="images per step in all: under torchrun each of N processes takes 1/N of it")
    train.add_argument("--lr", type=positive_float, default=defaults.lr,
                       help="Adam learning rate (scaled by the lazy-regularisation ratios)")
    train.add_argument("--r1", type=non_negative_float, default=defaults.r1, help="R1 weight (gamma)")
    train.add_argument("--path-regularize", type=non_negative_float, default=defaults.path_regularize,
                       help="path-length regularisation weight (0: off)")
    train.add_argument("--path-batch-shrink", type=positive_int, default=defaults.path_batch_shrink,
                       help="the path-length pass uses batch / this many images")
    train.add_argument("--d-reg-every", type=positive_int, default=defaults.d_reg_every,
                       help="steps between R1 regularisation passes")
    train.add_argument("--g-reg-every", type=positive_int, default=defaults.g_reg_every,
                       help="steps between path-length regularisation passes")
    train.add_argument("--mixing", type=fraction, default=defaults.mixing, help="style-mixing probability")
    train.add_argument("--fusion-noise", type=fraction, default=defaults.fusion_noise,
                       help="share of noise in the fused latent during training")
    train.add_argument("--fusion-lr-mul", type=non_negative_float, default=0.01,
                       help="learning-rate multiplier of the (equalised) noise-fusion layer, as --lr-mlp is the "
                            "mapping network's: it keeps the feature term at its initial scale (see CDTG/fusion.py); "
                            "0: the plain Linear of earlier versions, only to resume their runs")
    train.add_argument("--lambda-cls", type=non_negative_float, default=defaults.lambda_cls,
                       help="weight of M_T's loss on fakes")
    train.add_argument("--lambda-clip", type=non_negative_float, default=defaults.lambda_clip,
                       help="weight of the CLIP loss")
    train.add_argument("--flip", action="store_true",
                       help="random horizontal flips of the real images (the official CDTG trains without; "
                            "rosinality's StyleGAN2 flips)")
    train.add_argument("--augment", action="store_true", help="adaptive discriminator augmentation (ADA)")
    train.add_argument("--augment-p", type=fraction, default=defaults.augment_p, help="fixed ADA p (0: adaptive)")
    train.add_argument("--ada-target", type=below_one, default=defaults.ada_target,
                       help="ADA raises p while the mean sign of D's outputs on reals (-1 to 1) is above this "
                            "(below 1: at 1 or above, p would never rise)")
    train.add_argument("--ada-length", type=positive_int, default=defaults.ada_length,
                       help="images over which ADA's p can move from 0 to 1")
    train.add_argument("--ada-every", type=positive_int, default=None,
                       help=f"images between updates of ADA's p (default: {ADA_STEPS} steps, {ADA_STEPS} x --batch "
                            "images, as the official code; StyleGAN2-ADA uses 256)")
    train.add_argument("--save-every", type=positive_int, default=defaults.save_every, help="steps between checkpoints")
    train.add_argument("--keep-full", type=non_negative_int, default=defaults.keep_full, metavar="N",
                       help="checkpoints kept whole, the newest N (--resume reads the newest); older ones are cut to "
                            "what generation reads, G_ema and the fusion layer's EMA (at 256 px about 0.65 of 3 GB); "
                            "0 keeps every one whole, as the official code")
    train.add_argument("--sample-every", type=positive_int, default=defaults.sample_every, help="steps between sample grids")
    train.add_argument("--log-every", type=positive_int, default=defaults.log_every, help="steps between metrics lines")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    runtime.add_argument("--seed", type=seed_value, default=0, help="seed of every random draw")
    runtime.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS,
                         help="DataLoader worker processes (4, at most the CPU count)")
    runtime.add_argument("--amp", choices=["off", "bf16"], default="off",
                         help="mixed precision of the D and G passes (regularisers, fusion, mapping and ADA "
                              "stay fp32); fp16 is not offered: the shared-weight convolutions can overflow it")
    runtime.add_argument("--modconv", choices=["shared", "fused"], default="shared",
                         help="modulated-conv path: shared = one weight for the batch, activations scaled "
                              "(faster), fused = the official per-sample grouped conv; the same function")
    runtime.add_argument("--compile", action="store_true",
                         help="torch.compile G and D for the passes without double backward (compiling took over "
                              "a minute and a half at 256 px on an H100; its speed-up there is not measured yet)")
    runtime.add_argument("--fusion-pool", type=non_negative_int, default=0, metavar="K",
                         help="average-pool M_T's layer3 map to K x K before the fusion layer (0: the faithful "
                              "full-size layer); far less memory at 256 px")
    runtime.add_argument("--skip-bad-images", action="store_true",
                         help="check every image once and skip (and count) unreadable ones instead of stopping")
    return parser


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
    """Fixed inputs of the sample grids: up to 8 rows of classes, 8 samples each."""
    classes = list(range(min(num_classes, 8)))
    labels = torch.tensor([c for c in classes for _ in range(8)])
    first_of_class = {}
    for index, (_, label) in enumerate(dataset.samples):
        first_of_class.setdefault(label, index)
    real = torch.stack([dataset[first_of_class[int(c)]][0] for c in labels])
    z = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(0))
    return z.to(device), labels.to(device), real.to(device)


def clear_run(out):
    """--overwrite: remove an earlier run's checkpoints, metrics and sample grids, so that
    neither the log nor a later --resume mixes the two runs."""
    for path in (out / "checkpoint").glob("*.pt"):
        if path.stem.isdigit():  # <step>.pt, zero-padded or not
            path.unlink()
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for grid in (out / "sample").glob("[0-9]*.png"):
        grid.unlink()


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    refuse_folder_in_use(args.out)
    check_own_run_folder(args.out, args)
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
    steps = checkpoint_steps(args.out / "checkpoint")
    if steps and not (args.resume or args.overwrite):
        raise UserError(f"{args.out / 'checkpoint'} holds checkpoints; pass --resume to continue or --overwrite")
    check_resume(args.out, args, done=steps[-1] if steps else None, length="iter")
    local = dist.local_batch(args.batch, "--batch")  # divisible by the torchrun processes, checked before joining
    if local > STDDEV_GROUP and local % STDDEV_GROUP:
        share = f"each process's share ({local})" if local != args.batch else "it"
        raise UserError(f"--batch {args.batch}: {share} must be at most {STDDEV_GROUP} or a multiple of "
                        f"{STDDEV_GROUP}, the discriminator's minibatch-std group")
    if local < min(args.batch, STDDEV_GROUP):  # each process groups its own images: smaller groups than one process's
        world = args.batch // local
        raise UserError(f"--batch {args.batch} over {world} processes leaves {local} image(s) each, fewer than the "
                        f"discriminator's minibatch-std group of {STDDEV_GROUP}, which changes training; use at most "
                        f"{max(1, args.batch // STDDEV_GROUP)} processes or --batch {STDDEV_GROUP * world}")
    tail = load_tail_classes(args.data, args.data_root)
    device = dist.process_device(args.device)
    seed_everything(args.seed)
    dataset = tail_image_dataset(tail, args.size, args.skip_bad_images)
    teacher = load_teacher(args.teacher, tail)
    num_classes = len(tail.classes)
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
    options = save_options(args.out, args, write=False)
    metadata = {
        "generator_config": generator.config,
        "discriminator_config": discriminator.config,
        "fusion_config": fusion.config,
        "class_ids": tail.ids,
        "class_names": tail.names,
        "prompts": tail.prompts,
        "train_counts": [sum(1 for _, label in dataset.samples if label == index) for index in range(num_classes)],
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
    # Written after the checkpoint's checks, so that a refused --resume leaves the run's own flags.
    save_options(args.out, args, write=main)
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


if __name__ == "__main__":
    main()
