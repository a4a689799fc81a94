"""KMDN: group training learns, resumes exactly, and distillation follows its schedule."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import decode_sizes, exit_message, script_accuracies
from KMDN.dataset_split import main as split_main
from KMDN.Distill import main as distill_main
from KMDN.distillation import distillation_loss, freeze, make_distill_loss_fn, student_of_epoch
from KMDN.RModel import main as rmodel_main
from KMDN.UModel import main as umodel_main
from tgn.checkpoint import load_checkpoint
from tgn.resnet import FeatureResNet

TINY = ["--arch", "resnet18", "--width", "4", "--pretrained", "none", "--image-size", "16",
        "--batch-size", "8", "--workers", "0"]


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_group_outputs_follow_the_ranking_as_in_the_official_scripts(tmp_path):
    """Official KMDN and CDTG weights record no class order: their output k is the group's
    k-th class by training count, descending (DIOR head 13, 18, 15, 0, ...)."""
    from CDTG.dataset_split import main as cdtg_split_main
    from CDTG.tail_data import load_tail_classes
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", {0: 3, 1: 9, 2: 5, 3: 12, 4: 4})
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    assert split["head"] == [3, 1] and split["tail"] == [2, 4, 0]
    head_lines = (tmp_path / "split" / "head_train.txt").read_text().splitlines()
    assert {line.split()[-1] for line in head_lines} == {"3", "1"}  # annotations keep the dataset's ids
    cdtg_split_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "cdtg")])
    tail = json.loads((tmp_path / "cdtg" / "tail_classes.json").read_text())
    assert [(c["label"], c["id"]) for c in tail["classes"]] == [(0, 2), (1, 4), (2, 0)]
    assert load_tail_classes(tmp_path / "cdtg").ids == [2, 4, 0]  # in label order, read back
    rmodel_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"), "--epochs", "1", *TINY])
    assert load_checkpoint(tmp_path / "kmdn" / "tail" / "best.pth")["class_ids"] == [2, 4, 0]


def test_tail_model_learns_the_easy_task(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "8", "--lr", "0.01", *TINY])
    metrics = read_metrics(out / "tail" / "metrics.jsonl")
    assert len(metrics) == 8
    assert metrics[-1]["train_loss"] < 0.6 * metrics[0]["train_loss"]
    best = load_checkpoint(out / "tail" / "best.pth")
    assert best["class_ids"] == [2, 3, 4] and best["class_names"] == ["class 2", "class 3", "class 4"]
    assert best["metrics"]["overall_accuracy"] > 0.6  # chance is 1/3
    assert best["model_config"] == {"arch": "resnet18", "num_classes": 3, "width": 4}


def test_resume_equals_uninterrupted_run(split_dir, tmp_path, capsys):
    """A run resumed with only --epochs (the flags left out are the run's, from its
    options.json) ends as the uninterrupted run does, bit for bit."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    umodel_main(["--split", str(split_dir), "--out", str(straight), "--epochs", "3", "--milestones", "2", *TINY])
    umodel_main(["--split", str(split_dir), "--out", str(interrupted), "--epochs", "2", "--milestones", "2", *TINY])
    capsys.readouterr()
    umodel_main(["--split", str(split_dir), "--out", str(interrupted), "--epochs", "3", "--resume", "--workers", "0"])
    assert ("--resume: left out, as the run was started: --arch resnet18, --width 4, --pretrained none, "
            "--batch-size 8, --milestones 2, --image-size 16\n") in capsys.readouterr().out
    a = load_checkpoint(straight / "head" / "last.pth")
    b = load_checkpoint(interrupted / "head" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert read_metrics(straight / "head" / "metrics.jsonl") [-1]["lr"] == pytest.approx(1e-4)
    # The optimizer took it, not only the log: Adam stepped the last epoch at a tenth.
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_resume_parses_the_values_it_takes_from_options_json_as_their_flags_do(split_dir, tmp_path, capsys):
    """A value options.json records (edited by hand) is taken as its flag would take it: a
    number written as text becomes one; one the flag refuses is refused in one line, not
    a traceback mid-run."""
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    capsys.readouterr()
    record = out / "head" / "options.json"
    options = json.loads(record.read_text())
    resume = ["--split", str(split_dir), "--out", str(out), "--epochs", "2", "--resume"]
    for key, bad, why in (("batch_size", 0, "0 must be a positive integer"), ("lr", "fast", "'fast' is not a number"),
                          ("arch", "resnet7", "'resnet7' is not one of resnet50, resnet18"),
                          ("milestones", 30, "not a list"), ("weight_decay", None, "null, where it takes a value")):
        record.write_text(json.dumps({**options, key: bad}))
        flag = "--" + key.replace("_", "-")
        err = exit_message(capsys, umodel_main, resume)
        assert f"--resume: {record} records {flag} " in err and f"which {flag} refuses ({why})" in err, err
    # A run older than --full-decode (its options.json has none) decoded in draft mode.
    record.write_text(json.dumps({key: value for key, value in options.items() if key != "full_decode"}))
    assert "was started with no --full-decode, this call has --full-decode" in exit_message(
        capsys, umodel_main, [*resume, "--full-decode"])
    # A seed past 32 bits, which --seed took before it checked them: refused in options.json
    # alone (a hand edit), taken where the checkpoint records it too (the run trained with it).
    record.write_text(json.dumps({**options, "seed": 5_000_000_000}))
    assert "which --seed refuses" in exit_message(capsys, umodel_main, resume)
    last = torch.load(out / "head" / "last.pth", weights_only=True)
    torch.save({**last, "options": {**last["options"], "seed": 5_000_000_000}}, out / "head" / "last.pth")
    record.write_text(json.dumps({**options, "seed": 5_000_000_000, "batch_size": "8"}))
    capsys.readouterr()
    umodel_main(resume)
    taken = capsys.readouterr().out
    assert "--batch-size 8," in taken and "--seed 5000000000" in taken
    assert len(read_metrics(out / "head" / "metrics.jsonl")) == 2


def test_full_decode_reaches_the_head_tail_and_distillation_images(split_dir, tmp_path, monkeypatch):
    sizes = decode_sizes(monkeypatch)
    out = tmp_path / "kmdn"
    for main in (umodel_main, rmodel_main):
        main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", "--full-decode", *TINY])
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "2", "--distill-interval", "1",
                  "--full-decode", "--batch-size", "8", "--workers", "0"])
    assert len(sizes) > 2 * 37 and set(sizes) == {None}  # 37 training and 15 test images, read twice or more
    # A resumed Distill rebuilds each model at the size it trained at (saved as its image_size).
    assert load_checkpoint(out / "distill" / "last.pth")["trained_at"] == {"head": 16, "tail": 16}
    sizes.clear()
    umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "drafted"), "--epochs", "1", *TINY])
    assert sizes and set(sizes) == {16}


