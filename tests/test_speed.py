"""Speed options: sharded epoch order, per-image augmentation seeds, --cache, --amp defaults,
--fusion-pool, generation's precision and modulated-conv paths, and generation that writes
while it generates, and the stages without a model starting without torch."""
import contextlib
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, needs_compile, write_dataset
from test_cdtg_training import read_anno, tiny_train_args
from CDTG.checkpoint import load_cdtg_checkpoint
from CDTG.fusion import NoiseFusion
from CDTG import generated_folder
from CDTG.generation import main as generation_main
from CDTG.generated_folder import JpegWriter
from CDTG.synthesis import TailSynthesizer
from CDTG.train import main as train_main
from KMDN.flags import group_parser
from tgn import distributed as dist
from tgn.cache import SUFFIX, ResizeCache
from tgn.cli import training_config
from tgn.data import open_dataset, samples_for
from tgn.engine import make_loader, resolve_precision
from tgn.errors import UserError
from tgn.images import ImageList, build_transform
from tgn.sampling import EpochSampler


@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0, 1.0, 4.0, 4.0, 4.0]])
def test_process_shares_partition_the_global_order_of_an_epoch(monkeypatch, weights):
    whole = EpochSampler(7, shuffle=True, seed=1, epoch=2, weights=weights)
    order = whole.global_order()
    assert list(whole) == order
    whole.set_epoch(3)
    assert whole.global_order() != order
    shares, evaluation = [], []
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    for rank in range(3):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        share = EpochSampler(7, shuffle=True, seed=1, epoch=2, weights=weights)
        assert len(share) == 3
        shares.append(list(share))
        evaluation.append(list(EpochSampler(7, shuffle=False)))
    # Process r takes positions r, r + 3, ... of the global order, padded from its start;
    # in evaluation every image once, no padding.
    padded = order + order[:2]
    assert shares == [padded[r::3] for r in range(3)]
    assert evaluation == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_no_process_trains_a_batch_of_one_image_where_batchnorm_cannot(monkeypatch, world):
    monkeypatch.setattr(dist, "world_size", lambda: world)
    local = 8 // world  # each process's share of a global batch of 8
    for size in range(9, 41):
        shares = []
        for rank in range(world):
            monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
            shares.append(len(EpochSampler(size, shuffle=True, batch_size=8)))
        last_batches = [share - (share - 1) // local * local for share in shares]
        assert min(last_batches) >= 2, (size, last_batches)
        assert sum(shares) >= size - world  # at most N images left out of an epoch


@pytest.mark.parametrize("image_size, trained", [(32, 16), (33, 17)])
def test_a_last_batch_of_one_image_is_trained_where_the_maps_are_larger_than_one_pixel(tmp_path, image_size,
                                                                                         trained):
    """At 33 px and more the ResNets' last map is at least 2x2: BatchNorm trains on one image,
    and the epoch keeps it, as the official loaders (drop_last=False) do."""
    images = ImageList([(tmp_path / f"{i}.png", 0) for i in range(17)], image_size=image_size)
    assert len(make_loader(images, 8, train=True).sampler) == trained


def test_augmentation_depends_on_the_epoch_not_on_the_workers(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 6, 1: 6})
    info = open_dataset(data)
    # A flip of an asymmetric image is visible: make every image a horizontal ramp.
    for path, _ in samples_for(info.image_root("train"), info.entries("train"), {0: 0, 1: 1}):
        Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))).save(path)
    dataset = ImageList(samples_for(info.image_root("train"), info.entries("train"), {0: 0, 1: 1}),
                        build_transform(8, train=True), 8)

    def epoch(workers, number):
        loader = make_loader(dataset, 4, train=True, workers=workers, seed=5, persistent=True)
        loader.sampler.set_epoch(number)
        return torch.cat([images for images, _ in loader])

    first = epoch(0, 0)
    assert torch.equal(first, epoch(2, 0))
    flipped = first[:, 0, 0, 0] > first[:, 0, 0, -1]
    assert 0 < flipped.sum() < len(flipped)  # some images flipped, some not
    assert not torch.equal(first, epoch(0, 1))


