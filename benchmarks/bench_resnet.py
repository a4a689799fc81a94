"""Benchmark the ResNet trainers' training loop; prints figures, asserts nothing.

    python benchmarks/bench_resnet.py                  # paper configuration on a GPU, tiny on a CPU
    python benchmarks/bench_resnet.py --config paper   # ResNet-50, 224 px, the paper's batches

First the data path alone: KMDN's DataLoader on JPEGs written for the run, and from
--cache, with each batch moved to the device and scaled as training does, no model
(--no-data-path: skip). Then, for each trainer (KMDN's feature ResNet at batch 32,
Distill's student + frozen teacher at batch 64, the torchvision classifier at batch 32)
the engine's own train_one_epoch runs
  - on synthetic batches already in memory (the model's speed), and
  - through the DataLoader on JPEGs written for the run (decode, resize, flip in workers),
    and reading the resized images from --cache (an untimed first epoch writes them),
reporting images/s and, on GPUs, peak memory. On a GPU every case runs in fp32 and in
bf16 + channels_last (the --amp/--channels-last defaults), in the same process, and
KMDN's trainer also at --large-batch, where kernel launches no longer hide the GPU's
speed, and compiled (--compile-modes, default reduce-overhead: CUDA graphs replay each
step in one launch) at its own batch, in-memory. Models have random weights: timing
depends on shapes, not values. JSON lines are appended to --out.
"""
import argparse
import itertools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import tgn.engine  # noqa: E402

from benchmarks.measuring import machine_facts, release, synchronize  # noqa: E402
from Classification.model import build_classifier  # noqa: E402
from KMDN.distillation import make_distill_loss_fn  # noqa: E402
from tgn.cache import ResizeCache  # noqa: E402
from tgn.cli import COMPILE_MODES, make_parser, non_negative_int, positive_int  # noqa: E402
from tgn.compat import grad_scaler  # noqa: E402
from tgn.distributed import resolve_device  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import append_jsonl, appendable_file  # noqa: E402
from tgn.engine import (TrainConfig, cross_entropy_loss, make_loader, model_input, prepare_model,  # noqa: E402
                        train_one_epoch, uses_cuda_graphs)
from tgn.optim import make_optimizer  # noqa: E402
from tgn.progress import progress_bar  # noqa: E402
from tgn.images import ImageList, build_transform  # noqa: E402
from tgn.resnet import FeatureResNet  # noqa: E402

CONFIGS = {
    "paper": dict(arch="resnet50", width=64, size=224, jpeg_size=512, classes=20, batches={"kmdn": 32, "distill": 64,
                                                                                            "classifier": 32}),
    "tiny": dict(arch="resnet18", width=8, size=32, jpeg_size=64, classes=5, batches={"kmdn": 8, "distill": 8,
                                                                                      "classifier": 8}),
}


def quiet_progress_bar(iterable=None, **kwargs):
    """The engine's progress bars, switched off: this script prints figures only."""
    return progress_bar(iterable, **{**kwargs, "disable": True})


class SteadyClock:
    """Iterates a DataLoader whose epoch holds `lead` batches (its worker count) before the
    timed ones, and notes when the first timed one is asked for. Each epoch starts with the
    workers' queue empty and every worker decoding its first batch at once: timing the whole
    of a short epoch counts that start (low where training sets the pace), and timing from
    the first arrival counts the batches that arrived with it (high where decoding does).
    Once the first `lead` batches are taken, the queue is as in the middle of a long epoch.
    The clock starts once `device` has finished the untimed batches' work."""

    def __init__(self, loader, lead, device):
        self.loader, self.lead, self.device, self.started = loader, lead, device, None
        self.num_workers = loader.num_workers

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self._noting(iter(self.loader))  # the workers start here, as for the loader itself

    def _noting(self, batches):
        for index in itertools.count():
            if index == self.lead:
                synchronize(self.device)
                self.started = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            yield batch


def lead_batches(args):
    """Untimed batches at the start of a DataLoader source's epoch: one per worker."""
    return max(args.workers, 1)


def build(trainer, cfg):
    """(model to train, loss function) of one trainer."""
    torch.manual_seed(0)
    if trainer == "classifier":
        return build_classifier(cfg["arch"], cfg["classes"]), cross_entropy_loss
    model = FeatureResNet(cfg["arch"], num_classes=cfg["classes"], width=cfg["width"])
    if trainer == "kmdn":
        return model, cross_entropy_loss
    return model, None  # distill: the teacher is built once the device is known


def write_jpegs(folder, count, size):
    rng = np.random.default_rng(0)
    samples = []
    for index in range(count):
        path = Path(folder) / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append((str(path), index % 5))
    return samples