def test_resume_alone_keeps_the_runs_length_and_a_given_split_brings_its_dataset(split_dir, tmp_path, capsys):
    """--resume alone: the run's --epochs too (not the default 100); a --split given names
    its own dataset (the run's --data-root is not taken then); --group, no flag, is compared."""
    import shutil

    from tgn.split import load_split

    out, moved = tmp_path / "kmdn", tmp_path / "moved"
    shutil.copytree(load_split(split_dir).data_root, moved)
    umodel_main(["--split", str(split_dir), "--data-root", str(moved), "--out", str(out), "--epochs", "2", *TINY])
    capsys.readouterr()
    umodel_main(["--out", str(out), "--resume", "--workers", "0"])
    said = capsys.readouterr().out
    assert f"--split {split_dir}, --data-root {moved}, " in said and "has trained all 2 epochs" in said
    assert json.loads((out / "head" / "options.json").read_text())["epochs"] == 2
    (out / "head" / "options.json").unlink()  # lost with a copied folder: last.pth's copy of the options serves
    umodel_main(["--out", str(out), "--resume", "--workers", "0"])
    assert "has trained all 2 epochs" in capsys.readouterr().out
    shutil.rmtree(moved)
    umodel_main(["--split", str(split_dir), "--out", str(out), "--resume", "--epochs", "3", "--workers", "0"])
    assert load_checkpoint(out / "head" / "last.pth")["epoch"] == 2  # on the split's own dataset
    shutil.copytree(out / "head", out / "tail")
    capsys.readouterr()
    err = exit_message(capsys, rmodel_main, ["--out", str(out), "--resume", "--workers", "0"])
    assert "was started with --group head, this call has --group tail" in err


