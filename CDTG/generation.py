"""Generate tail-class images with a trained CDTG generator.

    python CDTG/generation.py --ckpt runs/dior/cdtg/checkpoint/200000.pt --per-class 7000 --r 0.05 --out runs/dior/generated

Each tail class gets --per-class images, written as OUT/<class_id>/gen_<index>.jpg under
the dataset's own class ids, plus OUT/anno.txt in the dataset's annotation format, so
`Classification/train.py --extra OUT` uses the folder as it is. The latent is
r * noise + (1 - r) * fusion(M_T feature of a real image of the class).

Rerunning with the same flags completes a stopped run; a larger --per-class adds images
after the existing ones; nothing is overwritten without --overwrite. The official
`200000.pt` works too: pass --data (CDTG/dataset_split.py output) and --teacher, since it
records neither (and holds no fusion weights: a fixed-seed projection is used, with a
warning).

Several GPUs: `torchrun --nproc_per_node=N CDTG/generation.py ...` splits each class's
images over the processes; the images are the same as one process writes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from tgn.cli import (COMPILE_MODES, fraction, jpeg_quality, make_parser, output_folder, positive_int,  # noqa: E402
                     seed_value)
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="CDTG checkpoint (ours or the official 200000.pt)")
    parser.add_argument("--out", type=output_folder, default=Path("runs/generated"), help="output folder")
    parser.add_argument("--per-class", type=positive_int, default=7000, help="images per tail class (the released classifier's)")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="dataset class ids (default: every tail class)")
    parser.add_argument("--r", "--noise-ratio", dest="r", type=fraction, default=0.05,
                        help="proportion of noise in the fused latent (under torchrun write --noise-ratio: torchrun "
                             "reads --r as an abbreviation of its own flags)")
    parser.add_argument("--truncation", type=fraction, default=1.0,
                        help="truncation psi, 0 to 1 (1 = none; 0 = the class's mean W alone)")
    parser.add_argument("--batch", type=positive_int, default=64, help="images per generator call")
    parser.add_argument("--quality", type=jpeg_quality, default=75,
                        help="JPEG quality (75: PIL's default, what the official code's save_image wrote)")
    parser.add_argument("--data", type=Path, default=None, help="tail-class data (default: the one training used)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved")
    parser.add_argument("--teacher", type=Path, default=None, help="tail model M_T (default: the one training used)")
    parser.add_argument("--seed", type=seed_value, default=0, help="with the class and index, fixes every image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=positive_int, default=4, help="threads encoding and writing JPEGs")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off",
                        help="precision of the synthesis convolutions (off: fp32, as the official code; "
                             "fp16 is not offered: the shared-weight convolutions can overflow it)")
    parser.add_argument("--modconv", choices=["shared", "fused"], default="shared",
                        help="modulated-conv path: shared = one weight for the batch (faster), fused = the "
                             "official per-sample grouped conv; both compute the same function")
    parser.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
                        help="torch.compile the synthesis network (--compile alone: mode 'default'; "
                             "'reduce-overhead' also replays CUDA graphs); the first batch pays the compilation. "
                             "Rendering alone at 256 px and --batch 64 ran 1.4x eager on an H100; the whole "
                             "pipeline with JPEGs, compiled as now, is not measured yet (see the README)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out unreadable real tail images (as train.py --skip-bad-images did), instead of "
                             "stopping; the images then fuse the features of the readable ones")
    parser.add_argument("--overwrite", action="store_true", help="delete images already in --out and start again")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from CDTG.generated_folder import generate  # torch loads after the flags: --help answers at once
    generate(args)


if __name__ == "__main__":
    main()
