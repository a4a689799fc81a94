"""The benchmark scripts run on a CPU and write complete records (their figures are not
checked: speed is for `make bench` to print, not for tests to assert)."""
import importlib.util
import json
import time
import warnings

import pytest
import torch

import tgn.engine
import tgn.io
from conftest import ROOT


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restored_globals(monkeypatch):
    """The scripts silence warnings, quiet the engine's progress bars and set cuDNN's
    autotuning for their whole process: none of it may leak into other tests."""
    monkeypatch.setattr(tgn.engine, "progress_bar", tgn.engine.progress_bar)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    with warnings.catch_warnings():
        yield


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cdtg_benchmark_writes_a_record_per_case_with_its_settings(tmp_path):
    out = tmp_path / "cdtg.jsonl"
    load_script("bench_cdtg").main(["--config", "tiny", "--device", "cpu", "--warmup", "1", "--repeats", "1",
                                    "--generation-batches", "1", "--jpeg-workers", "2", "--out", str(out),
                                    "--cases", "step-no-clip", "gen-render", "gen-cpu-side", "gen-batch1-fused"])
    step, render, cpu_side, batch1 = records(out)
    assert [r["case"] for r in (step, render, cpu_side, batch1)] == ["step-no-clip", "gen-render", "gen-cpu-side",
                                                                     "gen-batch1-fused"]
    assert (step["clip"], step["size"], step["batch"], step["warmup"], step["repeats"]) == (False, 32, 4, 1, 1)
    assert step["seconds_per_step"] > 0
    assert (render["jpeg"], render["render"], render["jpeg_workers"]) == (False, True, None)
    assert (cpu_side["jpeg"], cpu_side["render"], cpu_side["jpeg_workers"]) == (True, False, 2)
    assert cpu_side["quality"] == 75 and render["quality"] is None  # generation.py's default
    assert (batch1["batch"], batch1["modconv"]) == (1, "fused")
    assert all(r["images_per_second"] > 0 and r["images"] >= r["batch"] for r in (render, cpu_side, batch1))
    assert render["flush_ms"] is None  # no JPEGs written
    if tgn.io.SYNCFS is not None:  # Linux
        assert cpu_side["flush_ms"] > 0 and batch1["flush_ms"] > 0
    assert step["host_seconds_per_step"] is None and step["gpu_busy_seconds_per_step"] is None  # GPUs only
    assert step["gpu_activities_per_step"] is None
    with pytest.raises(SystemExit):  # the paper configuration or the tiny one, not both
        load_script("bench_cdtg").main(["--config", "paper", "--tiny", "--out", str(out)])
    assert len(records(out)) == 4


def test_generation_records_split_their_time_into_stages(tmp_path):
    from CDTG.generated_folder import HostImages, JpegWriter

    originals = (JpegWriter._write, JpegWriter._finish_oldest, HostImages.numpy, tgn.io.flush_file_system,
                 tgn.io._rename_into_place)
    out = tmp_path / "cdtg.jsonl"
    load_script("bench_cdtg").main(["--config", "tiny", "--device", "cpu", "--generation-batches", "2",
                                    "--jpeg-workers", "2", "--out", str(out), "--cases", "gen", "gen-render"])
    gen, render = records(out)
    stages = gen["stage_seconds"]
    assert set(stages) == {"draw", "render_call", "writer_wait", "gpu_wait", "encode_write", "flush", "rename"}
    assert all(stages[part] > 0 for part in ("draw", "render_call", "encode_write", "rename"))
    # Thread time summed over the writers cannot pass their number times the run's time.
    assert stages["encode_write"] <= gen["jpeg_workers"] * gen["seconds"]
    assert stages["render_call"] <= gen["seconds"]
    assert gen["flushes"] >= 1 if tgn.io.SYNCFS is not None else gen["flushes"] == 0
    assert 0 < gen["jpeg_mb"] < 1  # 32 JPEGs of 32 px
    assert "stage_seconds" not in render  # nothing written, nothing to split
    # The timed functions are put back.
    assert originals == (JpegWriter._write, JpegWriter._finish_oldest, HostImages.numpy, tgn.io.flush_file_system,
                         tgn.io._rename_into_place)


