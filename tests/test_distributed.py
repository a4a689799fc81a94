"""Training under torchrun: 2 CPU processes (gloo) against 1 process with the same global batch.

Each test spawns 2 processes with the environment torchrun would give them and runs the
library or the stage scripts in them. Checked: parameters stay identical across the
processes, the result matches a single-process run with the same global batch (exactly
where nothing per-process enters, within a tolerance where BatchNorm statistics are per
process: PyTorch's SyncBatchNorm has no CPU kernel), rank 0 alone writes, and metrics
are reduced over the processes. Generation split over 2 processes writes the images of 1.
CDTG with --compile (G and D compiled through DDP) stays identical across the processes.
"""
import contextlib
import copy
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.utils import counters

from conftest import ROOT, write_dataset
from CDTG.checkpoint import checkpoint_steps, load_cdtg_checkpoint
from CDTG.generation import main as generation_main
from CDTG.train import main as cdtg_train_main
from CDTG.trainer import CdtgTrainer
from Classification.test import main as cls_test_main
from Classification.train import main as cls_train_main
from KMDN.dataset_split import main as split_main
from KMDN.Distill import main as distill_main
from KMDN.RModel import main as rmodel_main
from KMDN.UModel import main as umodel_main
from KMDN.stage import group_datasets, open_split
from tgn import distributed as dist
from tgn.checkpoint import load_checkpoint
from tgn.compat import COMPILE_SINCE, torch_version
from tgn.engine import TrainConfig, evaluate, fit, make_loader, train_one_epoch
from tgn.errors import ProcessError, UserError, cli_main, one_line_warning
from tgn.io import atomic_torch_save
from tgn.resnet import FeatureResNet
from tgn.run_folder import prepare_run_dir

WORLD = 2
TINY = ["--arch", "resnet18", "--width", "4", "--pretrained", "none", "--image-size", "16", "--batch-size", "8",
        "--workers", "0", "--device", "cpu"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(rank, port, job, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    try:
        dist.init("cpu")
        job(*args)
        if torch_version() < (2, 9):
            # Older releases can deadlock destroying a gloo group: its destructor holds the GIL
            # while joining a worker thread that needs it (pytorch/pytorch#154976). Seen on 2.1
            # and 2.6; the job is done, so leave without it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        dist.shutdown()


# The processes start from a fresh interpreter's state, as spawned ones do (nothing of
# pytest's process), but forked from a server that imported these once for the session:
# spawned, each imported them again, seconds per process (the file took twice as long).
# They see the environment and working folder the server started with (at the first call):
# a job sets what it needs itself (_process), never through monkeypatch.
PRELOAD = ["torch", "torchvision", "torch._dynamo", "clip", "conftest", "test_distributed"]


def run_in_processes(job, *args):
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server starts, at the first call
    mp.start_processes(_process, args=(free_port(), job, args), nprocs=WORLD, join=True, start_method=method)


def torchrun_variables(monkeypatch, local_rank=0, world=2):
    """This process seen as torchrun starts process `local_rank` of `world` on one node,
    before it joins."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_cnn(num_classes):
    """No BatchNorm: nothing per process, so two processes must equal one exactly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, num_classes))


def fit_both_models(split_dir, out):
    """fit() of a BatchNorm-free CNN and of a ResNet-18 on the head classes, 2 epochs, batch 8."""
    split = open_split(type("Args", (), {"split": split_dir, "data_root": None})())
    train_set, test_set = group_datasets(split, "head", 16)
    meta = {"class_ids": split.ids("head")}
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, weight_decay=1e-4, milestones=[1], seed=3)
    torch.manual_seed(0)
    models = {"cnn": tiny_cnn(len(meta["class_ids"])), "resnet": FeatureResNet("resnet18", 2, width=4)}
    for name, model in models.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        atomic_torch_save(out / name / "init.pt", model.state_dict())
        fit(model, train_set, test_set, cfg, torch.device("cpu"), out / name, meta=meta)
        atomic_torch_save(out / name / f"rank{dist.rank()}.pt", model.state_dict())


def resnet_scripts(split_dir, data, out):
    """Every ResNet trainer, as torchrun would start it."""
    umodel_main(["--split", str(split_dir), "--out", str(out / "kmdn"), "--epochs", "2", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out / "kmdn"), "--epochs", "1", *TINY])
    distill_main(["--split", str(split_dir), "--out", str(out / "kmdn"), "--epochs", "2", "--distill-interval", "1",
                  "--image-size", "16", "--batch-size", "8", "--workers", "0", "--device", "cpu"])
    cls_train_main(["--data-root", str(data), "--out", str(out / "cls"), "--epochs", "1", "--arch", "resnet18",
                    "--pretrained", "none", "--image-size", "16", "--batch-size", "8", "--workers", "0",
                    "--device", "cpu", "--sampler", "class-balanced"])
    cls_test_main(["--data-root", str(data), "--ckpt", str(out / "cls" / "best.pth"), "--out",
                   str(out / "cls" / "report-ddp"), "--batch-size", "4", "--workers", "0", "--device", "cpu"])


