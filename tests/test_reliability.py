"""Reliability: killed runs leave loadable files and resume; bad input gets one line, exit 2,
and no output; resumed runs equal uninterrupted ones."""
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_dataset
from KMDN.dataset_split import main as split_main
from KMDN.Distill import main as distill_main
from KMDN.RModel import main as rmodel_main
from KMDN.UModel import main as umodel_main
from tgn.checkpoint import load_checkpoint
from tgn.errors import UserError
from tgn.io import append_jsonl, atomic_torch_save, atomic_write_json, trim_jsonl

TINY = ["--arch", "resnet18", "--width", "4", "--pretrained", "none", "--image-size", "16", "--batch-size", "8",
        "--workers", "0"]


def expect_user_error(capsys, run, fragment):
    """The run exits with status 2 and one stderr line containing `fragment`."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], lines


# ----- killed while saving -------------------------------------------------------------------

def test_sigkill_at_any_moment_leaves_loadable_checkpoints_and_resume_finishes(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    command = [sys.executable, str(ROOT / "KMDN" / "UModel.py"), "--split", str(split_dir), "--out", str(out),
               "--epochs", "40", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = out / "head" / "metrics.jsonl"

    def last_logged():
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return json.loads(lines[-1])["epoch"] if lines else 0

    rng = random.Random(0)
    for _ in range(3):
        logged = last_logged()
        process = subprocess.Popen([*command, "--resume"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        checkpoint = out / "head" / "last.pth"
        while (last_logged() <= logged or not checkpoint.is_file()) and process.poll() is None \
                and time.time() < deadline:
            time.sleep(0.02)  # an epoch ended and a checkpoint exists: kill anywhere after (even mid-save)
        time.sleep(rng.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert (out / "head" / "last.pth").is_file()  # the kills came after a checkpoint existed
        for path in (out / "head").glob("*.pth"):
            load_checkpoint(path)  # never truncated
    finished = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-500:]
    assert load_checkpoint(out / "head" / "last.pth")["epoch"] == 39
    epochs = [json.loads(line)["epoch"] for line in (out / "head" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 41))  # nothing logged twice, nothing missing


def test_resume_keeps_the_runs_flags(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    common = ["--split", str(split_dir), "--out", str(out), *TINY]
    umodel_main([*common, "--epochs", "2", "--resume"])  # nothing to resume yet: a new run, said so
    assert f"note: nothing to resume in {out / 'head'}: starting a new run" in capsys.readouterr().out
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "3", "--resume", "--image-size", "32"]),
                      "was started with --image-size 16, this call has --image-size 32; resume with the flags")
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "3", "--resume", "--lr", "0.01",
                                                   "--seed", "1"]), "--lr 0.001, --seed 0, this call has --lr 0.01")
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "1", "--resume"]),
                      "has already trained 2 epochs; --epochs 1 is fewer")
    assert json.loads((out / "head" / "options.json").read_text())["epochs"] == 2  # the refusals wrote nothing
    # How it runs and how long may change: more epochs, another device setting, workers.
    umodel_main([*common, "--epochs", "3", "--resume", "--workers", "1", "--amp", "off"])
    epochs = [json.loads(line)["epoch"] for line in (out / "head" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    (out / "head" / "options.json").unlink()  # the flags are also in the checkpoint
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "4", "--resume", "--image-size", "32"]),
                      "was started with --image-size 16, this call has --image-size 32; resume with the flags")
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "4", "--resume", "--milestones", "2", "3"]),
                      "was started with --milestones 30 60 90 120 150 180, this call has --milestones 2 3")


def test_milestone_0_is_refused_for_a_new_run_but_a_run_started_with_it_resumes(split_dir, tmp_path, capsys):
    """It divides --lr from the first epoch; earlier versions took it (their demo passed it)."""
    out = tmp_path / "kmdn"
    common = ["--split", str(split_dir), "--out", str(out), *TINY, "--milestones", "0"]
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "1"]),
                      "--milestones 0 divides --lr by 10 from the first epoch: pass a lower --lr instead")
    assert not out.exists()
    umodel_main([*common, "--epochs", "1", "--resume"])  # nothing to resume: a new run, as an earlier version's
    umodel_main([*common, "--epochs", "2", "--resume"])
    lrs = [json.loads(line)["lr"] for line in (out / "head" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-4, 1e-4]


def test_distill_resumes_with_the_flags_of_its_checkpoint_when_options_json_is_gone(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    run = ["--split", str(split_dir), "--out", str(out), "--batch-size", "8", "--workers", "0"]
    distill_main([*run, "--epochs", "1"])
    (out / "distill" / "options.json").unlink()
    expect_user_error(capsys, lambda: distill_main([*run, "--epochs", "2", "--resume", "--alpha", "0.9"]),
                      "was started with --alpha 0.2, this call has --alpha 0.9")


def test_resume_reads_no_pretrained_weights(split_dir, tmp_path):
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    common = ["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), *TINY, "--width", "64", "--pretrained",
              str(weights)]
    umodel_main([*common, "--epochs", "1"])
    weights.unlink()  # its run's checkpoint holds what it gave
    umodel_main([*common[:-1], "imagenet", "--epochs", "2", "--resume"])  # --pretrained may change: not read
    assert load_checkpoint(tmp_path / "kmdn" / "head" / "last.pth")["epoch"] == 1
    # The run's record still says what it started from.
    assert json.loads((tmp_path / "kmdn" / "head" / "options.json").read_text())["pretrained"] == str(weights)


def test_lines_of_a_run_killed_before_its_first_checkpoint_are_dropped(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    (out / "head").mkdir(parents=True)
    (out / "head" / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 9}\n')  # no last.pth was written
    umodel_main(["--split", str(split_dir), "--out", str(out), *TINY, "--epochs", "1"])
    lines = (out / "head" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["train_loss"] != 9


class FullDisk:
    """A file whose writes fail with ENOSPC past `room` bytes, as a full disk's do."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_save_waits_while_windows_refuses_to_replace_a_file_another_program_has_open(tmp_path, monkeypatch):
    import tgn.io

    path = tmp_path / "best.pth"
    atomic_torch_save(path, {"version": 1})
    replace, refusals = os.replace, []

    def refused_twice(source, target):  # test.py loading best.pth, or a virus scanner reading it
        if len(refusals) < 2:
            refusals.append(target)
            raise PermissionError(errno.EACCES, "Access is denied")
        return replace(source, target)

    monkeypatch.setattr(tgn.io.os, "replace", refused_twice)
    monkeypatch.setattr(tgn.io, "REPLACE_RETRIES_S", (0.01, 0.01, 0.01))  # Windows' waits
    atomic_torch_save(path, {"version": 2})
    assert len(refusals) == 2 and load_checkpoint(path) == {"version": 2}
    refusals.clear()
    monkeypatch.setattr(tgn.io, "REPLACE_RETRIES_S", ())  # elsewhere such a refusal is for good: one line
    with pytest.raises(UserError, match=r"cannot write .*best.pth: Access is denied$"):
        atomic_torch_save(path, {"version": 3})
    assert load_checkpoint(path) == {"version": 2} and [p.name for p in tmp_path.iterdir()] == ["best.pth"]


