"""Benchmark the CDTG training step and generation throughput; prints figures, asserts nothing.

    python benchmarks/bench_cdtg.py                 # paper configuration on a GPU, tiny on a CPU
    python benchmarks/bench_cdtg.py --config paper  # 256 px, batch 8, ResNet-50 teacher, ViT-B/32-sized CLIP
    python benchmarks/bench_cdtg.py --tiny          # a CPU-sized configuration

Training step (all losses back-propagated, averaged over a whole regulariser cycle): the
official fused modulated conv against our default shared-weight one, with and without the
CLIP loss, with --fusion-pool (paper: 4, tiny: 1), and on GPUs in bf16 (--amp) and with
--compile (compiled in the warm-up steps); seconds per step and peak GPU memory, and on GPUs
the host's time to queue a step and the GPU's busy time in it (which of the two sets the
pace). Generation: CDTG/generation.py's own pipeline (seeded inputs, g_ema, JPEG encoding and
writing) at --batch 1 with the fused conv (the official way) and at the default batch, plus
the render alone and the rest alone (the CPU side's ceiling), and on GPUs with --amp bf16, a
4x larger batch and --compile (default and reduce-overhead, also without JPEG writing;
compiled before the timing). Records with JPEGs also hold flush_ms (the time one flush of
the file system takes), the megabytes written, and the seconds spent in each stage of the
pipeline, summed over its threads (StageClock.PARTS): what the run waited on. Models have
random weights (nothing is downloaded): timing depends on shapes, not values. Results are
appended as JSON lines to --out.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.measuring import machine_facts, release, synchronize  # noqa: E402
from CDTG.clip_loss import ClipConsistencyLoss, import_clip  # noqa: E402
from CDTG.fusion import NoiseFusion  # noqa: E402
from CDTG.swagan import Discriminator, Generator  # noqa: E402
from CDTG.generated_folder import HostImages, JpegWriter, run_generation  # noqa: E402
from CDTG.generation import build_parser as generation_parser  # noqa: E402
from CDTG.synthesis import TailSynthesizer  # noqa: E402
from CDTG.tail_data import IMAGE_LIST, TailClasses  # noqa: E402
from tgn.cli import jpeg_quality, make_parser, non_negative_int, positive_int  # noqa: E402
from tgn.errors import cli_main  # noqa: E402
from tgn.io import append_jsonl, appendable_file  # noqa: E402
from tgn.data import Entry, write_annotation  # noqa: E402
from CDTG.config import GanConfig  # noqa: E402
from CDTG.trainer import CdtgTrainer, accumulate  # noqa: E402
from tgn.distributed import resolve_device  # noqa: E402
import tgn.io  # noqa: E402
from tgn.resnet import FeatureResNet  # noqa: E402


def paper_clip():
    """ViT-B/32's architecture with random weights."""
    clip = import_clip()
    return clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)


def tiny_clip():
    clip = import_clip()
    return clip.model.CLIP(16, 32, 1, 64, 16, 77, 49408, 64, 1, 1)


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":  # the peak of the timed steps, not of cuDNN's autotuning in the first ones
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def activity_spans(profiled, device_type=DeviceType.CUDA):
    """(start, end) in seconds of every activity of one device type a torch.profiler run
    recorded, read from its raw results: turning 100,000 kernels into FunctionEvents takes
    seconds of device time a benchmark session cannot spare."""
    spans = []
    for event in profiled.profiler.kineto_results.events():
        if event.device_type() == device_type:
            if hasattr(event, "start_ns"):
                spans.append((event.start_ns() / 1e9, event.end_ns() / 1e9))
            else:  # torch before 2.2
                spans.append((event.start_us() / 1e6, (event.start_us() + event.duration_us()) / 1e6))
    return spans


def busy_seconds(spans):
    """Seconds covered by any of the (start, end) spans: work on overlapping streams counts once."""
    busy, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        busy += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return busy


def host_and_gpu_seconds(fn, device, repeats):
    """Seconds per call (means) that the host takes to queue `fn`'s work (each call starts on
    an idle GPU, so none waits for a full queue) and that the GPU is busy with it (profiled).
    A host time near the step time means the host's Python and launches set the pace (fewer
    ops, --compile or CUDA graphs help); a busy time near it, the GPU's kernels."""
    host = 0.0
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        host += time.perf_counter() - started
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        for _ in range(repeats):
            fn()
        synchronize(device)
    spans = activity_spans(profiled)
    busy = busy_seconds(spans)
    # None: no device events recorded. The activity count tells whether a step could fill CUDA's launch queue
    # (about a thousand kernels), which would make the host wait within a step even from an idle GPU.
    return host / repeats, (busy / repeats if busy > 0 else None), len(spans) / repeats