@pytest.fixture
def split_dir(tmp_path):
    data = write_dataset(tmp_path / "data", {0: 12, 1: 12, 2: 8, 3: 4, 4: 4}, {0: 5, 1: 4, 2: 3, 3: 3, 4: 2})
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    return tmp_path / "split"


def assert_states_close(a, b, atol):
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_resnet_trainers_under_torchrun_match_one_process(split_dir, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_in_processes(fit_both_models, split_dir, ddp)
    fit_both_models(split_dir, single)
    for name in ("cnn", "resnet"):
        ranks = [torch.load(ddp / name / f"rank{r}.pt") for r in range(WORLD)]
        for key in ranks[0]:  # identical in every process, BatchNorm statistics included
            assert torch.equal(ranks[0][key], ranks[1][key]), (name, key)
        assert len(read_metrics(ddp / name / "metrics.jsonl")) == 2  # rank 0 alone writes
    # Without BatchNorm: the same run (up to the order of float sums).
    assert_states_close(torch.load(ddp / "cnn" / "rank0.pt"), torch.load(single / "cnn" / "rank0.pt"), atol=1e-5)
    a, b = read_metrics(ddp / "cnn" / "metrics.jsonl"), read_metrics(single / "cnn" / "metrics.jsonl")
    for x, y in zip(a, b):
        assert x["overall_accuracy"] == y["overall_accuracy"] and x["train_accuracy"] == y["train_accuracy"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)
    # With BatchNorm each process normalises by its own 4 images, not by the batch of 8: the
    # runs differ (Adam's first steps amplify small gradient differences to the learning
    # rate), yet they move the weights the same way.
    init, a, b = (torch.load(path) for path in (single / "resnet" / "init.pt", ddp / "resnet" / "rank0.pt",
                                                single / "resnet" / "rank0.pt"))
    weights = [key for key in init if key.endswith("weight")]
    moves = [torch.cat([(state[key] - init[key]).flatten() for key in weights]) for state in (a, b)]
    assert torch.nn.functional.cosine_similarity(*moves, dim=0) > 0.75  # 0.89 measured


def test_stage_scripts_under_torchrun(split_dir, tmp_path):
    data = tmp_path / "data"
    run_in_processes(resnet_scripts, split_dir, data, tmp_path)
    kmdn = tmp_path / "kmdn"
    head = read_metrics(kmdn / "head" / "metrics.jsonl")
    assert [m["epoch"] for m in head] == [1, 2]  # one line per epoch: rank 0 alone writes
    assert {m["processes"] for m in head} == {WORLD}
    # The logged test metrics are those of the whole test set (confusion matrices summed
    # over the processes): one process evaluating the saved model finds the same.
    last = load_checkpoint(kmdn / "head" / "last.pth")
    model = FeatureResNet(**last["model_config"])
    model.load_state_dict(last["state_dict"])
    split = open_split(type("Args", (), {"split": split_dir, "data_root": None})())
    _, test_set = group_datasets(split, "head", 16)
    cm, summary = evaluate(model, make_loader(test_set, 8, train=False), torch.device("cpu"), 2)
    assert cm.sum() == len(test_set) == 9
    assert head[-1]["overall_accuracy"] == summary["overall_accuracy"]
    distilled = read_metrics(kmdn / "distill" / "metrics.jsonl")
    assert [m["student"] for m in distilled] == ["head", "tail"] and {m["processes"] for m in distilled} == {WORLD}
    assert (kmdn / "distill" / "M_T.pth").is_file()
    report = json.loads((tmp_path / "cls" / "report-best" / "report.json").read_text())
    assert sum(report["confusion_matrix"][0]) + sum(report["confusion_matrix"][1]) > 0
    # test.py split over the processes counts each of the 17 test images once, as one process does.
    single = cls_test_main(["--data-root", str(data), "--ckpt", str(tmp_path / "cls" / "best.pth"), "--out",
                            str(tmp_path / "report-single"), "--workers", "0", "--device", "cpu"])
    ddp = json.loads((tmp_path / "cls" / "report-ddp" / "report.json").read_text())
    assert ddp["confusion_matrix"] == single["confusion_matrix"] == report["confusion_matrix"]
    assert sum(map(sum, ddp["confusion_matrix"])) == 17


def cdtg_args(root, out, *extra):
    return ["--data", str(root / "cdtg_data"), "--teacher", str(root / "M_T.pth"), "--clip", str(root / "clip.pt"),
            "--out", str(out), "--size", "32", "--latent", "16", "--n-mlp", "2", "--channel-max", "16",
            "--batch", "8", "--d-reg-every", "2", "--g-reg-every", "2", "--save-every", "100", "--sample-every", "2",
            "--log-every", "1", "--workers", "0", "--device", "cpu", "--iter", "3", "--flip", *extra]


def train_cdtg_saving_every_rank(argv):
    """CDTG/train.py, plus each process's final state for the test to compare."""
    original_fit = CdtgTrainer.fit

    def fit(trainer, *args):
        def weights():
            return {"g": trainer.g.state_dict(), "d": trainer.d.state_dict(), "g_ema": trainer.g_ema.state_dict(),
                    "fusion": trainer.fusion.state_dict(), "fusion_ema": trainer.fusion_ema.state_dict()}

        initial = copy.deepcopy(weights())
        step = original_fit(trainer, *args)
        atomic_torch_save(trainer.out_dir / f"rank{dist.rank()}.pt",
                          {**weights(), "initial": initial, "ada_p": trainer.ada_p,
                           "mean_path_length": float(trainer.mean_path_length),
                           "compiled_graphs": counters["stats"]["unique_graphs"]})
        return step

    CdtgTrainer.fit = fit
    try:
        cdtg_train_main(argv)
    finally:
        CdtgTrainer.fit = original_fit


def folders_per_process(root, cdtg_argv):
    """Each process with its own folder (nodes without a shared file system): every process
    must refuse it, the trainers' run folders and CDTG's alike. Records what each process saw."""
    dist.SHARED_FOLDER_WAIT_S = 0.2
    outcomes = {}
    cdtg_train = cdtg_train_main.__wrapped__  # without cli_main: the UserError itself
    generation = ["--ckpt", str(root / "trained" / "checkpoint" / "1.pt"), "--per-class", "1", "--device", "cpu",
                  "--overwrite", "--out"]
    for name, call in (("shared", lambda: prepare_run_dir(root / "shared")),
                       ("run_dir", lambda: prepare_run_dir(root / f"run{dist.rank()}")),
                       ("cdtg", lambda: cdtg_train([*cdtg_argv, "--out", str(root / f"cdtg{dist.rank()}")])),
                       ("generation", lambda: generation_main.__wrapped__([*generation, str(root / f"gen{dist.rank()}")]))):
        try:
            call()
            outcomes[name] = "ok"
        except UserError as exc:
            outcomes[name] = str(exc)
    (root / f"outcomes{dist.rank()}.json").write_text(json.dumps(outcomes))


def test_a_folder_not_shared_by_every_process_is_refused_by_all(cdtg_inputs):
    root = cdtg_inputs
    cdtg_argv = cdtg_args(root, root / "unused")  # each process's --out comes after it, and wins
    cdtg_train_main([*cdtg_argv, "--out", str(root / "trained"), "--iter", "1"])
    for rank in range(WORLD):  # earlier generated images, which a refused --overwrite must keep
        generation_main(["--ckpt", str(root / "trained" / "checkpoint" / "1.pt"), "--per-class", "1",
                         "--device", "cpu", "--out", str(root / f"gen{rank}")])
    earlier = sorted(p.relative_to(root) for p in root.glob("gen*/**/*.jpg"))
    run_in_processes(folders_per_process, root, cdtg_argv)
    for rank in range(WORLD):
        outcomes = json.loads((root / f"outcomes{rank}.json").read_text())
        assert outcomes["shared"] == "ok"
        for name in ("run_dir", "cdtg", "generation"):
            assert "do not see the files rank 0 writes there" in outcomes[name], (rank, name)
    assert not list(root.rglob(".shared-check-*"))  # the probes are removed
    assert not (root / "cdtg0" / "checkpoint").exists()  # refused before training
    assert len(earlier) == 6 and sorted(p.relative_to(root) for p in root.glob("gen*/**/*.jpg")) == earlier


def fail_on_rank_one(root):
    """Rank 1 hits a user error of its own (say, an unreadable image in its share) while
    rank 0 waits in a collective. Records what each printed and its exit status."""
    @cli_main
    def script(argv):
        if dist.rank() == 1:
            raise UserError("data/3/x.jpg: cannot decode")
        dist.all_reduce_(torch.ones(1))

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            script(None)
            code = 0
        except SystemExit as exc:
            code = exc.code
    (root / f"rank{dist.rank()}.json").write_text(json.dumps({"code": code, "stderr": err.getvalue()}))


def test_an_error_on_one_process_is_one_line_on_each(tmp_path):
    run_in_processes(fail_on_rank_one, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert rank1 == {"code": 2, "stderr": "[rank 1] error: data/3/x.jpg: cannot decode\n"}
    assert rank0["code"] == 2 and rank0["stderr"].count("\n") == 1  # not gloo's traceback
    assert rank0["stderr"].startswith("[rank 0] error: another process of this torchrun job stopped")


def collective_error(root):
    """Every process refuses the same thing after joining: rank 0 alone prints it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        cli_main(lambda argv: dist.local_batch(3))(None)  # 3 does not divide over 2 processes
    (root / f"rank{dist.rank()}.txt").write_text(err.getvalue())


def test_an_error_every_process_raises_prints_once(tmp_path):
    run_in_processes(collective_error, tmp_path)
    assert (tmp_path / "rank0.txt").read_text() == (
        "error: --batch-size 3 is the global batch and must be a multiple of the 2 processes\n")
    assert (tmp_path / "rank1.txt").read_text() == ""


def run_mistakes(split_dir, root):
    """Mistakes every process meets alike once joined: a run folder that cannot be created,
    a last.pth of another shape. Records each process's error lines and exit status."""
    common = ["--split", str(split_dir), "--out", str(root / "kmdn"), *TINY]
    umodel_main([*common, "--epochs", "1"])
    if dist.is_main():
        last = root / "kmdn" / "head" / "last.pth"
        state = load_checkpoint(last)
        state["state_dict"]["conv1.weight"] = torch.zeros(8, 3, 7, 7)  # as a run of another --width left it
        atomic_torch_save(last, state)
    dist.barrier()
    outcomes = {}
    for name, argv in (("unwritable", [*common[:2], "--out", "/proc/tgn-no-such-run", *TINY, "--epochs", "1"]),
                       ("other shape", [*common, "--epochs", "2", "--resume"])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            umodel_main(argv)
        outcomes[name] = {"code": exit_info.value.code,
                          "errors": [line for line in err.getvalue().splitlines() if "error:" in line]}
    (root / f"mistakes{dist.rank()}.json").write_text(json.dumps(outcomes))


def test_mistakes_every_process_meets_print_one_line(split_dir, tmp_path):
    run_in_processes(run_mistakes, split_dir, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"mistakes{r}.json").read_text()) for r in range(WORLD))
    assert rank0["unwritable"]["errors"] == ["error: --out /proc/tgn-no-such-run/head: cannot create it (No such file "
                                             "or directory)"]
    assert len(rank0["other shape"]["errors"]) == 1
    assert "last.pth does not fit this model: conv1.weight has shape (8, 3, 7, 7)" in rank0["other shape"]["errors"][0]
    assert rank1 == {name: {"code": 2, "errors": []} for name in ("unwritable", "other shape")}
    assert {outcome["code"] for outcome in rank0.values()} == {2}


def train_into_a_held_folder(split_dir, root):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        umodel_main(["--split", str(split_dir), "--out", str(root / "kmdn"), *TINY, "--epochs", "1", "--overwrite"])
    errors = [line for line in err.getvalue().splitlines() if "error:" in line]
    (root / f"held{dist.rank()}.json").write_text(json.dumps({"code": exit_info.value.code, "errors": errors}))


def test_a_folder_another_run_holds_stops_every_process_with_one_line(split_dir, tmp_path):
    from tgn.runlock import claim_folder, release_folders

    head = tmp_path / "kmdn" / "head"
    head.mkdir(parents=True)
    (head / "best.pth").write_bytes(b"the other run's")
    claim_folder(head)  # this process stands for the other run
    try:
        run_in_processes(train_into_a_held_folder, split_dir, tmp_path)
    finally:
        release_folders()
    rank0, rank1 = (json.loads((tmp_path / f"held{r}.json").read_text()) for r in range(WORLD))
    assert rank0["code"] == rank1["code"] == 2
    assert rank0["errors"] == [f"error: --out {head} is in use by another run (pid {os.getpid()} on "
                               f"{socket.gethostname()}): wait for it to end, or choose another --out"]
    assert rank1["errors"] == [] and (head / "best.pth").read_bytes() == b"the other run's"


def test_a_global_batch_that_does_not_divide_is_refused_before_anything_is_removed(cdtg_inputs, monkeypatch,
                                                                                     capsys):
    run = cdtg_inputs / "run"
    cdtg_train_main(cdtg_args(cdtg_inputs, run, "--iter", "1"))
    torchrun_variables(monkeypatch, world=4)
    with pytest.raises(SystemExit):
        cdtg_train_main(cdtg_args(cdtg_inputs, run, "--overwrite", "--batch", "6"))
    assert "--batch 6 is the global batch and must be a multiple of the 4 processes" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 2 images a process: smaller minibatch-stddev groups than one process's 4
        cdtg_train_main(cdtg_args(cdtg_inputs, run, "--overwrite", "--batch", "8"))
    assert ("--batch 8 over 4 processes leaves 2 image(s) each, fewer than the discriminator's minibatch-std "
            "group of 4, which changes training; use at most 2 processes or --batch 16") in capsys.readouterr().err
    assert (run / "checkpoint" / "1.pt").is_file()  # --overwrite had not started


def test_sync_bn_on_over_cpu_processes_is_refused_before_anything_is_written(split_dir, tmp_path, monkeypatch,
                                                                              capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    before = {path.name: path.read_bytes() for path in (out / "head").iterdir()}
    torchrun_variables(monkeypatch)
    with pytest.raises(SystemExit):
        umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY, "--sync-bn", "on",
                     "--overwrite"])
    assert "--sync-bn on needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (out / "head").iterdir()} == before