@pytest.mark.parametrize("writer", ["torch.save", "an OSError"])
def test_disk_full_while_saving_keeps_the_old_file(tmp_path, monkeypatch, writer):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save(path, {"version": 1})
    if writer == "torch.save":  # its zip writer reports the OSError as a RuntimeError ("unexpected pos")
        fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FullDisk(fdopen(*args, **kwargs), 4096))
    else:
        def full_disk(obj, handle):
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"cannot write .*ckpt.pth: No space left on device$"):
        atomic_torch_save(path, {"version": 2, "weights": torch.zeros(10_000)})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # the temporary file is gone


def test_ctrl_c_while_saving_is_an_interruption_and_leaves_no_temp_file(tmp_path, monkeypatch):
    class Interrupted(FullDisk):
        def write(self, data):
            self.room -= len(data)
            if self.room < 0:
                raise KeyboardInterrupt  # the signal lands in the middle of torch.save's writes
            return self.handle.write(data)

    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: Interrupted(fdopen(*args, **kwargs), 4096))
    with pytest.raises(KeyboardInterrupt):  # not torch's RuntimeError ("unexpected pos"): cli_main's exit 130
        atomic_torch_save(tmp_path / "ckpt.pth", {"weights": torch.zeros(10_000)})
    assert not list(tmp_path.iterdir())


def test_what_the_system_refuses_anywhere_is_one_line_and_other_os_errors_are_not_hidden(capsys):
    """A write refused by permissions or a full disk, wherever a script makes it, names the
    file in one line; an OSError that is not the system's refusal stays a traceback (a bug)."""
    from tgn.errors import cli_main

    @cli_main
    def script(error):
        raise error

    for error, line in ((PermissionError(errno.EACCES, "Permission denied", "/ro/.preparing"),
                         "error: /ro/.preparing: Permission denied\n"),
                        (OSError(errno.ENOSPC, "No space left on device"), "error: [Errno 28] No space left on device\n")):
        with pytest.raises(SystemExit) as exit_info:
            script(error)
        assert exit_info.value.code == 2 and capsys.readouterr().err == line
    with pytest.raises(FileNotFoundError):
        script(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"))


def test_an_error_exit_survives_a_loader_that_failed_while_starting_its_workers(tmp_path, capsys):
    """Its iterator, half made (fork refused a worker), is found among the ones to shut down:
    that failed with an AttributeError that hid the error, and the run folder stayed held."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    from tgn.errors import cli_main
    from tgn.runlock import claim_folder

    half_made = []

    @cli_main
    def script(_argv):
        claim_folder(tmp_path / "run")
        half_made.append(_MultiProcessingDataLoaderIter.__new__(_MultiProcessingDataLoaderIter))
        raise UserError("fork: Resource temporarily unavailable")

    with pytest.raises(SystemExit) as exit_info:
        script(None)
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: fork: Resource")
    from tgn import runlock

    assert not runlock._held  # the folder was released
    half_made[0]._shutdown = True  # nothing for its __del__ to shut down


def test_temp_files_of_a_run_killed_mid_save_are_removed(split_dir, tmp_path):
    common = ["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), *TINY]
    umodel_main([*common, "--epochs", "1"])
    head = tmp_path / "kmdn" / "head"
    left = head / ".best.pth.4vxlalbe.tmp"  # as SIGKILL leaves it
    left.write_bytes(b"half a checkpoint")
    kept = [head / ".notes.tmp",  # not a temp file of ours
            head / "other-run" / ".last.pth.x1_y2.tmp"]  # another job's save in progress, below this folder
    kept[1].parent.mkdir()
    for path in kept:
        path.write_text("not this run's")
    umodel_main([*common, "--epochs", "2", "--resume"])
    assert not left.exists() and all(path.exists() for path in kept)


def test_the_splits_and_the_comparison_remove_what_a_killed_run_of_theirs_left(toy_data, tmp_path):
    from CDTG.dataset_split import main as cdtg_split_main
    from Classification.compare import main as compare_main
    from Classification.report import build_report, write_report

    split, tail_data, table = tmp_path / "split", tmp_path / "tail", tmp_path / "table"
    left = [split / ".split.json.k1ll3d.tmp", tail_data / ".tail_classes.json.k1ll3d.tmp",
            table / ".comparison.md.k1ll3d.tmp"]
    for path in left:
        path.parent.mkdir()
        path.write_text("half a file")
    split_main(["--data-root", str(toy_data), "--out", str(split)])
    cdtg_split_main(["--split", str(split), "--out", str(tail_data)])
    report = build_report(np.eye(2, dtype=int), method="m", source="m.pth", dataset="TOY", class_ids=[0, 1],
                          class_names=["a", "b"], train_counts=[2, 1], generated_counts=None, head=[0], tail=[1],
                          grouping="hand")
    write_report(report, tmp_path / "report")
    compare_main([str(tmp_path / "report"), "--out", str(table)])
    assert not any(path.exists() for path in left)


HOLD = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from tgn.runlock import claim_folder, refuse_folder_in_use
if sys.argv[3] == "checking":  # a run still checking its inputs holds an existing lock
    refuse_folder_in_use(sys.argv[2])
else:
    claim_folder(sys.argv[2])
worker = os.fork() if sys.argv[3] == "fork" else None  # as a DataLoader starts its workers
if worker != 0:
    print(worker, flush=True)
time.sleep(600)
"""


def hold_folder(folder, how="-"):
    """Another process holding `folder` for its run, as a running stage does; `how`: "fork"
    (it has a forked child, whose pid is holder.worker) or "checking" (it holds the lock file
    an earlier run left, as a run does while it checks its inputs)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(folder), how],
                              stdout=subprocess.PIPE, text=True)
    worker = holder.stdout.readline().strip()
    assert worker, f"{folder} could not be held"
    holder.worker = None if worker == "None" else int(worker)
    return holder


def test_a_folder_another_run_writes_to_is_refused_until_it_ends(cdtg_inputs, tmp_path, capsys):
    """A command started twice, or a cluster job requeued while the first still runs: the
    second must neither train into the first's folder nor --overwrite its results."""
    from CDTG.train import main as cdtg_train_main
    from test_cdtg_training import tiny_train_args

    common = ["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"), *TINY, "--epochs", "1"]
    umodel_main(common)
    head = tmp_path / "kmdn" / "head"
    before = {path.name: path.read_bytes() for path in head.iterdir()}
    holder = hold_folder(head, "checking")  # the lock file names the run above until the holder names itself
    try:
        for flag in ("--overwrite", "--resume"):
            expect_user_error(capsys, lambda: umodel_main([*common, flag]),
                              f"--out {head} is in use by another run (pid {holder.pid} on ")
        assert {path.name: path.read_bytes() for path in head.iterdir() if path.name != ".lock"} == \
            {name: data for name, data in before.items() if name != ".lock"}
        rmodel_main(common)  # the same --out, another group's folder: free
        # Distill started before UModel ends: its best.pth may yet change, which is said.
        with pytest.warns(UserWarning, match=f"the head model {head / 'best.pth'} is in the folder of a run still "
                                             f"going \\(pid {holder.pid} on "):
            distill_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"), "--batch-size", "8",
                          "--workers", "0", "--epochs", "1"])
        gan = cdtg_inputs / "gan"
        gan.mkdir()
        killed = hold_folder(gan, "fork")
        killed.kill()  # a run killed outright leaves no lock behind, though its workers still wind down
        killed.wait()
        try:
            holder_of_gan = hold_folder(gan)  # at once
        finally:
            os.kill(killed.worker, signal.SIGKILL)
        expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, gan, "--iter", "1")),
                          f"is in use by another run (pid {holder_of_gan.pid} on ")
        holder_of_gan.kill()
        holder_of_gan.wait()
        cdtg_train_main(tiny_train_args(cdtg_inputs, gan, "--iter", "1", "--clip", "none"))
    finally:
        holder.kill()
        holder.wait()
    umodel_main([*common, "--overwrite"])  # free again once the other run has ended
    assert (head / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    from tgn.runlock import claim_folder, release_folders, running_run
    assert running_run(head) is None and running_run(tmp_path / "kmdn" / "distill") is None
    # This process's own folder, under another spelling: probing it must not let go of its lock.
    claim_folder(head)
    (tmp_path / "alias").symlink_to(tmp_path / "kmdn")
    try:
        assert running_run(tmp_path / "alias" / "head") is None and hold_folder_fails(head)
    finally:
        release_folders()


def test_a_lock_file_of_another_user_still_refuses_a_second_run(tmp_path, monkeypatch):
    """In a folder shared by several users, the lock file is its maker's: another user may
    only read it, and must still be refused while the first run holds it."""
    from tgn import runlock

    holder = hold_folder(tmp_path)
    opened = []
    real_open = runlock.os.open

    def as_another_user(path, flags, *args):
        if Path(path).name == runlock.LOCK_NAME and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied")
        opened.append(flags)
        return real_open(path, flags, *args)

    monkeypatch.setattr(runlock.os, "open", as_another_user)
    try:
        with pytest.raises(UserError, match=f"is in use by another run \\(pid {holder.pid} on "):
            runlock.claim_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert opened == [os.O_RDONLY]
    runlock.claim_folder(tmp_path)  # the run has ended: free, and this one now holds it
    try:
        assert hold_folder_fails(tmp_path)
    finally:
        runlock.release_folders()


def test_a_split_into_a_folder_another_split_writes_is_refused_and_leaves_its_files(toy_data, tmp_path, capsys):
    """Each split removes the temp files a killed split left: a second one at once would
    remove the first's files mid-write."""
    from CDTG.dataset_split import main as cdtg_split_main

    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    for folder, run in ((tmp_path / "split", lambda: split_main(["--data-root", str(toy_data), "--out",
                                                                   str(tmp_path / "split"), "--overwrite"])),
                        (tmp_path / "tail", lambda: cdtg_split_main(["--split", str(tmp_path / "split"), "--out",
                                                                      str(tmp_path / "tail")]))):
        folder.mkdir(exist_ok=True)
        writing = folder / ".split.json.wr1t1ng.tmp"  # the other split's file, half written
        writing.write_text("half a file")
        holder = hold_folder(folder)
        try:
            expect_user_error(capsys, run, f"--out {folder} is in use by another run (pid {holder.pid} on ")
        finally:
            holder.kill()
            holder.wait()
        assert writing.exists()


def hold_folder_fails(folder):
    process = subprocess.run([sys.executable, "-c", HOLD, str(ROOT), str(folder), "-"], capture_output=True,
                             text=True, timeout=60)
    return process.returncode != 0 and "is in use by another run" in process.stderr


def test_a_folder_that_cannot_be_written_is_one_line(split_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"cannot write .*x.json: Read-only file system$"):
        atomic_write_json(tmp_path / "x.json", {})
    monkeypatch.undo()
    # A run folder that cannot be created (here in /proc; a read-only mount does the same).
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", "/proc/tgn-no-such-run",
                                                   *TINY, "--epochs", "1"]),
                      "--out /proc/tgn-no-such-run/head: cannot create it")