def test_cache_serves_what_the_decoder_gives_and_follows_edits(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", {0: 2}, size=40)
    info = open_dataset(data)
    samples = samples_for(info.image_root("train"), info.entries("train"), {0: 0})
    plain = ImageList(samples, build_transform(16, train=False), 16)
    cache = ResizeCache(tmp_path / "cache", 16)
    cached = ImageList(samples, build_transform(16, train=False), 16, cache)
    for index in range(2):
        assert torch.equal(cached[index][0], plain[index][0])  # entry written
        assert torch.equal(cached[index][0], plain[index][0])  # entry read
    entries = sorted((tmp_path / "cache" / "16px").rglob("*" + SUFFIX))
    assert len(entries) == 2 and {entry.stat().st_size for entry in entries} == {3 * 16 * 16 + 4}  # pixels, CRC
    assert cached[0][0].dtype == torch.uint8 and cached[0][0].is_contiguous()
    path = samples[0][0]
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path)  # an edited image is decoded again
    assert torch.equal(cached[0][0], plain[0][0]) and len(list((tmp_path / "cache").rglob("*" + SUFFIX))) == 3
    # Replaced by a file of the same size with the old times set back (cp -p, rsync -t, tar).
    bmp = Path(path).with_suffix(".bmp")
    Image.new("RGB", (40, 40), (0, 0, 0)).save(bmp)
    black = cache.load(bmp)
    stat = os.stat(bmp)
    Image.new("RGB", (40, 40), (255, 255, 255)).save(str(bmp) + ".new", format="BMP")  # the same byte size
    os.replace(str(bmp) + ".new", bmp)
    os.utime(bmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert np.asarray(black).max() == 0 and np.asarray(cache.load(bmp)).min() == 255
    with pytest.raises(UserError, match="cannot read image .*gone.jpg"):  # a file gone mid-run: one line
        cache.load(tmp_path / "gone.jpg")
    # Rebuilt: an entry of the wrong length, or of the right one with other bytes (a power cut
    # can leave zeros in a renamed file), or with one pixel changed.
    whole = cache.entry(path).read_bytes()
    flipped = bytearray(whole)
    flipped[5] ^= 1
    for damaged in (b"half", whole + b"\0", bytes(len(whole)), bytes(flipped)):
        cache.entry(path).write_bytes(damaged)
        assert torch.equal(cached[0][0], plain[0][0])
        assert cache.entry(path).read_bytes() == whole
    # Not two hex digits: no entry's folder can already have this name (a hash chose 'ab' once).
    blocker = tmp_path / "cache" / "16px" / "not-hex"
    blocker.write_text("a file where an entry folder goes")
    monkeypatch.setattr(cache, "entry", lambda path: blocker / ("x" + SUFFIX))
    with pytest.warns(UserWarning, match="--cache: cannot write .*not-hex/x.chwc .*: the images it cannot keep are "
                                         "decoded again every epoch"):
        assert torch.equal(cached[1][0], plain[1][0])  # an entry that cannot be written costs speed only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not once per image
        assert torch.equal(cached[0][0], plain[0][0])
    with pytest.raises(UserError, match="--cache .*cannot write there"):
        ResizeCache(blocker, 16)  # a wrong --cache: one line at start-up


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="forks its workers (none on Windows; unsafe on macOS)")
def test_a_cache_that_cannot_be_written_is_said_once_in_a_run_of_workers(tmp_path, monkeypatch):
    """Evaluation workers start again every epoch: a flag of each worker's own said it once
    per worker and epoch (800 lines over 100 epochs of 8 workers). An entry's folder that
    cannot even be looked into (another user's, mode 700) costs speed, not the run."""
    import errno

    import tgn.cache

    data = write_dataset(tmp_path / "d", {0: 4}, size=24)
    info = open_dataset(data)
    samples = samples_for(info.image_root("train"), info.entries("train"), {0: 0})
    cache = ResizeCache(tmp_path / "cache", 16)
    images = ImageList(samples, build_transform(16, train=False), 16, cache)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def not_to_be_looked_into(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    def written_down(message, *args, **kwargs):  # what the workers warn, where this process can read it
        with open(tmp_path / "warned.txt", "a") as handle:
            handle.write(f"{message}\n")

    monkeypatch.setattr(tgn.cache.tempfile, "mkstemp", full_disk)
    monkeypatch.setattr(tgn.cache.warnings, "warn", written_down)
    for epoch in range(2):
        # forked, as on Linux: the workers have this process's patches (spawned ones import tgn.cache afresh)
        loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=2, multiprocessing_context="fork")
        assert len(list(loader)) == 4
    warned = [line for line in (tmp_path / "warned.txt").read_text().splitlines() if line.startswith("--cache")]
    assert len(warned) == 1 and "No space left on device" in warned[0]
    monkeypatch.setattr(Path, "exists", not_to_be_looked_into)
    assert images[0][0].shape == (3, 16, 16)