def test_existing_results_are_not_overwritten(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    with pytest.raises(SystemExit) as exit_info:
        umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    assert exit_info.value.code == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("epoch, interval, student", [
    (0, 50, "head"), (49, 50, "head"), (50, 50, "tail"), (99, 50, "tail"), (100, 50, "head"), (3, 2, "tail"),
])
def test_distillation_schedule(epoch, interval, student):
    assert student_of_epoch(epoch, interval) == student


def test_distillation_loss_is_ce_plus_alpha_mse():
    logits, labels = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    student, teacher = torch.full((1, 2, 2, 2), 2.0), torch.zeros(1, 2, 2, 2)  # squared error 4, not 2
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert distillation_loss(logits, labels, student, teacher, 0.2).item() == pytest.approx(ce.item() + 0.2 * 4)


def test_teacher_is_frozen_and_gets_no_gradient():
    torch.manual_seed(0)
    teacher = FeatureResNet("resnet18", num_classes=2, width=4)
    student = FeatureResNet("resnet18", num_classes=3, width=4)
    freeze(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss, _ = make_distill_loss_fn(teacher, 0.2)(student, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN statistics too


def test_distill_alternates_students_and_writes_named_outputs(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    head_before = load_checkpoint(out / "head" / "best.pth")["state_dict"]
    tail_before = load_checkpoint(out / "tail" / "best.pth")["state_dict"]
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "2", "--distill-interval", "1",
                  "--batch-size", "8", "--workers", "0"])
    options = json.loads((out / "distill" / "options.json").read_text())
    assert options["image_size"] == 16  # the size M_H and M_T were trained at, not 224
    metrics = read_metrics(out / "distill" / "metrics.jsonl")
    assert [m["student"] for m in metrics] == ["head", "tail"]
    state = load_checkpoint(out / "distill" / "last.pth")
    # Epoch 1 trains only M_H, epoch 2 only M_T: both moved, each exactly once.
    assert not torch.equal(state["models"]["head"]["conv1.weight"], head_before["conv1.weight"])
    assert not torch.equal(state["models"]["tail"]["conv1.weight"], tail_before["conv1.weight"])
    m_t = load_checkpoint(out / "distill" / "M_T.pth")
    assert m_t["class_ids"] == [2, 3, 4] and m_t["group"] == "tail" and m_t["distilled"]
    assert (out / "distill" / "M_H.pth").is_file()


def test_distill_keeps_only_the_students_workers(split_dir, tmp_path, monkeypatch):
    """The idle group's training workers would sit through all its teacher epochs."""
    import multiprocessing

    import tgn.engine

    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    before, alive = len(multiprocessing.active_children()), []
    train_one_epoch = tgn.engine.train_one_epoch

    def counting(*args, **kwargs):
        stats = train_one_epoch(*args, **kwargs)
        alive.append(len(multiprocessing.active_children()) - before)
        return stats

    monkeypatch.setattr(tgn.engine, "train_one_epoch", counting)
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "4", "--distill-interval", "1",
                  "--batch-size", "8", "--workers", "1"])
    assert alive == [1, 1, 1, 1]  # the student's one worker, never the other group's too
    assert [m["student"] for m in read_metrics(out / "distill" / "metrics.jsonl")] == ["head", "tail"] * 2


@pytest.mark.parametrize("keep_fc", [False, True])
def test_each_student_starts_with_a_new_classifier_as_in_the_official_distill(split_dir, tmp_path, keep_fc):
    """The official Distill loads M_H and M_T without their fc layers; --keep-fc keeps them.
    At a learning rate of 1e-9 an epoch moves no weight by more than about 1e-8."""
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    given = {group: load_checkpoint(out / group / "best.pth")["state_dict"] for group in ("head", "tail")}
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "2", "--distill-interval", "1",
                  "--batch-size", "8", "--workers", "0", "--lr", "1e-9", *(["--keep-fc"] if keep_fc else [])])
    learnt = load_checkpoint(out / "distill" / "last.pth")["models"]
    for group in ("head", "tail"):
        assert torch.allclose(learnt[group]["conv1.weight"], given[group]["conv1.weight"], atol=1e-6)
        same_fc = torch.allclose(learnt[group]["fc.weight"], given[group]["fc.weight"], atol=1e-6)
        assert same_fc == keep_fc, group
        assert learnt[group]["fc.weight"].abs().max() > 0.01  # drawn, not zeroed