def test_a_last_checkpoint_that_cannot_resume_is_one_line(split_dir, tmp_path, capsys):
    common = ["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), *TINY]
    umodel_main([*common, "--epochs", "1"])
    head = tmp_path / "kmdn" / "head"
    (head / "last.pth").write_bytes((head / "best.pth").read_bytes())  # best.pth keeps no optimizer state
    expect_user_error(capsys, lambda: umodel_main([*common, "--epochs", "2", "--resume"]),
                      "it holds no 'optimizer' to resume from: a copy of best.pth")


# ----- generated images: a batch reaches its names once on disk, whole or not at all -------------

def jpeg_batch(count):
    return np.random.default_rng(0).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)


def test_generated_images_are_flushed_before_they_get_their_names(tmp_path, monkeypatch):
    import tgn.io
    from CDTG.generated_folder import JpegWriter

    seen = []

    def syncfs(fd):  # the images that have their names when a batch is flushed
        seen.append((sorted(p.name for p in (tmp_path / "3").iterdir() if not p.name.startswith(".")),
                     os.fstat(fd).st_ino))
        return 0

    monkeypatch.setattr(tgn.io, "SYNCFS", syncfs)
    fsyncs = []  # of files; the folder's own sync follows the renames
    monkeypatch.setattr(os, "fsync", lambda fd: None if stat.S_ISDIR(os.fstat(fd).st_mode) else fsyncs.append(fd))
    with JpegWriter(workers=3, quality=90) as writer:
        writer.submit(tmp_path / "3", [0, 1, 2, 3], jpeg_batch(4))
        writer.submit(tmp_path / "3", [4, 5], jpeg_batch(2))
    folder_inode = os.stat(tmp_path / "3").st_ino
    names = [f"gen_{i:06d}.jpg" for i in range(6)]
    # Before any rename: one flush for both batches, or one each (the second written after the
    # first was flushed), each before its batch's renames.
    assert seen in ([([], folder_inode)], [([], folder_inode), (names[:4], folder_inode)])
    assert not fsyncs  # not one per image
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == names