TRAINERS = ("kmdn", "distill", "classifier")
SOURCES = ("memory", "jpeg", "jpeg+cache")


def jpeg_loader(source, cfg, args, device, samples, cache_dir, batch):
    """The trainers' DataLoader over `lead_batches` + `args.steps` batches of the JPEGs
    (source 'jpeg'), or of their --cache entries ('jpeg+cache')."""
    cache = ResizeCache(cache_dir, cfg["size"]) if source == "jpeg+cache" else None
    images = (lead_batches(args) + args.steps) * batch  # the timed batches follow the first wave (SteadyClock)
    dataset = ImageList(samples[:images], build_transform(cfg["size"], train=True), cfg["size"], cache)
    return make_loader(dataset, batch, train=True, workers=args.workers, device=device, persistent=True)


def time_data_path(source, cfg, args, device, samples, cache_dir, channels_last):
    """Images/s the data path alone delivers: each batch of KMDN's DataLoader moved to the
    device and scaled as the engine does (channels_last as the bf16 cases), no model. Above the
    in-memory training rate, the data path does not hold training back."""
    release(device)
    batch = cfg["batches"]["kmdn"]
    loader = jpeg_loader(source, cfg, args, device, samples, cache_dir, batch)
    for epoch in range(2):  # the first, untimed, as in run()
        loader.sampler.set_epoch(epoch)
        clocked = SteadyClock(loader, lead_batches(args), device)
        for images, _ in clocked:
            model_input(images, device, channels_last)
        synchronize(device)
        seconds = time.perf_counter() - clocked.started
    return {"bench": "data_path", "source": source, "batch": batch, "channels_last": channels_last,
            "warmup": len(loader) + lead_batches(args), "images_per_second": round(args.steps * batch / seconds, 2)}