def test_precision_defaults():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", "auto", cpu) == ("off", False)
    assert resolve_precision("bf16", "on", cpu) == ("bf16", True)
    assert resolve_precision("off", "off", cpu) == ("off", False)


def test_amp_this_torch_cannot_train_with_is_refused_up_front(monkeypatch):
    args = group_parser("", "tail").parse_args(["--amp", "fp16"])
    cpu = torch.device("cpu")
    if not hasattr(torch.amp, "GradScaler"):  # torch before 2.3
        with pytest.raises(UserError, match="--amp fp16 on cpu: torch .* use --amp bf16 or --amp off"):
            training_config(args, cpu)
        return
    assert training_config(args, cpu).amp == "fp16"

    def autocast_as_torch_2_1(device_type, dtype):
        if device_type == "cpu" and dtype != torch.bfloat16:
            raise RuntimeError("Currently, AutocastCPU only support Bfloat16 as the autocast_cpu_dtype")
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast_as_torch_2_1)
    with pytest.raises(UserError, match="--amp fp16 on cpu: torch .* cannot autocast to it there; use --amp bf16"):
        training_config(args, cpu)
    assert training_config(group_parser("", "tail").parse_args(["--amp", "bf16"]), cpu).amp == "bf16"


@pytest.mark.parametrize("capability, amp", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_takes_fp16_on_gpus_that_only_emulate_bf16(monkeypatch, capability, amp):
    # torch's is_bf16_supported() also says yes where bf16 is emulated (V100 7.0, T4 7.5): slower than fp32.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", "auto", torch.device("cuda")) == (amp, True)


@needs_compile
@pytest.mark.parametrize("size, compile_mode, flag, channels_last", [
    (32, "reduce-overhead", "auto", False), (33, "reduce-overhead", "auto", True), (32, "off", "auto", True),
    (16, "default", "off", False), (224, "default", "on", True)])
def test_compiled_training_keeps_channels_last_off_the_gpu_for_one_pixel_maps(size, compile_mode, flag,
                                                                              channels_last):
    # On CUDA, torch.compile mis-predicts the layout of convolution gradients on 1x1 maps.
    args = group_parser("", "tail").parse_args(["--image-size", str(size), "--compile", compile_mode,
                                                "--channels-last", flag, "--amp", "off"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = training_config(args, torch.device("cuda"))
    assert cfg.channels_last is channels_last
    assert bool(caught) == (flag == "auto" and not channels_last)  # auto says why it is off
    assert training_config(args, torch.device("cpu")).channels_last is (flag == "on")  # the CPU has no such bug


@needs_compile
def test_channels_last_asked_for_with_compile_and_one_pixel_maps_is_refused():
    args = group_parser("", "tail").parse_args(["--image-size", "32", "--compile", "--channels-last", "--amp", "off"])
    with pytest.raises(UserError, match="--channels-last with --compile needs --image-size above 32"):
        training_config(args, torch.device("cuda"))


def test_fusion_pool_is_saved_and_rebuilt_by_generation(cdtg_inputs, tmp_path):
    full, pooled = NoiseFusion(32 * 8 * 8, 16), NoiseFusion(32 * 8 * 8, 16, pool=2, channels=32)
    assert pooled.project.weight.numel() * 16 == full.project.weight.numel()  # a 16th: 8 x 8 pooled to 2 x 2
    feature = torch.randn(2, 32, 8, 8)
    expected = pooled.project(torch.nn.functional.avg_pool2d(feature, 4).flatten(1))
    torch.testing.assert_close(pooled.embed(feature), expected)
    run = cdtg_inputs / "pooled"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none", "--fusion-pool", "1"))
    checkpoint = load_cdtg_checkpoint(run / "checkpoint" / "1.pt")
    assert checkpoint["fusion_config"] == {"feature_numel": 64, "latent_dim": 16, "pool": 1, "channels": 16,
                                          "lr_mul": 0.01}
    generation_main(["--ckpt", str(run / "checkpoint" / "1.pt"), "--out", str(tmp_path / "gen"), "--per-class", "1",
                     "--device", "cpu"])
    assert len(read_anno(tmp_path / "gen")) == 3


def test_cdtg_trains_with_bf16_autocast(cdtg_inputs):
    run = cdtg_inputs / "bf16"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "2", "--amp", "bf16"))
    state = load_cdtg_checkpoint(run / "checkpoint" / "2.pt")
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in state["g"].values())


