"""Stopping the ResNet trainers between two steps: Ctrl-C or a scheduler's SIGTERM saves the
step the run finished, mid-epoch, and --resume continues exactly as the uninterrupted run."""
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from conftest import ROOT
from Classification.test import main as score_main
from Classification.train import main as train_main
from KMDN.dataset_split import main as split_main
from KMDN.Distill import main as distill_main
from KMDN.RModel import main as rmodel_main
from KMDN.UModel import main as umodel_main
from tgn import distributed as dist
from tgn import engine
from tgn.checkpoint import load_checkpoint
from tgn.sampling import EpochSampler
from tgn.stopping import EpochProgress, stop_between_steps

TINY = ["--image-size", "16", "--batch-size", "8", "--workers", "0"]
MODEL = ["--arch", "resnet18", "--width", "4", "--pretrained", "none"]
EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130}


@contextlib.contextmanager
def signal_at_batch(batch, signal_number, training=True):
    """This process receives `signal_number` while it trains (or evaluates) its `batch`-th
    batch, counted over the whole run: as from a scheduler or a Ctrl-C then."""
    calls = itertools.count(1)
    model_input = engine.model_input

    def sending(images, *args):
        if torch.is_grad_enabled() == training and next(calls) == batch:  # evaluation runs without gradients
            os.kill(os.getpid(), signal_number)
        return model_input(images, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "model_input", sending)
        yield


def stopped(main, argv, batch, signal_number, training=True):
    with signal_at_batch(batch, signal_number, training), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_STATUS[signal_number]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# The toy data's 37 training images in batches of 8: 5 steps an epoch; its 15 test images: 2.
# Training step 7 is the second epoch's second; step 5 the first epoch's last (before its
# evaluation); evaluation batch 3 is the second epoch's first (its training is done).
@pytest.mark.parametrize("batch, training, signal_number, sampler", [
    (7, True, signal.SIGTERM, "random"), (5, True, signal.SIGINT, "class-balanced"),
    (3, False, signal.SIGTERM, "random")])
