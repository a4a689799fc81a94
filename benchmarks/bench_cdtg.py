"""Benchmark the CDTG training step and generation throughput; prints figures, asserts nothing.

    python benchmarks/bench_cdtg.py                 # paper configuration (256 px, batch 8, ViT-B/32-sized CLIP)
    python benchmarks/bench_cdtg.py --tiny          # a CPU-sized configuration

Models have random weights (nothing is downloaded): timing depends on shapes, not values.
Results are appended as JSON lines to --out.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import torch  # noqa: E402

from CDTG.clip_loss import ClipConsistencyLoss, import_clip  # noqa: E402
from CDTG.fusion import NoiseFusion  # noqa: E402
from CDTG.swagan import Discriminator, Generator  # noqa: E402
from CDTG.trainer import CdtgTrainer, GanConfig, accumulate  # noqa: E402
from tgn.engine import resolve_device  # noqa: E402
from tgn.resnet import FeatureResNet  # noqa: E402


def paper_clip():
    """ViT-B/32's architecture with random weights."""
    clip = import_clip()
    return clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)


def tiny_clip():
    clip = import_clip()
    return clip.model.CLIP(16, 32, 1, 64, 16, 77, 49408, 64, 1, 1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def build(args, device, with_clip):
    torch.manual_seed(0)
    g = Generator(args.size, args.latent, args.n_mlp, num_classes=args.classes, channel_max=args.channel_max)
    d = Discriminator(args.size, args.classes, label_dim=args.latent, channel_max=args.channel_max)
    g_ema = Generator(**g.config)
    accumulate(g_ema, g, 0)
    teacher = FeatureResNet(args.teacher_arch, num_classes=args.classes, width=args.teacher_width)
    channels, height, width = teacher.feature_shape(args.size)
    fusion = NoiseFusion(channels * height * width, args.latent)
    clip_loss = None
    if with_clip:
        clip_model = (tiny_clip() if args.tiny else paper_clip()).float().to(device)
        clip_loss = ClipConsistencyLoss(clip_model, [f"A photo of a class {i}" for i in range(args.classes)])
    cfg = GanConfig(batch=args.batch, workers=0, lambda_clip=1.0 if with_clip else 0.0)
    return CdtgTrainer(g, d, g_ema, fusion, teacher, clip_loss, cfg, device, Path("unused"), {"class_ids": []})


def bench_step(args, device, with_clip):
    trainer = build(args, device, with_clip)
    real = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.arange(args.batch, device=device) % args.classes

    def step():
        trainer.train_step(real, labels)
        trainer.step += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"bench": "cdtg_step", "clip": with_clip, "seconds_per_step": seconds, "peak_gib": peak}


@torch.no_grad()
def bench_generation(args, device, batch):
    trainer = build(args, device, with_clip=False)
    g_ema, fusion = trainer.g_ema, trainer.fusion
    projected = torch.randn(16, args.latent, device=device)

    def generate():
        z = torch.randn(batch, args.latent, device=device)
        fused = 0.05 * z + 0.95 * projected[torch.randint(16, (batch,), device=device)]
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        images, _ = g_ema([fused], labels)
        ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    seconds = timed(generate, device, 2, max(2, args.repeats // 2))
    return {"bench": "generation", "batch": batch, "images_per_second": batch / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="32 px, narrow models: for CPUs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cdtg.jsonl"))
    args = parser.parse_args()
    paper = dict(size=256, latent=512, n_mlp=8, channel_max=512, batch=8, classes=12, teacher_arch="resnet50",
                 teacher_width=64)
    tiny = dict(size=32, latent=64, n_mlp=2, channel_max=32, batch=4, classes=3, teacher_arch="resnet18",
                teacher_width=8)
    for key, value in (tiny if args.tiny else paper).items():
        setattr(args, key, value)
    device = resolve_device(args.device)
    warnings.simplefilter("ignore")
    results = [bench_step(args, device, with_clip=True), bench_step(args, device, with_clip=False),
               bench_generation(args, device, 1), bench_generation(args, device, 64 if not args.tiny else 16)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with open(args.out, "a") as handle:
        for result in results:
            record = {**result, "config": "tiny" if args.tiny else "paper", "device": name}
            handle.write(json.dumps(record) + "\n")
            print(json.dumps(record))


if __name__ == "__main__":
    main()