def build(args, device, with_clip, fusion_pool=None, amp="off", modconv="shared", compile=False):
    torch.manual_seed(0)
    g = Generator(args.size, args.latent, args.n_mlp, num_classes=args.classes, channel_max=args.channel_max)
    d = Discriminator(args.size, args.classes, label_dim=args.latent, channel_max=args.channel_max)
    g_ema = Generator(**g.config)
    accumulate(g_ema, g, 0)
    for module in (g, g_ema):
        module.set_fused_modconv(modconv == "fused")
    teacher = FeatureResNet(args.teacher_arch, num_classes=args.classes, width=args.teacher_width)
    channels, height, width = teacher.feature_shape(args.size)
    fusion = NoiseFusion(channels * height * width, args.latent, pool=fusion_pool, channels=channels, lr_mul=0.01)
    clip_loss = None
    if with_clip:
        clip_model = (tiny_clip() if args.tiny else paper_clip()).float().to(device)
        clip_loss = ClipConsistencyLoss(clip_model, [f"A photo of a class {i}" for i in range(args.classes)])
    cfg = GanConfig(batch=args.batch, workers=0, lambda_clip=1.0 if with_clip else 0.0, amp=amp, compile=compile)
    return CdtgTrainer(g, d, g_ema, fusion, teacher, clip_loss, cfg, device, Path("unused"), {"class_ids": []})


