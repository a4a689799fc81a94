"""Evaluate generated tail images against the real ones: FID, KID, LPIPS diversity, class consistency.

    python CDTG/evaluate.py runs/dior/generated-r0.05 runs/dior/generated-r0.8 --out runs/dior/evaluation

Each FOLDER is a CDTG/generation.py output (OUT/anno.txt, OUT/generation.json); several
folders give one comparison table, rows labelled by their r. Per tail class and overall:
FID and KID against the real tail training images (Inception-v3 pool features, torchvision's
IMAGENET1K_V1 weights: NOT the TF-Inception of published FIDs; the report names the
extractor), mean pairwise LPIPS (AlexNet) of generated and of real images, CLIP zero-shot
accuracy over the tail prompts and the tail model M_T's accuracy. Writes
OUT/evaluation.{md,csv,json} and OUT/samples.png. Offline: data/fetch_weights.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from CDTG.flags import add_clip_args  # noqa: E402
from tgn.cli import (DEFAULT_WORKERS, make_parser, non_negative_int, output_folder, positive_int,  # noqa: E402
                     seed_value)
from tgn.errors import cli_main, signals_held  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="generated folders")
    parser.add_argument("--data", type=Path, default=None,
                        help="tail-class data, CDTG/dataset_split.py output (default: the one the first folder was "
                             "generated from, as its generation.json, else its checkpoint, records)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved")
    parser.add_argument("--out", type=output_folder, default=Path("runs/cdtg/evaluation"), help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--inception", default="torchvision",
                         help="FID features: 'torchvision' (downloaded when online), a weight file, or 'none'")
    metrics.add_argument("--lpips", default="alex", choices=["alex", "none"], help="LPIPS backbone")
    metrics.add_argument("--pairs", type=positive_int, default=1000, help="random LPIPS pairs per class and set")
    add_clip_args(metrics, help="CLIP model name, a local file, or 'none'")
    metrics.add_argument("--teacher", default=None,
                         help="tail model M_T, or 'none' (default: the one the first folder was generated with, as "
                              "its generation.json, else its checkpoint, records)")
    runtime = parser.add_argument_group("cost and runtime")
    runtime.add_argument("--max-per-class", type=positive_int, default=1000,
                         help="at most this many images per class and set (a seeded random subset)")
    runtime.add_argument("--size", type=positive_int, default=None,
                         help="images are resized to this square size (default: the generated images' size)")
    runtime.add_argument("--batch", type=positive_int, default=64, help="images per model call")
    runtime.add_argument("--seed", type=seed_value, default=0, help="seed of the subsets and LPIPS pairs")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    runtime.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS,
                         help="DataLoader worker processes decoding images; the default is 4, or this machine's usable "
                              "cores where fewer")
    runtime.add_argument("--skip-bad-images", action="store_true",
                         help="leave out unreadable real tail images (as training and generation with this flag did) "
                              "instead of stopping")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    with signals_held():  # a Ctrl-C during torch's import comes after it: a library there swallowed it
        from CDTG.evaluation import evaluate_generation  # torch loads after the flags: --help answers at once
    return evaluate_generation(args)


if __name__ == "__main__":
    main()
