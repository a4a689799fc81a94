"""--compile: a compiled ResNet trainer trains the same model as the eager one.

On a CPU, mode 'reduce-overhead' compiles exactly as on a GPU and only skips the CUDA
graphs, so this checks the compiled forward and backward and that the mode reaches
torch.compile from the command line. The graph replays themselves (and the per-step
marking they need) are checked on a GPU, in tests/test_cuda.py.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from conftest import needs_compile
from KMDN.dataset_split import main as split_main
from KMDN.UModel import main as umodel_main
from tgn.checkpoint import load_checkpoint
from tgn.cli import add_training_args, make_parser
from tgn.engine import seed_everything
from tgn.resnet import FeatureResNet

pytestmark = needs_compile

TINY = ["--arch", "resnet18", "--width", "4", "--pretrained", "none", "--image-size", "16",
        "--batch-size", "8", "--workers", "0", "--epochs", "2", "--lr", "0.01"]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch: torch.compile caches graphs per function, so a model
    compiled by an earlier test would otherwise be reused and count no new graph."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def initial_weights(config):
    """The weights both runs start from (UModel seeds with --seed 0, then builds the model)."""
    seed_everything(0)
    return FeatureResNet(**config).state_dict()


def parse_compile(*argv):
    parser = make_parser("test")
    add_training_args(parser, epochs=1, batch_size=8)
    return parser.parse_args(list(argv)).compile


def test_compile_flag_modes():
    assert parse_compile() == "off"
    assert parse_compile("--compile") == "default"
    assert parse_compile("--compile", "reduce-overhead") == "reduce-overhead"
    with pytest.raises(SystemExit):
        parse_compile("--compile", "fastest")


def test_compiled_training_matches_eager(toy_data, tmp_path, monkeypatch):
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    modes, compile_model = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or compile_model(model, mode=mode))
    graphs_before = counters["stats"]["unique_graphs"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "reduce-overhead"])):
        out = tmp_path / name
        umodel_main(["--split", str(tmp_path / "split"), "--out", str(out), *TINY, "--image-size", "32", *extra])
        runs[name] = (load_checkpoint(out / "head" / "last.pth"),
                      [json.loads(line) for line in (out / "head" / "metrics.jsonl").read_text().splitlines()])
    assert modes == ["reduce-overhead"] and counters["stats"]["unique_graphs"] > graphs_before
    (eager, eager_log), (compiled, compiled_log) = runs["eager"], runs["compiled"]
    init = initial_weights(eager["model_config"])
    # Adam divides each gradient by its running size, so float rounding (compiled kernels
    # sum in another order) moves near-zero-gradient weights by up to a learning rate:
    # compare the whole of training's change to the weights, not each weight. At 32 px, not
    # 16: there layer4's BatchNorm normalises 8 values per channel (1x1 maps of 8 images),
    # and on a Xeon with AVX-512 the rounding grew to 4% of the change by the second epoch.
    weights = [key for key, value in init.items() if value.is_floating_point()]
    eager_change, compiled_change = (torch.cat([(state["state_dict"][key] - init[key]).flatten() for key in weights])
                                     for state in (eager, compiled))
    assert (compiled_change - eager_change).norm() < 0.01 * eager_change.norm()  # 1.3e-4 measured
    for key, value in eager["state_dict"].items():
        if not value.is_floating_point():  # BatchNorm's batch counters
            assert torch.equal(compiled["state_dict"][key], value), key
    for a, b in zip(eager_log, compiled_log):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["overall_accuracy"] == b["overall_accuracy"]



def test_compiled_generation_writes_the_images_of_eager_generation(cdtg_inputs, tmp_path):
    """generation.py --compile: one graph for every batch (the last, smaller batch of a class
    is padded), the same pixels as eager up to float rounding."""
    from CDTG.generation import main as generation_main
    from CDTG.train import main as cdtg_train_main
    from test_cdtg_training import tiny_train_args

    cdtg_train_main(tiny_train_args(cdtg_inputs, tmp_path / "run", "--iter", "2", "--clip", "none"))
    common = ["--ckpt", str(tmp_path / "run" / "checkpoint" / "2.pt"), "--per-class", "6", "--batch", "4",
              "--classes", "3", "--device", "cpu", "--quality", "100"]
    generation_main([*common, "--out", str(tmp_path / "eager")])
    counters.clear()
    generation_main([*common, "--out", str(tmp_path / "compiled"), "--compile", "reduce-overhead"])
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not silently eager
    assert counters["stats"]["calls_captured"] > 0
    names = sorted(p.name for p in (tmp_path / "eager" / "3").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "compiled" / "3").iterdir()) and len(names) == 6
    for name in names:  # batches of 4 and 2 (padded to 4 with copies of its first image)
        eager, compiled = (np.asarray(Image.open(tmp_path / run / "3" / name), dtype=np.int16)
                           for run in ("eager", "compiled"))
        assert np.abs(eager - compiled).max() <= 3, name  # JPEG at quality 100 of pixels within 1


def test_compiled_cdtg_training_matches_eager_with_a_bounded_set_of_graphs(cdtg_inputs, tmp_path, monkeypatch):
    """CDTG train.py --compile: G and D compiled without graph breaks, a fixed set of graphs
    however the style-mixing layer varies (it used to split G's graph on a Python random
    draw and to compile a graph per crossover layer, which past torch's recompile limit
    silently falls back to eager), and the same training as eager. The 'aot_eager' backend
    traces and differentiates exactly as the default one and only skips code generation,
    which would cost minutes of C++ compilation on a CPU."""
    from CDTG.checkpoint import load_cdtg_checkpoint
    from CDTG.train import main as cdtg_train_main
    from test_cdtg_training import tiny_train_args

    compile_model = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or compile_model(
        model, backend="aot_eager", **kw))
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        counters.clear()
        cdtg_train_main(tiny_train_args(cdtg_inputs, tmp_path / name, "--iter", "16", "--mixing", "0.9", *extra))
        runs[name] = load_cdtg_checkpoint(tmp_path / name / "checkpoint" / "16.pt")
    assert len(compiled) == 2  # G (with the fusion layer) and D
    assert not counters["graph_break"]
    # G: one crossover layer, then any (the index becomes symbolic), and one latent (no mixing);
    # D: on detached images and on fakes that carry G's graph.
    assert 0 < counters["stats"]["unique_graphs"] <= 5
    for key in ("g", "d", "fusion", "g_ema"):
        for name, value in runs["eager"][key].items():
            torch.testing.assert_close(runs["compiled"][key][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", [True, "default", "reduce-overhead", "max-autotune"])
def test_swagan_compiles_without_layout_optimisation_on_gpus_only(mode, monkeypatch):
    """On GPUs inductor's channels_last layouts send the blurs to a slow cuDNN kernel, so the
    SWAGAN passes compile without them; the options must be ones torch.compile accepts (it
    checks them when called, before any compiling) and keep the mode's own (CUDA graphs)."""
    from CDTG.compilation import compile_swagan

    calls, compile_model = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or compile_model(fn, **kwargs))
    compile_swagan(torch.nn.Linear(2, 2), mode, torch.device("cuda"), dynamic=False)
    compile_swagan(torch.nn.Linear(2, 2), mode, torch.device("cpu"), dynamic=False)
    on_gpu, on_cpu = calls
    assert "mode" not in on_gpu and on_gpu["options"]["layout_optimization"] is False and on_gpu["dynamic"] is False
    assert on_gpu["options"].get("triton.cudagraphs", False) == (mode in ("reduce-overhead", "max-autotune"))
    assert on_cpu == {"mode": None if mode in (True, "default") else mode, "dynamic": False}
