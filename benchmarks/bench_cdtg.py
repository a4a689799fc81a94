"""Benchmark the CDTG training step and generation throughput; prints figures, asserts nothing.

    python benchmarks/bench_cdtg.py                 # paper configuration on a GPU, tiny on a CPU
    python benchmarks/bench_cdtg.py --config paper  # 256 px, batch 8, ResNet-50 teacher, ViT-B/32-sized CLIP
    python benchmarks/bench_cdtg.py --tiny          # a CPU-sized configuration

Training step (all losses back-propagated): with and without the CLIP loss, with
--fusion-pool (paper: 4, tiny: 1), and on GPUs in bf16 (--amp) too; seconds per step and
peak GPU memory. Generation: g_ema forward + transfer to the CPU at batch 1 and at the
default batch, and the same through the JPEG writer of CDTG/generation.py (encoding and
writing overlap the next batch). Models have random weights (nothing is downloaded):
timing depends on shapes, not values. Results are appended as JSON lines to --out.
"""
import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import torch  # noqa: E402

from CDTG.clip_loss import ClipConsistencyLoss, import_clip  # noqa: E402
from CDTG.fusion import NoiseFusion  # noqa: E402
from CDTG.swagan import Discriminator, Generator  # noqa: E402
from CDTG.synthesis import JpegWriter  # noqa: E402
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


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(args, device, with_clip, fusion_pool=None, amp="off"):
    torch.manual_seed(0)
    g = Generator(args.size, args.latent, args.n_mlp, num_classes=args.classes, channel_max=args.channel_max)
    d = Discriminator(args.size, args.classes, label_dim=args.latent, channel_max=args.channel_max)
    g_ema = Generator(**g.config)
    accumulate(g_ema, g, 0)
    teacher = FeatureResNet(args.teacher_arch, num_classes=args.classes, width=args.teacher_width)
    channels, height, width = teacher.feature_shape(args.size)
    fusion = NoiseFusion(channels * height * width, args.latent, pool=fusion_pool, channels=channels)
    clip_loss = None
    if with_clip:
        clip_model = (tiny_clip() if args.tiny else paper_clip()).float().to(device)
        clip_loss = ClipConsistencyLoss(clip_model, [f"A photo of a class {i}" for i in range(args.classes)])
    cfg = GanConfig(batch=args.batch, workers=0, lambda_clip=1.0 if with_clip else 0.0, amp=amp)
    return CdtgTrainer(g, d, g_ema, fusion, teacher, clip_loss, cfg, device, Path("unused"), {"class_ids": []})


def bench_step(args, device, with_clip, fusion_pool=None, amp="off"):
    release(device)
    trainer = build(args, device, with_clip, fusion_pool, amp)
    real = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.arange(args.batch, device=device) % args.classes

    def step():
        trainer.train_step(real, labels)
        trainer.step += 1

    seconds = timed(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    fusion_parameters = sum(p.numel() for p in trainer.fusion.parameters())
    return {"bench": "cdtg_step", "clip": with_clip, "fusion_pool": fusion_pool, "amp": amp,
            "fusion_parameters": fusion_parameters, "seconds_per_step": seconds, "peak_gib": peak}


@torch.no_grad()
def bench_generation(args, device, batch, write_jpeg=False):
    """g_ema forward + transfer to the CPU; with write_jpeg, also encoded and written by
    CDTG/generation.py's writer, which works while the next batch is generated."""
    release(device)
    trainer = build(args, device, with_clip=False)
    g_ema = trainer.g_ema
    projected = torch.randn(16, args.latent, device=device)
    calls = max(2, args.repeats // 2)

    def generate():
        z = torch.randn(batch, args.latent, device=device)
        fused = 0.05 * z + 0.95 * projected[torch.randint(16, (batch,), device=device)]
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        images, _ = g_ema([fused], labels)
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    if not write_jpeg:
        seconds = timed(generate, device, 2, calls)
    else:
        with tempfile.TemporaryDirectory() as folder, JpegWriter(args.jpeg_workers, 95) as writer:
            counter = iter(range(10**9))

            def generate_and_write():
                writer.submit(Path(folder), [next(counter) for _ in range(batch)], generate())

            generate_and_write()
            writer.drain()
            started = time.perf_counter()
            for _ in range(calls):
                generate_and_write()
            writer.drain()
            seconds = (time.perf_counter() - started) / calls
    return {"bench": "generation", "batch": batch, "jpeg": write_jpeg, "images_per_second": batch / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["auto", "paper", "tiny"], default="auto",
                        help="auto: paper on a GPU, tiny on a CPU")
    parser.add_argument("--tiny", action="store_true", help="the same as --config tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jpeg-workers", type=int, default=4, help="JPEG writer threads (generation.py --workers)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cdtg.jsonl"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.config == "auto" and not args.tiny:
        args.tiny = device.type != "cuda"
    args.tiny = args.tiny or args.config == "tiny"
    paper = dict(size=256, latent=512, n_mlp=8, channel_max=512, batch=8, classes=12, teacher_arch="resnet50",
                 teacher_width=64)
    tiny = dict(size=32, latent=64, n_mlp=2, channel_max=32, batch=4, classes=3, teacher_arch="resnet18",
                teacher_width=8)
    for key, value in (tiny if args.tiny else paper).items():
        setattr(args, key, value)
    warnings.simplefilter("ignore")
    default_batch, pool = (16, 1) if args.tiny else (64, 4)
    cases = [lambda: bench_step(args, device, with_clip=True), lambda: bench_step(args, device, with_clip=False),
             lambda: bench_step(args, device, with_clip=True, fusion_pool=pool)]
    if device.type == "cuda":
        cases.append(lambda: bench_step(args, device, with_clip=True, amp="bf16"))
    cases += [lambda: bench_generation(args, device, 1), lambda: bench_generation(args, device, default_batch),
              lambda: bench_generation(args, device, default_batch, write_jpeg=True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for case in cases:
        record = {**case(), "config": "tiny" if args.tiny else "paper", "device": name, "torch": torch.__version__}
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
