"""Inputs a researcher gets wrong: impossible flag values, foreign or empty checkpoints,
checkpoints of another group or teacher, 16-bit images; and what a rerun must not mix."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, write_dataset
from test_cdtg_training import read_anno, tiny_train_args
from test_reliability import TINY, expect_user_error
from CDTG.generation import main as generation_main
from CDTG.train import main as cdtg_train_main
from Classification.train import main as cls_train_main
from KMDN.dataset_split import main as split_main
from KMDN.Distill import main as distill_main
from KMDN.UModel import main as umodel_main
from KMDN.RModel import main as rmodel_main
from tgn import distributed as dist
from tgn.compat import torch_version
from tgn.data import load_image
from tgn.engine import make_loader
from tgn.errors import UserError
from tgn.optim import adam, restore_optimizer
from tgn.resnet import FeatureResNet
from tgn.split import load_split


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--epochs", "0"), ("--image-size", "-3"),
                                         ("--workers", "-1"), ("--width", "0"), ("--lr", "-1"), ("--lr", "abc"),
                                         ("--weight-decay", "inf"), ("--lr", "1e400"),  # nan losses mid-run
                                         ("--seed", "100000000000000"), ("--seed", "-1")])  # its epoch seeds overflow
def test_impossible_resnet_flags_stop_before_anything_is_written(split_dir, tmp_path, capsys, flag, value):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        umodel_main(["--split", str(split_dir), "--out", str(out), *TINY, flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1  # argparse's usage block left out
    assert err.startswith(f"error: argument {flag}") and err.rstrip().endswith("--help)")
    assert not out.exists()


@pytest.mark.parametrize("main, argv", [(generation_main, ["--ckpt", "x.pt", "--r", "1.5"]),
                                        (generation_main, ["--ckpt", "x.pt", "--per-class", "0"]),
                                        (split_main, ["--data-root", "x", "--threshold", "100"]),
                                        (distill_main, ["--alpha", "inf"]),
                                        (generation_main, ["--ckpt", "x.pt", "--seed", str(2 ** 32)])])
def test_impossible_values_of_other_scripts_are_argparse_errors(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: argument ")


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--save-every", "0"), ("--log-every", "0"),
                                         ("--size", "30"), ("--iter", "0"), ("--mixing", "2")])
def test_impossible_cdtg_flags_stop_before_anything_is_written(cdtg_inputs, capsys, flag, value):
    out = cdtg_inputs / "never"
    with pytest.raises(SystemExit) as exit_info:
        cdtg_train_main(tiny_train_args(cdtg_inputs, out, flag, value))
    assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not out.exists()


def test_ada_flags_without_augment_are_refused_not_ignored(cdtg_inputs, capsys):
    out = cdtg_inputs / "never"
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "1",
                                                                      "--augment-p", "0.5", "--ada-every", "64")),
                      "--augment-p, --ada-every act only with --augment (ADA): add --augment or leave them out")
    assert not out.exists()


def test_a_clip_weight_without_clip_is_refused_not_ignored(cdtg_inputs, capsys):
    out = cdtg_inputs / "never"
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "1", "--clip", "none",
                                                                      "--lambda-clip", "0.5")),
                      "--lambda-clip 0.5 acts only with a CLIP model: leave it out with --clip none")
    assert not out.exists()
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "1", "--clip", "none"))
    # --lambda-clip 0 says the same as the default that a run without CLIP recorded
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "2", "--clip", "none", "--lambda-clip", "0", "--resume"))
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["1.pt", "2.pt"]


@pytest.mark.parametrize("device, message", [("bogus", "--device bogus: not a device"),
                                             ("mps", "--device mps: this code runs on CPUs and CUDA GPUs")])
def test_unknown_device_is_one_line(split_dir, tmp_path, capsys, device, message):
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "o"), *TINY,
                                                   "--device", device]), message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["afile", "afile/run"])
@pytest.mark.parametrize("script", ["KMDN/dataset_split.py", "KMDN/UModel.py", "CDTG/train.py",
                                    "Classification/train.py", "data/prepare_folders.py"])
def test_an_output_folder_that_is_a_file_is_an_argument_error(tmp_path, capsys, script, out):
    """Checked as the flags are read: before, some scripts made folders and then failed
    with a traceback."""
    import importlib

    (tmp_path / "afile").write_text("a file")
    main = importlib.import_module(script[:-3].replace("/", ".")).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / out)])  # refused as it is read, before required flags are missed
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"argument --out: {tmp_path / 'afile'} is a file, not a folder" in err


@pytest.mark.parametrize("target", ["link", "gone"])
def test_an_output_folder_through_a_symlink_to_nothing_is_an_argument_error(tmp_path, capsys, target):
    """A link to itself ended in a 'Symlink loop' traceback, a dangling one in 'File exists'."""
    (tmp_path / "link").symlink_to(tmp_path / target)
    with pytest.raises(SystemExit) as exit_info:
        umodel_main(["--out", str(tmp_path / "link" / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"argument --out: {tmp_path / 'link'} is a symbolic link to nothing (or to itself)" in err


@pytest.mark.parametrize("content, reason", [(b"", "the file is empty"), (b"hello", "not a PyTorch checkpoint"),
                                             (b'{"a": 1}\n', "not a PyTorch checkpoint")])
def test_empty_or_foreign_checkpoint_files_are_one_line(split_dir, tmp_path, capsys, content, reason):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    expect_user_error(capsys, lambda: distill_main(["--split", str(split_dir), "--out", str(tmp_path / "k"),
                                                    "--head-ckpt", str(bad), "--epochs", "1"]), reason)


def test_a_checkpoint_cut_short_or_an_archive_of_other_files_is_named_for_what_it_is(split_dir, tmp_path, capsys):
    """torch's own words were '[Errno 22] Invalid argument', a line about miniz, or
    '[enforce fail at inline_container.cc:180]'."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(1000)}, buffer)
    whole = buffer.getvalue()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("notes.txt", "not weights")
    bad = tmp_path / "bad.pth"
    for content, reason in ((whole[:-10], "the file is cut short or damaged"),
                            (whole[:len(whole) // 5], "the file is cut short or damaged"),
                            (archive.getvalue(), "not a PyTorch checkpoint (an archive of other files)")):
        bad.write_bytes(content)
        expect_user_error(capsys, lambda: distill_main(["--split", str(split_dir), "--out", str(tmp_path / "k"),
                                                        "--head-ckpt", str(bad), "--epochs", "1"]),
                          f"cannot load head model checkpoint {bad}: {reason}")


def test_a_damaged_last_checkpoint_is_named_on_resume_and_overwrite_replaces_it(split_dir, tmp_path, capsys):
    """It used to be reported as 'trained on other classes'."""
    out = tmp_path / "k"
    run = ["--split", str(split_dir), "--out", str(out), *TINY]
    umodel_main([*run, "--epochs", "1"])
    last = out / "head" / "last.pth"
    last.write_bytes(last.read_bytes()[:2000])  # cut short, as by a failed copy
    expect_user_error(capsys, lambda: umodel_main([*run, "--epochs", "2", "--resume"]),
                      f"--resume: cannot read {last} (")
    umodel_main([*run, "--epochs", "1", "--overwrite"])
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_earlier_results_are_never_mixed_into_a_new_run(split_dir, tmp_path, capsys, monkeypatch):
    """Any result marks a run folder, not only last.pth (which users delete to save space);
    --resume without last.pth is refused rather than started again over the results; and
    --overwrite removes the earlier run's results first, so that a new run stopped early
    leaves none for a later --resume to continue under the new flags."""
    import KMDN.distillation
    import KMDN.group_training

    out = tmp_path / "k"
    run = ["--split", str(split_dir), "--out", str(out), *TINY, "--epochs", "1"]
    umodel_main(run)
    rmodel_main(run)
    tail = out / "tail"
    (tail / "last.pth").unlink()
    expect_user_error(capsys, lambda: rmodel_main(run), f"{tail} already holds results (best.pth)")
    expect_user_error(capsys, lambda: rmodel_main([*run, "--resume"]), "but no last.pth to continue from")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(KMDN.group_training, "fit", stopped)
    with pytest.raises(SystemExit):  # interrupted: exit 130
        rmodel_main([*run, "--lr", "0.01", "--overwrite"])
    assert sorted(path.name for path in tail.iterdir()) == [".lock", "options.json"]  # the lock: see tgn/runlock.py

    distill = ["--split", str(split_dir), "--out", str(out), "--epochs", "1", "--image-size", "16",
               "--head-ckpt", str(out / "head" / "best.pth"), "--tail-ckpt", str(out / "head" / "best.pth")]
    monkeypatch.setattr(KMDN.distillation, "load_group_model", lambda path, split, group: FeatureResNet(
        "resnet18", num_classes=len(split.ids(group)), width=4))
    (out / "distill").mkdir()
    (out / "distill" / "M_T.pth").write_bytes(b"an earlier run's")
    expect_user_error(capsys, lambda: distill_main(distill), "already holds results (M_T.pth)")
    monkeypatch.setattr(KMDN.distillation, "distill", stopped)
    with pytest.raises(SystemExit):
        distill_main([*distill, "--overwrite"])
    assert not (out / "distill" / "M_T.pth").exists()


def test_distill_refuses_models_of_different_widths_before_writing(split_dir, tmp_path, capsys, monkeypatch):
    import KMDN.distillation

    widths = {"head": 4, "tail": 8}
    monkeypatch.setattr(KMDN.distillation, "load_group_model", lambda path, split, group: FeatureResNet(
        "resnet18", num_classes=len(split.ids(group)), width=widths[group]))
    out = tmp_path / "k"
    expect_user_error(capsys, lambda: distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1",
                                                    "--image-size", "16"]),
                      "layer3 features of different shapes ((16, 1, 1) vs (32, 1, 1))")
    assert not out.exists()