def test_batches_written_while_the_oldest_is_still_written_share_its_flush(tmp_path, monkeypatch):
    import tgn.io
    from CDTG.generated_folder import JpegWriter

    flushes = []
    monkeypatch.setattr(tgn.io, "SYNCFS", lambda fd: flushes.append(sorted(os.listdir(tmp_path))) or 0)
    writer = JpegWriter(workers=3, quality=90, max_pending=3)
    release, original = threading.Event(), writer._write

    def first_image_waits(path, pixels):
        if path.name == "gen_000000.jpg":
            release.wait()
        return original(path, pixels)

    monkeypatch.setattr(writer, "_write", first_image_waits)
    jobs, submit = [], writer.pool.submit
    monkeypatch.setattr(writer.pool, "submit", lambda *args: jobs.append(submit(*args)) or jobs[-1])
    with writer:
        try:
            for index in range(3):  # three batches of one image
                writer.submit(tmp_path, [index], jpeg_batch(1))
            wait(jobs[1:], timeout=10)
            assert all(job.done() for job in jobs[1:]) and not flushes
        finally:
            release.set()  # a failure must not leave the writer waiting forever
    assert len(flushes) == 1 and not any(name.startswith("gen_") for name in flushes[0])  # before the renames
    assert sorted(os.listdir(tmp_path)) == [f"gen_{i:06d}.jpg" for i in range(3)]


def test_without_syncfs_each_generated_image_is_fsynced(tmp_path, monkeypatch):
    import tgn.io
    from CDTG.generated_folder import JpegWriter

    monkeypatch.setattr(tgn.io, "SYNCFS", None)  # not Linux
    fsyncs, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    with JpegWriter(workers=2, quality=90) as writer:
        writer.submit(tmp_path, [0, 1, 2], jpeg_batch(3))
    assert fsyncs == [False] * 3 + [True]  # each image, then the folder once for their renames
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gen_{i:06d}.jpg" for i in range(3)]


@pytest.mark.parametrize("failure", ["an image", "the flush"])
def test_a_failed_batch_leaves_none_of_its_images(tmp_path, monkeypatch, failure):
    import tgn.io
    from CDTG.generated_folder import JpegWriter

    monkeypatch.setattr(tgn.io, "SYNCFS", lambda fd: ctypes.set_errno(errno.EIO) or -1 if failure == "the flush" else 0)
    writer = JpegWriter(workers=2, quality=90)
    if failure == "an image":
        original = writer._write

        def full_disk_at_image_2(path, pixels):
            if path.name == "gen_000002.jpg":
                raise UserError(f"cannot write {path}: No space left on device")
            return original(path, pixels)

        monkeypatch.setattr(writer, "_write", full_disk_at_image_2)
    expected = "No space left on device" if failure == "an image" else "cannot write into .*: Input/output error"
    with pytest.raises(UserError, match=expected):
        with writer:
            writer.submit(tmp_path, [0, 1, 2, 3], jpeg_batch(4))
    assert list(tmp_path.iterdir()) == []  # no image of the batch, no temp file


def test_a_ctrl_c_inside_submit_neither_hangs_the_writer_nor_loses_the_batch(tmp_path):
    """Ctrl-C between queueing a batch and queueing its publishing call: leaving the writer
    still publishes that batch instead of waiting for it forever."""
    from CDTG.generated_folder import JpegWriter

    def scenario():
        writer = JpegWriter(workers=2, quality=90)
        calls, submit = [], writer.publisher.submit

        def interrupted_second_call(fn):
            calls.append(fn)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return submit(fn)

        writer.publisher.submit = interrupted_second_call
        with pytest.raises(KeyboardInterrupt):
            with writer:
                writer.submit(tmp_path, [0, 1], jpeg_batch(2))
                writer.submit(tmp_path, [2, 3], jpeg_batch(2))

    thread = threading.Thread(target=scenario, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the writer waits for a batch nobody publishes"
    assert sorted(os.listdir(tmp_path)) == [f"gen_{i:06d}.jpg" for i in range(4)]


def test_a_ctrl_c_is_reported_rather_than_a_later_batchs_error(tmp_path, monkeypatch):
    from CDTG.generated_folder import JpegWriter

    writer = JpegWriter(workers=2, quality=90)

    def full_disk(path, pixels):
        raise UserError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(writer, "_write", full_disk)
    with pytest.raises(KeyboardInterrupt):
        with writer:
            writer.submit(tmp_path, [0, 1], jpeg_batch(2))
            raise KeyboardInterrupt  # while the batch is still being written
    assert os.listdir(tmp_path) == []


def test_a_failed_rename_leaves_no_temp_file_of_the_files_after_it(tmp_path, monkeypatch):
    import tgn.io

    pending = [tgn.io.write_pending(tmp_path / f"{name}.jpg", lambda handle: handle.write(b"x")) for name in "abc"]
    rename = tgn.io._rename_into_place

    def refuse_b(tmp, path):
        if path.name == "b.jpg":
            Path(tmp).unlink()
            raise UserError(f"cannot write {path}: Permission denied")
        rename(tmp, path)

    monkeypatch.setattr(tgn.io, "_rename_into_place", refuse_b)
    with pytest.raises(UserError, match="Permission denied"):
        tgn.io.publish(pending)
    assert os.listdir(tmp_path) == ["a.jpg"]


def test_trim_jsonl_drops_later_and_half_written_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epo')
    trim_jsonl(path, "epoch", 2)
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'



def test_logs_and_json_files_hold_strict_json_without_nan(tmp_path):
    """A class with no test images has accuracy NaN: written as null, which strict readers
    (jq, JavaScript) accept; Python's default would write the token NaN."""
    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in JSON"))

    record = {"epoch": 1, "per_class_accuracy": [1.0, float("nan")], "nested": {"loss": float("inf")}}
    append_jsonl(tmp_path / "metrics.jsonl", record)
    atomic_write_json(tmp_path / "summary.json", record)
    expected = {"epoch": 1, "per_class_accuracy": [1.0, None], "nested": {"loss": None}}
    assert strict((tmp_path / "metrics.jsonl").read_text()) == expected
    assert strict((tmp_path / "summary.json").read_text()) == expected

# ----- exact resume ----------------------------------------------------------------------------

def test_distillation_resume_equals_uninterrupted_run(split_dir, tmp_path):
    kmdn = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(kmdn), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(kmdn), "--epochs", "1", *TINY])
    common = ["--split", str(split_dir), "--head-ckpt", str(kmdn / "head" / "best.pth"), "--tail-ckpt",
              str(kmdn / "tail" / "best.pth"), "--distill-interval", "1", "--image-size", "16", "--batch-size", "8",
              "--workers", "0"]
    distill_main([*common, "--out", str(tmp_path / "a"), "--epochs", "3"])
    distill_main([*common, "--out", str(tmp_path / "b"), "--epochs", "2"])
    distill_main([*common, "--out", str(tmp_path / "b"), "--epochs", "3", "--resume"])
    a = load_checkpoint(tmp_path / "a" / "distill" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "distill" / "last.pth")
    for group in ("head", "tail"):
        for key, value in a["models"][group].items():
            assert torch.equal(value, b["models"][group][key]), (group, key)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="fp16 on CPUs needs the loss scaler of torch 2.3")
