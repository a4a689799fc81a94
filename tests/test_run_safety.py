"""The shared run-safety helpers on their own: run folders and their owners, options.json,
atomic writes, weight loading, resume checks, torchrun shares, optimizer state."""
import argparse
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tgn import distributed as dist
from tgn import io as tgn_io
from tgn import resume as tgn_resume
from tgn import runlock
from tgn.checkpoint import load_all_but_classifier, load_weights, map_tensors, state_dict_of
from tgn.errors import UserError
from tgn.handoff import read_generation_settings
from tgn.optim import restore_optimizer
from tgn.run_folder import (OUTPUT_MARKERS, check_folder_of_runs, check_no_other_output, check_run_dir,
                            run_folder_owner, save_options)


# --- run folders and whose they are ------------------------------------------------------------

@pytest.mark.parametrize("marker", [marker for marker, _ in OUTPUT_MARKERS])
def test_every_output_marker_refuses_the_folder_for_another_script(tmp_path, marker):
    (tmp_path / marker).write_text("{}")
    with pytest.raises(UserError, match="is an output folder of"):
        check_no_other_output(tmp_path)
    check_no_other_output(tmp_path, writes=marker)  # the script's own output
    with pytest.raises(UserError, match="is an output folder of"):
        check_folder_of_runs(tmp_path)


def test_a_run_folder_owner_is_told_by_any_one_of_its_flags():
    assert run_folder_owner({"iter": 10, "batch": 4}) == "CDTG/train.py"
    assert run_folder_owner({"alpha": 0.5}) == "KMDN/Distill.py"
    assert run_folder_owner({"sampler": "random", "lr": 0.1}) == "Classification/train.py"
    assert run_folder_owner({"lr": 0.1}) is None


