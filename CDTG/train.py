"""Train CDTG: a class-conditional SWAGAN on the tail classes, with noise fused with the
tail model's features, the tail model's classification loss and a CLIP text loss.

    python CDTG/train.py --data runs/dior/cdtg/data --teacher runs/dior/kmdn/distill/M_T.pth --out runs/dior/cdtg

Official defaults: 256 px, latent 512, 8 mapping layers, channel multiplier 2, batch 8,
lr 0.002, 200,000 iterations, R1 10 every 16 steps, path length 2 every 4 steps, style
mixing 0.9, fusion 0.8 * noise + 0.2 * feature, CLIP ViT-B/32. Writes
OUT/checkpoint/<step>.pt every --save-every steps, OUT/sample/<step, 6 digits>.png grids,
OUT/metrics.jsonl and OUT/options.json. Quick CPU run: --size 32 --latent 64 --n-mlp 2
--channel-max 32 --batch 4 --iter 200 --clip none.

Several GPUs: `torchrun --nproc_per_node=N CDTG/train.py ...` with the same flags; --batch
stays the global batch (each GPU takes --batch / N, which must be 4 or a multiple of 4,
the size of the discriminator's minibatch-stddev groups, unless --batch itself is 4 or less
on one process).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from CDTG.config import ADA_STEPS, GanConfig  # noqa: E402
from CDTG.flags import add_clip_args  # noqa: E402
from tgn.cli import (add_full_decode_arg, add_runtime_args, below_one, fraction, gan_size, make_parser,  # noqa: E402
                     non_negative_float, non_negative_int, output_folder, positive_float, positive_int)
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    defaults = GanConfig()
    parser = make_parser(__doc__)
    paths = parser.add_argument_group("inputs and outputs")
    paths.add_argument("--data", type=Path, default=Path("runs/cdtg/data"), help="folder made by CDTG/dataset_split.py")
    paths.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved since the split")
    paths.add_argument("--teacher", type=Path, default=Path("runs/kmdn/distill/M_T.pth"),
                       help="the distilled tail model M_T (KMDN/Distill.py); official bare state dicts work too")
    add_clip_args(paths, help="CLIP model name (downloaded when online), a local file, or 'none'")
    paths.add_argument("--out", type=output_folder, default=Path("runs/cdtg"), help="run folder")
    paths.add_argument("--init", type=Path, default=None,
                       help="start from the weights of a CDTG checkpoint, ours or the official 200000.pt (as the "
                            "official train.py --ckpt): G, D, G_ema and, where it holds one of the same settings "
                            "(size, --fusion-pool, --fusion-lr-mul), the noise-fusion layer; the optimizers and the "
                            "step start afresh. A --resume that finds checkpoints ignores it")
    either = paths.add_mutually_exclusive_group()  # continue the run, or replace it
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
                       help="images per step in all: under torchrun each of N processes takes 1/N of it; each "
                            "process's share is --batch itself when 4 or less, else 4 or a multiple of 4 (the "
                            "discriminator's minibatch-stddev group)")
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
    add_full_decode_arg(train, " (generation decodes the real images as their run did)")
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

    runtime = add_runtime_args(parser, pin_memory=False)  # pinned whenever the run is on a GPU
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
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from CDTG.training import train_cdtg  # torch loads after the flags: --help answers at once
    return train_cdtg(args)


if __name__ == "__main__":
    main()
