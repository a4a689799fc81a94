"""The CUDA paths, on a GPU (CI has none: these skip there; run them where one is lent).

Checked: uint8 batches scaled on the GPU give the CPU's values; a ResNet trainer learns with the GPU defaults (bf16 autocast + channels_last), and
with CUDA graphs (--compile reduce-overhead) as without;
CDTG trains on the GPU in fp32 and bf16, and compiled (no graph break); generation with
CUDA graphs matches eager; the benchmarks see the GPU's busy time; pipelined generation (inputs drawn by a thread,
pinned copies, writers that wait on CUDA events) writes exactly what the synchronous path
computes; the GPU draws the same images as the CPU from the same seeds; a benchmark case reports
its own reserved memory.
"""
import json
import time
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

import tgn.engine as engine

from conftest import needs_compile
from test_cdtg_training import tiny_train_args
from test_kmdn import TINY
from CDTG.checkpoint import load_cdtg_checkpoint
from CDTG.generated_folder import image_name, run_generation
from CDTG.synthesis import TailSynthesizer
from CDTG.train import main as train_main
from KMDN.dataset_split import main as split_main
from KMDN.RModel import main as rmodel_main
from tgn.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def jpeg_bytes(pixels, quality):
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def on_cuda(argv):
    return [*argv[:argv.index("--device")], *argv[argv.index("--device") + 2:], "--device", "cuda"]


def test_uint8_batches_scaled_on_the_gpu_equal_the_cpus():
    pixels = (torch.arange(4 * 3 * 8 * 8) % 256).to(torch.uint8).view(4, 3, 8, 8).pin_memory()  # every value
    images = engine.model_input(pixels, torch.device("cuda"), channels_last=True)
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images.cpu(), engine.model_input(pixels, torch.device("cpu")))


def test_kid_on_the_gpu_equals_the_cpus():
    from CDTG.fidelity import kid

    rng = np.random.default_rng(0)
    x, y = np.abs(rng.normal(size=(300, 64))), np.abs(rng.normal(0.1, 1.0, size=(200, 64)))
    assert kid(x, y, block=64, device=torch.device("cuda")) == pytest.approx(kid(x, y, block=64), rel=1e-9)


def test_resnet_trainer_learns_with_the_gpu_defaults(toy_data, tmp_path, monkeypatch):
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    precisions = []  # what training and evaluation actually ran in
    real_autocast = engine.autocast
    monkeypatch.setattr(engine, "autocast", lambda device, amp: precisions.append(amp) or real_autocast(device, amp))
    out = tmp_path / "kmdn"
    rmodel_main(["--split", str(tmp_path / "split"), "--out", str(out), "--epochs", "8", "--lr", "0.01", *TINY,
                 "--device", "cuda"])
    losses = [json.loads(line)["train_loss"] for line in (out / "tail" / "metrics.jsonl").read_text().splitlines()]
    # The lowest of the last four epochs: on 15 images, two batches an epoch, one epoch's
    # loss can jump (seen on an H100: 0.04 then 1.02, test accuracy 100% all the same).
    assert min(losses[4:]) < 0.6 * losses[0]
    best = load_checkpoint(out / "tail" / "best.pth")
    assert best["metrics"]["overall_accuracy"] > 0.6  # chance is 1/3
    expected = "bf16" if engine.native_bf16(torch.device("cuda")) else "fp16"
    assert precisions and set(precisions) == {expected}