def test_a_group_of_one_training_image_at_32_px_is_one_line(tmp_path, capsys):
    """BatchNorm cannot train on one image whose layer4 map is 1x1; at 64 px it can."""
    data = write_dataset(tmp_path / "data", {0: 6, 1: 5, 2: 1})
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split"), "--threshold", "70"])  # tail: class 2
    run = ["--split", str(tmp_path / "split"), "--out", str(tmp_path / "k"), *TINY, "--epochs", "1"]
    expect_user_error(capsys, lambda: rmodel_main(run), "the tail classes' training images: 1 in all, so every batch "
                      "is that one image; at --image-size 16 (32 or less) BatchNorm cannot train on one image")
    assert not (tmp_path / "k").exists()
    rmodel_main([*run, "--image-size", "64"])
    assert (tmp_path / "k" / "tail" / "best.pth").is_file()


def test_one_image_per_process_at_32_px_is_refused_unless_batchnorm_is_synchronised(monkeypatch):
    """Under torchrun with N processes: a global batch of N, or a training set of at most
    N images, leaves each process one image (one process accepts both)."""
    from tgn.engine import check_one_image_batches

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    check_one_image_batches(2, 2, 32, cpu)  # one process: batches of 2
    monkeypatch.setattr(dist, "planned_world_size", lambda: 2)
    with pytest.raises(UserError, match="--batch-size 2 gives each of the 2 processes one image per step"):
        check_one_image_batches(100, 2, 32, cpu)
    with pytest.raises(UserError, match="training images: 2 in all, so 2 processes would each train on one"):
        check_one_image_batches(2, 8, 32, cpu)
    check_one_image_batches(3, 8, 32, cpu)  # 2 and 1 padded to 2 and 2
    check_one_image_batches(100, 2, 33, cpu)  # 2x2 maps
    check_one_image_batches(100, 2, 32, gpu)  # SyncBatchNorm on GPUs under torchrun
    with pytest.raises(UserError, match="one image per step"):
        check_one_image_batches(100, 2, 32, gpu, sync_bn="off")


def test_cdtg_batch_the_discriminator_cannot_group_is_one_line(cdtg_inputs, tmp_path, capsys):
    run = tmp_path / "c"
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, run, "--batch", "10")),
                      "--batch 10: it must be at most 4 or a multiple of 4, the discriminator's minibatch-std group")
    assert not run.exists()