@pytest.mark.parametrize("nccl_built", [True, False])
def test_gpus_join_with_nccl_where_torch_has_it_and_gloo_elsewhere(monkeypatch, nccl_built):
    """Windows' torch builds have no NCCL: torchrun on its GPUs joins with gloo."""
    from tgn import compat

    joined = {}

    def init_process_group(backend, device_id=None):  # as torch 2.3 and later have it
        joined.update(backend=backend, device_id=device_id)

    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl_built)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    compat.init_process_group(dist.backend_for(torch.device("cuda", 0)), torch.device("cuda", 0))
    assert joined["backend"] == ("nccl" if nccl_built else "gloo")
    assert joined["device_id"] == (torch.device("cuda", 0) if nccl_built else None)  # for NCCL's eager set-up
    assert dist.backend_for(torch.device("cpu")) == "gloo"


def collectives(root):
    """Each collective helper, with values that tell a sum from a maximum, rank 0's value from
    this process's, and float64 from float32."""
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(dist.rank() + 1)
    found = {
        "agreed_max": [dist.agreed_max([2, 15][dist.rank()]), dist.agreed_max([300, 2][dist.rank()])],
        "average": dist.all_reduce_(torch.tensor([dist.rank() + 1.0]), average=True).item(),
        "sum": dist.all_reduce_(torch.tensor([dist.rank() + 1.0])).item(),
        "sum_numbers": dist.sum_numbers([2**24 + 1 if dist.rank() == 0 else 0, 0.5], torch.device("cpu")),
        "broadcast": dist.broadcast_object(f"r{dist.rank()}"),
        "all_agree": [dist.all_agree(dist.rank() == 0), dist.all_agree(True)],
        "shard": dist.shard(list(range(5))),
        "local_batch": dist.local_batch(8),
    }
    dist.broadcast_buffers_(bn)
    found["buffers"] = bn.running_mean.tolist()
    (root / f"rank{dist.rank()}.json").write_text(json.dumps(found))


