"""What the benchmarks time and count, checked with a fake clock and spies: a rate's
images and seconds, the warm-up left out, the settings each case runs in."""
import argparse
import warnings

import pytest
import torch

import tgn.engine
import tgn.io
from test_benchmarks import load_script, records


@pytest.fixture(autouse=True)
def restored_globals(monkeypatch):
    """The scripts quiet the engine's progress bars and set cuDNN's autotuning for their
    whole process."""
    monkeypatch.setattr(tgn.engine, "progress_bar", tgn.engine.progress_bar)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    with warnings.catch_warnings():
        yield


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_resnet_images_per_second_counts_the_timed_steps_of_each_trainer(monkeypatch, tmp_path):
    bench = load_script("bench_resnet")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setitem(bench.CONFIGS, "tiny", {**bench.CONFIGS["tiny"],
                                                "batches": {"kmdn": 4, "distill": 6, "classifier": 5}})
    epochs, transforms = [], []
    real_transform = bench.build_transform
    monkeypatch.setattr(bench, "build_transform", lambda *a, **k: transforms.append(k) or real_transform(*a, **k))

    def fake_epoch(net, loader, optimizer, loss_fn, device, **options):
        warm = len(epochs) % 2 == 0
        batches = iter(loader)
        clock.now += 7.0  # the workers' queue filling, before the first batch arrives
        sampler = getattr(getattr(loader, "loader", loader), "sampler", None)  # through SteadyClock
        epochs.append(([], getattr(sampler, "epoch", None)))
        for batch in batches:
            epochs[-1][0].append(batch)
            clock.now += 50.0 if warm else 2.0  # a step: slow while warming up
        return {}

    monkeypatch.setattr(bench, "train_one_epoch", fake_epoch)
    out = tmp_path / "r.jsonl"
    bench.main(["--config", "tiny", "--device", "cpu", "--warmup", "2", "--steps", "3",
                "--trainers", "kmdn", "distill", "--sources", "memory", "jpeg", "--no-data-path", "--out", str(out)])
    written = records(out)
    assert [(r["trainer"], r["source"], r["batch"]) for r in written] == [
        ("kmdn", "memory", 4), ("kmdn", "jpeg", 4), ("distill", "memory", 6), ("distill", "jpeg", 6)]
    for index, record in enumerate(written):
        (warm, _), (timed, sampler_epoch) = epochs[2 * index], epochs[2 * index + 1]
        memory = record["source"] == "memory"
        # A DataLoader's epoch: a batch per worker (2), then the 3 timed ones.
        assert (len(warm), len(timed)) == ((2, 3) if memory else (5, 5))
        assert all(len(labels) == record["batch"] for _, labels in warm + timed)
        if memory:  # the whole timed epoch
            assert record["images_per_second"] == round(3 * record["batch"] / (7 + 3 * 2.0), 2)
        else:  # from when the third batch is asked for: 7 + 2 * 2 s into the epoch, of 7 + 5 * 2
            assert record["images_per_second"] == round(3 * record["batch"] / (3 * 2.0), 2)
            assert sampler_epoch == 1  # not the warm-up's order again
        assert record["amp"] == "off" and record["channels_last"] is False and record["workers"] == 2  # CPU defaults
        assert record["warmup"] == (2 if memory else 5 + 2)
        assert record["cpus"] > 0 and record["tf32"] is None and len(record["date"]) == 10
    assert transforms and all(options.get("train") is True for options in transforms)  # flips, as training reads
    # The synthetic batches are what the DataLoader delivers: uint8 pixels of the same shape, int64 labels.
    memory_images, memory_labels = epochs[0][0][0]
    jpeg_images, jpeg_labels = epochs[3][0][0]
    assert memory_images.dtype == jpeg_images.dtype == torch.uint8
    assert memory_images.shape == jpeg_images.shape and memory_labels.dtype == jpeg_labels.dtype
    assert len(set(memory_labels.tolist())) > 1