def run(trainer, source, precision, cfg, args, device, samples, cache_dir, batch=None, compile_mode="off"):
    amp, channels_last = precision
    release(device)
    counters.clear()
    model, loss_fn = build(trainer, cfg)
    train_cfg = TrainConfig(epochs=1, batch_size=batch or cfg["batches"][trainer], lr=1e-3, weight_decay=1e-4, milestones=[],
                            workers=args.workers, amp=amp, channels_last=channels_last, compile=compile_mode)
    model, net = prepare_model(model, train_cfg, device)
    if trainer == "distill":
        teacher, _ = build("kmdn", cfg)
        teacher, _ = prepare_model(teacher, train_cfg, device)
        teacher.eval().requires_grad_(False)
        loss_fn = make_distill_loss_fn(teacher, 0.2)
    optimizer = make_optimizer(model, train_cfg)
    scaler = grad_scaler(device) if amp == "fp16" else None
    batch = train_cfg.batch_size
    if source == "memory":
        # uint8 pixels, as the DataLoader delivers them: the same loop, scaling on the device included
        images = torch.randint(0, 256, (batch, 3, cfg["size"], cfg["size"]), dtype=torch.uint8)
        labels = torch.arange(batch) % cfg["classes"]
        if device.type == "cuda":  # pinned, as the DataLoader's are: a pageable copy would sync every step
            images, labels = images.pin_memory(), labels.pin_memory()
        warm_loader, loader = [(images, labels)] * args.warmup, [(images, labels)] * args.steps
    else:
        # A first, untimed epoch starts the persistent workers, fills the page cache and,
        # with --cache, writes the resized images; the second epoch is timed.
        warm_loader = jpeg_loader(source, cfg, args, device, samples, cache_dir, batch)
        loader = SteadyClock(warm_loader, lead_batches(args), device)
    common = dict(amp=amp, scaler=scaler, channels_last=channels_last, desc=f"{trainer} {source}",
                  cuda_graphs=uses_cuda_graphs(compile_mode))
    train_one_epoch(net, warm_loader, optimizer, loss_fn, device, **common)
    if source != "memory":
        warm_loader.sampler.set_epoch(1)
    synchronize(device)
    if device.type == "cuda":  # the timed epoch's peak, not cuDNN's autotuning in the first one
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    train_one_epoch(net, loader, optimizer, loss_fn, device, **common)
    synchronize(device)
    seconds = time.perf_counter() - (started if source == "memory" else loader.started)
    return {"bench": "resnet_train", "trainer": trainer, "source": source, "batch": batch, "amp": amp,
            # untimed batches first: a DataLoader source's are a whole epoch, then the first wave of the timed one
            "warmup": args.warmup if source == "memory" else 2 * lead_batches(args) + args.steps,
            "channels_last": channels_last, "compile": compile_mode,
            "images_per_second": round(args.steps * batch / seconds, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
            # reserved by the allocator, CUDA graphs' private pools included (peak_gib leaves them out)
            "reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if device.type == "cuda" else None,
            # graphs inductor ran without CUDA graphs (mutated inputs, say): those steps are not replayed
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if uses_cuda_graphs(compile_mode) else None}


@cli_main
def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", choices=["auto", "paper", "tiny"], default="auto",
                        help="auto: paper on a GPU, tiny on a CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="DataLoader workers (default 8 on GPUs, 2 on CPUs)")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help="untimed in-memory batches first (default 5 on GPUs, 2 on CPUs); DataLoader sources "
                             "warm up with a whole untimed epoch")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed batches (default 30 on GPUs, 4 on CPUs); a DataLoader source's epoch holds one "
                             "batch per worker more, before them")
    parser.add_argument("--trainers", nargs="*", choices=TRAINERS, default=list(TRAINERS),
                        help="trainers to time (KMDN's, Distill's, the classifier's); none: the data path only")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                        help="where batches come from: synthetic in memory, JPEGs through the DataLoader, the "
                             "same with --cache")
    parser.add_argument("--data-path", action=argparse.BooleanOptionalAction, default=True,
                        help="first time the data path alone (DataLoader to device, no model) for each DataLoader "
                             "source")
    parser.add_argument("--large-batch", type=non_negative_int, default=256,
                        help="also time KMDN's trainer on in-memory batches of this size (0: no); at the paper's "
                             "batch of 32 a GPU spends much of each step waiting for kernel launches")
    parser.add_argument("--compile-modes", nargs="*", default=["reduce-overhead"], choices=COMPILE_MODES[1:],
                        help="on a GPU, also time KMDN's trainer compiled in these torch.compile modes (in-memory "
                             "batches; the warm-up epoch pays the compilation)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="on a GPU, the settings each case runs in: fp32 (--amp off) and bf16 (--amp bf16 "
                             "--channels-last on); a CPU runs fp32 only")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/resnet.jsonl"),
                        help="JSON-lines file the figures are appended to")
    args = parser.parse_args(argv)
    args.out = appendable_file(args.out)
    loaders = any(source != "memory" for source in args.sources)
    if not args.trainers and not (args.data_path and loaders):
        raise UserError("nothing to time: name --trainers, or --sources with a DataLoader source and --data-path")
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    name = args.config if args.config != "auto" else ("paper" if gpu else "tiny")
    cfg = CONFIGS[name]
    args.workers = args.workers if args.workers is not None else (8 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.steps = args.steps if args.steps is not None else (30 if gpu else 4)
    settings = {"fp32": ("off", False), "bf16": ("bf16", True)}
    precisions = [settings[name] for name in args.precisions] if gpu else [settings["fp32"]]
    warnings.simplefilter("ignore")
    tgn.engine.progress_bar = quiet_progress_bar
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        # the data path reads KMDN's batches
        batches = [cfg["batches"][trainer] for trainer in args.trainers] + ([cfg["batches"]["kmdn"]] if args.data_path
                                                                              else [])
        largest = max(batches) * (lead_batches(args) + args.steps) if loaders else 0
        (Path(tmp) / "jpeg").mkdir()
        samples = write_jpegs(Path(tmp) / "jpeg", largest, cfg["jpeg_size"])
        cases = [(trainer, source, precision, None, "off") for trainer in args.trainers for source in args.sources
                 for precision in precisions]
        kmdn_in_memory = "kmdn" in args.trainers and "memory" in args.sources  # the extra cases' setting
        if args.large_batch and gpu and kmdn_in_memory:
            cases += [("kmdn", "memory", precision, args.large_batch, "off") for precision in precisions]
        if gpu and kmdn_in_memory:
            cases += [("kmdn", "memory", precision, None, mode) for mode in args.compile_modes for precision in precisions]
        cache_dir = Path(tmp) / "cache"
        channels_last = any(setting for _, setting in precisions)
        results = (time_data_path(source, cfg, args, device, samples, cache_dir, channels_last)
                   for source in args.sources if source != "memory" and args.data_path)
        results = itertools.chain(results, (run(trainer, source, precision, cfg, args, device, samples, cache_dir,
                                                batch, compile_mode)
                                            for trainer, source, precision, batch, compile_mode in cases))
        for result in results:  # each printed and written as soon as it is measured
            record = {"warmup": args.warmup, **result, "config": name, "workers": args.workers, "steps": args.steps,
                      **machine_facts(device)}
            print(json.dumps(record), flush=True)
            append_jsonl(args.out, record)


if __name__ == "__main__":
    main()