def test_a_distill_run_of_an_earlier_version_resumes_with_keep_fc_which_it_had(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    run = ["--split", str(split_dir), "--out", str(out), "--distill-interval", "1", "--batch-size", "8", "--workers",
           "0", "--lr", "1e-9"]
    distill_main([*run, "--epochs", "1", "--keep-fc"])
    options = json.loads((out / "distill" / "options.json").read_text())
    del options["keep_fc"]  # what earlier versions recorded: they had no such flag, and kept fc
    (out / "distill" / "options.json").write_text(json.dumps(options))
    capsys.readouterr()
    err = exit_message(capsys, distill_main, [*run, "--epochs", "2", "--resume"])
    assert err.endswith("was started by an earlier version, which kept M_H's and M_T's classifiers: resume it "
                        "with --keep-fc")
    distill_main([*run, "--epochs", "2", "--resume", "--keep-fc"])
    tail = load_checkpoint(out / "distill" / "last.pth")["models"]["tail"]
    given = load_checkpoint(out / "tail" / "best.pth")["state_dict"]
    assert torch.allclose(tail["fc.weight"], given["fc.weight"], atol=1e-6)
    distill_main([*run, "--epochs", "3", "--resume", "--keep-fc"])  # recorded now: the same call resumes again
    capsys.readouterr()
    distill_main([*run, "--epochs", "4", "--resume"])  # left out: as the run was started
    assert "--resume: left out, as the run was started: --keep-fc, " in capsys.readouterr().out
    assert json.loads((out / "distill" / "options.json").read_text())["keep_fc"] is True
    # Nothing to resume: a new run, with this version's defaults.
    (out / "distill" / "last.pth").unlink()
    for name in ("M_H.pth", "M_T.pth"):
        (out / "distill" / name).unlink()
    (out / "distill" / "options.json").write_text(json.dumps(options))
    distill_main([*run, "--epochs", "1", "--resume"])
    assert json.loads((out / "distill" / "options.json").read_text())["keep_fc"] is False


def test_a_resumed_distillation_needs_neither_given_model(split_dir, tmp_path, capsys):
    """last.pth records both models: M_H and M_T as given may be gone (or replaced by a new
    UModel run) when the distillation resumes, and it ends as the uninterrupted run does."""
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    common = ["--split", str(split_dir), "--distill-interval", "1", "--batch-size", "8", "--workers", "0"]
    distill_main([*common, "--out", str(out), "--epochs", "2"])
    straight = load_checkpoint(out / "distill" / "last.pth")["models"]
    (out / "distill").rename(tmp_path / "straight")
    distill_main([*common, "--out", str(out), "--epochs", "1"])
    for group in ("head", "tail"):
        (out / group / "best.pth").unlink()
    capsys.readouterr()
    distill_main([*common, "--out", str(out), "--epochs", "2", "--resume", "--tail-ckpt", str(tmp_path / "gone.pth")])
    assert f"note: --tail-ckpt not read: the run resumes from {out / 'distill' / 'last.pth'}" in capsys.readouterr().out
    resumed = load_checkpoint(out / "distill" / "last.pth")["models"]
    for group in ("head", "tail"):
        assert all(torch.equal(resumed[group][key], value) for key, value in straight[group].items()), group
    assert load_checkpoint(out / "distill" / "M_T.pth")["options"]["image_size"] == 16
    capsys.readouterr()
    distill_main([*common, "--out", str(out), "--epochs", "3", "--resume"])  # --tail-ckpt taken from the run: no note
    assert "not read" not in capsys.readouterr().out
    (out / "distill" / "last.pth").write_bytes(b"cut short")
    capsys.readouterr()
    err = exit_message(capsys, distill_main, [*common, "--out", str(out), "--epochs", "3", "--resume"])
    assert "--resume: cannot read" in err and "last.pth" in err  # not the given files it stands in for


def test_a_run_too_short_to_distill_m_t_says_so(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    capsys.readouterr()
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", "--distill-interval", "1",
                  "--image-size", "24", "--batch-size", "8", "--workers", "0"])  # the groups trained at 16 px
    captured = capsys.readouterr()
    assert "warning: M_T was not distilled: the tail model learns in epochs 2 to 2, this run has 1" in captured.err
    assert load_checkpoint(out / "distill" / "M_T.pth")["options"]["image_size"] == 16  # the size it trained at
    assert load_checkpoint(out / "distill" / "M_H.pth")["options"]["image_size"] == 24
    assert "distilled tail model" not in captured.out
    m_t = load_checkpoint(out / "distill" / "M_T.pth")
    assert m_t["distilled"] is False and load_checkpoint(out / "distill" / "M_H.pth")["distilled"] is True
    tail = load_checkpoint(out / "tail" / "best.pth")["state_dict"]
    assert all(torch.equal(tail[k], m_t["state_dict"][k]) for k in tail)  # passed on unchanged