def test_cdtg_batch_split_below_the_stddev_group_offers_only_what_the_run_may_change(monkeypatch):
    """Over more processes a --batch leaves each fewer images than one minibatch-std group:
    a new run may take a larger --batch, a resumed one (which keeps its --batch) may not."""
    from CDTG.training import check_stddev_groups

    check_stddev_groups(4)
    monkeypatch.setattr(dist, "planned_world_size", lambda: 2)
    with pytest.raises(UserError, match=r"leaves 2 image\(s\) each.*use at most 1 processes or --batch 8$"):
        check_stddev_groups(4)
    with pytest.raises(UserError) as refused:
        check_stddev_groups(4, resumed=True)
    assert str(refused.value).endswith("use at most 1 processes (a resumed run keeps its --batch)")
    check_stddev_groups(8, resumed=True)


def test_prompts_clip_cannot_take_are_one_line(cdtg_inputs, tmp_path, capsys):
    from CDTG.dataset_split import main as cdtg_split_main

    split = ["--split", str(cdtg_inputs / "split")]
    for prompt, fragment in (("A {style} photo of a {name}", "only {name} may stand in braces"),
                             ("{name} {0}", "only {name} may stand in braces"),
                             ("{name.foo}", "brace itself); it holds {name.foo}"),
                             ("A photo {name!z}", "it holds {name!z}"),
                             ("{name:>5000000000}", "it holds {name:>5000000000}"),
                             ("a {name", "brace itself); expected '}' before end of string"),
                             ("a photo", "--prompt must contain {name}"),
                             ("a photo of " * 30 + "{name}", "is longer than CLIP's 77 tokens")):
        expect_user_error(capsys, lambda: cdtg_split_main([*split, "--out", str(tmp_path / "d"), "--prompt", prompt]),
                          fragment)
        assert not (tmp_path / "d").exists()
    manifest = cdtg_inputs / "cdtg_data" / "tail_classes.json"  # edited by hand, as the README invites
    manifest.write_text(manifest.read_text().replace("A photo of a dam", "a dam " * 80))
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, tmp_path / "c")),
                      "is longer than CLIP's 77 tokens")


def test_compile_on_a_torch_whose_compiler_fails_is_one_line(cdtg_inputs, tmp_path, capsys, monkeypatch):
    import tgn.compat

    monkeypatch.setattr(tgn.compat, "torch_version", lambda: (2, 5))
    resnet = ["--split", str(cdtg_inputs / "split"), "--out", str(tmp_path / "k"), *TINY, "--compile"]
    expect_user_error(capsys, lambda: rmodel_main(resnet), "--compile needs torch 2.6 or later")
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, tmp_path / "c", "--compile")),
                      "--compile needs torch 2.6 or later")
    assert not (tmp_path / "k").exists() and not (tmp_path / "c").exists()


def test_a_run_folder_given_for_a_checkpoint_names_the_file_to_pass(cdtg_inputs, tmp_path, capsys):
    from CDTG.checkpoint import load_cdtg_checkpoint
    from tgn.checkpoint import load_checkpoint

    (tmp_path / "kmdn").mkdir()
    (tmp_path / "kmdn" / "best.pth").write_bytes(b"")
    with pytest.raises(UserError, match=f"kmdn is a folder, not a file; pass {tmp_path / 'kmdn' / 'best.pth'}$"):
        load_checkpoint(tmp_path / "kmdn")
    # Distill's folder, and KMDN's --out: the models in them (not last.pth, which resumes a run).
    root = tmp_path / "runs"
    for name in ("head/best.pth", "head/last.pth", "distill/M_H.pth", "distill/M_T.pth", "distill/last.pth"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    with pytest.raises(UserError) as raised:
        load_checkpoint(root / "distill")
    assert str(raised.value).endswith(f"pass one of {root / 'distill' / 'M_H.pth'}, {root / 'distill' / 'M_T.pth'}")
    with pytest.raises(UserError) as raised:
        load_checkpoint(root)
    assert str(raised.value).endswith(f"pass one of {root / 'distill' / 'M_H.pth'}, {root / 'distill' / 'M_T.pth'}, "
                                      f"{root / 'head' / 'best.pth'}")
    (root / "head" / "best.pth").unlink()  # a run that had no test images writes last.pth alone
    with pytest.raises(UserError, match=f"pass one of {root / 'head' / 'last.pth'}$"):
        load_checkpoint(root / "head")
    run = tmp_path / "cdtg"
    cdtg_train_main(tiny_train_args(cdtg_inputs, run, "--iter", "4", "--clip", "none"))
    with pytest.raises(UserError, match=f"is a folder, not a file; pass {run / 'checkpoint' / '4.pt'}, its newest"):
        load_cdtg_checkpoint(run)


def test_distill_refuses_the_other_groups_model(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", {0: 8, 1: 7, 2: 4, 3: 3})  # 1 head and 3 tail classes
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])  # the groups differ in size too
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(tmp_path / "split"), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(tmp_path / "split"), "--out", str(out), "--epochs", "1", *TINY])
    swapped = ["--head-ckpt", str(out / "tail" / "best.pth"), "--tail-ckpt", str(out / "head" / "best.pth")]
    expect_user_error(capsys, lambda: distill_main(["--split", str(tmp_path / "split"), "--out", str(out), "--epochs",
                                                    "1", "--image-size", "16", *swapped]), "is the tail model")