def test_the_collective_helpers_combine_every_process(tmp_path):
    run_in_processes(collectives, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    common = {"agreed_max": [15, 300], "average": 1.5, "sum": 3.0, "sum_numbers": [2**24 + 1, 1.0],
              "broadcast": "r0", "all_agree": [False, True], "local_batch": 4, "buffers": [1.0, 1.0]}
    assert rank0 == {**common, "shard": [0, 2, 4]}
    assert rank1 == {**common, "shard": [1, 3]}


def gpus(monkeypatch, count):
    """This machine seen with `count` GPUs; setting one up only records it."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "tune_cuda", lambda: chosen.append("tuned"))
    return chosen


def test_auto_takes_the_gpu_where_there_is_one(monkeypatch):
    chosen = gpus(monkeypatch, 2)
    assert dist.checked_device("auto") == dist.checked_device("cuda") == torch.device("cuda")
    assert dist.resolve_device("cuda:1") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1), "tuned"]
    gpus(monkeypatch, 0)
    assert dist.checked_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda: CUDA is not available on this machine"):
        dist.checked_device("cuda")


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    torchrun_variables(monkeypatch, local_rank=1)
    chosen = gpus(monkeypatch, 2)
    assert dist.process_device("auto") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1), "tuned"]
    assert dist.process_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="under torchrun each process takes the GPU of its LOCAL_RANK"):
        dist.process_device("cuda:0")
    gpus(monkeypatch, 1)
    with pytest.raises(ProcessError, match="LOCAL_RANK 1 but this node has 1 GPUs"):
        dist.process_device("auto")
    gpus(monkeypatch, 0)
    assert dist.process_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        dist.process_device("cuda")


def test_the_gpu_is_tuned_for_batches_of_fixed_shapes():
    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    try:  # (monkeypatch cannot put back the cuBLAS flag: it is no plain attribute)
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        dist.tune_cuda()
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_host_group_is_made_once_and_is_gloo(monkeypatch, backend):
    """Under nccl a gloo group of its own, made once; under gloo the job's own group."""
    made = []
    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "_host_group", None)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: backend)
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kwargs: made.append(kwargs) or object())
    first = dist.host_group()
    assert dist.host_group() is first
    if backend == "gloo":
        assert first is torch.distributed.group.WORLD and made == []
    else:
        assert made == [{"backend": "gloo"}]