def test_a_model_of_a_stopped_run_is_named_when_the_next_stage_reads_it(split_dir, tmp_path):
    """best.pth or M_T.pth of a run stopped before its last epoch (Ctrl-C, a time limit) is
    the best model so far: Distill and CDTG say so when they read it; of an ended run, nothing."""
    import re
    import warnings

    from tgn.resume import warn_if_unfinished

    out = tmp_path / "kmdn"
    for train in (umodel_main, rmodel_main):
        train(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    options = json.loads((out / "head" / "options.json").read_text())
    (out / "head" / "options.json").write_text(json.dumps({**options, "epochs": 3}))  # as if stopped after epoch 1
    with pytest.warns(UserWarning) as warned:
        distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", "--distill-interval", "1",
                      "--batch-size", "8", "--workers", "0"])
    said = [str(w.message) for w in warned if "stopped" in str(w.message)]
    assert len(said) == 1 and re.match(f"the head model {re.escape(str(out / 'head' / 'best.pth'))} comes from a "
                                       "run stopped after epoch 1 of 3: it is the best model so far", said[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unfinished(out / "distill" / "M_H.pth", "--teacher")  # the distill run ended
    options = json.loads((out / "distill" / "options.json").read_text())
    (out / "distill" / "options.json").write_text(json.dumps({**options, "epochs": 4}))
    with pytest.warns(UserWarning, match="comes from a run stopped after epoch 1 of 4"):
        warn_if_unfinished(out / "distill" / "M_T.pth", "--teacher")


def test_teacher_unchanged_during_its_teaching_epoch(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    tail_before = load_checkpoint(out / "tail" / "best.pth")["state_dict"]
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", "--image-size", "16",
                  "--batch-size", "8", "--workers", "0"])
    tail_after = load_checkpoint(out / "distill" / "last.pth")["models"]["tail"]
    assert all(torch.equal(tail_before[k], tail_after[k]) for k in tail_before)


def test_distill_refuses_a_model_of_another_class_count(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    bare = tmp_path / "bare.pth"  # the official format: weights alone, no group recorded
    torch.save(torch.load(out / "tail" / "best.pth", weights_only=True)["state_dict"], bare)
    with pytest.raises(SystemExit) as exit_info:
        distill_main(["--split", str(split_dir), "--out", str(out), "--head-ckpt", str(bare), "--epochs", "1",
                      "--workers", "0"])
    assert exit_info.value.code == 2
    assert "has 3 classes, the split's head group has 2" in capsys.readouterr().err


def test_distill_needs_an_image_size_when_the_models_disagree(split_dir, tmp_path, capsys):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY, "--image-size", "24"])
    with pytest.raises(SystemExit):
        distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", "--workers", "0"])
    assert "M_H was trained at 16 px, M_T at 24 px; pass --image-size" in capsys.readouterr().err
    assert not (out / "distill").exists()
    common = ["--split", str(split_dir), "--out", str(out), "--workers", "0", "--distill-interval", "1"]
    distill_main([*common, "--epochs", "1", "--image-size", "20"])
    distill_main([*common, "--epochs", "2", "--resume"])  # keeps the size the run started with
    assert json.loads((out / "distill" / "options.json").read_text())["image_size"] == 20


def test_distill_learning_rate_counts_the_runs_epochs(split_dir, tmp_path):
    """As the official script: the steps count the run's epochs, not each student's."""
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "4", "--distill-interval", "2",
                  "--milestones", "1", "3", "--batch-size", "8", "--workers", "0"])
    metrics = read_metrics(out / "distill" / "metrics.jsonl")
    assert [m["student"] for m in metrics] == ["head", "head", "tail", "tail"]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])


def test_best_checkpoints_are_the_most_accurate_epochs(split_dir, tmp_path, monkeypatch):
    import tgn.engine

    script_accuracies(monkeypatch, [0.5, 0.9, 0.6, 0.3, 0.8, 0.4, 0.2, 0.7], tgn.engine)
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "3", *TINY])  # 0.5, 0.9, 0.6
    assert load_checkpoint(out / "head" / "best.pth")["epoch"] == 1
    assert load_checkpoint(out / "head" / "last.pth")["epoch"] == 2
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])  # 0.3
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "4", "--distill-interval", "2",
                  "--batch-size", "8", "--workers", "0"])  # head 0.8, 0.4; tail 0.2, 0.7
    assert load_checkpoint(out / "distill" / "M_H.pth")["epoch"] == 0
    assert load_checkpoint(out / "distill" / "M_T.pth")["epoch"] == 3