def test_cdtg_overwrite_starts_a_clean_run(cdtg_inputs):
    out = cdtg_inputs / "run"
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--clip", "none"))
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "2", "--clip", "none", "--overwrite"))
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["2.pt"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["000002.png"]


def test_generation_checks_the_teacher_and_keeps_one_per_folder(cdtg_inputs, tmp_path, capsys):
    run = cdtg_inputs / "run"
    cdtg_train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none"))
    ckpt = run / "checkpoint" / "1.pt"
    torch.manual_seed(0)
    head = FeatureResNet("resnet18", num_classes=2, width=4)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    base = ["--ckpt", str(ckpt), "--out", str(tmp_path / "gen"), "--device", "cpu"]
    expect_user_error(capsys, lambda: generation_main([*base, "--per-class", "1", "--teacher",
                                                       str(tmp_path / "head.pth")]), "has 2 classes, the tail data has 3")
    generation_main([*base, "--per-class", "1"])
    settings = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert settings["teacher"] == str((cdtg_inputs / "M_T.pth").resolve())
    torch.manual_seed(1)
    other = FeatureResNet("resnet18", num_classes=3, width=4)
    torch.save(other.state_dict(), tmp_path / "other_tail.pth")
    expect_user_error(capsys, lambda: generation_main([*base, "--per-class", "2", "--teacher",
                                                       str(tmp_path / "other_tail.pth")]),
                      "is not the tail model")  # another M_T's features would not fit the fusion layer
    # The same weights and real images elsewhere (a run folder moved): the folder grows as one run would have made it.
    moved = tmp_path / "moved"
    shutil.copytree(cdtg_inputs / "cdtg_data", moved / "cdtg_data")
    shutil.copy(cdtg_inputs / "M_T.pth", moved / "M_T.pth")
    shutil.copy(ckpt, moved / "1.pt")
    generation_main([*base[:1], str(moved / "1.pt"), *base[2:], "--per-class", "2", "--data", str(moved / "cdtg_data"),
                     "--teacher", str(moved / "M_T.pth")])
    generation_main([*base[:2], "--out", str(tmp_path / "whole"), "--device", "cpu", "--per-class", "2"])
    assert read_anno(tmp_path / "gen") == read_anno(tmp_path / "whole")
    for relpath, _ in read_anno(tmp_path / "whole"):
        assert (tmp_path / "gen" / relpath).read_bytes() == (tmp_path / "whole" / relpath).read_bytes()
    assert json.loads((tmp_path / "gen" / "generation.json").read_text())["teacher"] == str(moved / "M_T.pth")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("")
    for flags in ([], ["--overwrite"]):  # a folder generation did not write is never written into
        expect_user_error(capsys, lambda: generation_main([*base, "--per-class", "1", "--out", str(run), *flags]),
                          f"{run} is a run folder of CDTG/train.py (its options.json); choose another --out")
        expect_user_error(capsys, lambda: generation_main([*base, "--per-class", "1", "--out",
                                                           str(tmp_path / "notes"), *flags]),
                          "holds other files and no generation.json")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "metrics.jsonl", "options.json"]
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".gitkeep").write_text("")  # hidden files do not make a folder someone else's
    generation_main([*base, "--per-class", "1", "--out", str(tmp_path / "fresh")])
    assert (tmp_path / "fresh" / "generation.json").is_file()
    cid = sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.is_dir())[0]
    shutil.rmtree(tmp_path / "fresh" / cid)
    (tmp_path / "fresh" / cid).write_text("notes")  # a FileExistsError traceback before
    for flags in ([], ["--overwrite"]):
        expect_user_error(capsys, lambda: generation_main([*base, "--per-class", "2", "--out", str(tmp_path / "fresh"),
                                                           *flags]),
                          f"{tmp_path / 'fresh' / cid} is a file where generation writes the images of class {cid}")
    assert (tmp_path / "fresh" / cid).read_text() == "notes"
    (tmp_path / "fresh" / cid).unlink()
    (tmp_path / "fresh" / cid).symlink_to(tmp_path / "gone")  # a link to nothing is in the way too
    expect_user_error(capsys, lambda: generation_main([*base, "--per-class", "2", "--out", str(tmp_path / "fresh")]),
                      f"{tmp_path / 'fresh' / cid} is a file where generation writes the images of class {cid}")


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    loaded = np.asarray(load_image(tmp_path / "grey16.png"))
    assert loaded.shape == (8, 8, 3)
    assert np.abs(loaded[..., 0].astype(float) - pixels / 257).max() <= 0.5  # clipped, the mean would be ~255


def test_classifier_refuses_a_class_without_training_images(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", {0: 4, 1: 4})
    classes = json.loads((data / "classes.json").read_text())
    classes["classes"].append({"id": 9, "name": "empty"})
    (data / "classes.json").write_text(json.dumps(classes))
    expect_user_error(capsys, lambda: cls_train_main(["--data-root", str(data), "--out", str(tmp_path / "c"),
                                                      "--arch", "resnet18", "--pretrained", "none", "--epochs", "1"]),
                      "class 9 (empty) has no training image")


def test_kmdn_refuses_a_group_without_test_images(tmp_path, capsys):
    """The best epoch is the best test accuracy: with no test image it never comes, and
    Distill would find no best.pth. dataset_split warns, the trainer stops before writing."""
    data = write_dataset(tmp_path / "data", {0: 12, 1: 10, 2: 6, 3: 5, 4: 4}, test_counts={0: 2, 1: 2})
    with pytest.warns(UserWarning, match="the tail classes have no test images"):
        split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    out = tmp_path / "kmdn"
    with pytest.raises(SystemExit):
        rmodel_main(["--split", str(tmp_path / "split"), "--out", str(out), "--epochs", "1", *TINY])
    assert "lists no test images of the tail classes" in capsys.readouterr().err and not out.exists()
    # A tail of one class without test images: refused, not first warned of as if it trained.
    data = write_dataset(tmp_path / "one", {0: 12, 1: 10, 2: 4}, test_counts={0: 2, 1: 2})
    with pytest.warns(UserWarning):
        split_main(["--data-root", str(data), "--out", str(tmp_path / "one-split"), "--threshold", "67"])
    assert load_split(tmp_path / "one-split").tail == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SystemExit):
            rmodel_main(["--split", str(tmp_path / "one-split"), "--out", str(out), "--epochs", "1", *TINY])
    assert "lists no test images of the tail classes" in capsys.readouterr().err and not out.exists()


def test_written_files_follow_the_umask(tmp_path):
    """mkstemp makes owner-only files; results must be readable as open() would make them."""
    script = ("import os, sys; os.umask(0o022); sys.path.insert(0, sys.argv[1]); "
              "from tgn.io import atomic_write_text; atomic_write_text(sys.argv[2], 'x')")
    subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "report.txt")], check=True)
    assert (tmp_path / "report.txt").stat().st_mode & 0o777 == 0o644


def test_files_are_written_where_python_has_no_fchmod(tmp_path):
    """Windows has os.fchmod from Python 3.13 only: every atomic write must still work."""
    script = ("import os, sys; del os.fchmod; sys.path.insert(0, sys.argv[1]); "
              "from tgn.io import atomic_write_text; atomic_write_text(sys.argv[2], 'x')")
    run = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "report.txt")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "report.txt").read_text() == "x"


