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

from CDTG.clip_loss import ClipConsistencyLoss, load_clip  # noqa: E402
from CDTG.eval_report import build_evaluation, evaluation_markdown, plot_sample_sheet, write_evaluation  # noqa: E402
from CDTG.evaluation import (Evaluator, check_generated_folders, evaluate_folders, generation_settings,  # noqa: E402
                             recorded_inputs)
from CDTG.fidelity import load_inception, load_lpips  # noqa: E402
from CDTG.tail_data import load_tail_classes  # noqa: E402
from CDTG.tail_data import load_teacher  # noqa: E402
from tgn.cli import (DEFAULT_WORKERS, make_parser, non_negative_int, output_folder, positive_int,  # noqa: E402
                     seed_value)
from tgn.engine import resolve_device  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import check_run_dir, save_options  # noqa: E402


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="generated folders")
    parser.add_argument("--data", type=Path, default=None,
                        help="tail-class data, CDTG/dataset_split.py output (default: the one training used)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved")
    parser.add_argument("--out", type=output_folder, default=Path("runs/cdtg/evaluation"), help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--inception", default="torchvision",
                         help="FID features: 'torchvision' (downloaded when online), a weight file, or 'none'")
    metrics.add_argument("--lpips", default="alex", choices=["alex", "none"], help="LPIPS backbone")
    metrics.add_argument("--pairs", type=positive_int, default=1000, help="random LPIPS pairs per class and set")
    metrics.add_argument("--clip", default="ViT-B/32", help="CLIP model name, a local file, or 'none'")
    metrics.add_argument("--clip-root", default=None, help="download folder of CLIP weights")
    metrics.add_argument("--teacher", default=None,
                         help="tail model M_T, or 'none' (default: the one the generation checkpoint records)")
    runtime = parser.add_argument_group("cost and runtime")
    runtime.add_argument("--max-per-class", type=positive_int, default=1000,
                         help="at most this many images per class and set (a seeded random subset)")
    runtime.add_argument("--size", type=positive_int, default=None,
                         help="images are resized to this square size (default: the generated images' size)")
    runtime.add_argument("--batch", type=positive_int, default=64, help="images per model call")
    runtime.add_argument("--seed", type=seed_value, default=0, help="seed of the subsets and LPIPS pairs")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    runtime.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS,
                         help="DataLoader worker processes decoding images (4, at most the CPU count)")
    runtime.add_argument("--skip-bad-images", action="store_true",
                         help="leave out unreadable real tail images (as training and generation with this flag did) "
                              "instead of stopping")
    return parser


def resolve_inputs(args):
    """--data and --teacher, defaulting to what the first folder's generation checkpoint records."""
    recorded = recorded_inputs(args.folders[0]) if args.data is None or args.teacher is None else {}
    data = args.data or recorded.get("data")
    if data is None:
        raise UserError(f"{args.folders[0]}: its generation checkpoint records no tail data; pass --data "
                        "(CDTG/dataset_split.py output)")
    notes = []
    teacher = args.teacher if args.teacher is not None else recorded.get("teacher")
    if teacher is None:
        notes.append("M_T accuracy skipped: no --teacher, and the generation checkpoint records none.")
    elif teacher != "none" and args.teacher is None and not Path(teacher).is_file():
        notes.append(f"M_T accuracy skipped: the recorded teacher {teacher} is not there; pass --teacher.")
        teacher = None
    check_same_tail_data(args.folders, data)
    return data, None if teacher == "none" else teacher, notes


def check_same_tail_data(folders, data):
    """Every folder is compared with the real images of the tail data it was generated
    from: refuse one whose generation.json names another tail data folder that still
    exists. A folder that has moved away, or a folder of an earlier version that names
    none, is let through (its checkpoint is not loaded for this: at 256 px it holds GBs)."""
    for folder in folders:
        recorded = generation_settings(folder).get("data")
        if recorded and Path(recorded).is_dir() and Path(recorded).resolve() != Path(data).resolve():
            raise UserError(f"{folder} was generated from the tail data {recorded}, this evaluation uses {data}; "
                            "evaluate folders of one tail data together (--data chooses it)")


def metric_notes(args, evaluator):
    notes = [
        "FID uses torchvision's Inception-v3, not the TF-Inception of the original FID code: the numbers compare "
        "only with FIDs from the same extractor (named above), never with published ones.",
        "FID from fewer than 2048 images per set is biased upward and depends on the image count: compare rows "
        f"at equal counts (--max-per-class {args.max_per_class}).",
        "KID (x1000 in this table; raw in the JSON and CSV) is the unbiased squared MMD of the same features "
        "with a cubic polynomial kernel: it does not depend on the count, so it compares small tail classes and "
        "sets of different sizes; values near 0, even slightly negative, mean no detectable difference. Copies "
        "of the real images are not independent draws: they score clearly below 0, the more so the fewer images.",
        "The overall FID and KID pool, of every class both sets hold, as many real as generated images (the smaller "
        "count, a seeded subset), so both pools have the same class proportions.",
        "Generated images are read from their JPEG files (generation.py --quality), real ones from the "
        "dataset's own files: FID and LPIPS include that compression difference.",
        f"LPIPS: mean over at most {args.pairs} random pairs of distinct images within a class; overall: the "
        "mean over classes. LPIPS real is the reference diversity.",
        "CLIP: zero-shot over the prompts of all tail classes; M_T: argmax over the tail classes. "
        "Accuracies on the real (training) images are the reference.",
    ]
    return notes if evaluator.inception is not None else notes[4:]


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    folders = [Path(folder) for folder in args.folders]
    check_run_dir(args.out, overwrite=args.overwrite, results=("evaluation.json",), resumable=False, args=args)
    check_generated_folders(folders)
    data, teacher_path, notes = resolve_inputs(args)
    tail = load_tail_classes(data, args.data_root)
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
    results, sheets, size = evaluate_folders(folders, tail, evaluator, max_per_class=args.max_per_class,
                                             size=args.size, seed=args.seed, workers=args.workers,
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


if __name__ == "__main__":
    main()