def test_the_feature_term_pulls_the_student_toward_the_teacher(split_dir, tmp_path):
    """Distill's alpha weighs the layer3 MSE: with alpha 10 M_H's features on the head images
    end much nearer M_T's than with alpha 0 (plain CE), from the same start."""
    from KMDN.stage import group_datasets
    from tgn.images import ImageList, build_transform, normalize_pixels
    from tgn.split import load_split

    groups = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(groups), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(groups), "--epochs", "1", *TINY])
    head_images, _ = group_datasets(load_split(split_dir), "head", 16)
    unflipped = ImageList(head_images.samples, build_transform(16, train=False), 16)
    images = normalize_pixels(torch.stack([image for image, _ in unflipped]))
    teacher = FeatureResNet("resnet18", num_classes=3, width=4).eval()
    teacher.load_state_dict(load_checkpoint(groups / "tail" / "best.pth")["state_dict"])

    def feature_gap(head_state):  # as the loss sees it: the student in training mode, the teacher frozen
        student = FeatureResNet("resnet18", num_classes=2, width=4).train()
        student.load_state_dict(head_state)
        with torch.no_grad():
            return torch.nn.functional.mse_loss(student(images)[1], teacher(images)[1]).item()

    def distilled_gap(alpha):
        out = tmp_path / f"alpha-{alpha}"
        distill_main(["--split", str(split_dir), "--out", str(out), "--head-ckpt", str(groups / "head" / "best.pth"),
                      "--tail-ckpt", str(groups / "tail" / "best.pth"), "--alpha", alpha, "--epochs", "2",
                      "--distill-interval", "2", "--lr", "0.01", "--batch-size", "8", "--workers", "0"])
        return feature_gap(load_checkpoint(out / "distill" / "last.pth")["models"]["head"])

    start = feature_gap(load_checkpoint(groups / "head" / "best.pth")["state_dict"])
    plain, distilled = distilled_gap("0"), distilled_gap("10")
    assert distilled < 0.5 * start and distilled < 0.5 * plain