@needs_compile
@pytest.mark.parametrize("size", [16, 64])
def test_cuda_graph_training_matches_eager(toy_data, tmp_path, monkeypatch, size):
    """--compile reduce-overhead replays CUDA graphs (none skipped, so the graphs really ran);
    losses and logits are read before the next replay reuses their memory. At 64 px in
    channels_last (the GPU default); at 16 px, whose 1x1 maps torch.compile cannot train in
    channels_last, with it turned off. Full fp32 (--amp off, TF32 off) so that the two runs
    differ by summation order only: with TF32 the 16 px first epoch differed by 3% on an
    H100 (batch norm over 8 values of a 1x1 map magnifies rounding)."""
    from torch._dynamo.utils import counters
    import tgn.distributed

    monkeypatch.setattr(tgn.distributed, "tune_cuda", lambda: None)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    logs = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:  # (monkeypatch cannot put back the cuBLAS flag: it is no plain attribute)
        torch.backends.cuda.matmul.allow_tf32 = False
        for name, extra in (("eager", []), ("graphs", ["--compile", "reduce-overhead"])):
            out = tmp_path / name
            torch._dynamo.reset()  # no graphs cached by earlier tests (CPU ones count towards the limit)
            counters.clear()
            rmodel_main(["--split", str(tmp_path / "split"), "--out", str(out), "--epochs", "4", "--lr", "0.01", *TINY,
                         "--image-size", str(size), "--device", "cuda", "--amp", "off", *extra])
            logs[name] = [json.loads(line) for line in (out / "tail" / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert counters["inductor"]["cudagraph_skips"] == 0
    # The first epoch differs by float rounding only (kernel choice); later ones drift apart.
    assert logs["graphs"][0]["train_loss"] == pytest.approx(logs["eager"][0]["train_loss"], rel=5e-3)
    # Learns: the lowest later loss, since one epoch's loss can jump on such tiny data.
    assert min(epoch["train_loss"] for epoch in logs["graphs"][1:]) < 0.8 * logs["graphs"][0]["train_loss"]


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cdtg_trains_on_the_gpu(cdtg_inputs, amp):
    run = cdtg_inputs / f"cuda-{amp}"
    # With ADA at a fixed p: under autocast it must still resample in fp32.
    train_main(on_cuda(tiny_train_args(cdtg_inputs, run, "--iter", "4", "--amp", amp, "--augment",
                                       "--augment-p", "0.5")))
    state = load_cdtg_checkpoint(run / "checkpoint" / "4.pt")
    for part in ("g", "d", "g_ema", "fusion"):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all()
                   for v in state[part].values() if v.is_floating_point())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


@needs_compile
def test_compiled_cdtg_training_on_the_gpu(cdtg_inputs):
    """CDTG train.py --compile with inductor's CUDA kernels: no graph break, the fixed set of
    graphs the CPU test finds (tests/test_compile.py), and the first steps' losses of eager."""
    from torch._dynamo.utils import counters

    logs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()  # no graphs cached by earlier tests (CPU ones count towards the limit)
        counters.clear()
        train_main(on_cuda(tiny_train_args(cdtg_inputs, cdtg_inputs / f"cuda-{name}", "--iter", "8", *extra)))
        logs[name] = [json.loads(line) for line in (cdtg_inputs / f"cuda-{name}" / "metrics.jsonl").read_text()
                      .splitlines()]
    assert not counters["graph_break"] and 0 < counters["stats"]["unique_graphs"] <= 5
    for key in ("d", "g_adv", "cls", "clip"):  # step 1: the same weights, kernels that sum in another order
        assert logs["compiled"][0][key] == pytest.approx(logs["eager"][0][key], rel=1e-2), key


@pytest.fixture
def cdtg_checkpoint(cdtg_inputs):
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1", "--clip", "none"))
    return cdtg_inputs / "run" / "checkpoint" / "1.pt"


def test_pipelined_generation_writes_what_the_synchronous_path_computes(cdtg_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    synth = TailSynthesizer.from_checkpoint(cdtg_checkpoint, torch.device("cuda"))
    run_generation(synth, tmp_path, class_ids=[3], per_class=10, ratio=0.05, seed=0, truncation=1.0, batch_size=4,
                   quality=95, workers=3)
    for chunk in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        expected = synth.generate(3, chunk, ratio=0.05, seed=0, batch_size=4)  # the batch shape generation used
        for position, index in enumerate(chunk):
            assert (tmp_path / "3" / image_name(index)).read_bytes() == jpeg_bytes(expected[position], 95)


def test_gpu_and_cpu_draw_the_same_images(cdtg_checkpoint):
    indices = list(range(8))
    images = {device: TailSynthesizer.from_checkpoint(cdtg_checkpoint, torch.device(device)).generate(
        3, indices, ratio=0.05, seed=0).astype(np.int16) for device in ("cpu", "cuda")}
    other = TailSynthesizer.from_checkpoint(cdtg_checkpoint, torch.device("cpu")).generate(
        3, indices, ratio=0.05, seed=1).astype(np.int16)
    assert np.abs(images["cpu"] - other).max() > 20  # another seed gives other images
    assert np.abs(images["cpu"] - images["cuda"]).mean() < 1  # same seeds, same images (TF32 rounding aside)


@needs_compile
def test_cuda_graph_generation_matches_eager(cdtg_checkpoint):
    """--compile reduce-overhead: replayed graphs, padded last batch, each batch's output
    copied before the next replay reuses its memory."""
    chunks = ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9])
    images = {}
    for mode in ("off", "reduce-overhead"):
        synth = TailSynthesizer.from_checkpoint(cdtg_checkpoint, torch.device("cuda"), compile=mode)
        rendered = [synth.render(3, synth.batch_inputs(3, chunk, seed=0), ratio=0.05, batch_size=4)
                    for chunk in chunks]  # every batch rendered before any is read
        images[mode] = torch.cat(rendered).cpu().numpy().astype(np.int16)
    assert images["off"].shape == (10, 32, 32, 3)
    assert np.abs(images["off"] - images["reduce-overhead"]).mean() < 1


def test_the_benchmarks_gpu_busy_time_sees_the_kernels():
    """bench_cdtg's host and busy times: large matrix products keep the GPU busy longer than
    the host takes to queue them, and the profiler reports them as device events."""
    from test_benchmarks import load_script

    host_and_gpu_seconds = load_script("bench_cdtg").host_and_gpu_seconds
    matrix = torch.randn(2048, 2048, device="cuda")

    def work():
        for _ in range(20):
            matrix @ matrix

    host, busy, activities = host_and_gpu_seconds(work, torch.device("cuda"), repeats=3)
    torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    assert busy is not None and 0 < busy <= wall * 1.5 and activities >= 20
    assert host < wall  # queueing 20 launches takes less than running 20 large products


def test_a_benchmark_case_reports_its_own_reserved_memory():
    """A case that follows a larger one: its reserved memory is its own, not the cache the
    larger case left in the allocator."""
    from test_benchmarks import load_script

    bench = load_script("bench_resnet")
    args = bench.argparse.Namespace(steps=2, warmup=1, workers=0)
    device, cfg = torch.device("cuda"), {**bench.CONFIGS["tiny"], "size": 128}  # about 1 GiB at batch 512
    large = bench.run("kmdn", "memory", ("off", False), cfg, args, device, [], None, batch=512)
    small = bench.run("kmdn", "memory", ("off", False), cfg, args, device, [], None, batch=8)
    assert large["reserved_gib"] > 4 * small["reserved_gib"]
    assert small["reserved_gib"] < 2 * small["peak_gib"] + 0.1, small