def test_jpeg_writer_keeps_at_most_two_batches_waiting(tmp_path, monkeypatch):
    release = threading.Event()
    writer = JpegWriter(workers=2, quality=90, max_pending=2)
    original = writer._write

    def slow_write(path, pixels):
        release.wait()
        return original(path, pixels)

    monkeypatch.setattr(writer, "_write", slow_write)
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    writer.submit(tmp_path, [0, 1], images)  # returns at once: writing overlaps what comes next
    writer.submit(tmp_path, [2, 3], images)
    assert len(writer.pending) == 2
    returned = threading.Event()

    def third():
        writer.submit(tmp_path, [4, 5], images)
        returned.set()

    blocked = threading.Thread(target=third)
    blocked.start()
    try:
        assert not returned.wait(0.5)  # a third batch waits for the oldest
    finally:
        release.set()  # a failure must not leave the writer threads waiting forever
    assert returned.wait(10)
    blocked.join()
    with writer:
        pass  # leaving drains the queue
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gen_{i:06d}.jpg" for i in range(6)]


def test_pin_memory_flag():
    from tgn.engine import make_loader

    dataset = list(range(4))
    assert make_loader(dataset, 2, train=False, device=torch.device("cpu")).pin_memory is False
    assert make_loader(dataset, 2, train=False, device=torch.device("cpu"), pin_memory="on").pin_memory is True
    assert make_loader(dataset, 2, train=False, device=torch.device("cuda"), pin_memory="off").pin_memory is False


def test_generation_paths_give_the_same_images(cdtg_inputs, tmp_path, capsys):
    run = cdtg_inputs / "paths"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none", "--modconv", "fused"))
    ckpt = run / "checkpoint" / "1.pt"
    cpu = torch.device("cpu")

    def images(seed=0, **options):
        synth = TailSynthesizer.from_checkpoint(ckpt, cpu, **options)
        return synth.generate(3, list(range(6)), ratio=0.05, seed=seed).astype(np.int16)

    synth = TailSynthesizer.from_checkpoint(ckpt, cpu)
    torch.manual_seed(1)
    truncated = synth.generate(3, list(range(6)), ratio=0.05, seed=0, truncation=0.5)
    torch.manual_seed(2)  # the truncation centre must not depend on the global RNG or the batches
    in_parts = np.concatenate([synth.generate(3, part, ratio=0.05, seed=0, truncation=0.5)
                               for part in ([0, 1], [2, 3, 4, 5])])
    assert np.array_equal(truncated, in_parts)  # every part rendered in a batch of 64 rows, padded
    # The centre is the mean W of what generation feeds the mapping network (r * noise +
    # (1 - r) * a real image's projected feature), not of noise alone.
    label = synth.tail.label_of()[3]
    z, real, _ = synth.batch_inputs(3, list(range(1000)), seed=5)
    labels = torch.full((1000,), label)
    with torch.no_grad():
        used = synth.g_ema.get_latent(0.05 * z + 0.95 * synth.projected_features(label)[real], labels).mean(0)
        of_noise = synth.g_ema.get_latent(torch.randn(1000, z.shape[1]), labels).mean(0)
    centre = synth.mean_latent(label, 0.05)[0]
    assert (centre - used).norm() < 0.05 * (of_noise - used).norm()  # 0.0075 against 3.0 measured
    shared, fused, bf16 = images(), images(modconv="fused"), images(amp="bf16")
    assert np.abs(shared - fused).max() <= 1  # the same function, up to float rounding
    assert np.abs(shared - images(seed=1)).max() > 20  # a different seed: other images
    # bf16 convolutions: not bit-equal (the option is in effect), off by under one level on average
    assert 0 < np.abs(shared - bf16).mean() < 1
    out = tmp_path / "gen"
    base = ["--ckpt", str(ckpt), "--out", str(out), "--per-class", "1", "--device", "cpu"]
    generation_main(base)
    with pytest.raises(SystemExit):  # --amp changes the pixels: not mixed into one folder
        generation_main([*base, "--amp", "bf16"])
    assert "other settings (amp)" in capsys.readouterr().err