def test_a_resumed_fp16_distillation_continues_with_its_students_saved_loss_scale(split_dir, tmp_path):
    """As for the other trainers: the student's fp16 loss scale comes back with --resume
    (set to 1024 by hand), not 65536 again."""
    kmdn = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(kmdn), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(kmdn), "--epochs", "1", *TINY])
    run = ["--split", str(split_dir), "--out", str(kmdn), "--distill-interval", "2", "--image-size", "16",
           "--batch-size", "8", "--workers", "0", "--amp", "fp16"]
    distill_main([*run, "--epochs", "1"])
    last = kmdn / "distill" / "last.pth"
    state = load_checkpoint(last)
    assert set(state["scalers"]) == {"head", "tail"}
    for scaler in state["scalers"].values():
        scaler["scale"] = 1024.0
    atomic_torch_save(last, state)
    distill_main([*run, "--epochs", "2", "--resume"])  # the same student as in the first epoch
    assert all(scaler["scale"] <= 1024.0 for scaler in load_checkpoint(last)["scalers"].values())


def test_distillation_resumes_only_on_the_data_it_started_with(toy_data, split_dir, tmp_path, capsys):
    kmdn = tmp_path / "kmdn"
    for main in (umodel_main, rmodel_main):
        main(["--split", str(split_dir), "--out", str(kmdn), "--epochs", "1", *TINY])
    common = ["--head-ckpt", str(kmdn / "head" / "best.pth"), "--tail-ckpt", str(kmdn / "tail" / "best.pth"),
              "--distill-interval", "1", "--image-size", "16", "--batch-size", "8", "--workers", "0",
              "--out", str(kmdn)]
    distill_main(["--split", str(split_dir), *common, "--epochs", "1"])
    anno = toy_data / "anno" / "TOY_train.txt"
    anno.write_text("".join(anno.read_text().splitlines(keepends=True)[1:]))  # one image of class 0 fewer
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "other-split")])  # the same groups
    expect_user_error(capsys, lambda: distill_main(["--split", str(tmp_path / "other-split"), *common, "--epochs", "2",
                                                    "--resume"]), "was trained on a split of other data")


def test_a_last_checkpoint_of_another_shape_is_refused_before_anything_is_written(split_dir, tmp_path, capsys):
    kmdn = tmp_path / "kmdn"
    for main in (umodel_main, rmodel_main):
        main(["--split", str(split_dir), "--out", str(kmdn), "--epochs", "1", *TINY])
    distill = ["--split", str(split_dir), "--out", str(kmdn), "--distill-interval", "1", "--image-size", "16",
               "--batch-size", "8", "--workers", "0"]
    distill_main([*distill, "--epochs", "1"])
    runs = {"head": (lambda state: state["state_dict"], lambda: umodel_main(
                ["--split", str(split_dir), "--out", str(kmdn), "--epochs", "2", "--resume", *TINY])),
            "distill": (lambda state: state["models"]["tail"], lambda: distill_main([*distill, "--epochs", "2",
                                                                                      "--resume"]))}
    for name, (weights, resume) in runs.items():
        run = kmdn / name
        state = load_checkpoint(run / "last.pth")
        weights(state)["conv1.weight"] = torch.zeros(8, 3, 7, 7)  # as a run of another --width left it
        atomic_torch_save(run / "last.pth", state)
        (run / "options.json").unlink()  # the run's flags, which would have caught it, are gone
        # The lock file aside: whichever run takes the folder, even to be refused, names itself there.
        before = {path.name: path.stat().st_mtime_ns for path in run.iterdir() if path.name != ".lock"}
        expect_user_error(capsys, resume, "last.pth does not fit this model: conv1.weight has shape (8, 3, 7, 7)")
        assert {path.name: path.stat().st_mtime_ns for path in run.iterdir() if path.name != ".lock"} == before, name


# ----- bad input: one line, exit 2, nothing written ----------------------------------------------

def test_bad_inputs_write_nothing(toy_data, split_dir, tmp_path, capsys):
    out = tmp_path / "never"
    run = lambda *extra: umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY, *extra])  # noqa: E731
    expect_user_error(capsys, lambda: run("--data-root", str(tmp_path / "nowhere")), "dataset folder not found")
    other = write_dataset(tmp_path / "other", {0: 12, 1: 10, 2: 8, 3: 4, 4: 2})
    expect_user_error(capsys, lambda: run("--data-root", str(other)), "another dataset")
    expect_user_error(capsys, lambda: run("--pretrained", str(tmp_path / "missing.pth")), "missing.pth")
    (toy_data / "train" / "0" / "img 3.jpg").unlink()
    expect_user_error(capsys, run, "img 3.jpg does not exist")
    assert not out.exists()


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image_stops_or_is_skipped(toy_data, split_dir, tmp_path, capsys, content):
    broken = toy_data / "train" / "1" / "img 2.jpg"
    if content == "truncated":
        content = broken.read_bytes()[:200]
    broken.write_bytes(content)
    args = ["--split", str(split_dir), "--epochs", "1", *TINY]
    expect_user_error(capsys, lambda: umodel_main([*args, "--out", str(tmp_path / "a")]), "img 2.jpg")
    umodel_main([*args, "--out", str(tmp_path / "b"), "--skip-bad-images"])
    assert "skipped 1 unreadable head training images" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "b" / "head" / "last.pth")["epoch"] == 0