def test_the_stage_clock_puts_back_what_it_replaced_whatever_stops_the_case():
    from CDTG.generated_folder import HostImages, JpegWriter

    def timed_functions():
        return (JpegWriter._write, JpegWriter._finish_oldest, HostImages.numpy, tgn.io.flush_file_system,
                tgn.io._rename_into_place)

    before = timed_functions()
    bench = load_script("bench_cdtg")

    class Synth:
        def batch_inputs(self):
            return "drawn"

    synth = Synth()
    synth.render = lambda: "rendered"  # an instance's own attribute, as the CPU-side case sets
    clock = bench.StageClock()
    with pytest.raises(RuntimeError, match="the case failed"):
        with clock.timing(synth):
            assert synth.batch_inputs() == "drawn" and synth.render() == "rendered"
            raise RuntimeError("the case failed")
    assert clock.calls["draw"] == clock.calls["render_call"] == 1
    assert "batch_inputs" not in vars(synth) and synth.render() == "rendered" and timed_functions() == before

    class NoRender:  # a target missing: its own error, and what was replaced before it is put back
        def batch_inputs(self):
            return "drawn"

    partial = NoRender()
    with pytest.raises(AttributeError, match="render"):
        with clock.timing(partial):
            pass
    assert "batch_inputs" not in vars(partial) and timed_functions() == before


def test_busy_time_is_the_union_of_the_activities_spans():
    bench = load_script("bench_cdtg")
    # Two streams overlapping, one kernel inside another, then a gap.
    assert bench.busy_seconds([(20, 25), (0, 10), (5, 12), (6, 8)]) == pytest.approx(17)
    assert bench.busy_seconds([]) == 0
    # The spans come from the profiler's raw records (on a CPU, of the CPU's ops).
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    matrix = torch.randn(64, 64)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(5):
            matrix @ matrix
    wall = time.perf_counter() - started
    spans = bench.activity_spans(profiled, DeviceType.CPU)
    assert len(spans) >= 5 and all(start <= end for start, end in spans)
    assert 0 < bench.busy_seconds(spans) <= wall
    assert bench.activity_spans(profiled) == []  # no GPU activity on a CPU


def test_resnet_benchmark_runs_the_chosen_cases_and_refuses_unknown_names(tmp_path, capsys):
    out = tmp_path / "resnet.jsonl"
    bench = load_script("bench_resnet")
    bench.main(["--config", "tiny", "--device", "cpu", "--warmup", "3", "--steps", "2", "--trainers", "kmdn",
                "--sources", "memory", "jpeg+cache", "--out", str(out)])
    data_path, *written = records(out)
    assert (data_path["bench"], data_path["source"], data_path["batch"]) == ("data_path", "jpeg+cache", 8)
    assert data_path["images_per_second"] > 0 and data_path["channels_last"] is False
    assert [(r["trainer"], r["source"]) for r in written] == [("kmdn", "memory"), ("kmdn", "jpeg+cache")]
    assert all(r["images_per_second"] > 0 and r["steps"] == 2 for r in written)
    # A DataLoader source warms up with a whole epoch of --steps and one batch per worker (2), then
    # the timed epoch's first batch per worker.
    assert [r["warmup"] for r in written] == [3, 2 + 2 + 2]
    assert data_path["warmup"] == 2 + 2 + 2
    assert "it/s" not in capsys.readouterr().err  # figures only: the engine's progress bars are off
    bench.main(["--config", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--trainers", "--sources",
                "jpeg", "--out", str(out)])  # no trainer: the data path alone
    assert [(r["bench"], r["source"]) for r in records(out)[3:]] == [("data_path", "jpeg")]
    bench.main(["--config", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--trainers", "kmdn",
                "--sources", "jpeg", "--no-data-path", "--out", str(out)])
    assert [(r["bench"], r["source"]) for r in records(out)[4:]] == [("resnet_train", "jpeg")]
    for flag, name in (("--trainers", "resnet"), ("--sources", "disk")):
        with pytest.raises(SystemExit):
            bench.main([flag, name, "--out", str(out)])
        assert f"argument {flag}: invalid choice: '{name}'" in capsys.readouterr().err
    # One line before anything is measured, not a traceback (after the first case, for a folder).
    for argv, message in ((["--out", str(tmp_path)], f"--out {tmp_path} is a folder; name a file"),
                          (["--steps", "0"], "argument --steps: 0 must be a positive integer"),
                          (["--trainers", "--sources", "memory"], "nothing to time"),
                          (["--device", "cuda:7"], "--device cuda:7: ")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--config", "tiny", *argv] + ([] if "--out" in argv else ["--out", str(out)]))
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and "Traceback" not in error, error