def test_generation_lists_each_class_folder_once(cdtg_inputs, tmp_path, monkeypatch):
    run = cdtg_inputs / "listing"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none"))
    calls = []
    original = generated_folder.existing_indices
    monkeypatch.setattr(generated_folder, "existing_indices", lambda folder: calls.append(folder) or original(folder))
    generation_main(["--ckpt", str(run / "checkpoint" / "1.pt"), "--out", str(tmp_path / "gen"), "--per-class", "30",
                     "--classes", "3", "--device", "cpu"])
    # One listing to find the missing images, one per tail class for anno.txt and one for the
    # class's summary line: not one per image.
    assert len(calls) == 1 + 3 + 1
    assert len(read_anno(tmp_path / "gen")) == 30


SCRIPTS = ["KMDN/dataset_split.py", "KMDN/UModel.py", "KMDN/RModel.py", "KMDN/Distill.py", "CDTG/dataset_split.py",
           "CDTG/train.py", "CDTG/generation.py", "CDTG/evaluate.py", "Classification/train.py",
           "Classification/test.py", "Classification/compare.py", "data/demo.py", "data/make_demo.py",
           "data/prepare_folders.py", "data/prepare_fgsc23.py", "data/prepare_dior.py", "data/prepare_dota.py",
           "data/fetch_weights.py"]