@pytest.mark.parametrize("stage", ["UModel", "Classification"])
def test_an_unreadable_test_image_stops_the_run_before_it_trains(toy_data, split_dir, tmp_path, capsys, stage):
    """Test images are read first at the end of the first epoch: they are all decoded at
    start-up instead, so that a bad one costs no epoch (and writes nothing)."""
    from Classification.train import main as cls_train_main

    broken = toy_data / "test" / "0" / "img 1.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "run"
    if stage == "UModel":
        run = lambda *extra: umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1",  # noqa: E731
                                          *TINY, *extra])
    else:
        run = lambda *extra: cls_train_main(["--data-root", str(toy_data), "--out", str(out), "--epochs", "1",  # noqa
                                             "--arch", "resnet18", "--pretrained", "none", "--image-size", "16",
                                             "--workers", "0", *extra])
    expect_user_error(capsys, run, "img 1.jpg")
    assert not out.exists()
    run("--skip-bad-images")
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_empty_or_malformed_annotations(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", {0: 3, 1: 3})
    run = lambda: split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])  # noqa: E731
    anno = data / "anno" / "TOY_test.txt"
    anno.write_text("")
    expect_user_error(capsys, run, "TOY_test.txt lists no images")
    anno.write_text("0/img 0.jpg\n")
    expect_user_error(capsys, run, "TOY_test.txt:1: expected")
    (data / "anno" / "TOY_train.txt").unlink()
    anno.unlink()
    expect_user_error(capsys, run, "annotation file not found")
    assert not (tmp_path / "split").exists()


def test_class_in_test_but_not_in_train(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", {0: 3, 1: 3}, test_counts={0: 2, 1: 2, 2: 2})
    (data / "classes.json").unlink()
    with pytest.warns(UserWarning):
        expect_user_error(capsys, lambda: split_main(["--data-root", str(data), "--out", str(tmp_path / "s")]),
                          "class id 2 is not a class of")


def test_results_are_not_overwritten_without_asking(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    before = (out / "head" / "last.pth").read_bytes()
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1",
                                                   *TINY]), "--resume")
    assert (out / "head" / "last.pth").read_bytes() == before
    assert Path(out / "head" / "options.json").is_file()


def test_classifier_resume_equals_uninterrupted_run(toy_data, tmp_path):
    from Classification.train import main as train_main

    common = ["--data-root", str(toy_data), "--sampler", "class-balanced", "--milestones", "1", "--device", "cpu",
              "--arch", "resnet18", "--pretrained", "none", "--image-size", "16", "--batch-size", "8", "--workers", "0"]
    train_main([*common, "--out", str(tmp_path / "a"), "--epochs", "2"])
    train_main([*common, "--out", str(tmp_path / "b"), "--epochs", "1"])
    train_main([*common, "--out", str(tmp_path / "b"), "--epochs", "2", "--resume"])
    a, b = load_checkpoint(tmp_path / "a" / "last.pth"), load_checkpoint(tmp_path / "b" / "last.pth")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def cdtg_command(cdtg_inputs, out, steps, *extra):
    return [sys.executable, str(ROOT / "CDTG" / "train.py"), "--data", str(cdtg_inputs / "cdtg_data"),
            "--teacher", str(cdtg_inputs / "M_T.pth"), "--clip", "none", "--out", str(out), "--size", "32",
            "--latent", "16", "--n-mlp", "2", "--channel-max", "16", "--batch", "4", "--iter", str(steps),
            "--save-every", "100000", "--sample-every", "100000", "--log-every", "1", "--workers", "0",
            "--device", "cpu", *extra]


def stop_cdtg_midway(cdtg_inputs, out, signal_number, *extra):
    """A long CDTG run, sent `signal_number` once training has started (SIGTERM to all its
    processes, as Slurm sends it): its exit status, its output and the steps of the
    checkpoints it left."""
    from CDTG.checkpoint import checkpoint_steps

    process = subprocess.Popen(cdtg_command(cdtg_inputs, out, 100000, *extra), env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)  # training has started (whatever the start-up takes) before the signal comes
    time.sleep(1)
    if signal_number == signal.SIGTERM:
        os.killpg(process.pid, signal_number)  # the DataLoader's workers too
    else:
        process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout + stderr, checkpoint_steps(out / "checkpoint")