def bench_step(args, device, with_clip, fusion_pool=None, amp="off", modconv="shared", compile=False):
    release(device)
    trainer = build(args, device, with_clip, fusion_pool, amp, modconv, compile)
    real = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.arange(args.batch, device=device) % args.classes

    def step():
        trainer.train_step(real, labels)
        trainer.step += 1

    seconds = timed(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    host = gpu_busy = gpu_activities = None
    if device.type == "cuda" and args.host_and_gpu_time:  # on a CPU both are the step itself
        host, gpu_busy, gpu_activities = host_and_gpu_seconds(step, device, args.repeats)
    fusion_parameters = sum(p.numel() for p in trainer.fusion.parameters())
    return {"bench": "cdtg_step", "clip": with_clip, "fusion_pool": fusion_pool, "amp": amp, "modconv": modconv,
            "compile": compile, "size": args.size, "batch": args.batch, "warmup": args.warmup, "repeats": args.repeats,
            "fusion_parameters": fusion_parameters, "seconds_per_step": seconds, "peak_gib": peak,
            "host_seconds_per_step": host, "gpu_busy_seconds_per_step": gpu_busy,
            "gpu_activities_per_step": gpu_activities}


def write_tail_data(folder, size, images=16):
    """One tail class of random JPEGs in a dataset, and the tail data CDTG/dataset_split.py
    would write of it."""
    rng = np.random.default_rng(0)
    (folder / "train" / "0").mkdir(parents=True)
    entries = []
    for index in range(images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "train" / "0" / f"{index}.jpg")
        entries.append(Entry(f"0/{index}.jpg", 0))
    write_annotation(folder / "anno" / "BENCH_train.txt", entries)
    write_annotation(folder / IMAGE_LIST, entries)
    tail = TailClasses(folder, folder, [{"label": 0, "id": 0, "name": "tail", "prompt": "A photo of a tail",
                                         "train_count": images}])
    tail.write()
    return tail


def flush_milliseconds(folder, batch_bytes, repeats=5):
    """The median time of one flush of `folder`'s file system, where the case wrote its images
    (what publishing batches waits for; None without syncfs, or if the flush fails), each
    after writing a batch's worth of data there (`batch_bytes`, as the case's JPEGs)."""
    if tgn.io.SYNCFS is None:
        return None
    times = []
    for index in range(repeats):
        (folder / f"flush-{index}").write_bytes(os.urandom(batch_bytes))
        started = time.perf_counter()
        if tgn.io.flush_file_system(folder):
            return None
        times.append((time.perf_counter() - started) * 1000)
    return round(sorted(times)[repeats // 2], 2)


MISSING = object()


class StageClock:
    """Seconds each part of generation takes, summed over the threads that run it, while
    in `with clock.timing(synth):`; wraps the functions and puts them back after."""

    PARTS = {  # what each reading times, and in which thread
        "draw": "drawing the seeded inputs (prefetch thread)",
        "render_call": "queueing the render (main thread; on a GPU it does not wait for the kernels)",
        "writer_wait": "waiting for the writer to take a batch, and for its last one (main thread)",
        "gpu_wait": "waiting for a batch's pixels to reach the host (writer threads)",
        "encode_write": "encoding and writing JPEGs into temp files (writer threads, summed)",
        "flush": "flushing the file system before renames (publisher thread)",
        "rename": "renaming the written files into place (publisher thread; also the run's few JSON and list files)",
    }

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.calls = dict.fromkeys(self.PARTS, 0)
        self.lock = threading.Lock()

    def wrap(self, part, fn):
        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[part] += time.perf_counter() - started
                    self.calls[part] += 1
        return timed_call

    @contextlib.contextmanager
    def timing(self, synth):
        targets = [(synth, "batch_inputs", "draw"), (synth, "render", "render_call"),
                   (JpegWriter, "_finish_oldest", "writer_wait"), (HostImages, "numpy", "gpu_wait"),
                   (JpegWriter, "_write", "encode_write"), (tgn.io, "flush_file_system", "flush"),
                   (tgn.io, "_rename_into_place", "rename")]
        patched = []  # only what was replaced is put back, whatever stops the case
        try:
            for owner, name, part in targets:  # a module, a class or the instance
                original = vars(owner).get(name, MISSING)
                setattr(owner, name, self.wrap(part, getattr(owner, name)))
                patched.append((owner, name, original))
            yield self
        finally:
            for owner, name, original in reversed(patched):
                if original is MISSING:  # the instance reached its class's method
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)

    def record(self):
        return {"stage_seconds": {part: round(value, 4) for part, value in self.seconds.items()},
                "flushes": self.calls["flush"]}


def bench_generation(args, device, batch, modconv="shared", amp="off", write_jpeg=True, images=None, compile="off",
                     render=True):
    """CDTG/generation.py's own path: per-image seeded inputs drawn by a thread, g_ema, copy to
    pinned memory, JPEG encoding and writing in --jpeg-workers threads. Without write_jpeg,
    only the render (the GPU part) is timed; without render, everything else (each batch
    is one batch rendered beforehand): the ceiling the CPU side sets."""
    release(device)
    images = images or max(batch * args.generation_batches, 32)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tail = write_tail_data(folder / "data", args.size)
        trainer = build(args, device, with_clip=False)
        synth = TailSynthesizer(trainer.g_ema, trainer.fusion, trainer.teacher, tail, device, modconv=modconv,
                                amp=amp, compile=compile)
        if not render:
            ready = synth.render(0, synth.batch_inputs(0, list(range(batch)), seed=0), ratio=0.05,
                                 batch_size=batch)
            synth.render = lambda class_id, inputs, **options: ready[: inputs[0].shape[0]]
        common = dict(class_ids=[0], ratio=0.05, seed=0, truncation=1.0, batch_size=batch, quality=args.quality,
                      workers=args.jpeg_workers)
        flush_ms, stages = None, {}
        if write_jpeg:
            run_generation(synth, folder / "warmup", per_class=2 * batch, **common)  # cuDNN autotuning, warm pools
            synchronize(device)
            clock = StageClock()
            with clock.timing(synth):  # a microsecond or two a call, against about a millisecond an image
                started = time.perf_counter()
                run_generation(synth, folder / "timed", per_class=images, **common)
                seconds = time.perf_counter() - started
            jpeg_bytes = sum(path.stat().st_size for path in (folder / "timed").rglob("*.jpg"))
            stages = {**clock.record(), "jpeg_mb": round(jpeg_bytes / 2**20, 2)}
            flush_ms = flush_milliseconds(folder, jpeg_bytes * batch // images)
        else:
            inputs = synth.batch_inputs(0, list(range(batch)), seed=0)

            def render_one_batch():  # not `render`: that name is this function's flag, recorded below
                synth.render(0, inputs, ratio=0.05, batch_size=batch)

            seconds = timed(render_one_batch, device, 2, max(1, images // batch)) * max(1, images // batch)
            images = batch * max(1, images // batch)
    return {"bench": "generation", "batch": batch, "modconv": modconv, "amp": amp, "compile": compile,
            "jpeg": write_jpeg, "render": render, "jpeg_workers": args.jpeg_workers if write_jpeg else None,
            "quality": args.quality if write_jpeg else None,
            "images": images, "images_per_second": round(images / seconds, 1), "seconds": round(seconds, 4),
            "flush_ms": flush_ms, **stages}


@cli_main
def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", choices=["auto", "paper", "tiny"], default="auto",
                        help="auto: paper on a GPU, tiny on a CPU")
    parser.add_argument("--tiny", action="store_true", help="the same as --config tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=positive_int, default=16,
                        help="timed steps; 16 hold one R1 step and four path-length steps, as training does")
    parser.add_argument("--host-and-gpu-time", action=argparse.BooleanOptionalAction, default=True,
                        help="on GPUs, also time each step case's host side (queueing a step on an idle GPU) and "
                             "its GPU busy time (profiled): which of the two sets the pace")
    parser.add_argument("--generation-batches", type=positive_int, default=8,
                        help="batches timed per generation case")
    defaults = generation_parser().parse_args(["--ckpt", "unused"])
    parser.add_argument("--jpeg-workers", type=positive_int, default=defaults.workers,
                        help="JPEG writer threads (generation.py --workers, whose default is this one's)")
    parser.add_argument("--quality", type=jpeg_quality, default=defaults.quality,
                        help="JPEG quality (generation.py --quality, whose default is this one's)")
    parser.add_argument("--part", choices=["all", "step", "generation"], default="all",
                        help="what to time: the training step, generation, or both")
    parser.add_argument("--cases", nargs="+", metavar="NAME",
                        help="run only these cases, in this order (default: every case of --part; a wrong name "
                             "lists them)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cdtg.jsonl"),
                        help="JSON-lines file the figures are appended to")
    args = parser.parse_args(argv)
    if args.tiny and args.config == "paper":
        parser.error("--tiny and --config paper disagree: pass one")
    args.out = appendable_file(args.out)
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
    gpu = device.type == "cuda"
    batch, pool = (16, 1) if args.tiny else (defaults.batch, 4)  # generation.py's --batch on the paper configuration
    steps = {"step-fused": dict(with_clip=True, modconv="fused"), "step": dict(with_clip=True),
             "step-no-clip": dict(with_clip=False), "step-pool": dict(with_clip=True, fusion_pool=pool)}
    if gpu:
        steps.update({"step-bf16": dict(with_clip=True, amp="bf16"), "step-bf16-no-clip": dict(with_clip=False, amp="bf16"),
                      "step-compile": dict(with_clip=True, compile=True)})
    generation = {"gen-batch1-fused": dict(batch=1, modconv="fused", images=batch), "gen": dict(batch=batch),
                  "gen-fused": dict(batch=batch, modconv="fused"), "gen-render": dict(batch=batch, write_jpeg=False),
                  "gen-cpu-side": dict(batch=batch, render=False)}
    if gpu:
        generation.update({
            "gen-bf16": dict(batch=batch, amp="bf16"), "gen-bf16-render": dict(batch=batch, amp="bf16", write_jpeg=False),
            "gen-bf16-4x": dict(batch=4 * batch, amp="bf16"), "gen-compile": dict(batch=batch, compile="default"),
            "gen-compile-render": dict(batch=batch, compile="default", write_jpeg=False),
            "gen-reduce-overhead": dict(batch=batch, compile="reduce-overhead"),
            "gen-reduce-overhead-render": dict(batch=batch, compile="reduce-overhead", write_jpeg=False)})
    cases = {}
    if args.part in ("all", "step"):
        cases.update({name: lambda options=options: bench_step(args, device, **options) for name, options in steps.items()})
    if args.part in ("all", "generation"):
        cases.update({name: lambda options=options: bench_generation(args, device, **options)
                      for name, options in generation.items()})
    unknown = [name for name in args.cases or [] if name not in cases]
    if unknown:
        parser.error(f"--cases: no case {', '.join(unknown)} in --part {args.part} on this device; "
                     f"choose from {', '.join(cases)}")
    chosen = args.cases or list(cases)
    for case in chosen:
        record = {"case": case, **cases[case](), "config": "tiny" if args.tiny else "paper", **machine_facts(device)}
        print(json.dumps(record), flush=True)
        append_jsonl(args.out, record)


if __name__ == "__main__":
    main()