def modules_imported(*args, cwd=ROOT, status=0):
    """The modules a script run as `python SCRIPT ARGS` imported (from -X importtime)."""
    run = subprocess.run([sys.executable, "-X", "importtime", *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == status, run.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}


def imports_torch(modules):
    return sorted(name for name in modules if name.split(".")[0] in ("torch", "torchvision"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_stage_answers_help_without_importing_torch(script):
    # torch and torchvision take 3 to 5 s to import: the flags are read first.
    assert imports_torch(modules_imported(ROOT / script, "--help")) == []


@pytest.mark.parametrize("script", ["KMDN/UModel.py", "CDTG/train.py", "CDTG/generation.py", "Classification/test.py"])
def test_a_mistyped_flag_is_refused_before_torch_is_imported(script):
    assert imports_torch(modules_imported(ROOT / script, "--no-such-flag", status=2)) == []


def test_splitting_and_preparing_a_dataset_run_without_torch(toy_data, tmp_path):
    split = modules_imported(ROOT / "KMDN/dataset_split.py", "--data-root", toy_data, "--out", tmp_path / "split")
    assert "tgn.split" in split and imports_torch(split) == []
    assert (tmp_path / "split" / "split.json").is_file()
    source = tmp_path / "folders"
    for name in ("harbor", "ship"):
        (source / name).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(source / name / f"{k}.png")
    prepared = modules_imported(ROOT / "data/prepare_folders.py", "--train-dir", source, "--test-fraction", 0.25,
                                "--out", tmp_path / "prepared")
    assert "data.folders" in prepared and imports_torch(prepared) == []
    assert open_dataset(tmp_path / "prepared").class_names == {0: "harbor", 1: "ship"}


class WorkerRecorder(torch.utils.data.Dataset):
    """A dataset that notes which process read each item."""

    def __init__(self, dataset, log):
        self.dataset, self.log = dataset, log

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        return self.dataset[index]


@pytest.mark.parametrize("keep", [True, False])
def test_evaluation_workers_are_kept_where_starting_them_is_costly(tmp_path, monkeypatch, keep):
    """Spawned workers (macOS, Windows) import torch at each start, seconds an epoch: kept
    for the run there. Forked ones (Linux) start at once: started each epoch, they hold no
    memory through the training epochs."""
    from tgn import engine
    from tgn.engine import TrainConfig, fit
    from tgn.resnet import FeatureResNet

    assert engine.keep_evaluation_workers() is (torch.multiprocessing.get_start_method() != "fork")
    monkeypatch.setattr(engine, "keep_evaluation_workers", lambda: keep)
    data = write_dataset(tmp_path / "data", {0: 6, 1: 6}, {0: 4, 1: 4})
    info = open_dataset(data)
    subsets = {subset: ImageList(samples_for(info.image_root(subset), info.entries(subset), {0: 0, 1: 1}),
                                 build_transform(16, train=subset == "train"), 16) for subset in ("train", "test")}
    log = tmp_path / "readers.txt"
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, weight_decay=0.0, milestones=[], seed=0, workers=2)
    (tmp_path / "run").mkdir()
    fit(FeatureResNet("resnet18", 2, width=4), subsets["train"], WorkerRecorder(subsets["test"], log), cfg,
        torch.device("cpu"), tmp_path / "run", meta={"class_ids": [0, 1]})
    readers = log.read_text(encoding="utf-8").split()
    assert len(readers) == 3 * 8 and len(set(readers)) == (2 if keep else 6)


class _Listed(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return torch.zeros(3, 2, 2), torch.tensor(self.labels[index])


def test_the_training_loss_is_the_mean_over_images_not_over_batches():
    """train_loss is the mean over images (batches of 4, 4 and 2), not of the batch means."""
    from tgn.engine import make_loader, train_one_epoch

    labels = list(range(10))  # batches of 4, 4 and 2 images
    model = torch.nn.Linear(12, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss_fn(net, images, targets):  # a per-image loss equal to the label
        logits = net(images.flatten(1))
        return targets.double().mean() + 0 * logits.sum(), logits

    loader = make_loader(_Listed(labels), 4, train=True)
    loader.sampler.set_epoch(0)
    stats = train_one_epoch(model, loader, optimizer, loss_fn, torch.device("cpu"))
    assert stats["train_loss"] == pytest.approx(np.mean(labels))


def test_runs_of_different_seeds_never_share_an_epochs_order():
    """--seed 1's first epoch is not --seed 0's second: runs repeated over seeds for error bars
    draw orders of their own."""
    from tgn.sampling import EpochSampler, epoch_seed

    assert len({epoch_seed(seed, epoch) for seed in range(5) for epoch in range(100_000)}) == 5 * 100_000
    a = EpochSampler(50, shuffle=True, seed=0, epoch=1)
    b = EpochSampler(50, shuffle=True, seed=1, epoch=0)
    assert list(a) != list(b)


@pytest.mark.skipif(os.name == "nt", reason="st_ctime is the creation time on Windows (the next test)")
def test_cache_rebuilds_an_image_rewritten_in_place_with_its_old_size_and_times(tmp_path):
    """An image overwritten in place (same file, same byte size, its modification time set
    back, as `cp -p` onto an existing file or `rsync -t --inplace` do) is decoded again,
    not served from the stale --cache entry: only its change time tells."""
    from tgn.cache import ResizeCache

    path = tmp_path / "img.bmp"
    Image.new("RGB", (20, 20), (0, 0, 0)).save(path)
    cache = ResizeCache(tmp_path / "cache", 8)
    assert np.asarray(cache.load(path)).max() == 0
    stat = os.stat(path)
    data = path.read_bytes()
    header = len(data) - 20 * 20 * 3
    deadline = time.monotonic() + 3
    while True:  # the change-time clock is coarse (a jiffy, a second on some file systems)
        time.sleep(0.01)
        with open(path, "r+b") as handle:  # the same inode and size
            handle.seek(header)
            handle.write(b"\xff" * (len(data) - header))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if os.stat(path).st_ctime_ns != stat.st_ctime_ns or time.monotonic() > deadline:
            break
    assert os.stat(path).st_ino == stat.st_ino and os.stat(path).st_size == stat.st_size
    assert np.asarray(cache.load(path)).min() == 255


def test_cache_rebuilds_an_edited_image_where_the_change_time_is_the_creation_time(tmp_path, monkeypatch):
    """On Windows st_ctime is the creation time and an in-place edit keeps the file's index:
    an image edited in place to the same byte size is still decoded again, told by its
    modification time."""
    from tgn import cache as cache_module
    from tgn.cache import ResizeCache

    real_stat = os.stat

    class WindowsStat:
        def __init__(self, stat):
            self.st_size, self.st_mtime_ns, self.st_ino = stat.st_size, stat.st_mtime_ns, stat.st_ino
            self.st_ctime_ns = 1_000_000_000  # the creation time: an edit leaves it

    class WindowsOs:  # tgn.cache's view of os; the rest of the process keeps the real one
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def stat(path, *args, **kwargs):
            return WindowsStat(real_stat(path, *args, **kwargs))

    monkeypatch.setattr(cache_module, "os", WindowsOs())
    path = tmp_path / "img.bmp"
    Image.new("RGB", (20, 20), (0, 0, 0)).save(path)
    cache = ResizeCache(tmp_path / "cache", 8)
    assert np.asarray(cache.load(path)).max() == 0
    stat = real_stat(path)
    Image.new("RGB", (20, 20), (255, 255, 255)).save(path)  # rewritten in place: same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later modification time
    assert np.asarray(cache.load(path)).min() == 255