def test_ctrl_c_during_cdtg_training_saves_a_checkpoint_that_resumes_exactly(cdtg_inputs):
    from CDTG.checkpoint import load_cdtg_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    interrupted = cdtg_inputs / "interrupted"
    code, _, steps = stop_cdtg_midway(cdtg_inputs, interrupted, signal.SIGINT)
    assert code == 130
    [stopped_at] = steps  # the step finished when Ctrl-C came
    assert stopped_at > 0
    subprocess.run(cdtg_command(cdtg_inputs, interrupted, stopped_at + 2, "--resume"), env=env, check=True,
                   capture_output=True)
    subprocess.run(cdtg_command(cdtg_inputs, cdtg_inputs / "straight", stopped_at + 2), env=env, check=True,
                   capture_output=True)
    a = load_cdtg_checkpoint(interrupted / "checkpoint" / f"{stopped_at + 2}.pt")
    b = load_cdtg_checkpoint(cdtg_inputs / "straight" / "checkpoint" / f"{stopped_at + 2}.pt")
    for part in ("g", "d", "g_ema", "fusion", "fusion_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


def sleep_as_a_data_worker(starting_s):
    from tgn.stopping import leave_signals_to_the_trainer

    time.sleep(starting_s)  # a worker starts with torch's SIGTERM handler and Python's Ctrl-C: both end it
    leave_signals_to_the_trainer(0)
    time.sleep(30)


@pytest.mark.parametrize("starting_s", [0, 1])
def test_data_workers_leave_ctrl_c_to_the_trainer_and_outlive_sigterm_for_a_while_only(monkeypatch, starting_s):
    """Long enough for the trainer to save, even for signals that come while the worker
    starts (held until its handlers are set); a worker stuck in a read still ends."""
    import multiprocessing

    import tgn.stopping
    from tgn.errors import signals_held

    monkeypatch.setattr(tgn.stopping, "WORKER_SIGTERM_GRACE_S", 1)
    with signals_held():  # as the trainers start their loaders' workers
        worker = multiprocessing.get_context("fork").Process(target=sleep_as_a_data_worker, args=(starting_s,))
        worker.start()
    time.sleep(0.5)  # started, with its handlers set (0) or not yet (1)
    os.kill(worker.pid, signal.SIGINT)  # a spawned worker (macOS, Windows) has Python's KeyboardInterrupt
    time.sleep(0.5 + starting_s)
    assert worker.is_alive()
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.is_alive()
    worker.join(timeout=10)
    assert worker.exitcode == -signal.SIGALRM


WORKER_MASKS = """
import multiprocessing, signal, sys


def report_mask(queue):
    queue.put(sorted(int(number) for number in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


if __name__ == "__main__":  # (spawned children import this file as a module: not torch)
    sys.path.insert(0, sys.argv[1])
    import tgn.engine

    for method in ("spawn", "forkserver"):  # as on macOS, and under torchrun on an older Python
        tgn.engine.worker_start_method = lambda: method
        context = multiprocessing.get_context(method)
        for loader in range(2):
            with tgn.engine.workers_starting(2):
                queue = context.Queue()
                workers = [context.Process(target=report_mask, args=(queue,)) for _ in range(2)]
                for worker in workers:
                    worker.start()
                print(method, loader, [queue.get(timeout=60) for _ in workers])
                for worker in workers:
                    worker.join()
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks (Windows)")
def test_workers_started_by_spawn_or_a_fork_server_start_with_the_stop_signals_held(tmp_path):
    """multiprocessing's resource tracker, started with the first spawned (macOS) or fork
    server's (torchrun on an older Python) workers, unblocks Ctrl-C and SIGTERM as it starts:
    the first loader's workers started without them held, and could be ended before their
    handlers were set (the run crashed without its save)."""
    script = tmp_path / "masks.py"
    script.write_text(WORKER_MASKS)
    result = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    held = sorted(int(number) for number in (signal.SIGINT, signal.SIGTERM))
    assert result.stdout.splitlines() == [f"{method} {loader} {[held, held]}" for method in ("spawn", "forkserver")
                                          for loader in range(2)], result.stdout


def test_a_cluster_stopping_cdtg_training_gets_a_checkpoint_of_the_last_step(cdtg_inputs):
    """Slurm and other schedulers send SIGTERM, then SIGKILL seconds later, when a job is
    preempted or its time is up: the run saves the step it finished, as for Ctrl-C
    (the next periodic checkpoint may be thousands of steps away)."""
    code, output, steps = stop_cdtg_midway(cdtg_inputs, cdtg_inputs / "stopped", signal.SIGTERM, "--workers", "2")
    assert code == 128 + signal.SIGTERM
    [stopped_at] = steps
    assert stopped_at > 0 and f"terminated: saving step {stopped_at}" in output


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's list of mapped files")
def test_the_checkpoint_checked_for_resume_is_not_left_mapped(tmp_path):
    """Windows refuses to replace or remove a mapped file: the run's first save (--resume)
    or its --overwrite would fail while the checked last.pth stayed mapped."""
    from tgn.checkpoint import check_fits
    from tgn.resume import last_state

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "last.pth"
    torch.save({"state_dict": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 4,
                "rng": [torch.zeros(5, dtype=torch.uint8)]}, path)
    state = last_state(path)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert state["epoch"] == 4 and state["state_dict"]["weight"].shape == (2, 3)
    assert state["rng"][0].dtype == torch.uint8
    check_fits(model, state["state_dict"], path)
    with pytest.raises(UserError, match="weight has shape"):
        check_fits(torch.nn.Linear(4, 2), state["state_dict"], path)


def test_another_scripts_run_folder_is_refused_whatever_the_flags(split_dir, toy_data, tmp_path, capsys):
    """Training into another stage's run folder replaced its options.json and dropped its log
    lines, so that run could no longer be resumed."""
    from CDTG.train import main as cdtg_train_main
    from Classification.train import main as cls_train_main

    umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), "--epochs", "1", *TINY])
    head = tmp_path / "kmdn" / "head"
    cdtg = tmp_path / "cdtg"  # as CDTG/train.py leaves it: options and a log of steps
    cdtg.mkdir()
    (cdtg / "options.json").write_text(json.dumps({"iter": 6, "batch": 4, "lr": 0.002, "size": 32}))
    (cdtg / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "d": 1.0}) + "\n" for step in (1, 2, 3)))
    before = {folder: {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
              for folder in (head, cdtg)}
    classifier = ["--data-root", str(toy_data), "--epochs", "1", "--arch", "resnet18", "--pretrained", "none",
                  "--image-size", "16", "--batch-size", "8", "--workers", "0"]
    for flags in ([], ["--resume"], ["--overwrite"]):
        expect_user_error(capsys, lambda: cls_train_main([*classifier, "--out", str(cdtg), *flags]),
                          f"{cdtg} is a run folder of CDTG/train.py (its options.json); choose another --out")
        expect_user_error(capsys, lambda: cls_train_main([*classifier, "--out", str(head), *flags]),
                          f"{head} is a run folder of KMDN/UModel.py or RModel.py")
    expect_user_error(capsys, lambda: cdtg_train_main(["--data", str(tmp_path / "none"), "--out", str(head)]),
                      f"{head} is a run folder of KMDN/UModel.py or RModel.py")
    from CDTG.dataset_split import main as cdtg_split_main

    expect_user_error(capsys, lambda: split_main(["--data-root", str(toy_data), "--out", str(head), "--overwrite"]),
                      f"{head} is a run folder of KMDN/UModel.py or RModel.py")
    expect_user_error(capsys, lambda: cdtg_split_main(["--split", str(split_dir), "--out", str(cdtg), "--overwrite"]),
                      f"{cdtg} is a run folder of CDTG/train.py")
    assert before == {folder: {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
                      for folder in (head, cdtg)}
    other = tmp_path / "other" / "head"  # an options.json of another tool, or one that is not an object
    other.mkdir(parents=True)
    for text, fragment in (('{"model": "vit"}', "was not written by one of this project's training scripts"),
                           ("[1, 2]", "was not written by one of this project's training scripts"),
                           ('{"iter": ', "is not valid JSON")):
        (other / "options.json").write_text(text)
        expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", str(other.parent),
                                                       "--epochs", "1", "--overwrite", *TINY]), fragment)
        assert (other / "options.json").read_text() == text


def test_another_scripts_output_folder_is_refused_as_out(split_dir, toy_data, tmp_path, capsys):
    """A split, a generation folder or a report given as --out got the writer's options.json
    and files mixed into it (and the split could then not be made again there)."""
    from CDTG.dataset_split import main as cdtg_split_main
    from Classification.train import main as cls_train_main

    generated = tmp_path / "generated"
    generated.mkdir()
    (generated / "generation.json").write_text(json.dumps({"ckpt": "200000.pt", "r": 0.05}))
    classifier = ["--data-root", str(toy_data), "--epochs", "1", "--arch", "resnet18", "--pretrained", "none",
                  "--image-size", "16", "--batch-size", "8", "--workers", "0"]
    for folder, message in ((split_dir, f"{split_dir} is an output folder of KMDN/dataset_split.py (its split.json)"),
                            (generated, f"{generated} is an output folder of CDTG/generation.py (its generation.json)")):
        for flags in ([], ["--overwrite"]):
            expect_user_error(capsys, lambda: cls_train_main([*classifier, "--out", str(folder), *flags]), message)
        assert not (folder / "options.json").exists()
    expect_user_error(capsys, lambda: cdtg_split_main(["--split", str(split_dir), "--out", str(split_dir)]),
                      f"{split_dir} is an output folder of KMDN/dataset_split.py")
    # KMDN's --out holds its runs (OUT/head, ...): the check is of OUT itself, a run folder included.
    umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), "--epochs", "1", *TINY])
    head = tmp_path / "kmdn" / "head"
    for folder, message in ((split_dir, f"{split_dir} is an output folder of KMDN/dataset_split.py (its split.json)"),
                            (generated, f"{generated} is an output folder of CDTG/generation.py"),
                            (head, f"{head} is a run folder of KMDN/UModel.py or RModel.py (its options.json); --out "
                                   "is the folder that holds the KMDN runs")):
        for main, flags in ((umodel_main, TINY), (distill_main, ["--batch-size", "8", "--workers", "0"])):
            expect_user_error(capsys, lambda: main(["--split", str(split_dir), "--out", str(folder), *flags]), message)
        assert not (folder / "head" / "options.json").exists() and not (folder / "distill").exists()
    # KMDN runs an earlier version let share a split's folder still resume.
    shared = tmp_path / "shared"
    shutil.copytree(split_dir, shared)
    shutil.copytree(head, shared / "head")
    umodel_main(["--split", str(shared), "--out", str(shared), "--epochs", "2", "--resume", "--workers", "0"])
    assert len((shared / "head" / "metrics.jsonl").read_text().splitlines()) == 2
    split_main(["--data-root", str(toy_data), "--out", str(split_dir), "--overwrite"])  # its own: made again
    # A run an earlier version let share a split's folder still resumes: the folder is its run's.
    mixed = tmp_path / "mixed"
    cls_train_main([*classifier, "--out", str(mixed)])
    shutil.copy(split_dir / "split.json", mixed / "split.json")
    cls_train_main([*classifier, "--out", str(mixed), "--epochs", "2", "--resume"])
    assert [line["epoch"] for line in map(json.loads, (mixed / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_resume_and_overwrite_together_are_refused(split_dir, tmp_path, capsys):
    """Together, --overwrite was silently ignored, and errors then said to pass it."""
    from CDTG.train import main as cdtg_train_main

    for main, argv in ((umodel_main, ["--split", str(split_dir), *TINY]), (cdtg_train_main, [])):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "run"), "--resume", "--overwrite"])
        assert exit_info.value.code == 2
        assert "error: argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_each_epoch_logs_the_precision_it_ran_with(split_dir, tmp_path):
    """A --resume may change --amp and --channels-last; options.json holds the latest call's
    flags, so the log says how each epoch ran. At 64 px: at 16 px layer4's maps are 1x1, on
    which torch's CPU bf16 channels_last convolutions gave a NaN loss about one run in four
    (after other tests in the process; seen with torch 2.14)."""
    common = ["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), *TINY, "--image-size", "64"]
    umodel_main([*common, "--epochs", "1", "--amp", "auto"])
    umodel_main([*common, "--epochs", "2", "--amp", "bf16", "--channels-last", "--resume"])
    lines = [json.loads(line) for line in (tmp_path / "kmdn" / "head" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["amp"], m["channels_last"], m["processes"]) for m in lines] == [
        (1, "off", False, 1), (2, "bf16", True, 1)]


def test_resuming_a_finished_run_says_nothing_is_left_to_train(split_dir, tmp_path, capsys):
    common = ["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), *TINY, "--epochs", "2"]
    umodel_main(common)
    capsys.readouterr()
    umodel_main([*common, "--resume"])
    out = capsys.readouterr().out
    assert "has trained all 2 epochs: nothing left to train" in out and "epoch 3/2" not in out


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="fp16 on CPUs needs the loss scaler of torch 2.3")
def test_a_resumed_fp16_run_continues_with_its_saved_loss_scale(toy_data, tmp_path):
    """The fp16 loss scale comes back with --resume: restarting at 65536 would overflow again
    where the run had backed off. The saved scale is set to 1024 by hand."""
    from KMDN.dataset_split import main as split_main
    from KMDN.UModel import main as umodel_main
    from tgn.checkpoint import load_checkpoint
    from tgn.io import atomic_torch_save

    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    common = ["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"), "--arch", "resnet18", "--width",
              "4", "--pretrained", "none", "--image-size", "16", "--batch-size", "8", "--workers", "0",
              "--device", "cpu", "--amp", "fp16"]
    umodel_main([*common, "--epochs", "1"])
    last = tmp_path / "kmdn" / "head" / "last.pth"
    state = load_checkpoint(last)
    assert state["scaler"] is not None
    state["scaler"]["scale"] = 1024.0
    atomic_torch_save(last, state)
    umodel_main([*common, "--epochs", "2", "--resume"])
    assert load_checkpoint(last)["scaler"]["scale"] <= 1024.0  # halved on an overflow, never back to 65536


def test_resume_refuses_a_checkpoint_of_other_class_ids_with_the_same_counts():
    """A dataset renumbered with the same counts (or a run of an earlier version without a
    split fingerprint) is refused by the class-id comparison alone."""
    from tgn.errors import UserError
    from tgn.resume import check_same_data

    state = {"class_ids": [0, 1, 2], "train_counts": [5, 4, 3]}
    check_same_data(state, {"class_ids": [0, 1, 2], "train_counts": [5, 4, 3]}, "last.pth")
    with pytest.raises(UserError, match=r"other classes \(\[0, 1, 2\], now \[1, 2, 3\]\)"):
        check_same_data(state, {"class_ids": [1, 2, 3], "train_counts": [5, 4, 3]}, "last.pth")
    # The same classes ranked otherwise (the data changed): said so, with every way out.
    with pytest.raises(UserError) as refused:
        check_same_data(state, {"class_ids": [0, 2, 1], "train_counts": [5, 4, 3]}, "last.pth")
    assert str(refused.value) == ("last.pth was trained on the same classes in another order ([0, 1, 2], now "
                                  "[0, 2, 1]: the data ranks them otherwise); resume with the data it started with, "
                                  "use another --out, or pass --overwrite instead of --resume to start again")


def test_resume_refuses_a_checkpoint_of_other_class_names_with_the_same_ids_and_counts():
    """Another dataset laid out alike (as many images under the same ids) names its classes
    otherwise; the names' spelling aside, they must be the checkpoint's."""
    from tgn.errors import UserError
    from tgn.resume import check_same_names

    state = {"class_ids": [0, 1], "class_names": ["golf field", "dam"], "train_counts": [5, 4]}
    check_same_names(state, [0, 1], ["Golf_Field", "dam"], "last.pth")
    check_same_names({**state, "class_names": None}, [0, 1], ["a", "b"], "last.pth")  # an earlier version's
    check_same_names(state, [0, 1], ["golf field", "1"], "last.pth")  # named by id: DATA without classes.json
    with pytest.raises(UserError, match="last.pth was trained with class 1 named 'dam', the data names it 'bridge'"):
        check_same_names(state, [0, 1], ["golf field", "bridge"], "last.pth")