@pytest.mark.skipif(torch_version() < (2, 4), reason="Adam's fused kernel runs on CPUs from torch 2.4 on")
@pytest.mark.parametrize("saved_fused", [True, None])  # a GPU run's kernel; earlier versions' on CPUs
def test_a_resumed_optimizer_keeps_this_runs_kernel(saved_fused):
    model = torch.nn.Linear(3, 2)
    saved = torch.optim.Adam(model.parameters(), fused=saved_fused)
    model(torch.ones(1, 3)).sum().backward()
    saved.step()
    this_run = adam(model.parameters())
    assert this_run.param_groups[0]["fused"] is True  # CPUs have the fused kernel from torch 2.4 on
    restore_optimizer(this_run, saved.state_dict())
    assert this_run.param_groups[0]["fused"] is True and len(this_run.state) == 2
    model(torch.ones(1, 3)).sum().backward()
    this_run.step()  # the restored state works with this run's kernel
    assert all(int(state["step"]) == 2 for state in this_run.state.values())


def test_the_flags_given_are_told_from_defaults_however_they_are_spelled():
    """--resume fills the flags left out from the run: what counts as given must be exact
    (an abbreviation, --flag=value, a repeated flag, a value equal to the default)."""
    from Classification.train import build_parser

    args = build_parser().parse_args(["--epo", "3", "--lr=0.001", "--extra", "a", "--extra", "b", "--milestones",
                                      "--resume"])
    assert args.given == {"epochs", "lr", "extra", "milestones", "resume"}
    assert args.epochs == 3 and args.lr == 0.001 and args.extra == [Path("a"), Path("b")] and args.milestones == []
    assert "given" not in vars(args)  # no flag: options.json neither records nor compares it
    args = build_parser().parse_args(["--pretrained", "r50.pth"])
    assert args.given == {"pretrained"} and args.arch == "resnet50" and args.extra == []
    assert args.pretrained == str(Path.cwd() / "r50.pth")  # recorded absolute: a --resume elsewhere reads it


def test_a_resume_prints_repeated_flags_as_typed_and_may_turn_a_recorded_switch_off(tmp_path, capsys):
    """What a --resume takes is printed as it would be typed (--extra A --extra B, not
    --extra A B); --skip-bad-images, once recorded, is taken when left out and turned off by
    --no-skip-bad-images."""
    from Classification.train import build_parser
    from tgn.resume import take_the_runs_flags

    extra = [tmp_path / "gen a", tmp_path / "b"]
    run = build_parser().parse_args(["--extra", str(extra[0]), "--extra", str(extra[1]), "--skip-bad-images"])
    (tmp_path / "options.json").write_text(json.dumps(vars(run), default=str))
    resumed = build_parser().parse_args(["--resume"])
    assert {"extra", "skip_bad_images"} <= set(take_the_runs_flags(resumed, tmp_path))
    assert resumed.skip_bad_images and resumed.extra == extra
    taken = capsys.readouterr().out
    assert f"--extra '{extra[0]}' --extra {extra[1]}, " in taken and "--skip-bad-images" in taken
    turned_off = build_parser().parse_args(["--resume", "--no-skip-bad-images"])
    take_the_runs_flags(turned_off, tmp_path)
    assert turned_off.skip_bad_images is False


def test_runs_of_earlier_versions_resume_with_their_fusion_layer(cdtg_inputs, capsys):
    out = cdtg_inputs / "legacy"
    legacy = ("--fusion-lr-mul", "0", "--flip")  # the plain Linear of earlier versions
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "2", "--clip", "none", *legacy))
    options = json.loads((out / "options.json").read_text())
    (out / "options.json").write_text(json.dumps({**options, "ada_every": 256}))  # without --augment: inert
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "3", "--clip", "none",
                                                                      "--resume", "--fusion-lr-mul", "0.01")),
                      "was started with --fusion-lr-mul 0")
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "3", "--clip", "none", "--resume"))  # as it started
    taken = capsys.readouterr().out
    assert "left out, as the run was started: " in taken and "--fusion-lr-mul 0.0" in taken and "--flip" in taken
    cdtg_train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--clip", "none", "--resume", *legacy))
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["2.pt", "3.pt", "4.pt"]


def test_generation_folders_of_earlier_versions_refuse_other_jpeg_settings(cdtg_inputs, tmp_path, capsys):
    run = cdtg_inputs / "run"
    cdtg_train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none"))
    ckpt = run / "checkpoint" / "1.pt"
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation.json").write_text(json.dumps(  # as an earlier version wrote it (JPEG quality 95)
        {"ckpt": str(ckpt.resolve()), "r": 0.05, "truncation": 1.0, "seed": 0}))
    base = ["--ckpt", str(ckpt), "--out", str(folder), "--device", "cpu", "--per-class", "1"]
    expect_user_error(capsys, lambda: generation_main(base), "other settings (quality)")
    generation_main([*base, "--quality", "95"])
    assert len(list((folder / "2").iterdir())) == 1