def test_resnet_jpegs_are_written_for_the_chosen_trainers_batches(monkeypatch, tmp_path):
    bench = load_script("bench_resnet")
    monkeypatch.setitem(bench.CONFIGS, "tiny", {**bench.CONFIGS["tiny"],
                                                "batches": {"kmdn": 2, "distill": 6, "classifier": 3}})
    written = []
    monkeypatch.setattr(bench, "write_jpegs", lambda folder, count, size: written.append(count) or [])
    monkeypatch.setattr(bench, "run", lambda *a, **k: {})
    monkeypatch.setattr(bench, "time_data_path", lambda *a, **k: {})
    # (a batch per worker, 2, and the 4 timed ones) of the largest batch
    for trainers, data_path, batch in ((["classifier"], "--no-data-path", 3), (["classifier"], "--data-path", 3),
                                       (["kmdn"], "--no-data-path", 2), (["distill", "kmdn"], "--data-path", 6)):
        bench.main(["--config", "tiny", "--device", "cpu", "--steps", "4", "--trainers", *trainers, data_path,
                    "--sources", "jpeg", "--out", str(tmp_path / "r.jsonl")])
        assert written.pop() == batch * (2 + 4), trainers


def test_resnet_run_keeps_a_large_batch(monkeypatch, tmp_path):
    bench = load_script("bench_resnet")
    seen = []
    monkeypatch.setattr(bench, "train_one_epoch", lambda net, loader, *a, **k: seen.extend(len(l) for _, l in loader))
    args = argparse.Namespace(steps=1, warmup=1, workers=0)
    result = bench.run("kmdn", "memory", ("off", False), bench.CONFIGS["tiny"], args, torch.device("cpu"), [],
                       tmp_path, batch=12)
    assert result["batch"] == 12 and seen == [12, 12]


def test_resnet_data_path_times_the_second_epoch_after_its_first_wave(monkeypatch, tmp_path):
    bench = load_script("bench_resnet")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    calls = []

    def fake_input(images, device, channels_last):
        calls.append((len(images), channels_last))
        clock.now += 10.0 if len(calls) <= 4 else 0.5

    monkeypatch.setattr(bench, "model_input", fake_input)
    cfg = bench.CONFIGS["tiny"]
    samples = bench.write_jpegs(tmp_path, 4 * cfg["batches"]["kmdn"], cfg["jpeg_size"])
    args = argparse.Namespace(steps=3, warmup=1, workers=0)  # no worker: one batch ahead of the timed ones
    result = bench.time_data_path("jpeg", cfg, args, torch.device("cpu"), samples, tmp_path / "cache", True)
    # Two epochs of 4 batches; the second is timed from its second batch on: 3 of 0.5 s.
    assert calls == [(8, True)] * 8 and result["images_per_second"] == round(3 * 8 / 1.5, 2)
    assert result["warmup"] == 4 + 1 and result["channels_last"] is True