def test_a_classifier_stopped_mid_epoch_resumes_as_the_uninterrupted_run(toy_data, tmp_path, capsys, batch, training,
                                                                         signal_number, sampler):
    common = ["--data-root", str(toy_data), "--milestones", "2", "--device", "cpu", "--arch", "resnet18",
              "--pretrained", "none", "--sampler", sampler, *TINY, "--epochs", "3"]
    stopped(train_main, [*common, "--out", str(tmp_path / "b")], batch, signal_number, training)
    state = load_checkpoint(tmp_path / "b" / "last.pth")
    epoch, steps = divmod(batch - 1, 5) if training else (batch // 2, 5)
    assert state["epoch"] == epoch - 1 and state["unfinished_epoch"]["epoch"] == epoch
    assert state["unfinished_epoch"]["steps"] == (steps + 1 if training else steps)
    steps = state["unfinished_epoch"]["steps"]
    assert f"saving epoch {epoch + 1} at step {steps}/5" in capsys.readouterr().out
    assert len(metrics(tmp_path / "b" / "metrics.jsonl")) == epoch  # the stopped epoch is not logged
    if batch == 7:  # test.py tells such a last.pth from a whole epoch's
        score_main(["--data-root", str(toy_data), "--ckpt", str(tmp_path / "b" / "last.pth"), "--out",
                   str(tmp_path / "report"), "--device", "cpu", "--workers", "0"])
        assert "stopped within epoch 2 (step 2): its weights are of no whole epoch" in capsys.readouterr().err
    if epoch:  # an --epochs that would leave the stopped epoch unfinished is refused
        with pytest.raises(SystemExit):
            train_main([*common[:-1], str(epoch), "--out", str(tmp_path / "b"), "--resume"])
        assert f"was stopped within epoch {epoch + 1}; pass --epochs {epoch + 1} or more" in capsys.readouterr().err

    train_main([*common, "--out", str(tmp_path / "b"), "--resume"])
    assert f"at epoch {epoch + 1}/3, after its step {steps}" in capsys.readouterr().out
    train_main([*common, "--out", str(tmp_path / "a")])
    a, b = load_checkpoint(tmp_path / "a" / "last.pth"), load_checkpoint(tmp_path / "b" / "last.pth")
    assert_same_state(a["state_dict"], b["state_dict"])
    for key in ("exp_avg", "exp_avg_sq"):
        for index, saved in a["optimizer"]["state"].items():
            assert torch.equal(saved[key], b["optimizer"]["state"][index][key])
    assert "unfinished_epoch" not in b
    straight, resumed = metrics(tmp_path / "a" / "metrics.jsonl"), metrics(tmp_path / "b" / "metrics.jsonl")
    assert [line["epoch"] for line in resumed] == [1, 2, 3]
    for one, other in zip(straight, resumed):  # the stopped epoch's loss and accuracy count all its steps
        assert {key: value for key, value in one.items() if key != "seconds"} == \
            {key: value for key, value in other.items() if key != "seconds"}


def test_distillation_stopped_in_its_first_student_epoch_resumes_without_redrawing_the_classifier(toy_data,
                                                                                                  tmp_path):
    """The first epoch a model learns draws its fc afresh: a resume within it must keep the
    fc the stopped run had trained."""
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    kmdn = tmp_path / "kmdn"
    for main in (umodel_main, rmodel_main):
        main(["--split", str(tmp_path / "split"), "--out", str(kmdn), "--epochs", "1", *MODEL, *TINY])
    common = ["--split", str(tmp_path / "split"), "--head-ckpt", str(kmdn / "head" / "best.pth"), "--tail-ckpt",
              str(kmdn / "tail" / "best.pth"), "--distill-interval", "1", *TINY, "--epochs", "2"]
    # Head classes hold 30 training images (4 steps): step 2 is within the head's first epoch.
    stopped(distill_main, [*common, "--out", str(tmp_path / "b")], 2, signal.SIGTERM)
    assert load_checkpoint(tmp_path / "b" / "distill" / "last.pth")["unfinished_epoch"]["steps"] == 2
    distill_main([*common, "--out", str(tmp_path / "b"), "--resume"])
    distill_main([*common, "--out", str(tmp_path / "a")])
    a = load_checkpoint(tmp_path / "a" / "distill" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "distill" / "last.pth")
    for group in ("head", "tail"):
        assert_same_state(a["models"][group], b["models"][group])


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_started_midway_leaves_out_the_batches_trained(monkeypatch, world):
    monkeypatch.setattr(dist, "world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        whole = EpochSampler(37, shuffle=True, seed=3, epoch=1, batch_size=8)
        rest = EpochSampler(37, shuffle=True, seed=3, epoch=0, batch_size=8)
        rest.set_epoch(1, start_batch=2)
        local = 8 // world
        assert list(rest) == list(whole)[2 * local:] and len(rest) == len(whole) - 2 * local
        rest.set_epoch(2)
        whole.set_epoch(2)
        assert list(rest) == list(whole)  # the next epoch is whole again


def test_evaluation_asks_to_stop_only_after_the_batches_every_process_has(monkeypatch):
    for world in (1, 2, 3):
        monkeypatch.setattr(dist, "world_size", lambda: world)
        for size in range(1, 20):
            for batch in range(1, 5):
                counts = []
                for rank in range(world):
                    monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
                    counts.append(-(-len(EpochSampler(size, shuffle=False)) // batch))
                assert EpochSampler(size, shuffle=False).fewest_batches(batch) == min(counts), (world, size, batch)


def test_an_epochs_training_accuracy_is_a_fraction_of_its_images():
    stats = EpochProgress(steps=2, total_steps=4, loss_sum=8.0, correct=12, seen=16).stats()
    assert stats == {"train_loss": 0.5, "train_accuracy": 0.75}
    assert EpochProgress(loss_sum=3.0, correct=1, seen=1).stats() == {"train_loss": 3.0, "train_accuracy": 1.0}
    assert EpochProgress().stats() == {"train_loss": 0.0, "train_accuracy": 0.0}  # stopped before its first step


def test_a_stopped_epoch_recorded_by_an_earlier_version_resumes():
    record = {"epoch": 2, "steps": 3, "loss_sum": 1.5, "correct": 7.0, "seen": 24, "seconds": 4.0}  # no total_steps
    progress = EpochProgress.saved({"unfinished_epoch": record}, 2)
    assert (progress.steps, progress.seen, progress.total_steps) == (3, 24, 0)
    assert EpochProgress.saved({"unfinished_epoch": record}, 3) == EpochProgress()  # of another epoch: a new one


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_between_steps() as stop_requested:
        assert stop_requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop_requested() == signal.SIGTERM  # a scheduler's stop is the one to exit with
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_sigterm_after_a_ctrl_c_still_waits_for_the_step():
    """Ctrl-C, then the scheduler's SIGTERM: not a second Ctrl-C; the run saves and ends as
    terminated."""
    with stop_between_steps() as stop_requested:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handlers run here
        except KeyboardInterrupt:  # (which would end the whole test session)
            pytest.fail("the SIGTERM stopped the step at once, as a second Ctrl-C does")
        assert stop_requested() == signal.SIGTERM


def test_outside_the_main_thread_no_handler_is_set():
    """Python sets signal handlers in the main thread only (a trainer run from a thread of a
    notebook or a test): the run goes on without stopping between steps."""
    found = []

    def train():
        with stop_between_steps() as stop_requested:
            found.append(stop_requested())

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=10)
    assert found == [None] and signal.getsignal(signal.SIGINT) is before


def test_under_torchrun_a_repeated_sigint_is_the_same_stop(monkeypatch):
    """pkill -INT or a scheduler's SIGINT to every process of a torchrun job reaches each
    directly and again through torchrun, which passes it on: the step is still finished and
    saved (torchrun kills its processes 30 s after it passed the signal on)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with stop_between_steps() as stop_requested:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here
        assert stop_requested() == signal.SIGINT


def test_a_stopped_epochs_progress_bar_ends_its_line_in_a_log(capsys):
    """In a log file (stderr not a terminal) the epoch's bar, cleared there, would leave its
    text without a line end: 'terminated: saving ...' or an error would be appended to it."""
    from tgn.engine import make_loader, train_one_epoch
    from tgn.stopping import Stopped

    dataset = torch.utils.data.TensorDataset(torch.zeros(8, 12), torch.zeros(8, dtype=torch.long))
    loader = make_loader(dataset, 4, train=True)
    model = torch.nn.Linear(12, 2)

    def loss_fn(net, images, targets):
        logits = net(images)
        return torch.nn.functional.cross_entropy(logits, targets), logits

    capsys.readouterr()
    with pytest.raises(Stopped):
        train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, torch.device("cpu"),
                        stop_requested=lambda: signal.SIGTERM, progress=EpochProgress())
    err = capsys.readouterr().err
    assert "train" in err and err.endswith("\n"), repr(err)


def test_an_error_after_a_progress_bar_starts_a_line_of_its_own_in_a_log(tmp_path, capsys):
    from data.prepare_folders import main as prepare_main
    from PIL import Image

    for name in ("plane", "ship"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for index in range(3):
            colour = (40 * index, 120 * (name == "ship"), 0)
            Image.new("RGB", (8, 8), colour).save(tmp_path / "src" / name / f"{index}.jpg")
    (tmp_path / "src" / "ship" / "2.jpg").write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        prepare_main(["--train-dir", str(tmp_path / "src"), "--test-fraction", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "checking images" in err
    assert any(line.startswith("error: cannot read image") for line in err.split("\n")), repr(err)


def test_an_error_while_data_workers_run_ends_the_run_with_them(toy_data, tmp_path):
    """An unreadable image stops a run whose DataLoader workers are running: one error line,
    and the workers end with the run. Before, they outlived Python's SIGTERM at exit by their
    60 s grace, and torch then reported their end as a second error."""
    bad = toy_data / "train" / "0" / "img 5.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    command = [sys.executable, str(ROOT / "KMDN" / "UModel.py"), "--split", str(tmp_path / "split"), "--out",
               str(tmp_path / "kmdn"), *MODEL, "--image-size", "16", "--batch-size", "4", "--workers", "2",
               "--epochs", "1"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=45)  # the workers' grace is 60 s
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and f"cannot read image {bad}" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_a_cluster_stopping_a_resnet_trainer_with_workers_gets_a_checkpoint_it_resumes_from(toy_data, tmp_path):
    """SIGTERM to every process of the job (the DataLoader's workers too), as Slurm sends it."""
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    out = tmp_path / "kmdn"
    command = [sys.executable, str(ROOT / "KMDN" / "UModel.py"), "--split", str(tmp_path / "split"), "--out",
               str(out), *MODEL, "--image-size", "16", "--batch-size", "4", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "--epochs", "100000"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "head" / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    output = "".join(process.communicate(timeout=60))
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "terminated: " in output and "Traceback" not in output
    state = load_checkpoint(out / "head" / "last.pth")
    epochs = state["epoch"] + 2  # the stopped epoch (or the next), then one more
    finished = subprocess.run([*command, "--epochs", str(epochs), "--resume"], env=env, capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [line["epoch"] for line in metrics(out / "head" / "metrics.jsonl")] == list(range(1, epochs + 1))


def test_an_epoch_stopped_twice_records_the_seconds_of_both_parts(tmp_path, monkeypatch):
    """A run stopped, resumed and stopped again in the same epoch saves the epoch's time so
    far including the part before the first stop, so the epoch's logged seconds are whole."""
    from tgn.checkpoint import load_checkpoint
    from tgn.stopping import EpochProgress, Stopped, saved_if_stopped

    clock = iter([1000.0, 1005.0])  # the resumed part runs 5 s
    monkeypatch.setattr("tgn.stopping.time", types.SimpleNamespace(time=lambda: next(clock)))  # this module's clock
    progress = EpochProgress(steps=3, total_steps=5, seconds=100.0)  # what the first stop saved
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C ends the process as "interrupted"
        with saved_if_stopped(progress, 2, lambda **extra: {"epoch": 1, **extra}, tmp_path / "last.pth"):
            raise Stopped(signal.SIGINT)
    saved = load_checkpoint(tmp_path / "last.pth")["unfinished_epoch"]
    assert saved["epoch"] == 2 and saved["steps"] == 3 and saved["seconds"] == 105.0


@pytest.mark.parametrize("main_process", [True, False])
def test_a_stop_is_saved_by_rank_0_before_any_process_ends(monkeypatch, capsys, main_process):
    """Rank 0 alone says it and saves; every process waits for the save, then ends as the
    signal would have."""
    from tgn import stopping
    from tgn.stopping import Stopped, saved_if_stopped, stop_if_requested

    events = []
    monkeypatch.setattr(stopping.dist, "is_main", lambda: main_process)
    monkeypatch.setattr(stopping.dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(stopping, "save_checkpoint", lambda path, state: events.append(("save", state)))
    progress = EpochProgress(steps=3, total_steps=5)
    with pytest.raises(SystemExit) as exit_info:
        with saved_if_stopped(progress, 2, lambda **extra: extra, "last.pth"):
            raise Stopped(signal.SIGTERM)
    assert exit_info.value.code == 128 + signal.SIGTERM
    saved = ("save", {"unfinished_epoch": progress.record(2)})
    assert events == ([saved, "barrier"] if main_process else ["barrier"])
    said = "terminated: saving epoch 3 at step 3/5\n"
    assert capsys.readouterr().out == (said if main_process else "")

    events.clear()
    stop_if_requested(lambda: None, 2)  # no signal: nothing
    assert events == [] and capsys.readouterr().out == ""
    with pytest.raises(KeyboardInterrupt):
        stop_if_requested(lambda: signal.SIGINT, 2)
    assert events == ["barrier"]
    assert capsys.readouterr().out == ("interrupted: epoch 3 is saved\n" if main_process else "")


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks (Windows)")
def test_signals_held_while_workers_start_reach_the_trainer_afterwards():
    """Ctrl-C and SIGTERM, held while DataLoader workers start, are delivered again once
    they have started: the trainer's signal mask is back as it was, and a SIGTERM sent
    meanwhile then reaches its handler (the run can still be stopped and saved)."""
    from tgn.errors import signals_held

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        with signals_held():
            # To this thread: a signal to the process may go to another thread that does not hold it.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            assert received == [] and signal.SIGTERM in signal.sigpending()  # held
        time.sleep(0.05)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        assert received == [signal.SIGTERM]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        signal.signal(signal.SIGTERM, previous)


def test_a_spawned_worker_warns_in_one_line_as_the_script_does():
    """Spawned workers (macOS, Windows) start without the script's setup: a warning in one
    (an unusual image's, from PIL) printed PIL's file, line and source line there, and a
    class name its console cannot show would have been an encoding error."""
    code = ("import sys, warnings; sys.path.insert(0, sys.argv[1]); "
            "from tgn.stopping import leave_signals_to_the_trainer; leave_signals_to_the_trainer(0); "
            "warnings.warn('Palette images with Transparency expressed in bytes should be converted'); "
            "print('\u6e2f\u53e3')")
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert run.returncode == 0 and run.stderr == ("warning: Palette images with Transparency expressed in bytes "
                                                  "should be converted\n")
    assert run.stdout == "\\u6e2f\\u53e3\n"


class StuckInARead(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        time.sleep(3600)  # a read from a file system that stopped answering


def test_a_worker_stuck_in_a_read_is_killed_when_the_run_ends(monkeypatch):
    """It outlives torch's SIGTERM (leave_signals_to_the_trainer's grace): the run would
    hang after its error line until the grace ran out."""
    from torch.utils.data import _utils as loader_utils

    from tgn.stopping import end_worker_processes, leave_signals_to_the_trainer

    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)  # torch's waits for its workers
    loader = torch.utils.data.DataLoader(StuckInARead(), num_workers=1, worker_init_fn=leave_signals_to_the_trainer)
    batches = iter(loader)  # the worker starts its first read
    workers = list(batches._workers)
    time.sleep(0.5)
    end_worker_processes()
    assert not any(worker.is_alive() for worker in workers)
    del batches


SCRIPTS_IMPORTING_TORCH = ("KMDN/UModel.py", "KMDN/RModel.py", "KMDN/Distill.py", "CDTG/dataset_split.py",
                           "CDTG/train.py", "CDTG/generation.py", "CDTG/evaluate.py", "Classification/train.py",
                           "Classification/test.py")


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks (Windows)")
def test_a_ctrl_c_during_torchs_import_is_not_swallowed():
    """A library swallows a KeyboardInterrupt raised within its import (a Ctrl-C about half a
    second into a run was lost: the run went on). The scripts import torch with Ctrl-C held,
    so it comes after the import, to the script."""
    import ast

    swallowing_import = ("import os, signal, sys; sys.path.insert(0, sys.argv[1])\n"
                         "from tgn.errors import cli_main, signals_held\n"
                         "@cli_main\n"
                         "def main(argv):\n"
                         "    with signals_held():\n"
                         "        try:  # what a library's import did\n"
                         "            os.kill(os.getpid(), signal.SIGINT)\n"
                         "            for _ in range(10 ** 6): pass\n"
                         "        except KeyboardInterrupt:\n"
                         "            pass\n"
                         "    print('went on')\n"
                         "main(None)\n")
    run = subprocess.run([sys.executable, "-c", swallowing_import, str(ROOT)], capture_output=True, text=True,
                         timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (130, "", "interrupted\n")
    for script in SCRIPTS_IMPORTING_TORCH:
        main = next(node for node in ast.parse((ROOT / script).read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "main")
        held = [node for node in ast.walk(main) if isinstance(node, ast.With)
                and ast.unparse(node.items[0].context_expr) == "signals_held()"]
        assert held and any(isinstance(inner, ast.ImportFrom) for inner in held[0].body), script