@pytest.mark.parametrize("size", [6, 9, 10, 13])
def test_a_one_image_last_training_batch_is_left_out_for_any_process_count(monkeypatch, size):
    """BatchNorm cannot train on one image: a global last batch of one is dropped (sizes 9
    and 13 at batch 4); with 2 processes one of 2 too (size 6, 10: one image each), and
    otherwise 2 processes train on the batches of 1."""
    single = [len(batch) for batch in make_loader(list(range(size)), 4, train=True)]
    assert single == [4] * (size // 4) + ([size % 4] if size % 4 > 1 else [])
    assert sum(len(batch) for batch in make_loader(list(range(size)), 4, train=False)) == size  # tests see all
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        shares.append([len(batch) for batch in make_loader(list(range(size)), 4, train=True)])
    assert [a + b for a, b in zip(*shares)] == [4] * (size // 4) + ([size % 4] if size % 4 > 2 else [])
    assert min(min(batches) for batches in shares) >= 2


def test_official_weights_refuse_listings_in_another_class_order(tmp_path, capsys):
    """Official files record no classes: output k is the k-th class by training count. A split
    made by an earlier version (ascending ids) would map them to the wrong classes."""
    data = write_dataset(tmp_path / "data", {0: 3, 1: 9, 2: 5, 3: 12, 4: 4})
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    torch.manual_seed(0)
    for group, count in (("head", 2), ("tail", 3)):
        torch.save(FeatureResNet("resnet18", num_classes=count, width=4).state_dict(), tmp_path / f"{group}.pth")
    args = ["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"),
            "--head-ckpt", str(tmp_path / "head.pth"), "--tail-ckpt", str(tmp_path / "tail.pth"),
            "--epochs", "1", "--image-size", "16", "--batch-size", "4", "--workers", "0"]
    distill_main(args)  # the split lists each group by count: official files fit
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    split["tail"] = sorted(split["tail"])  # as earlier versions wrote it: [0, 2, 4], counts 3, 5, 4
    (tmp_path / "split" / "split.json").write_text(json.dumps(split))
    expect_user_error(capsys, lambda: distill_main([*args, "--out", str(tmp_path / "kmdn2")]),
                      "is an official file, whose outputs follow the training counts")


def test_official_teacher_refuses_tail_data_in_another_class_order(cdtg_inputs, capsys):
    torch.manual_seed(0)
    torch.save(FeatureResNet("resnet18", num_classes=3, width=4).state_dict(), cdtg_inputs / "official_mt.pth")
    args = [*tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1", "--clip", "none"),
            "--teacher", str(cdtg_inputs / "official_mt.pth")]
    manifest = cdtg_inputs / "cdtg_data" / "tail_classes.json"
    tail = json.loads(manifest.read_text())
    assert [c["train_count"] for c in tail["classes"]] == [8, 4, 4]
    for cls, label in zip(tail["classes"], [1, 0, 2]):  # counts in label order: 4, 8, 4
        cls["label"] = label
    manifest.write_text(json.dumps(tail))
    expect_user_error(capsys, lambda: cdtg_train_main(args), "is an official file")


def test_an_unconditional_generator_given_for_a_cdtg_checkpoint_is_named(tmp_path):
    """A StyleGAN2 or SWAGAN checkpoint without classes has a g_ema too: one line, not a
    KeyError from reading its class embedding."""
    from CDTG.checkpoint import load_cdtg_checkpoint

    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}}, tmp_path / "unconditional.pt")
    with pytest.raises(UserError, match="is not a CDTG checkpoint: its generator has no class embedding"):
        load_cdtg_checkpoint(tmp_path / "unconditional.pt")


def test_teacher_files_of_the_wrong_kind_are_named(cdtg_inputs, tmp_path):
    from Classification.model import build_classifier
    from CDTG.tail_data import load_tail_classes, load_teacher
    from tgn.checkpoint import load_checkpoint

    tail = load_tail_classes(cdtg_inputs / "cdtg_data")
    torch.save(build_classifier("resnet18", 3).state_dict(), tmp_path / "classifier.pth")
    with pytest.raises(UserError, match="is a classifier .*the tail model .--teacher. is a KMDN model"):
        load_teacher(tmp_path / "classifier.pth", tail)
    short = load_checkpoint(cdtg_inputs / "M_T.pth")
    torch.save({**short, "distilled": False}, tmp_path / "M_T.pth")  # Distill.py ran too few epochs
    with pytest.warns(UserWarning, match="too short to distill"):
        load_teacher(tmp_path / "M_T.pth", tail)


def test_warnings_of_the_scripts_are_one_line(tmp_path):
    data = write_dataset(tmp_path / "data", {0: 7, 1: 6, 2: 2})
    (data / "classes.json").unlink()
    result = subprocess.run([sys.executable, str(ROOT / "KMDN" / "dataset_split.py"), "--data-root", str(data),
                             "--out", str(tmp_path / "split")], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"warning: {data / 'classes.json'} not found: classes are named by id "
                                          "(CLIP prompts need real names)",
                                          "warning: the head group has one class: cross-entropy over one class is 0, "
                                          "so UModel.py trains nothing"]


def test_flag_errors_and_help_print_once_per_node_under_torchrun(monkeypatch, capsys):
    from tgn.cli import make_parser

    parser = make_parser("doc")
    parser.add_argument("--size", type=int)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--size", "big"])
        assert exit_info.value.code == 2
        assert ("error: argument --size: invalid int value: 'big'" in capsys.readouterr().err) == printed
        with pytest.raises(SystemExit):
            parser.parse_args(["--help"])
        assert bool(capsys.readouterr().out) == printed


def test_a_recorded_value_is_parsed_again_by_its_flag():
    """What --resume takes from options.json goes through the flag's own type and choices:
    a switch, a repeated path flag and a list of numbers each in their recorded form."""
    from tgn.cli import make_parser, positive_int, recorded_value

    parser = make_parser("doc")
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--extra", type=Path, action="append")
    parser.add_argument("--milestones", type=positive_int, nargs="*")
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    actions = parser.parse_args([]).flags
    assert recorded_value(actions["flip"], True) is True
    assert recorded_value(actions["extra"], ["/x", "/y"]) == ["/x", "/y"]
    assert recorded_value(actions["extra"], None) is None
    assert recorded_value(actions["milestones"], [3, "5"]) == [3, 5]
    for key, value, why in (("flip", 1, "not true or false"), ("extra", "/x", "not a list"),
                            ("extra", [3], "3 is not text"), ("milestones", [True], "True is not a value of it"),
                            ("milestones", [2.5], "'2.5' is not a number"), ("mode", "c", "'c' is not one of a, b"),
                            ("mode", ["a"], "a list")):
        with pytest.raises(ValueError, match=re.escape(why)):
            recorded_value(actions[key], value)


def test_evaluation_batches_need_not_divide_over_the_processes(monkeypatch):
    """test.py's --batch-size is images per model call: 7 over 2 processes is fine there
    (training refuses it: its global batch sets the statistics)."""
    from tgn.errors import CollectiveError

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "planned_world_size", lambda: 2)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        batches = list(make_loader(list(range(11)), 7, train=False))
        assert max(len(batch) for batch in batches) == 4
        seen += [int(item) for batch in batches for item in batch]
    assert sorted(seen) == list(range(11))
    with pytest.raises(CollectiveError, match="must be a multiple of the 2 processes"):
        make_loader(list(range(11)), 7, train=True)