def test_a_probe_rank_0_cannot_remove_does_not_stop_rank_0_alone(tmp_path, monkeypatch):
    """After the collectives: an error there would end rank 0 while the others go on."""
    from pathlib import Path

    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: obj)  # rank 0 of a job that shares the folder
    monkeypatch.setattr(dist, "all_agree", lambda flag: flag)
    real_unlink = Path.unlink

    def refused(path, missing_ok=False):
        if path.name.startswith(".shared-check-"):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    dist.check_shared_folder(tmp_path)
    assert [path.name[:14] for path in tmp_path.iterdir()] == [".shared-check-"]  # left behind, harmlessly


def test_init_joins_once(monkeypatch):
    torchrun_variables(monkeypatch)
    joined = []
    monkeypatch.setattr(dist.compat, "init_process_group", lambda backend, device: joined.append(backend))
    monkeypatch.setattr(dist.atexit, "register", lambda fn: None)
    monkeypatch.setattr(dist, "active", lambda: bool(joined))
    assert dist.init("cpu") == dist.init("cpu") == torch.device("cpu")
    assert joined == ["gloo"]


def test_a_single_process_always_prints(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")  # left over from another launcher: no WORLD_SIZE
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    @cli_main
    def script(argv):
        assert dist.local_batch(3) == 3  # one process
        raise UserError("--data x: no such folder")

    with pytest.raises(SystemExit):
        script(None)
    assert capsys.readouterr().err == "error: --data x: no such folder\n"


def test_ctrl_c_while_torch_is_being_imported_under_torchrun_is_one_line():
    """The script's "interrupted", not the tracebacks of importing a torch that Ctrl-C cut
    short (torchrun passes Ctrl-C on while its processes may still be starting)."""
    script = ("import sys; sys.modules['torch'] = None  # a torch whose import failed\n"
              "from tgn.errors import cli_main\n"
              "@cli_main\n"
              "def main(argv):\n"
              "    raise KeyboardInterrupt\n"
              "main(None)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")
    # Cut short midway: torch still initialising, its DataLoader module already there; a
    # second import of torch (through tgn.stopping) would fail with a traceback.
    cut_short = ("import importlib.machinery, sys, types\n"
                 "torch = types.ModuleType('torch')\n"
                 "torch.__spec__ = importlib.machinery.ModuleSpec('torch', None)\n"
                 "torch.__spec__._initializing = True\n"
                 "sys.modules['torch'] = torch\n"
                 "loader = types.ModuleType('torch.utils.data.dataloader')\n"
                 "loader.DataLoader = object\n"
                 "sys.modules['torch.utils.data.dataloader'] = loader\n"
                 "sys.modules['tgn.stopping'] = None  # would import torch again\n"
                 + script.split("\n", 1)[1])
    done = subprocess.run([sys.executable, "-c", cut_short], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_before_joining_only_local_rank_0_prints_what_every_process_finds(monkeypatch, capsys, local_rank):
    torchrun_variables(monkeypatch, local_rank)

    @cli_main
    def script(error):
        raise error

    refused = PermissionError(errno.EACCES, "Permission denied", "/shared/runs")  # the node's shared --out
    for error, everywhere in ((UserError("--data x: no such folder"), False), (ProcessError("its GPU"), True),
                              (refused, False)):
        with pytest.raises(SystemExit) as exit_info:
            script(error)
        assert exit_info.value.code == 2
        printed = capsys.readouterr().err
        if local_rank == "0":
            assert printed == ("error: /shared/runs: Permission denied\n" if error is refused else f"error: {error}\n")
        else:  # the other processes of the node stay quiet, unless the problem is their own
            assert printed == ("[local rank 1] error: its GPU\n" if everywhere else "")
    warning = one_line_warning("3 images listed twice", UserWarning, "data.py", 1)
    assert warning == ("warning: 3 images listed twice\n" if local_rank == "0" else "")


def test_another_process_starts_its_error_on_a_new_line_of_a_terminal(monkeypatch, capsys):
    """Rank 0's progress bar may be drawn on the shared terminal without its line ended."""
    torchrun_variables(monkeypatch, local_rank=1)

    @cli_main
    def script(argv):
        raise ProcessError("its GPU")

    for terminal in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        with pytest.raises(SystemExit):
            script()
        assert capsys.readouterr().err == ("\n" if terminal else "") + "[local rank 1] error: its GPU\n"


@pytest.mark.parametrize("script", ["UModel", "Classification"])
def test_a_bad_pretrained_file_is_refused_before_the_processes_join(script, split_dir, tmp_path, monkeypatch, capsys):
    """Read after joining, it was refused by every process, one line each."""
    def joined(device_name="auto"):
        raise AssertionError("joined before every input was checked")

    monkeypatch.setattr(dist, "init", joined)
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights")
    tiny = [*TINY[:4], "--pretrained", str(notes), *TINY[6:]]
    main, inputs = ((umodel_main, ["--split", str(split_dir)]) if script == "UModel"
                    else (cls_train_main, ["--data-root", str(split_dir.parent / "data")]))
    if script == "Classification":
        tiny = [*tiny[:2], *tiny[4:]]  # no --width: its --arch names it
    with pytest.raises(SystemExit) as exit_info:
        main([*inputs, "--out", str(tmp_path / "run"), *tiny, "--epochs", "1"])
    assert exit_info.value.code == 2
    assert str(notes) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def nan_on_rank_one(root):
    """From its 3rd step rank 1 alone gets a non-finite loss; losses are checked every 2 steps."""
    data = [(torch.full((3, 2, 2), float(i)), i % 2) for i in range(24)]
    loader = make_loader(data, 4, train=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = []

    def loss_fn(model, images, labels):
        steps.append(len(steps) + 1)
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        return (loss * float("nan") if dist.rank() == 1 and len(steps) >= 3 else loss), logits

    try:
        train_one_epoch(model, loader, optimizer, loss_fn, torch.device("cpu"), check_every=2)
        outcome = "finished"
    except UserError as exc:
        outcome = str(exc)
    (root / f"rank{dist.rank()}.json").write_text(json.dumps({"outcome": outcome, "steps": len(steps)}))


def test_a_non_finite_loss_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    run_in_processes(nan_on_rank_one, tmp_path)
    for rank in range(WORLD):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record == {"outcome": "the training loss became nan; lower --lr or check the data", "steps": 4}


def stop_cdtg_on_one_process(root, argv):
    """CDTG training where process 1 alone gets SIGTERM, during step 3 (a scheduler's or
    torchrun's signal reaches the processes at different moments)."""
    train_step = CdtgTrainer.train_step

    def signalled_step(trainer, *args):
        if dist.rank() == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(trainer, *args)

    CdtgTrainer.train_step = signalled_step  # this process's own class: it ends with the job
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        cdtg_train_main(argv)
    (root / f"stopped{dist.rank()}.json").write_text(json.dumps({"code": exit_info.value.code,
                                                                  "printed": printed.getvalue()}))


def test_a_signal_to_one_process_stops_all_after_the_same_step_with_a_checkpoint(cdtg_inputs):
    out = cdtg_inputs / "stopped"
    run_in_processes(stop_cdtg_on_one_process, cdtg_inputs, cdtg_args(cdtg_inputs, out, "--iter", "50"))
    rank0, rank1 = (json.loads((cdtg_inputs / f"stopped{r}.json").read_text()) for r in range(WORLD))
    assert rank0["code"] == rank1["code"] == 128 + signal.SIGTERM
    assert "terminated: saving step 3" in rank0["printed"] and rank1["printed"] == ""
    assert checkpoint_steps(out / "checkpoint") == [3]


def stop_a_resnet_trainer_on_one_process(split_dir, out):
    """UModel where process 1 alone gets SIGTERM during its 2nd training step of 3 in the
    first epoch; resumed, where it gets one during its first evaluation batch (process 0
    evaluates 2 batches, process 1 one); then resumed to the end, and the same run
    uninterrupted, by both processes."""
    from tgn import engine

    model_input = engine.model_input
    common = ["--split", str(split_dir), "--epochs", "2", *TINY]
    for name, training, batch in (("training", True, 2), ("evaluation", False, 1)):
        calls = []

        def signalled_input(images, *args):
            calls.append(torch.is_grad_enabled() == training)
            if dist.rank() == 1 and calls.count(True) == batch and calls[-1]:
                os.kill(os.getpid(), signal.SIGTERM)
            return model_input(images, *args)

        engine.model_input = signalled_input  # this process's own module: it ends with the job
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
            umodel_main([*common, "--out", str(out / "stopped"), "--resume"])
        engine.model_input = model_input
        (out / f"{name}{dist.rank()}.json").write_text(json.dumps({"code": exit_info.value.code,
                                                                  "printed": printed.getvalue()}))
    umodel_main([*common, "--out", str(out / "stopped"), "--resume"])
    umodel_main([*common, "--out", str(out / "straight")])


def test_a_signal_to_one_process_stops_a_resnet_trainer_mid_epoch_and_the_resume_is_exact(split_dir, tmp_path):
    run_in_processes(stop_a_resnet_trainer_on_one_process, split_dir, tmp_path)
    for name, steps in (("training", 2), ("evaluation", 3)):
        rank0, rank1 = (json.loads((tmp_path / f"{name}{r}.json").read_text()) for r in range(WORLD))
        assert rank0["code"] == rank1["code"] == 128 + signal.SIGTERM
        assert f"terminated: saving epoch 1 at step {steps}/3" in rank0["printed"] and rank1["printed"] == ""
    a, b = (load_checkpoint(tmp_path / run / "head" / "last.pth") for run in ("straight", "stopped"))
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert [line["epoch"] for line in read_metrics(tmp_path / "stopped" / "head" / "metrics.jsonl")] == [1, 2]


def run_cdtg_runs(runs, generation_argv):
    # --compile with the backend that traces as the default one but generates no code (see
    # test_compile.py); this process is the test's own, so the change ends with it.
    compile_model = torch.compile
    torch.compile = lambda model, **options: compile_model(model, backend="aot_eager", **options)
    for argv in runs:
        counters.clear()
        train_cdtg_saving_every_rank(argv)
    generation_main(generation_argv)


def test_cdtg_under_torchrun_matches_one_process(cdtg_inputs):
    root = cdtg_inputs
    ddp, single, ada = root / "ddp", root / "single", root / "ada"
    exact = ("--path-regularize", "0")  # its penalty centres on each process's mean: see below
    compiled = ["--compile"] if torch_version() >= COMPILE_SINCE else []  # refused on older torch releases
    train_cdtg_saving_every_rank(cdtg_args(root, single, *exact))
    generation = ["--ckpt", str(single / "checkpoint" / "3.pt"), "--per-class", "5", "--batch", "2", "--device", "cpu"]
    # The compiled run without style mixing: each crossover point compiles another graph, each
    # split again at DDP's buckets (test_compile.py bounds them in one process).
    run_in_processes(run_cdtg_runs, [cdtg_args(root, ddp, *exact), cdtg_args(
        root, ada, "--augment", "--ada-target", "-2", "--ada-every", "8", "--ada-length", "100", "--clip", "none",
        "--mixing", "0", *compiled)],
        [*generation, "--out", str(root / "gen_ddp")])
    generation_main([*generation, "--out", str(root / "gen_single")])
    # Generation split over the processes writes the images one process writes, and one anno.txt.
    single_files = sorted(p.relative_to(root / "gen_single") for p in (root / "gen_single").rglob("*.jpg"))
    assert len(single_files) == 15
    assert sorted(p.relative_to(root / "gen_ddp") for p in (root / "gen_ddp").rglob("*.jpg")) == single_files
    for relpath in single_files:
        assert (root / "gen_ddp" / relpath).read_bytes() == (root / "gen_single" / relpath).read_bytes()
    assert (root / "gen_ddp" / "anno.txt").read_text() == (root / "gen_single" / "anno.txt").read_text()
    for run in (ddp, ada):
        ranks = [torch.load(run / f"rank{r}.pt") for r in range(WORLD)]
        for part in ("g", "d", "g_ema", "fusion", "fusion_ema"):
            for key in ranks[0][part]:
                assert torch.equal(ranks[0][part][key], ranks[1][part][key]), (run.name, part, key)
        assert ranks[0]["ada_p"] == ranks[1]["ada_p"]
        assert (ranks[0]["compiled_graphs"] > 0) == (run == ada and bool(compiled))  # the ADA run is compiled
        assert ranks[0]["mean_path_length"] == ranks[1]["mean_path_length"]
        assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]  # rank 0 alone writes
    # ADA counts both processes' 4 real predictions: a window of 8 closes at every step.
    assert torch.load(ada / "rank0.pt")["ada_p"] == pytest.approx(3 * 8 / 100)
    # Same global batches, latents and noise, each process a strided share (so its 4 fakes
    # form the minibatch-stddev group one process forms from 8): the same training, up to
    # float sums. (With the path-length penalty, each process centres it on its own running
    # mean, as rosinality's does; that alone moved G by up to 4e-4 in 3 steps here.)
    if torch_version() < (2, 6):  # the checks above passed: what follows is known to fail there
        pytest.xfail("on torch 2.1.2 two processes drift from one process in 3 steps by 4e-6 to 2% of G's "
                     "change, as float rounding elsewhere changes (on 2.14.1 at most 0.2%); cause not found")
    # Compared as a whole, not weight by weight: Adam divides each gradient by its running
    # size, so a weight whose gradient is near zero moves by up to a learning rate on float
    # rounding alone (seen here: one weight of G got a gradient of 2e-8 from one process and
    # 4e-7 from two, and its first steps differed by 4e-4; G's whole change by 0.1%). On a
    # Xeon with AVX-512 G's change differed by 0.4%, the EMA copies' (smaller) by up to 1.9%;
    # other batches than one process's would differ by the whole change.
    a, b = load_cdtg_checkpoint(ddp / "checkpoint" / "3.pt"), load_cdtg_checkpoint(single / "checkpoint" / "3.pt")
    initial = torch.load(single / "rank0.pt")["initial"]
    for part in ("g", "d", "g_ema", "fusion", "fusion_ema"):
        keys = [key for key, value in b[part].items() if value.is_floating_point()]
        ddp_change, single_change = (torch.cat([(state[part][key] - initial[part][key]).flatten() for key in keys])
                                     for state in (a, b))
        assert (ddp_change - single_change).norm() < 0.05 * single_change.norm(), part
    ddp_metrics, single_metrics = read_metrics(ddp / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    for x, y in zip(ddp_metrics, single_metrics):
        for key in ("d", "g_adv", "cls", "clip"):
            assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-4), key


def test_a_resume_by_another_process_count_is_noted(tmp_path, monkeypatch, capsys):
    """Resuming on another number of GPUs is allowed, but it is not the run that kept its
    count (BatchNorm statistics, last batches, CDTG's groups): options.json records the
    count, and --resume says so."""
    from argparse import Namespace

    from tgn.run_folder import save_options
    from tgn.resume import check_resume

    args = Namespace(epochs=1, resume=True)
    save_options(tmp_path, args)  # one process
    assert json.loads((tmp_path / "options.json").read_text())["processes"] == 1
    check_resume(tmp_path, args, done=1)
    assert "note" not in capsys.readouterr().out
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # as torchrun starts process 0
        monkeypatch.setenv(name, value)
    check_resume(tmp_path, args, done=1)
    assert f"note: {tmp_path} was trained by 1 process(es) and resumes with 2" in capsys.readouterr().out


def test_what_resume_takes_is_said_once_per_job_before_joining(tmp_path, monkeypatch, capsys):
    """Before the processes join, the first process of the second node (RANK 2, LOCAL_RANK
    0) says what its node finds, but not what --resume takes from the run folder: rank 0
    says that, once for the job."""
    from tgn.cli import make_parser
    from tgn.resume import take_the_runs_flags

    parser = make_parser("doc")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--resume", action="store_true")
    (tmp_path / "options.json").write_text(json.dumps({"lr": 0.5, "resume": False}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank, local_rank, said in (("2", "0", False), ("0", "0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        args = parser.parse_args(["--resume"])
        assert take_the_runs_flags(args, tmp_path) == ["lr"] and args.lr == 0.5
        assert ("--resume: left out, as the run was started: --lr 0.5" in capsys.readouterr().out) == said