def test_a_later_epoch_only_as_good_does_not_replace_best(split_dir, tmp_path, monkeypatch):
    """On a tie (common on small test sets) best.pth stays at the earlier epoch."""
    import tgn.engine

    script_accuracies(monkeypatch, [0.5, 0.9, 0.9], tgn.engine)
    umodel_main(["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), "--epochs", "3", *TINY])
    assert load_checkpoint(tmp_path / "kmdn" / "head" / "best.pth")["epoch"] == 1


def test_a_later_distillation_epoch_only_as_good_does_not_replace_the_students_best(split_dir, tmp_path,
                                                                                   monkeypatch):
    import tgn.engine

    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    script_accuracies(monkeypatch, [0.5, 0.5, 0.7, 0.7], tgn.engine)  # M_H learns twice (M_T teaches), then M_T
    distill_main(["--split", str(split_dir), "--out", str(out), "--epochs", "4", "--distill-interval", "2",
                  "--batch-size", "8", "--workers", "0"])
    assert load_checkpoint(out / "distill" / "M_H.pth")["epoch"] == 0
    assert load_checkpoint(out / "distill" / "M_T.pth")["epoch"] == 2


def test_a_resumed_run_keeps_the_best_epoch_of_the_run_before(split_dir, tmp_path, monkeypatch):
    """The first epoch after a --resume is the best only if it beats the run before it."""
    import tgn.engine

    script_accuracies(monkeypatch, [0.9, 0.5, 0.6], tgn.engine)
    common = ["--split", str(split_dir), "--out", str(tmp_path / "kmdn"), *TINY]
    umodel_main([*common, "--epochs", "2"])
    umodel_main([*common, "--epochs", "3", "--resume"])
    best = load_checkpoint(tmp_path / "kmdn" / "head" / "best.pth")
    assert best["epoch"] == 0 and best["best_accuracy"] == pytest.approx(0.9)


def test_a_resumed_distillation_keeps_each_students_best(split_dir, tmp_path, monkeypatch):
    """After --resume a student's first epoch replaces M_H.pth or M_T.pth only if it beats its
    best before (the resume test compares last.pth only)."""
    import tgn.engine

    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    script_accuracies(monkeypatch, [0.9, 0.5], tgn.engine)  # M_H's two epochs as the student
    common = ["--split", str(split_dir), "--out", str(out), "--distill-interval", "2", "--batch-size", "8",
              "--workers", "0"]
    distill_main([*common, "--epochs", "1"])
    distill_main([*common, "--epochs", "2", "--resume"])
    assert load_checkpoint(out / "distill" / "M_H.pth")["epoch"] == 0
    assert load_checkpoint(out / "distill" / "last.pth")["best"]["head"] == pytest.approx(0.9)


def test_distill_refuses_a_checkpoint_of_other_classes_of_the_group(split_dir, tmp_path, capsys):
    """A head model of another split with as many head classes is not distilled as if its
    outputs were this split's classes."""
    from tgn.io import atomic_torch_save

    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    other = load_checkpoint(out / "head" / "best.pth")
    assert other["class_ids"] == [0, 1]
    other["class_ids"] = [1, 0]  # another split's head of two classes (or this one's in another order)
    atomic_torch_save(tmp_path / "other_head.pth", other)
    capsys.readouterr()
    err = exit_message(capsys, distill_main, ["--split", str(split_dir), "--out", str(out), "--head-ckpt",
                                              str(tmp_path / "other_head.pth"), "--epochs", "1", "--batch-size", "8",
                                              "--workers", "0"])
    assert "was trained on classes [1, 0]" in err and not (out / "distill").exists()
    # Another dataset's head model, its classes under the same ids, with as many images.
    atomic_torch_save(tmp_path / "other_head.pth", {**other, "class_ids": [0, 1], "class_names": ["dam", "bridge"]})
    err = exit_message(capsys, distill_main, ["--split", str(split_dir), "--out", str(out), "--head-ckpt",
                                              str(tmp_path / "other_head.pth"), "--epochs", "1", "--batch-size", "8",
                                              "--workers", "0"])
    assert "was trained with class 0 named 'dam', the split's head group names it" in err
    assert not (out / "distill").exists()


def test_the_distillation_loss_compares_with_the_teachers_features_of_the_same_batch():
    """The teacher's features come from the student's own batch (not flipped, not another)."""
    torch.manual_seed(0)
    teacher = FeatureResNet("resnet18", num_classes=2, width=4)
    student = FeatureResNet("resnet18", num_classes=3, width=4)
    reference = FeatureResNet("resnet18", num_classes=3, width=4)
    reference.load_state_dict(student.state_dict())
    freeze(teacher)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss, _ = make_distill_loss_fn(teacher, 0.2)(student, images, labels)
    logits, feature = reference(images)  # train mode, as the student
    with torch.no_grad():
        _, teacher_feature = teacher(images)
    expected = F.cross_entropy(logits, labels) + 0.2 * F.mse_loss(feature, teacher_feature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_distill_and_gan_defaults_are_the_official_ones():
    """The paper's Distill, CDTG and generation defaults, which no run in the suite uses as they are."""
    from CDTG.config import GanConfig
    from CDTG.generation import build_parser as generation_parser
    from KMDN.Distill import build_parser as distill_parser

    args = distill_parser().parse_args([])
    assert (args.alpha, args.distill_interval, args.epochs, args.batch_size) == (0.2, 50, 100, 64)
    assert args.milestones == [30, 60, 90, 120, 150, 180] and args.lr == 1e-3 and args.weight_decay == 1e-4
    cfg = GanConfig()
    assert (cfg.iterations, cfg.batch, cfg.lr, cfg.r1, cfg.path_regularize, cfg.path_batch_shrink) == \
        (200_000, 8, 0.002, 10.0, 2.0, 2)
    assert (cfg.d_reg_every, cfg.g_reg_every, cfg.mixing, cfg.fusion_noise, cfg.ada_target) == (16, 4, 0.9, 0.8, 0.6)
    generation = generation_parser().parse_args(["--ckpt", "200000.pt"])
    assert (generation.per_class, generation.r, generation.truncation) == (7000, 0.05, 1.0)


def test_the_optimizer_gets_the_weight_decay():
    """Adam gets --weight-decay (without it, only a loss threshold of a training test would notice)."""
    from tgn.engine import TrainConfig
    from tgn.optim import make_optimizer

    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, weight_decay=1e-4, milestones=[])
    (group,) = make_optimizer(torch.nn.Linear(2, 2), cfg).param_groups
    assert group["lr"] == 1e-3 and group["weight_decay"] == 1e-4


def test_a_group_of_one_class_is_warned_about_where_its_model_trains(tmp_path):
    """Cross-entropy over one class is 0: the split warns, and so does the run that would
    spend its epochs on it."""
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", {0: 12, 1: 10, 2: 8})
    with pytest.warns(UserWarning, match="head group has one class"):
        split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    with pytest.warns(UserWarning, match=f"the head group of {tmp_path / 'split'} has one class: cross-entropy over "
                                         "one class is 0, so this model learns nothing"):
        umodel_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"), "--epochs", "1", *TINY])


def test_the_test_images_are_read_alike_every_time_unflipped(split_dir):
    """Flips are training's augmentation: a test image read twice is the same tensor, or the
    epoch of best test accuracy (best.pth, M_H.pth, M_T.pth) would be chosen by chance."""
    from KMDN.stage import group_datasets
    from tgn.split import load_split

    _, test = group_datasets(load_split(split_dir), "head", 16)
    reads = []
    for seed in range(8):
        torch.manual_seed(seed)
        reads.append(test[0][0])
    assert all(torch.equal(read, reads[0]) for read in reads)


def test_the_teacher_is_run_without_autograd_and_needs_no_gradient():
    """No graph is built through the teacher (memory), and its parameters take none."""
    from KMDN.distillation import unfreeze

    teacher = FeatureResNet("resnet18", num_classes=2, width=4)
    student = FeatureResNet("resnet18", num_classes=2, width=4)
    unfreeze(teacher)  # as after the epochs it was the student
    freeze(teacher)
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    seen = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(torch.is_grad_enabled()))
    make_distill_loss_fn(teacher, 0.5)(student, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert seen == [False]


@pytest.fixture
def group_models(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    rmodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "1", *TINY])
    return out


def test_a_students_classifier_is_drawn_only_in_its_first_epoch(split_dir, group_models, monkeypatch):
    import KMDN.distillation as distillation

    fc_at_start, real = [], distillation.train_and_test_epoch

    def spy(net, student, *args, **kwargs):
        fc_at_start.append(student.fc.weight.detach().clone())
        return real(net, student, *args, **kwargs)

    monkeypatch.setattr(distillation, "train_and_test_epoch", spy)
    distill_main(["--split", str(split_dir), "--out", str(group_models), "--epochs", "2", "--distill-interval", "2",
                  "--batch-size", "8", "--workers", "0", "--lr", "1e-9"])  # (a learning rate that leaves fc be)
    assert len(fc_at_start) == 2 and torch.allclose(fc_at_start[0], fc_at_start[1], atol=1e-6)


def test_a_resumed_distillation_keeps_the_sizes_the_models_were_trained_at(split_dir, group_models):
    run = ["--split", str(split_dir), "--out", str(group_models), "--distill-interval", "2", "--batch-size", "8",
           "--workers", "0"]
    distill_main([*run, "--epochs", "1"])
    distill_main([*run, "--epochs", "2", "--resume"])
    assert load_checkpoint(group_models / "distill" / "last.pth")["trained_at"] == {"head": 16, "tail": 16}


def test_the_default_models_are_the_best_and_official_ones_count_as_trained_at_224(split_dir, group_models,
                                                                                     tmp_path):
    import KMDN.distillation as distillation
    from tgn.split import load_split

    bare = tmp_path / "bare.pth"  # an official file: the weights alone
    torch.save(load_checkpoint(group_models / "head" / "best.pth")["state_dict"], bare)
    assert distillation.load_group_model(bare, load_split(split_dir), "head").training_size == 224
    best = load_checkpoint(group_models / "tail" / "best.pth")["state_dict"]
    (group_models / "tail" / "last.pth").unlink()
    distill_main(["--split", str(split_dir), "--out", str(group_models), "--epochs", "1", "--batch-size", "8",
                  "--workers", "0"])  # M_T never learns in one epoch of M_H's: passed on as given
    passed_on = load_checkpoint(group_models / "distill" / "M_T.pth")["state_dict"]
    assert all(torch.equal(best[key], passed_on[key]) for key in best)


def test_fit_divides_the_learning_rate_at_its_milestone_and_best_holds_no_optimizer(split_dir, tmp_path):
    out = tmp_path / "kmdn"
    umodel_main(["--split", str(split_dir), "--out", str(out), "--epochs", "3", "--milestones", "2", "--lr", "0.001",
                 *TINY])
    metrics = read_metrics(out / "head" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 1e-3, 1e-4])
    best = load_checkpoint(out / "head" / "best.pth")
    assert "optimizer" not in best and "scaler" not in best  # a model to pass on, not a run to resume
    assert load_checkpoint(out / "head" / "last.pth")["epoch"] == 2