# ----- paths recorded for later stages ------------------------------------------------------------

def test_recorded_paths_are_absolute_and_keep_symlinks(tmp_path, monkeypatch):
    from CDTG.dataset_split import main as cdtg_split_main

    write_dataset(tmp_path / "v1", {0: 6, 1: 5, 2: 4, 3: 4, 4: 3})
    (tmp_path / "DATA").symlink_to(tmp_path / "v1")  # pointed at a new version later: followed, not frozen
    monkeypatch.chdir(tmp_path)
    split_main(["--data-root", "DATA", "--out", "split"])
    assert json.loads((tmp_path / "split" / "split.json").read_text())["data_root"] == str(tmp_path / "DATA")
    cdtg_split_main(["--split", "split", "--data-root", "./sub/../DATA", "--out", "cdtg"])
    assert json.loads((tmp_path / "cdtg" / "tail_classes.json").read_text())["data_root"] == str(tmp_path / "DATA")
    umodel_main(["--split", "split", "--out", "kmdn", "--epochs", "1", *TINY])
    options = json.loads((tmp_path / "kmdn" / "head" / "options.json").read_text())
    assert options["split"] == str(tmp_path / "split") and options["out"] == str(tmp_path / "kmdn")


def test_a_tilde_the_shell_left_is_the_home_folder(tmp_path, monkeypatch):
    from KMDN.dataset_split import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["--data-root", "~/DATA", "--out=~/runs/split"])
    assert args.data_root == tmp_path / "DATA" and args.out == tmp_path / "runs" / "split"
    from Classification.train import build_parser as classifier_parser

    args = classifier_parser().parse_args(["--data-root", "~/DATA", "--extra=~/gen", "--pretrained", "~/r50.pth"])
    assert args.extra == [tmp_path / "gen"] and args.pretrained == str(tmp_path / "r50.pth")


def test_class_names_the_console_cannot_encode_are_printed_escaped(tmp_path):
    """A Windows console or log file (cp1252) cannot encode '港口': the stage goes on and
    prints it as escapes."""
    data = write_dataset(tmp_path / "data", {0: 12, 1: 10, 2: 3}, class_names={0: "港口", 1: "Łódź", 2: "dam"})
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    run = subprocess.run([sys.executable, str(ROOT / "KMDN/dataset_split.py"), "--data-root", str(data),
                          "--out", str(tmp_path / "split")], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr.decode("cp1252", "replace")
    assert b"\\u6e2f\\u53e3" in run.stdout and (tmp_path / "split" / "split.json").is_file()


def test_a_gpu_index_the_machine_lacks_is_one_line(monkeypatch):
    """--device cuda:N on a machine with N GPUs (indices 0..N-1) is refused with one line
    naming the GPU count, instead of failing later inside CUDA."""
    from tgn import distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.checked_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="--device cuda:1: this machine has 1 GPUs"):
        dist.checked_device("cuda:1")


def test_nothing_is_written_into_the_dataset_itself(toy_data, split_dir, tmp_path, capsys):
    """A split written into DATA/anno left two training annotation files there, and every
    later stage refused the dataset; the dataset folder and its train/ and test/ are refused
    alike, a folder of one's own inside DATA is not."""
    from CDTG.dataset_split import main as cdtg_split_main
    from Classification.test import main as cls_test_main

    anno = sorted(os.listdir(toy_data / "anno"))
    for out in (toy_data / "anno", toy_data, toy_data / "train" / "runs"):
        expect_user_error(capsys, lambda: split_main(["--data-root", str(toy_data), "--out", str(out)]),
                          f"--out {out} is the dataset folder {toy_data} or inside its anno/, train/, test/")
    expect_user_error(capsys, lambda: cdtg_split_main(["--split", str(split_dir), "--out", str(toy_data / "anno")]),
                      "is the dataset folder")
    common = ["--data-root", str(toy_data), "--device", "cpu", "--workers", "0"]
    expect_user_error(capsys, lambda: cls_train_main([*common, "--out", str(toy_data / "test" / "cls"), "--arch",
                                                      "resnet18", "--pretrained", "none", "--image-size", "16"]),
                      "is the dataset folder")
    (tmp_path / "model.pth").write_bytes(b"unused: refused before it is read")
    expect_user_error(capsys, lambda: cls_test_main([*common, "--ckpt", str(tmp_path / "model.pth"), "--out",
                                                     str(toy_data)]), "is the dataset folder")
    assert sorted(os.listdir(toy_data / "anno")) == anno and not (toy_data / "train" / "runs").exists()
    assert not (toy_data / "split.json").exists() and not (toy_data / "test" / "cls").exists()
    assert not (toy_data / "train" / "kmdn").exists()
    inside = str(toy_data / "train" / "kmdn")
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", inside, *TINY]),
                      "is the dataset folder")
    expect_user_error(capsys, lambda: distill_main(["--split", str(split_dir), "--out", inside, "--epochs", "1"]),
                      "is the dataset folder")
    cache = str(toy_data / "train" / "0")  # a class folder: its resized copies would join the class
    for script, flags in ((umodel_main, ["--split", str(split_dir), *TINY]),
                          (distill_main, ["--split", str(split_dir), "--epochs", "1"]),
                          (cls_train_main, [*common, "--arch", "resnet18", "--pretrained", "none"])):
        expect_user_error(capsys, lambda: script([*flags, "--out", str(tmp_path / "runs"), "--cache", cache]),
                          f"--cache {cache} is the dataset folder")
    assert not any(path.is_dir() for path in (toy_data / "train" / "0").iterdir())  # no cache made there
    (toy_data / "test" / "model.pth").write_bytes(b"unused")  # test.py's report folder would be beside it
    expect_user_error(capsys, lambda: cls_test_main([*common, "--ckpt", str(toy_data / "test" / "model.pth")]),
                      "the report folder (beside --ckpt; pass --out)")
    (toy_data / "test" / "model.pth").unlink()
    split_main(["--data-root", str(toy_data), "--out", str(toy_data / "splits" / "t50")])  # one's own folder
    assert (toy_data / "splits" / "t50" / "split.json").is_file()