@pytest.mark.parametrize("workers, wave_seconds, step_seconds, steady", [
    (4, 1.0, 0.01, 4.0),  # decoding sets the pace: 4 workers finish 4 batches a second
    (4, 1.0, 1.0, 1.0),  # training does: a batch a second
    (8, 1.0, 0.01, 8.0),
])
def test_the_steady_clock_gives_the_steady_rate_whichever_sets_the_pace(workers, wave_seconds, step_seconds, steady):
    """Each epoch's workers decode their first batches at once, so batches come in waves of
    one per worker; the timed batches come after the first wave."""
    bench = load_script("bench_resnet")
    clock = FakeClock()
    bench.time = clock
    timed = 3 * workers

    class Waves:
        num_workers = workers

        def __len__(self):
            return workers + timed

        def __iter__(self):
            for index in range(len(self)):
                clock.now = max(clock.now, (index // workers + 1) * wave_seconds)  # waits for its wave
                yield index

    clocked = bench.SteadyClock(Waves(), lead=workers, device=torch.device("cpu"))
    for _ in clocked:
        clock.now += step_seconds
    assert timed / (clock.now - clocked.started) == pytest.approx(steady, rel=0.03)


def test_cdtg_timed_averages_the_repeats_alone(monkeypatch):
    bench = load_script("bench_cdtg")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    calls = []

    def fn():
        calls.append(1)
        clock.now += 100.0 if len(calls) <= 2 else 1.5

    assert bench.timed(fn, torch.device("cpu"), 2, 4) == 1.5 and len(calls) == 6


def test_cdtg_step_goes_through_a_whole_regulariser_cycle(monkeypatch):
    bench = load_script("bench_cdtg")

    class Trainer:
        fusion = torch.nn.Linear(2, 2)

        def __init__(self):
            self.step, self.seen = 0, []

        def train_step(self, real, labels):
            self.seen.append(self.step)

    trainer = Trainer()
    monkeypatch.setattr(bench, "build", lambda *a, **k: trainer)
    args = argparse.Namespace(batch=2, size=8, classes=2, warmup=3, repeats=16, host_and_gpu_time=True)
    bench.bench_step(args, torch.device("cpu"), with_clip=False)
    assert trainer.seen == list(range(19))


def test_cdtg_flush_time_is_the_median(monkeypatch, tmp_path):
    bench = load_script("bench_cdtg")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    durations = iter([0.005, 0.001, 0.003, 0.004, 0.002])
    sizes = []

    def fake_flush(folder):
        sizes.append(sorted(p.stat().st_size for p in folder.iterdir())[-1])
        clock.now += next(durations)

    monkeypatch.setattr(tgn.io, "SYNCFS", object())
    monkeypatch.setattr(tgn.io, "flush_file_system", fake_flush)
    assert bench.flush_milliseconds(tmp_path, 1000) == 3.0 and sizes == [1000] * 5


def test_cdtg_cases_run_with_their_settings(monkeypatch, tmp_path):
    bench = load_script("bench_cdtg")
    from CDTG.clip_loss import ClipConsistencyLoss

    clip_calls = []
    original = ClipConsistencyLoss.forward

    def spy(self, images, labels):
        clip_calls.append(self.resolution)
        return original(self, images, labels)

    monkeypatch.setattr(ClipConsistencyLoss, "forward", spy)
    generations = []
    real_run = bench.run_generation

    def counting_run(synth, out_dir, **options):
        result = real_run(synth, out_dir, **options)
        jpegs = list(out_dir.rglob("*.jpg"))
        generations.append((options["per_class"], options["batch_size"], len(jpegs), sum(p.stat().st_size for p in jpegs)))
        return result

    monkeypatch.setattr(bench, "run_generation", counting_run)
    flushes = []
    real_flush = bench.flush_milliseconds
    monkeypatch.setattr(bench, "flush_milliseconds", lambda folder, size: flushes.append(size) or real_flush(folder, size))
    out = tmp_path / "c.jsonl"
    clip_per_case = {}
    for case in ["step", "step-no-clip", "step-pool", "gen-batch1-fused", "gen", "gen-render"]:
        before = len(clip_calls)
        bench.main(["--config", "auto", "--device", "cpu", "--warmup", "2", "--repeats", "1", "--generation-batches",
                    "2", "--jpeg-workers", "2", "--out", str(out), "--cases", case])
        clip_per_case[case] = clip_calls[before:]
    by_case = {r["case"]: r for r in records(out)}
    assert all(r["config"] == "tiny" for r in by_case.values())
    assert clip_per_case["step"] == [32] * 3 and clip_per_case["step-pool"] == [32] * 3
    assert clip_per_case["step-no-clip"] == []
    expected = {"step": (True, None, "shared"), "step-no-clip": (False, None, "shared"), "step-pool": (True, 1, "shared")}
    for case, (clip, pool, modconv) in expected.items():
        record = by_case[case]
        assert (record["clip"], record["fusion_pool"], record["modconv"], record["warmup"], record["repeats"]) == \
            (clip, pool, modconv, 2, 1)
    assert by_case["step-pool"]["fusion_parameters"] < by_case["step"]["fusion_parameters"]
    expected = {"gen-batch1-fused": (1, "fused", 16), "gen": (16, "shared", 32), "gen-render": (16, "shared", 32)}
    for case, (batch, modconv, images) in expected.items():
        record = by_case[case]
        assert (record["batch"], record["modconv"], record["images"]) == (batch, modconv, images)
        assert record["images_per_second"] == pytest.approx(record["images"] / record["seconds"], rel=0.01)
    # Warm-up run, then the timed one: the record's images are the JPEGs it wrote, at the case's batch.
    assert [g[:3] for g in generations] == [(2, 1, 2), (16, 1, 16), (32, 16, 32), (32, 16, 32)]
    assert by_case["gen"]["jpeg_mb"] == round(generations[3][3] / 2**20, 2)
    assert flushes == [generations[1][3] * 1 // 16, generations[3][3] * 16 // 32]
    assert by_case["gen"]["flushes"] <= 32 // 16


def test_cdtg_render_alone_counts_every_batch(monkeypatch):
    bench = load_script("bench_cdtg")
    monkeypatch.setattr(bench, "timed", lambda fn, device, warmup, repeats: 0.25)
    args = argparse.Namespace(generation_batches=3, size=32, latent=64, n_mlp=2, channel_max=32, batch=4,
                              classes=3, teacher_arch="resnet18", teacher_width=8, tiny=True, jpeg_workers=2, quality=75)
    record = bench.bench_generation(args, torch.device("cpu"), 16, write_jpeg=False)
    assert (record["images"], record["seconds"]) == (48, 0.75)
