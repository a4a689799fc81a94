"""Run the whole TGN pipeline on a small synthetic long-tailed dataset, offline, on a CPU.

    python data/demo.py --out demo-run        # what `make demo` runs

Every stage is the real script with small settings passed as flags: 32 px images, narrow
ResNet-18s for KMDN and standard ResNet-18 classifiers with random init, a narrow 32 px
SWAGAN, and a tiny randomly initialised CLIP
built in code and handed over with --clip PATH (nothing can be downloaded). It prints
each stage's time and ends with the baseline vs TGN table. `--device cuda` runs the same
on a GPU.
"""
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, no install needed

from tgn.cli import make_parser, non_negative_int, output_folder, positive_int  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import atomic_torch_save, make_folder, remove_path  # noqa: E402


def tiny_clip_file(path):
    """A random clip.model.CLIP (32 px, width 64) saved as a plain state dict."""
    import torch  # here: the demo's other steps run in their own processes

    from CDTG.clip_loss import import_clip

    clip = import_clip()
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                            vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                            transformer_heads=1, transformer_layers=2)
    atomic_torch_save(path, model.state_dict())
    return path


# What the demo writes into --out: all that --overwrite removes.
DEMO_ITEMS = ("data", "split", "kmdn", "cdtg", "generated", "baseline", "tgn", "comparison", "tiny_clip.pt")


def clear_output(out, overwrite):
    """A new or empty --out is used as it is; one the demo wrote before is emptied with
    --overwrite; one holding anything else is refused, --overwrite or not (it is not ours
    to delete)."""
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    foreign = sorted(entry.name for entry in entries if entry.name not in DEMO_ITEMS)
    if foreign:
        raise UserError(f"{out} holds files the demo did not write ({', '.join(foreign[:3])}); "
                        "choose a new or empty --out")
    if entries and not overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to run the demo again from scratch")
    for entry in entries:
        remove_path(entry)


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--out", type=output_folder, default=Path("demo-run"), help="folder for the data and every run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers of every stage")
    parser.add_argument("--epochs", type=positive_int, default=12,
                        help="epochs of the head, tail and classifier trainings (distillation runs 6: two roles of 3)")
    parser.add_argument("--gan-steps", type=positive_int, default=500, help="CDTG training steps")
    parser.add_argument("--per-class", type=positive_int, default=100, help="generated images per tail class")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo run in --out")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.out
    from tgn.distributed import checked_device  # (imports torch; sets nothing up on the GPU: the stages use it)

    checked_device(args.device)  # before anything is written: each stage would find a bad one only when it runs
    clear_output(out, args.overwrite)
    make_folder(out)
    data, split, kmdn, cdtg = out / "data", out / "split", out / "kmdn", out / "cdtg"
    runtime = ["--device", args.device, "--workers", str(args.workers)]
    small_resnet = ["--arch", "resnet18", "--pretrained", "none", "--image-size", "32"]
    # The learning rate drops after two thirds of the epochs (a run of one epoch keeps it).
    epochs = ["--epochs", str(args.epochs), "--milestones", *([str(args.epochs * 2 // 3)] if args.epochs > 1 else [])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip_path = tiny_clip_file(out / "tiny_clip.pt")
    stages = [
        ("make demo data", ["data/make_demo.py", "--out", data]),
        ("KMDN split", ["KMDN/dataset_split.py", "--data-root", data, "--out", split]),
        ("KMDN head model", ["KMDN/UModel.py", "--split", split, "--out", kmdn, "--width", "16", *small_resnet,
                             *epochs, *runtime]),
        ("KMDN tail model", ["KMDN/RModel.py", "--split", split, "--out", kmdn, "--width", "16", *small_resnet,
                             *epochs, *runtime]),
        ("KMDN distillation", ["KMDN/Distill.py", "--split", split, "--out", kmdn, "--image-size", "32",
                               "--epochs", "6", "--distill-interval", "3", "--milestones", "100", *runtime]),
        ("CDTG tail data", ["CDTG/dataset_split.py", "--split", split, "--out", cdtg / "data"]),
        ("CDTG training", ["CDTG/train.py", "--data", cdtg / "data", "--teacher", kmdn / "distill" / "M_T.pth",
                           "--clip", clip_path, "--out", cdtg, "--size", "32", "--latent", "64", "--n-mlp", "2",
                           "--channel-max", "32", "--iter", str(args.gan_steps), "--save-every",
                           str(args.gan_steps), "--sample-every", "100", *runtime]),
        ("CDTG generation", ["CDTG/generation.py", "--ckpt", cdtg / "checkpoint" / f"{args.gan_steps}.pt",
                             "--per-class", str(args.per_class), "--out", out / "generated", "--device",
                             args.device]),
        ("classifier: baseline", ["Classification/train.py", "--data-root", data, "--split", split, "--out",
                                  out / "baseline", "--name", "baseline", *small_resnet, *epochs, *runtime]),
        ("classifier: TGN", ["Classification/train.py", "--data-root", data, "--split", split, "--extra",
                             out / "generated", "--out", out / "tgn", "--name", "TGN",
                             "--baseline-report", out / "baseline" / "report-best" / "report.json",
                             *small_resnet, *epochs, *runtime]),
        ("comparison", ["Classification/compare.py", out / "baseline" / "report-best", out / "tgn" / "report-best",
                        "--out", out / "comparison"]),
    ]
    timings = []
    for name, command in stages:
        print(f"\n=== {name} ===", flush=True)
        started = time.time()
        # In the caller's folder, where a relative --out points; each script finds the code itself.
        result = subprocess.run([sys.executable, str(ROOT / command[0]), *map(str, command[1:])])
        if result.returncode != 0:
            raise UserError(f"demo stage '{name}' failed (exit {result.returncode}); see its output above")
        timings.append((name, time.time() - started))
    print("\n=== stage times ===")
    for name, seconds in timings:
        print(f"  {name:<24s} {seconds:7.1f} s")
    print(f"  {'total':<24s} {sum(s for _, s in timings):7.1f} s")
    print(f"\nreports: {out / 'baseline' / 'report-best'}, {out / 'tgn' / 'report-best'}")
    print(f"comparison: {out / 'comparison' / 'comparison.md'}")


if __name__ == "__main__":
    main()