def test_the_dataset_is_recognised_through_symlinks(toy_data, tmp_path):
    """DATA/train a link to another disk: a folder under it is still inside the dataset."""
    from tgn.data import check_outside_dataset

    shutil.move(toy_data / "train", tmp_path / "elsewhere")
    (toy_data / "train").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for out in (toy_data / "train" / "runs", tmp_path / "elsewhere" / "runs", toy_data / "anno" / "new" / "deeper"):
        with pytest.raises(UserError, match="is the dataset folder"):
            check_outside_dataset(out, toy_data)
    (tmp_path / "link").symlink_to(toy_data, target_is_directory=True)
    with pytest.raises(UserError, match="is the dataset folder"):
        check_outside_dataset(tmp_path / "link", toy_data)
    check_outside_dataset(tmp_path / "runs" / "split", toy_data)
    check_outside_dataset(toy_data / "splits", toy_data)


def test_a_file_or_a_split_given_for_the_dataset_is_named_for_what_it_is(split_dir, tmp_path, capsys):
    (tmp_path / "clip.pt").write_bytes(b"x")
    for root, message in ((tmp_path / "clip.pt", f"dataset folder {tmp_path / 'clip.pt'} is a file; pass the folder"),
                          (split_dir, f"{split_dir} is a split (KMDN/dataset_split.py's output), not a dataset")):
        expect_user_error(capsys, lambda: split_main(["--data-root", str(root), "--out", str(tmp_path / "s")]),
                          message)


@pytest.mark.parametrize("keep_full, way_on", [("2", "did not finish?); move it away to resume from 2.pt, or pass"),
                                                ("1", "did not finish?); or pass --overwrite instead of --resume")])
def test_a_damaged_newest_cdtg_checkpoint_names_the_ways_on(cdtg_inputs, capsys, keep_full, way_on):
    """The checkpoint before it is named only if it is whole (--keep-full 1 cuts it to what
    generation reads, which cannot resume)."""
    run = cdtg_inputs / "run"
    args = ["--clip", "none", "--keep-full", keep_full]
    cdtg_train_main(tiny_train_args(cdtg_inputs, run, "--iter", "4", *args))
    newest = run / "checkpoint" / "4.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # cut short, as by a failed copy
    expect_user_error(capsys, lambda: cdtg_train_main(tiny_train_args(cdtg_inputs, run, "--iter", "6", *args,
                                                                      "--resume")),
                      f"--resume: cannot load CDTG checkpoint {newest}: the file is cut short or damaged (a copy or "
                      f"download that {way_on}")


def test_model_files_of_other_kinds_given_for_resnet_weights_are_named(tmp_path):
    from tgn.checkpoint import state_dict_of

    distill_last = {"models": {}, "optimizers": {}, "epoch": 3, "best": {}}
    cdtg = {"g_ema": {}, "g": {}}
    for checkpoint, message in ((cdtg, "is a CDTG checkpoint (a generator), not the ResNet weights"),
                                (distill_last, "is Distill.py's last.pth, which only resumes its run: pass"),
                                ({"epoch": 3}, "holds neither a state dict nor a model checkpoint of this project"),
                                ({"state_dict": 5}, "holds neither a state dict nor a model checkpoint of this project")):
        with pytest.raises(UserError, match=re.escape(f"--head-ckpt last.pth {message}")):
            state_dict_of(checkpoint, "--head-ckpt last.pth")


def test_a_milestone_listed_twice_is_refused(split_dir, tmp_path, capsys):
    """MultiStepLR divides once per listing: '--milestones 2 2' divided by 100 at epoch 2."""
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "k"), *TINY,
                                                   "--milestones", "3", "2", "2"]),
                      "--milestones lists epoch 2 twice, which would divide --lr by 100 there")
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "k"), *TINY,
                                                   "--milestones", "2", "2", "2"]),
                      "--milestones lists epoch 2 3 times, which would divide --lr by 1000 there")
    # --resume with nothing to resume starts a new run: held to the same rule.
    expect_user_error(capsys, lambda: umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "k"), *TINY,
                                                   "--milestones", "2", "2", "--resume"]),
                      "--milestones lists epoch 2 twice")
    assert not (tmp_path / "k").exists()


def test_a_generation_file_given_to_extra_names_its_folder(toy_data, tmp_path, capsys):
    from Classification.samples import read_extra

    (tmp_path / "anno.txt").write_text("3/gen_000000.jpg 3\n")
    with pytest.raises(UserError, match="is a file; pass the generation folder that holds it"):
        read_extra(tmp_path / "anno.txt", {3: "class 3"})


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("data_root"), "was edited by hand (its 'data_root' or 'classes' is gone)"),
    (lambda m: m["classes"][0].pop("prompt"), "class 1 of its list needs a 'prompt' (str)"),
    (lambda m: m["classes"][1].update(prompt=None), "class 2 of its list needs a 'prompt' (str)"),
    (lambda m: m["classes"][0].update(prompt=["A photo of a dam"]), "needs a 'prompt' (str)"),
    (lambda m: m["classes"][0].update(label="0"), "class 1 of its list needs a 'label' (int)"),
    (lambda m: m["classes"][0].update(prompt="  "), "has an empty prompt"),
    (lambda m: m["classes"][0].update(prompt="A photo of a {name}"), "is a template ('A photo of a {name}')"),
    (lambda m: m["classes"][1].update(prompt=m["classes"][0]["prompt"].upper()), "two tail classes have the prompt"),
])
def test_a_tail_manifest_edited_by_hand_is_refused_in_one_line(cdtg_inputs, edit, message):
    """The README invites editing its prompts: a slip is named, not a traceback."""
    from CDTG.tail_data import check_prompts_name_classes, load_tail_classes

    manifest = cdtg_inputs / "cdtg_data" / "tail_classes.json"
    recorded = json.loads(manifest.read_text())
    edit(recorded)
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(UserError) as refused:
        tail = load_tail_classes(cdtg_inputs / "cdtg_data")
        check_prompts_name_classes(tail)  # where the CLIP loss reads them: two alike are refused there
    assert message in str(refused.value)