def test_a_kmdn_out_holding_only_an_empty_head_folder_is_still_checked(tmp_path):
    (tmp_path / "head").mkdir()
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(UserError, match="output folder"):
        check_folder_of_runs(tmp_path)


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, b"pid 4242 on elsewhere\\n")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(runlock.fcntl is None, reason="no POSIX record locks (Windows): runs go unguarded there")
def test_a_folder_in_use_is_refused_as_in_use_whatever_it_holds(tmp_path, monkeypatch):
    """Its results are another run's live files: 'in use by another run' comes first."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / "best.pth").write_bytes(b"x")
        with pytest.raises(UserError, match=r"in use by another run \(pid 4242 on elsewhere\)"):
            check_run_dir(run)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
        runlock.release_folders()


def test_options_json_records_absolute_paths_the_process_count_and_the_runs_start(tmp_path, monkeypatch):
    """Read by test.py and --resume from any folder; --resume keeps how the run started."""
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(split=Path("splits/a"), extra=[Path("gen1"), Path("../gen2")], init="first.pt", lr=0.1)
    save_options(tmp_path, args)
    saved = json.loads((tmp_path / "options.json").read_text())
    assert saved["split"] == str(tmp_path / "splits" / "a")
    assert saved["extra"] == [str(tmp_path / "gen1"), str(tmp_path.parent / "gen2")]
    assert saved["processes"] == 1
    args.init, args.lr = "other.pt", 0.2
    assert save_options(tmp_path, args, resumed=True)["init"] == "first.pt"
    assert json.loads((tmp_path / "options.json").read_text())["lr"] == 0.2
    monkeypatch.setattr(dist, "planned_world_size", lambda: 4)
    assert save_options(tmp_path, argparse.Namespace(lr=0.1), write=False)["processes"] == 4


# --- atomic writes ------------------------------------------------------------------------------

def test_an_atomic_write_goes_through_a_hidden_temp_file_beside_its_target(tmp_path, monkeypatch):
    """Beside it: one file system, so the rename is atomic, and remove_temp_files finds what
    a killed run left."""
    target = tmp_path / "sub" / "report.json"
    renames, real_replace = [], os.replace
    monkeypatch.setattr(tgn_io.os, "replace", lambda src, dst: renames.append((Path(src), Path(dst))) or
                        real_replace(src, dst))
    tgn_io.atomic_write_bytes(target, b"abc")
    [(temp, renamed)] = renames
    assert renamed == target and temp.parent == target.parent and tgn_io.TEMP_FILE.fullmatch(temp.name)
    assert target.read_bytes() == b"abc" and not temp.exists()


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot open a folder to sync it")
def test_an_atomic_write_syncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    """The new name is an entry of the folder: until the folder is on disk, a power cut can
    lose the rename."""
    events, real_replace, real_fsync = [], os.replace, os.fsync
    monkeypatch.setattr(tgn_io.os, "replace", lambda src, dst: events.append("rename") or real_replace(src, dst))

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("folder", info.st_ino) if stat.S_ISDIR(info.st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(tgn_io.os, "fsync", fsync)
    tgn_io.atomic_write_text(tmp_path / "sub" / "options.json", "{}")
    assert events == ["file", "rename", ("folder", (tmp_path / "sub").stat().st_ino)]


def test_only_a_refused_replace_is_retried(tmp_path, monkeypatch):
    """Windows refuses a replace while another program has the file open: that is retried;
    a full disk is said at once."""
    slept = []
    monkeypatch.setattr(tgn_io, "REPLACE_RETRIES_S", (0.1, 0.2))
    monkeypatch.setattr(tgn_io.time, "sleep", slept.append)

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tgn_io.os, "replace", full_disk)
    with pytest.raises(UserError, match="No space left"):
        tgn_io.atomic_write_text(tmp_path / "a.json", "{}")
    assert slept == [] and list(tmp_path.iterdir()) == []


# --- weights ------------------------------------------------------------------------------------

class Net(torch.nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.fc = torch.nn.Linear(6, classes)


def test_weights_of_another_shape_or_other_names_are_refused_in_one_line():
    state = Net().state_dict()
    load_weights(Net(), state, "w.pth")
    with pytest.raises(UserError, match="1 missing and 0 unexpected"):
        load_weights(Net(), {k: v for k, v in state.items() if k != "bn.running_mean"}, "w.pth")
    with pytest.raises(UserError, match=r"body.weight has shape \(4, 6\)"):  # as many numbers, another shape
        load_weights(Net(), {**state, "body.weight": torch.zeros(4, 6)}, "w.pth")
    source = Net(classes=5)
    model = Net(classes=3)
    fresh_fc = model.fc.weight.clone()
    load_all_but_classifier(model, source.state_dict(), "--pretrained x", "the model")
    assert torch.equal(model.body.weight, source.body.weight) and torch.equal(model.fc.weight, fresh_fc)
    with pytest.raises(UserError, match="1 unexpected"):  # a file of another architecture
        load_all_but_classifier(Net(), {**source.state_dict(), "head.weight": torch.zeros(1)}, "x", "the model")
    with pytest.raises(UserError, match="neither a state dict"):
        state_dict_of({"state_dict": {"w": torch.ones(1), "note": "x"}})
    with pytest.raises(UserError, match="1 missing"):  # parameters the file lacks would stay random
        load_all_but_classifier(Net(), {k: v for k, v in source.state_dict().items() if k != "bn.bias"}, "x", "m")
    with pytest.raises(UserError, match="holds neither"):
        state_dict_of({})


def test_checkpoints_load_onto_the_cpu_without_running_code_from_them(tmp_path, monkeypatch):
    """A checkpoint saved on a GPU loads on a machine without one; a file cannot run code."""
    from tgn.checkpoint import load_checkpoint

    torch.save({"w": torch.ones(1)}, tmp_path / "m.pth")
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    assert torch.equal(load_checkpoint(tmp_path / "m.pth")["w"], torch.ones(1))
    assert calls[0]["map_location"] == "cpu" and calls[0]["weights_only"] is True


def test_a_kmdn_model_file_that_does_not_fit_is_refused_in_one_line(tmp_path):
    """M_H/M_T files are rebuilt from their names and shapes, then loaded strictly."""
    from tgn.resnet import FeatureResNet, load_feature_resnet

    state = FeatureResNet("resnet18", num_classes=5, width=8).state_dict()
    model, _ = load_feature_resnet(_saved(tmp_path / "whole.pth", state))
    assert model.config == {"arch": "resnet18", "num_classes": 5, "width": 8}
    for name, damaged in (("short", {k: v for k, v in state.items() if k != "layer4.0.bn1.running_var"}),
                          ("extra", {**state, "foo": torch.zeros(1)})):
        with pytest.raises(UserError, match="does not fit"):
            load_feature_resnet(_saved(tmp_path / f"{name}.pth", damaged))


def test_imagenet_weights_are_torchvisions_v1_at_the_standard_width(monkeypatch):
    """V1 is what the official pretrained=True gave and the file fetch_weights.py downloads
    (DEFAULT would be V2 for ResNet-50)."""
    import torchvision

    from data.fetch_weights import WEIGHTS
    from tgn import resnet

    asked = []

    def offline(weights=None):
        asked.append(weights)
        raise OSError("offline")

    monkeypatch.setattr(torchvision.models, "resnet50", offline)
    with pytest.raises(UserError, match="cannot get torchvision's ImageNet weights for resnet50"):
        resnet.imagenet_state_dict("resnet50")
    assert asked == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1]
    assert asked[0].url == next(weight.url for weight in WEIGHTS if weight.name == "resnet50")
    monkeypatch.setattr(resnet, "imagenet_state_dict", lambda arch: pytest.fail("no download for a narrow model"))
    with pytest.raises(UserError, match="needs the standard width 64"):
        resnet.load_backbone(resnet.FeatureResNet("resnet18", width=8), "imagenet", "resnet18")


def _saved(path, payload):
    torch.save(payload, path)
    return path


def test_map_tensors_keeps_a_state_dicts_type_and_version_metadata():
    """BatchNorm reads its version from _metadata when a state dict loads."""
    state = Net().state_dict()
    mapped = map_tensors({"state_dict": state, "epoch": 3}, lambda t: torch.empty_like(t, device="meta"))
    assert type(mapped["state_dict"]) is type(state) and mapped["state_dict"]._metadata == state._metadata
    assert mapped["epoch"] == 3 and mapped["state_dict"]["fc.weight"].is_meta


def test_an_optimizer_state_of_more_parameter_groups_is_refused():
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.Adam([{"params": [first]}, {"params": [second], "lr": 0.5}])
    first.grad, second.grad = torch.ones(2), torch.ones(3)
    saved.step()
    with pytest.raises(UserError, match="2 parameter groups, this run's optimizer 1"):
        restore_optimizer(torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]), saved.state_dict())


def test_generation_settings_that_are_no_object_are_refused(tmp_path):
    assert read_generation_settings(tmp_path) == {}
    (tmp_path / "generation.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_generation_settings(tmp_path)


# --- resume ---------------------------------------------------------------------------------------

def test_a_flag_that_acts_now_but_did_not_in_the_run_is_refused(tmp_path):
    (tmp_path / "options.json").write_text(json.dumps({"seed": 0, "epochs": 4, "clip": "ViT-B/32",
                                                       "clip_weight": 0.0, "processes": 1}))
    args = argparse.Namespace(resume=True, overwrite=False, seed=0, epochs=4, clip="RN50", clip_weight=0.0)

    def compared(saved, now):  # --clip plays a part only with a CLIP weight
        return tuple({k: v for k, v in side.items() if k != "clip" or side.get("clip_weight")} for side in (saved, now))

    tgn_resume.check_resume(tmp_path, args, done=1, compared=compared, may_change=frozenset({"clip_weight"}))
    args.clip_weight = 1.0  # --clip RN50 acts now, and no --clip acted in the run: not the same run
    with pytest.raises(UserError, match="--clip"):
        tgn_resume.check_resume(tmp_path, args, done=1, compared=compared, may_change=frozenset({"clip_weight"}))


def test_resume_alone_takes_the_runs_flags_but_not_its_machine(tmp_path):
    from Classification.train import build_parser

    first = build_parser().parse_args(["--out", str(tmp_path), "--lr", "0.5", "--device", "cpu", "--workers", "7"])
    save_options(tmp_path, first)
    args = build_parser().parse_args(["--out", str(tmp_path), "--resume"])
    default_workers = args.workers
    taken = tgn_resume.take_the_runs_flags(args, tmp_path)
    assert "lr" in taken and args.lr == 0.5
    assert "workers" not in taken and "device" not in taken and args.workers == default_workers


def test_a_model_of_a_run_stopped_one_epoch_short_is_told_stopped(tmp_path):
    (tmp_path / "options.json").write_text(json.dumps({"epochs": 3}))
    torch.save({"epoch": 1}, tmp_path / "last.pth")
    assert tgn_resume.stopped_early(tmp_path) == (2, 3)
    torch.save({"epoch": 2}, tmp_path / "last.pth")
    assert tgn_resume.stopped_early(tmp_path) is None


# --- torchrun shares ------------------------------------------------------------------------------

def test_the_process_count_is_torchruns_before_joining(monkeypatch):
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert dist.planned_world_size() == 4


def test_the_shards_of_all_ranks_partition_the_items_in_order(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        shares.append(dist.shard(list(range(11))))
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
