"""Classification: released-weights format, --extra merging, long-tail baselines, training,
reports, figures and the comparison table."""
import codecs
import contextlib
import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from Classification.compare import main as compare_main
from Classification.figures import plot_confusion, plot_long_tail
from Classification.long_tail import balanced_softmax_loss, class_balanced_weights, make_loss, make_sampler_weights
from Classification.model import build_classifier, initialise_backbone, load_classifier
from Classification.report import build_report, read_report, report_csv, report_markdown, write_report
from Classification.samples import path_resolver, training_images
from Classification.test import main as evaluate_main
from Classification.train import main as train_main
from conftest import decode_sizes, exit_message, script_accuracies, write_dataset
from KMDN.dataset_split import main as split_main
from tgn.checkpoint import load_checkpoint
from tgn.data import open_dataset
from tgn.engine import cross_entropy_loss
from tgn.errors import UserError
from tgn.split import load_split

FORMATS = Path(__file__).resolve().parent / "official_state_dict_formats.json"  # the released keys and shapes
RELEASED_KEY = "Classification.resnet50(fc=Sequential(Linear(2048,20)))"
COUNTS = {0: 12, 1: 10, 2: 8, 3: 4, 4: 3}
TINY = ["--arch", "resnet18", "--pretrained", "none", "--image-size", "16", "--batch-size", "8", "--workers", "0"]


def write_generated(folder, counts, seed=7):
    """A generated folder as --extra reads it: DIR/<class_id>/<file> and DIR/anno.txt."""
    folder = Path(folder)
    source = write_dataset(folder.with_name(folder.name + "-source"), counts, {cid: 0 for cid in counts}, seed=seed,
                           file_pattern="fake {k}.jpg")
    shutil.move(str(source / "train"), str(folder))
    shutil.move(str(source / "anno" / "TOY_train.txt"), str(folder / "anno.txt"))
    return folder


# --- the released weights ------------------------------------------------------------------

@pytest.fixture(scope="module")
def released_format():
    if not FORMATS.is_file():
        pytest.skip(f"{FORMATS} is not present")
    return json.loads(FORMATS.read_text())[RELEASED_KEY]


@pytest.fixture(scope="module")
def released_file(released_format, tmp_path_factory):
    """A bare state dict with the keys and shapes of the official result.pth."""
    generator = torch.Generator().manual_seed(0)

    def value(key, shape):
        if key.endswith("num_batches_tracked"):
            return torch.tensor(0)
        if key.endswith("running_var"):
            return torch.ones(shape)
        return 0.05 * torch.randn(shape, generator=generator)

    path = tmp_path_factory.mktemp("released") / "result.pth"
    torch.save({key: value(key, shape) for key, shape in released_format.items()}, path)
    return path


def test_classifier_has_the_released_keys_and_shapes(released_format):
    ours = build_classifier("resnet50", 20).state_dict()
    assert list(ours) == list(released_format)
    assert {key: list(tensor.shape) for key, tensor in ours.items()} == released_format


def test_released_weights_load_strictly_and_evaluate(released_file, tmp_path):
    model, meta = load_classifier(released_file)
    assert meta == {} and model.config == {"arch": "resnet50", "num_classes": 20}
    state = torch.load(released_file, weights_only=True)
    assert torch.equal(model.state_dict()["fc.0.weight"], state["fc.0.weight"])
    data = write_dataset(tmp_path / "dior", {cid: 1 for cid in range(20)}, {cid: 1 for cid in range(20)})
    # It records no names: a dataset of 20 classes is scored as DIOR, which this one's names say it is not.
    with pytest.warns(UserWarning, match="result.pth records no class names .* names class 0 'class 0', DIOR's is "
                                         "'airplane' \\(20 of 20 differ\\)"):
        report = evaluate_main(["--data-root", str(data), "--ckpt", str(released_file), "--out",
                                str(tmp_path / "report"), "--image-size", "32", "--workers", "0", "--device", "cpu"])
    assert report["method"] == "result.pth" and report["num_test_images"] == 20
    assert len(report["head"]) == 8 and len(report["tail"]) == 12  # 40% of 20
    assert all(row["generated_count"] is None for row in report["classes"])
    assert "| 0 | class 0 | head | 1 | n/a | 1 |" in (tmp_path / "report" / "report.md").read_text()
    from tgn.class_names import DIOR_CLASSES

    dior_names = {cid: name.replace(" ", "") for cid, name in enumerate(DIOR_CLASSES)}  # as the XML spells them
    dior = write_dataset(tmp_path / "named", {cid: 1 for cid in range(20)}, {cid: 1 for cid in range(20)},
                         class_names=dior_names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_main(["--data-root", str(dior), "--ckpt", str(released_file), "--out", str(tmp_path / "dior-report"),
                       "--image-size", "32", "--workers", "0", "--device", "cpu"])


def test_released_weights_of_another_class_count_are_a_one_line_error(released_file, toy_data, capsys):
    err = exit_message(capsys, evaluate_main, ["--data-root", str(toy_data), "--ckpt", str(released_file)])
    assert "20 outputs" in err and "5 classes" in err


# --- training images and --extra -------------------------------------------------------------

def test_extra_folders_merge_without_duplicates(toy_data, tmp_path):
    generated = write_generated(tmp_path / "generated", {3: 5, 4: 6})
    images = training_images(open_dataset(toy_data), [generated, generated])  # the same folder twice
    assert images.real_counts == [12, 10, 8, 4, 3]
    assert images.generated_counts == [0, 0, 0, 5, 6]
    assert images.duplicates == 11
    paths = [path for path, _ in images.samples]
    assert len(paths) == len(set(paths)) == 37 + 11
    extra = [(Path(path), label) for path, label in images.samples if str(generated) in path]
    assert all(path.parent.name == str(label) for path, label in extra)
    # Reached through a link to the folder, or a file that links to a training image: the same files.
    (tmp_path / "linked").symlink_to(generated)
    assert training_images(open_dataset(toy_data), [generated, tmp_path / "linked"]).duplicates == 11
    image = sorted((generated / "3").iterdir())[0]
    image.unlink()
    image.symlink_to(sorted((toy_data / "train" / "3").iterdir())[0])
    assert training_images(open_dataset(toy_data), [generated]).duplicates == 1


def test_folders_generated_alike_are_warned_of(toy_data, tmp_path):
    """generation.py run twice with the default --seed "for more images" makes the same
    images under the same names in both folders: each would count twice."""
    info = open_dataset(toy_data)
    a, b = write_generated(tmp_path / "a", {3: 3}), write_generated(tmp_path / "b", {3: 2, 4: 2}, seed=8)
    settings = {"weights": "w", "real_features": "f", "r": 0.05, "seed": 0}
    for folder in (a, b):
        (folder / "generation.json").write_text(json.dumps(settings))
    with pytest.warns(UserWarning) as warned:
        training_images(info, [a, b])
    assert [str(w.message) for w in warned] == [
        f"--extra {b} repeats 2 images of --extra {a}: both were generated from the same checkpoint with the same "
        "--seed and settings, so images of the same name are the same image, and each counts twice; generate more "
        "with another --seed"]
    (b / "generation.json").write_text(json.dumps({**settings, "seed": 1}))  # other images
    (tmp_path / "link").symlink_to(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training_images(info, [a, b])
        training_images(info, [a, tmp_path / "link", a])  # one folder given again: its images are used once
        (b / "generation.json").unlink()  # not generation.py's: nothing known of how it was made
        training_images(info, [a, b])


def test_the_duplicate_check_folds_the_case_of_names_where_the_system_does(toy_data, tmp_path, monkeypatch):
    """On Windows, 3/IMG_1.JPG and 3/img_1.jpg are one file: the check folds the case of
    every part, the file name too, as os.path.normcase says the system does."""
    import os

    resolved = path_resolver()
    folder = toy_data / "train" / "3"
    assert resolved(folder / "IMG_1.JPG") != resolved(folder / "img_1.jpg")  # this system keeps case
    monkeypatch.setattr(os.path, "normcase", lambda path: str(path).lower())  # as Windows' does
    resolved = path_resolver()
    assert resolved(folder / "IMG_1.JPG") == resolved(folder / "img_1.jpg") == resolved(folder.parent / "3/Img_1.jpg")


def test_output_index_is_the_rank_of_the_class_id(tmp_path):
    data = write_dataset(tmp_path / "sparse", {2: 3, 5: 2, 9: 2})
    generated = write_generated(tmp_path / "generated", {9: 2})
    images = training_images(open_dataset(data), [generated])
    assert images.real_counts == [3, 2, 2] and images.generated_counts == [0, 0, 2]
    assert [label for path, label in images.samples if str(generated) in path] == [2, 2]


def test_resume_refuses_other_generated_images(toy_data, tmp_path, capsys):
    generated = write_generated(tmp_path / "gen", {3: 4, 4: 4})
    common = ["--data-root", str(toy_data), "--out", str(tmp_path / "cls"), "--device", "cpu", *TINY]
    train_main([*common, "--epochs", "1", "--extra", str(generated), "--name", "TGN (ours)"])
    capsys.readouterr()
    options = (tmp_path / "cls" / "options.json").read_text()
    other = write_generated(tmp_path / "other", {3: 4, 4: 3})
    err = exit_message(capsys, train_main, [*common, "--epochs", "2", "--resume", "--extra", str(other)])
    assert "was trained on other generated images (--extra); resume with the data it started with" in err
    assert (tmp_path / "cls" / "options.json").read_text() == options  # refused before writing anything
    train_main([*common, "--epochs", "2", "--resume"])  # --extra and --name left out: the run's own
    taken = capsys.readouterr().out
    assert f"--resume: left out, as the run was started: --extra {generated}, " in taken
    assert "--name 'TGN (ours)'" in taken
    assert json.loads((tmp_path / "cls" / "options.json").read_text())["extra"] == [str(generated)]
    assert json.loads((tmp_path / "cls" / "report-best" / "report.json").read_text())["method"] == "TGN (ours)"
    # As many images under the same names, generated again from another checkpoint.
    (generated / "generation.json").write_text(json.dumps({"weights": "another checkpoint's", "r": 0.05}))
    err = exit_message(capsys, train_main, [*common, "--epochs", "2", "--resume", "--extra", str(generated)])
    assert "was trained on other generated images (--extra: other images or generation settings)" in err
    (generated / "generation.json").unlink()
    moved = generated.rename(tmp_path / "moved")  # a folder moved elsewhere is the same images
    train_main([*common, "--epochs", "2", "--resume", "--extra", str(moved)])


def test_the_generated_images_fingerprint_is_what_the_folders_hold_in_any_order(toy_data, tmp_path):
    info = open_dataset(toy_data)
    a, b = write_generated(tmp_path / "a", {3: 2}), write_generated(tmp_path / "b", {4: 2}, seed=8)
    both = training_images(info, [a, b]).generated_fingerprint
    assert both == training_images(info, [b, a]).generated_fingerprint
    assert training_images(info, []).generated_fingerprint is None
    (b / "4" / "fake 1.jpg").rename(b / "4" / "other.jpg")  # as many images per class, another one
    (b / "anno.txt").write_text("4/fake 0.jpg 4\n4/other.jpg 4\n")
    assert training_images(info, [a, b]).generated_counts == [0, 0, 0, 2, 2]
    assert training_images(info, [a, b]).generated_fingerprint != both
    # How generation decoded the real images decides the images: whole ('full') is another
    # folder; 'draft' is what a folder of a version that recorded no decoding holds.
    fingerprints = []
    for decode in (None, "draft", "full"):
        recorded = {"weights": "w", "r": 0.05, **({"decode": decode} if decode else {})}
        (a / "generation.json").write_text(json.dumps(recorded))
        fingerprints.append(training_images(info, [a]).generated_fingerprint)
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_resume_refuses_a_dataset_that_names_its_classes_otherwise(toy_data, tmp_path, capsys):
    """Another dataset laid out alike (as many images under the same ids) is not trained on
    as if it were the one the run started with."""
    common = ["--data-root", str(toy_data), "--out", str(tmp_path / "cls"), "--device", "cpu", *TINY]
    train_main([*common, "--epochs", "1"])
    capsys.readouterr()
    classes = json.loads((toy_data / "classes.json").read_text())
    classes["classes"][3]["name"] = "bridge"
    (toy_data / "classes.json").write_text(json.dumps(classes))
    options = (tmp_path / "cls" / "options.json").read_text()
    err = exit_message(capsys, train_main, [*common, "--epochs", "2", "--resume"])
    assert "was trained with class 3 named 'class 3', the data names it 'bridge': resume with the data" in err
    assert (tmp_path / "cls" / "options.json").read_text() == options  # refused before writing anything


def test_resume_refuses_a_last_checkpoint_of_another_shape_before_writing(toy_data, tmp_path, capsys):
    run = tmp_path / "cls"
    common = ["--data-root", str(toy_data), "--out", str(run), "--device", "cpu", *TINY]
    train_main([*common, "--epochs", "1"])
    capsys.readouterr()
    state = load_checkpoint(run / "last.pth")
    state["state_dict"]["fc.0.weight"] = torch.zeros(7, state["state_dict"]["fc.0.weight"].shape[1])
    torch.save(state, run / "last.pth")
    (run / "options.json").unlink()  # the run's flags, which would have caught it, are gone
    # The lock file aside: whichever run takes the folder, even to be refused, names itself there.
    before = {path.name: path.stat().st_mtime_ns for path in run.iterdir() if path.name != ".lock"}
    with pytest.raises(SystemExit) as exit_info:
        train_main([*common, "--epochs", "2", "--resume"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert "last.pth does not fit this model: fc.0.weight has shape (7, " in errors[0]
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir() if path.name != ".lock"} == before


def test_bad_extra_folders_are_refused(toy_data, tmp_path):
    info = open_dataset(toy_data)
    with pytest.raises(UserError, match="no anno.txt"):
        training_images(info, [tmp_path])
    generated = write_generated(tmp_path / "unknown", {7: 1})
    with pytest.raises(UserError, match="class id 7 is not a class"):
        training_images(info, [generated])
    conflicting = write_generated(tmp_path / "conflicting", {3: 1})
    with open(conflicting / "anno.txt", "a") as handle:
        handle.write("3/fake 0.jpg 4\n")
    with pytest.raises(UserError, match="listed with another class"):
        training_images(info, [conflicting])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "anno.txt").write_text("")  # a generation that wrote nothing
    with pytest.raises(UserError, match="anno.txt lists no images"):
        training_images(info, [tmp_path / "empty"])


def test_extra_annotation_pointing_to_a_missing_file_stops_training(toy_data, tmp_path, capsys):
    generated = write_generated(tmp_path / "generated", {3: 2})
    (generated / "3" / "fake 1.jpg").unlink()
    err = exit_message(capsys, train_main, ["--data-root", str(toy_data), "--extra", str(generated),
                                            "--out", str(tmp_path / "cls"), *TINY])
    assert "anno.txt" in err and "fake 1.jpg does not exist" in err
    assert not (tmp_path / "cls" / "last.pth").exists()


# --- long-tail baselines ---------------------------------------------------------------------------

def test_class_balanced_weights_give_every_class_the_same_mass():
    labels = [0, 0, 0, 1, 2, 2]
    weights = class_balanced_weights(labels, 3)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2])
    assert [float(weights[np.array(labels) == c].sum()) for c in range(3)] == pytest.approx([1, 1, 1])
    assert make_sampler_weights("random", labels, 3) is None


def test_balanced_softmax_adds_the_log_prior():
    identity = torch.nn.Identity()
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    labels = torch.tensor([1, 0])
    loss, returned = balanced_softmax_loss([3, 1])(identity, logits, labels)
    # priors 3/4 and 1/4: row 1 -> -log(0.25 / 1), row 2 -> -log(0.75 e / (0.75 e + 0.25 / e))
    row1 = -np.log(0.25)
    row2 = -np.log(0.75 * np.e / (0.75 * np.e + 0.25 / np.e))
    assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-5)
    assert torch.equal(returned, logits)  # accuracy is measured on the plain logits
    balanced, _ = balanced_softmax_loss([5, 5])(identity, logits, labels)
    assert balanced.item() == pytest.approx(cross_entropy_loss(identity, logits, labels)[0].item(), rel=1e-6)
    assert make_loss("ce", [0, 1], 2) is cross_entropy_loss


def test_a_bare_classifier_state_dict_is_rebuilt_from_its_names_and_shapes(tmp_path):
    """As the released result.pth: no meta, so the architecture and class count are read off
    the weights; a file that is not a whole classifier is refused in one line."""
    from Classification.model import check_classes
    from tgn.resnet import FeatureResNet

    state = build_classifier("resnet18", 5).state_dict()
    torch.save(state, tmp_path / "bare.pth")
    model, meta = load_classifier(tmp_path / "bare.pth")
    assert model.config == {"arch": "resnet18", "num_classes": 5} and meta == {}
    torch.save({k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}, tmp_path / "short.pth")
    with pytest.raises(UserError, match="does not fit this model"):
        load_classifier(tmp_path / "short.pth")
    torch.save(FeatureResNet("resnet18", num_classes=5, width=8).state_dict(), tmp_path / "M_T.pth")
    with pytest.raises(UserError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "M_T.pth")
    with pytest.raises(UserError, match=r"was trained on classes \[1, 0\]"):
        check_classes({"class_ids": [1, 0]}, build_classifier("resnet18", 2), [0, 1], "ckpt.pth", "DATA")


def test_balanced_softmax_takes_classes_without_training_images():
    """A class with no image (--skip-bad-images left none, say): its prior is clamped to one
    image's, and the counts keep one entry per class."""
    identity = torch.nn.Identity()
    loss, _ = balanced_softmax_loss([3, 0])(identity, torch.zeros(1, 2), torch.tensor([0]))
    assert loss.item() == pytest.approx(-np.log(3 / 4), rel=1e-6)
    loss, _ = make_loss("balanced-softmax", [0, 0, 1], 3)(identity, torch.zeros(2, 3), torch.tensor([0, 1]))
    assert np.isfinite(loss.item())


# --- training, test.py, report and figures ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short CPU run with generated images for the tail classes 3 and 4."""
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data", COUNTS)
    generated = write_generated(root / "generated", {3: 9, 4: 10})
    out = root / "cls"
    report = train_main(["--data-root", str(data), "--extra", str(generated), "--out", str(out), "--epochs", "5",
                         "--device", "cpu", *TINY])
    return data, out, report


def test_an_unreadable_training_image_is_named_with_what_mends_it(tmp_path, capsys):
    """A generated image is written again by generation (its anno.txt lists it), a real one
    is fixed, removed, or skipped with --skip-bad-images."""
    data = write_dataset(tmp_path / "data", COUNTS)
    generated = write_generated(tmp_path / "generated", {3: 9, 4: 10})
    run = ["--data-root", str(data), "--extra", str(generated), "--epochs", "1", "--device", "cpu", *TINY]
    for bad, hint in ((sorted((generated / "4").iterdir())[0], "run CDTG/generation.py again with the same flags"),
                      (sorted((data / "train" / "0").iterdir())[0], "scripts with --skip-bad-images can leave")):
        whole = bad.read_bytes()
        bad.write_bytes(whole[:100])
        with pytest.raises(SystemExit):  # when the epoch reaches it (progress bars before)
            train_main([*run, "--out", str(tmp_path / bad.parent.name)])
        err = capsys.readouterr().err.splitlines()[-1]
        assert f"error: cannot read image {bad}" in err and hint in err, err
        bad.write_bytes(whole)


def test_training_beats_chance_and_records_its_classes(trained):
    _, out, report = trained
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 5 and {"head_accuracy", "tail_accuracy", "macro_f1"} <= set(metrics[-1])
    best = load_checkpoint(out / "best.pth")
    assert best["metrics"]["overall_accuracy"] >= 0.6  # chance is 0.2
    assert report["overall_accuracy"] == pytest.approx(best["metrics"]["overall_accuracy"])
    assert best["class_ids"] == [0, 1, 2, 3, 4] and best["method"] == "TGN"
    assert best["train_counts"] == [12, 10, 8, 4, 3] and best["generated_counts"] == [0, 0, 0, 9, 10]
    assert best["model_config"] == {"arch": "resnet18", "num_classes": 5}


def test_evaluation_with_an_amp_this_torch_cannot_autocast_is_one_line(trained, tmp_path, monkeypatch, capsys):
    data, out, _ = trained

    def autocast_as_torch_2_1(device_type, dtype):  # CPUs autocast to bf16 only
        if device_type == "cpu" and dtype != torch.bfloat16:
            raise RuntimeError("Currently, AutocastCPU only support Bfloat16 as the autocast_cpu_dtype")
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast_as_torch_2_1)
    with pytest.raises(SystemExit):
        evaluate_main(["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "r"),
                       "--amp", "fp16", "--device", "cpu", "--workers", "0"])
    assert "error: --amp fp16 on cpu: torch" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_head_and_tail_come_from_the_real_counts(trained):
    _, out, report = trained
    # With generated images classes 3 and 4 (13 images) would outrank classes 0 and 1.
    assert report["head"] == [0, 1] and report["tail"] == [2, 3, 4]
    assert report == read_report(out / "report-best")


def test_report_files_and_figures_are_written(trained):
    _, out, report = trained
    folder = out / "report-best"
    markdown = (folder / "report.md").read_text()
    assert "| overall accuracy (OA) |" in markdown and "| tail-class mean accuracy (3 classes) |" in markdown
    assert "| 4 | class 4 | tail | 3 | 10 | 3 |" in markdown
    rows = list(csv.DictReader((folder / "report.csv").open(encoding="utf-8-sig")))
    assert [row["id"] for row in rows] == ["0", "1", "2", "3", "4", "all", "mean", "head", "tail", "f1"]
    assert rows[3]["generated_count"] == "9" and rows[3]["group"] == "tail"
    assert float(rows[5]["accuracy"]) == pytest.approx(report["overall_accuracy"], abs=1e-6)
    for name in ("confusion_matrix.png", "long_tail.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_test_py_reproduces_the_training_report_with_a_split(trained, tmp_path):
    data, out, report = trained
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    again = evaluate_main(["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--split", str(tmp_path / "split"),
                       "--out", str(tmp_path / "report"), "--baseline-report", str(out / "report-best"),
                       "--workers", "0", "--device", "cpu"])
    assert again["confusion_matrix"] == report["confusion_matrix"]
    assert again["head"] == [0, 1] and "split" in again["grouping"]
    assert (tmp_path / "report" / "long_tail.png").is_file()


def test_the_dataset_defaults_to_the_splits_else_the_one_the_checkpoint_trained_on(trained, tmp_path, capsys):
    data, out, report = trained
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    common = ["--workers", "0", "--device", "cpu"]
    from_run = evaluate_main(["--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "r1"), *common])
    from_split = evaluate_main(["--ckpt", str(out / "best.pth"), "--split", str(tmp_path / "split"),
                                "--out", str(tmp_path / "r2"), *common])
    assert from_run["confusion_matrix"] == from_split["confusion_matrix"] == report["confusion_matrix"]
    assert from_run["dataset"] == from_split["dataset"] == report["dataset"]
    train_main(["--split", str(tmp_path / "split"), "--epochs", "1", "--device", "cpu", *TINY,
                "--out", str(tmp_path / "cls")])
    assert json.loads((tmp_path / "cls" / "options.json").read_text())["data_root"] == str(data)
    # --resume without either: the dataset and split the run recorded.
    resumed = train_main(["--resume", "--epochs", "2", "--device", "cpu", *TINY, "--out", str(tmp_path / "cls")])
    assert len((tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "split" in resumed["grouping"] and resumed["dataset"] == report["dataset"]
    # A split of a dataset moved since, given with --data-root: --resume alone reads the moved one.
    shutil.copytree(data, tmp_path / "copy")
    split_main(["--data-root", str(tmp_path / "copy"), "--out", str(tmp_path / "copy_split")])
    (tmp_path / "copy").rename(tmp_path / "moved")
    run = ["--device", "cpu", *TINY, "--out", str(tmp_path / "cls2")]
    train_main(["--split", str(tmp_path / "copy_split"), "--data-root", str(tmp_path / "moved"), "--epochs", "1", *run])
    train_main(["--resume", "--epochs", "2", *run])
    shutil.rmtree(tmp_path / "copy_split")  # gone: it only groups the report's classes
    with pytest.warns(UserWarning, match=f"the run's --split {tmp_path / 'copy_split'} is not found"):
        resumed = train_main(["--resume", "--epochs", "3", *run])
    assert "top 40% of classes" in resumed["grouping"]
    assert len((tmp_path / "cls2" / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert exit_message(capsys, train_main, ["--epochs", "1", "--out", str(tmp_path / "none")]) == (
        "error: which dataset? pass --data-root DATA (or --split, made on it)")
    moved = torch.load(out / "best.pth", weights_only=False)
    moved["options"]["data_root"] = str(tmp_path / "gone")
    torch.save(moved, tmp_path / "moved.pth")
    assert exit_message(capsys, evaluate_main, ["--ckpt", str(tmp_path / "moved.pth"), *common]) == (
        f"error: the dataset {tmp_path / 'moved.pth'} was trained on, {tmp_path / 'gone'}, is not found; "
        "pass --data-root")


def test_test_py_holds_its_report_folder_while_it_writes(trained, tmp_path, monkeypatch):
    """A second test.py into the same new folder is refused while the first writes (it took
    only an existing lock file, so two runs into a fresh folder wrote over each other)."""
    import Classification.stage as stage
    from test_reliability import hold_folder_fails

    data, out, _ = trained
    held = []
    real_write = stage.write_report
    monkeypatch.setattr(stage, "write_report", lambda report, folder: (held.append(hold_folder_fails(folder)),
                                                                        real_write(report, folder)))
    evaluate_main(["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "fresh"),
                   "--workers", "0", "--device", "cpu"])
    assert held == [True]


def test_the_training_report_is_computed_as_test_py_computes_it(tmp_path, monkeypatch):
    """report-best/ is what `test.py --ckpt best.pth` writes, also after training in bf16 and
    channels_last (the GPU defaults): the epochs are evaluated as they train, the report in fp32."""
    import Classification.stage

    evaluate, calls = Classification.stage.evaluate, []
    monkeypatch.setattr(Classification.stage, "evaluate", lambda *args, **kwargs: calls.append(kwargs) or evaluate(
        *args, **kwargs))
    data = write_dataset(tmp_path / "data", COUNTS)
    out = tmp_path / "cls"
    # At 64 px: on 1x1 maps (16 px) torch's CPU bf16 channels_last convolutions now and then
    # gave a NaN loss (test_reliability's precision test).
    report = train_main(["--data-root", str(data), "--out", str(out), "--epochs", "1", "--device", "cpu", *TINY,
                         "--image-size", "64", "--amp", "bf16", "--channels-last"])
    assert calls == [{"amp": "off", "channels_last": False}]
    again = evaluate_main(["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--workers", "0",
                           "--device", "cpu"])
    assert again["confusion_matrix"] == report["confusion_matrix"]
    # channels_last alone: the epochs' memory layout is not the report's either.
    calls.clear()
    train_main(["--data-root", str(data), "--out", str(tmp_path / "cl"), "--epochs", "1", "--device", "cpu", *TINY,
                "--amp", "off", "--channels-last"])
    assert calls == [{"amp": "off", "channels_last": False}]


@pytest.mark.parametrize("flags, resolved", [([], ("off", False)),
                                             (["--amp", "auto", "--channels-last"], ("off", True)),
                                             (["--amp", "bf16", "--channels-last", "off"], ("bf16", False))])
def test_test_py_spells_amp_and_channels_last_as_the_trainers(trained, tmp_path, monkeypatch, flags, resolved):
    import Classification.stage

    data, out, _ = trained
    evaluate, calls = Classification.stage.evaluate, []
    monkeypatch.setattr(Classification.stage, "evaluate", lambda *args, **kwargs: calls.append(kwargs) or evaluate(
        *args, **kwargs))
    evaluate_main(["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--workers", "0", "--device", "cpu",
                   "--out", str(tmp_path / "report"), *flags])
    assert calls == [{"amp": resolved[0], "channels_last": resolved[1]}]  # auto: off on a CPU


def test_test_py_writes_beside_the_checkpoint_without_touching_the_training_report(trained):
    data, out, report = trained
    before = (out / "report-best" / "report.json").read_bytes()
    again = evaluate_main(["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--workers", "0",
                           "--device", "cpu"])
    assert read_report(out / "test-best") == again and again["confusion_matrix"] == report["confusion_matrix"]
    assert again["method"] == report["method"] == "TGN"  # the name its run gave it
    assert (out / "report-best" / "report.json").read_bytes() == before


def test_test_py_scores_in_fp32_unless_asked():
    """Its figures then match the trainers' own reports, which evaluate in fp32 too."""
    from Classification.test import build_parser

    assert build_parser().parse_args(["--ckpt", "best.pth"]).amp == "off"


def test_reports_are_not_written_into_a_training_run_folder(trained, capsys):
    from Classification.compare import main as compare_main

    data, out, _ = trained
    err = exit_message(capsys, evaluate_main, ["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--out",
                                               str(out), "--workers", "0", "--device", "cpu"])
    assert err == f"error: {out} is a run folder of Classification/train.py (its options.json); choose another --out"
    err = exit_message(capsys, compare_main, [str(out / "report-best"), "--out", str(out)])
    assert "is a run folder of Classification/train.py" in err
    assert not (out / "report.json").exists() and not (out / "comparison.md").exists()


def test_test_py_groups_the_classes_as_the_checkpoints_run_did(trained, tmp_path, capsys):
    """Without --split or --threshold, test.py takes the run's (its report then matches the
    run's report-best/); flags given still win."""
    data, out, _ = trained
    checkpoint = torch.load(out / "best.pth", weights_only=False)
    checkpoint["options"]["threshold"] = 60.0  # as if trained with --threshold 60
    torch.save(checkpoint, tmp_path / "at60.pth")
    common = ["--data-root", str(data), "--ckpt", str(tmp_path / "at60.pth"), "--workers", "0", "--device", "cpu"]
    assert evaluate_main([*common, "--out", str(tmp_path / "a")])["head"] == [0, 1, 2]  # 60% of 5 classes
    assert evaluate_main([*common, "--out", str(tmp_path / "b"), "--threshold", "40"])["head"] == [0, 1]
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split"), "--threshold", "20"])
    checkpoint["options"]["split"] = str(tmp_path / "split")
    torch.save(checkpoint, tmp_path / "at60.pth")
    report = evaluate_main([*common, "--out", str(tmp_path / "c")])
    assert report["head"] == [0] and "split" in report["grouping"]
    checkpoint["options"]["split"] = str(tmp_path / "moved")
    torch.save(checkpoint, tmp_path / "at60.pth")
    capsys.readouterr()
    assert evaluate_main([*common, "--out", str(tmp_path / "d")])["head"] == [0, 1, 2]
    assert "moved, is not found" in capsys.readouterr().err


def test_a_run_with_a_split_records_the_splits_threshold(toy_data, tmp_path):
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split"), "--threshold", "60"])
    train_main(["--data-root", str(toy_data), "--split", str(tmp_path / "split"), "--out", str(tmp_path / "cls"),
                "--epochs", "1", "--device", "cpu", *TINY])
    # What test.py groups by should the split move: the split's 60%, not the unused default 40%.
    assert json.loads((tmp_path / "cls" / "options.json").read_text())["threshold"] == 60.0


def test_a_threshold_that_disagrees_with_the_split_is_refused(toy_data, tmp_path, capsys):
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split"), "--threshold", "60"])
    common = ["--data-root", str(toy_data), "--split", str(tmp_path / "split"), "--device", "cpu"]
    err = exit_message(capsys, train_main, [*common, "--threshold", "40", "--out", str(tmp_path / "cls"), *TINY])
    assert "--threshold 40 and --split" in err and "top 60%" in err and not (tmp_path / "cls").exists()
    train_main([*common, "--threshold", "60", "--out", str(tmp_path / "cls"), "--epochs", "1", *TINY])
    test_args = [*common, "--ckpt", str(tmp_path / "cls" / "last.pth"), "--workers", "0"]
    capsys.readouterr()
    assert "disagree" in exit_message(capsys, evaluate_main, [*test_args, "--threshold", "20"])
    assert evaluate_main([*test_args, "--threshold", "60"])["head"] == load_split(tmp_path / "split").head


@pytest.mark.parametrize("script", ["Classification/train.py", "Classification/test.py"])
def test_a_fraction_for_the_threshold_percentage_is_warned_of_in_the_classifier_too(script):
    from Classification.test import build_parser as test_parser
    from Classification.train import build_parser as train_parser

    parser = (train_parser if script.endswith("train.py") else test_parser)()
    required = ["--data-root", "d"] + (["--ckpt", "c.pth"] if script.endswith("test.py") else [])
    with pytest.warns(UserWarning, match=r"--threshold is a percentage: 0.4 means 0.4% of the classes \(for 40%"):
        assert parser.parse_args([*required, "--threshold", "0.4"]).threshold == 0.4


def test_overwrite_removes_the_reports_of_the_replaced_checkpoints(toy_data, tmp_path):
    common = ["--data-root", str(toy_data), "--out", str(tmp_path / "cls"), "--device", "cpu", "--epochs", "1", *TINY]
    train_main(common)
    evaluate_main(["--data-root", str(toy_data), "--ckpt", str(tmp_path / "cls" / "last.pth"), "--workers", "0"])
    (tmp_path / "cls" / "notes.txt").write_text("mine")
    assert (tmp_path / "cls" / "test-last" / "report.json").is_file()
    train_main([*common, "--overwrite", "--seed", "1"])
    assert not (tmp_path / "cls" / "test-last").exists()  # it described the checkpoint replaced
    assert (tmp_path / "cls" / "notes.txt").read_text() == "mine"


def test_skipped_bad_images_are_not_counted(tmp_path, capsys):
    """The report, the checkpoint (test.py groups head and tail by its counts) and --resume
    count the images trained on, without those --skip-bad-images left out."""
    data = write_dataset(tmp_path / "data", COUNTS)
    (data / "train" / "3" / "img 1.jpg").write_bytes(b"not an image")
    generated = write_generated(tmp_path / "generated", {3: 2, 4: 2})
    (generated / "4" / sorted(os.listdir(generated / "4"))[0]).write_bytes(b"")
    common = ["--data-root", str(data), "--extra", str(generated), "--out", str(tmp_path / "cls"), "--device", "cpu",
              "--skip-bad-images", *TINY]
    report = train_main([*common, "--epochs", "1"])
    out = capsys.readouterr().out
    assert "skipped 1 unreadable training images" in out and "skipped 1 unreadable generated images (--extra)" in out
    checkpoint = load_checkpoint(tmp_path / "cls" / "last.pth")
    assert checkpoint["train_counts"] == [12, 10, 8, 3, 3] and checkpoint["generated_counts"] == [0, 0, 0, 2, 1]
    assert [row["train_count"] for row in report["classes"]] == [12, 10, 8, 3, 3]
    train_main([*common, "--epochs", "2", "--resume"])  # the same images: resumed
    assert load_checkpoint(tmp_path / "cls" / "last.pth")["epoch"] == 1
    capsys.readouterr()
    # DATA unchanged: test.py, which counts what DATA lists, does not take it for other data.
    evaluate_main(["--data-root", str(data), "--ckpt", str(tmp_path / "cls" / "best.pth"), "--workers", "0",
                   "--device", "cpu", "--skip-bad-images"])
    assert "other training images per class" not in capsys.readouterr().err


def test_without_a_split_head_and_tail_rank_the_images_listed_as_kmdn_does(tmp_path):
    """--skip-bad-images trains on fewer images, but without --split the classes rank by
    what DATA lists, as KMDN/dataset_split.py ranks them; the report counts those trained on."""
    data = write_dataset(tmp_path / "data", COUNTS)
    for name in ("img 0.jpg", "img 1.jpg", "img 2.jpg"):  # class 1: 10 listed, 7 readable, below class 2's 8
        (data / "train" / "1" / name).write_bytes(b"not an image")
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    report = train_main(["--data-root", str(data), "--out", str(tmp_path / "cls"), "--device", "cpu",
                         "--skip-bad-images", "--epochs", "1", *TINY])
    assert report["head"] == load_split(tmp_path / "split").head == [0, 1]
    assert [row["train_count"] for row in report["classes"]] == [12, 7, 8, 4, 3]
    again = evaluate_main(["--ckpt", str(tmp_path / "cls" / "best.pth"), "--out", str(tmp_path / "again"),
                           "--workers", "0", "--device", "cpu", "--skip-bad-images"])
    assert again["head"] == [0, 1] and again["classes"] == report["classes"]
    # A run of an earlier version, which grouped by the images it trained on, resumes grouped so.
    last = torch.load(tmp_path / "cls" / "last.pth", weights_only=False)
    del last["listed_counts"]
    torch.save(last, tmp_path / "cls" / "last.pth")
    resumed = train_main(["--data-root", str(data), "--out", str(tmp_path / "cls"), "--device", "cpu",
                          "--skip-bad-images", "--epochs", "2", "--resume", *TINY])
    assert resumed["head"] == [0, 2]


def test_resume_reads_no_pretrained_weights(toy_data, tmp_path):
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    common = ["--data-root", str(toy_data), "--out", str(tmp_path / "cls"), "--device", "cpu", *TINY,
              "--pretrained", str(weights)]
    train_main([*common, "--epochs", "1"])
    weights.unlink()  # its run's checkpoint holds what it gave
    train_main([*common, "--epochs", "2", "--resume"])
    assert load_checkpoint(tmp_path / "cls" / "last.pth")["epoch"] == 1


def test_test_py_counts_and_groups_as_the_run_on_data_that_grew_since(trained, tmp_path, capsys):
    data, out, report = trained
    grown = tmp_path / "grown"
    shutil.copytree(data, grown)
    anno = grown / "anno" / "TOY_train.txt"
    anno.write_text(anno.read_text() + "4/img 0.jpg 4\n" * 20)  # class 4 now leads the real counts
    again = evaluate_main(["--data-root", str(grown), "--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "r"),
                           "--workers", "0", "--device", "cpu"])
    assert again["head"] == report["head"] == [0, 1]
    assert [row["train_count"] for row in again["classes"]] == [row["train_count"] for row in report["classes"]]
    assert "has other training images per class than" in capsys.readouterr().err
    # A run with a split: the split, made on the data it trained on, still groups its classes.
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split"), "--threshold", "20"])
    checkpoint = torch.load(out / "best.pth", weights_only=False)
    checkpoint["options"]["split"] = str(tmp_path / "split")
    torch.save(checkpoint, tmp_path / "with-split.pth")
    common = ["--data-root", str(grown), "--ckpt", str(tmp_path / "with-split.pth"), "--workers", "0", "--device",
              "cpu"]
    grouped = evaluate_main([*common, "--out", str(tmp_path / "s")])
    assert grouped["head"] == [0] and "split" in grouped["grouping"]
    assert "the report counts and groups them as its run did" in capsys.readouterr().err
    by_flag = evaluate_main([*common, "--out", str(tmp_path / "t"), "--threshold", "40"])
    assert by_flag["head"] == [0, 1]  # the run's counts (class 4 grew since), grouped by the flag given
    assert "the report counts them as its run did, grouped by the flags given" in capsys.readouterr().err
    # A split of other training images than the run counted groups nothing as the run did.
    split_main(["--data-root", str(grown), "--out", str(tmp_path / "grown-split")])
    checkpoint["options"]["split"] = str(tmp_path / "grown-split")
    torch.save(checkpoint, tmp_path / "with-split.pth")
    shutil.copytree(grown, tmp_path / "grown-more")
    anno = tmp_path / "grown-more" / "anno" / "TOY_train.txt"
    anno.write_text(anno.read_text() + "3/img 0.jpg 3\n")
    with pytest.raises(SystemExit):
        evaluate_main([*common[:1], str(tmp_path / "grown-more"), *common[2:], "--out", str(tmp_path / "u")])
    assert (f"error: the split the checkpoint's run used, {tmp_path / 'grown-split'}, counts other training images "
            f"than the run and than {tmp_path / 'grown-more'}: pass --split or --threshold") in capsys.readouterr().err


def test_full_decode_reads_the_test_jpegs_as_the_official_code_does(trained, tmp_path, monkeypatch):
    """Draft mode decodes a JPEG at least twice the input size at a fraction of it (faster,
    pixels a few levels apart); --full-decode decodes every one whole, as the official
    test.py does, for figures comparable image for image."""
    data, out, report = trained
    sizes = decode_sizes(monkeypatch)
    common = ["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--workers", "0", "--device", "cpu"]
    drafted = evaluate_main([*common, "--out", str(tmp_path / "draft")])
    assert sizes and set(sizes) == {load_checkpoint(out / "best.pth")["options"]["image_size"]}
    assert drafted["classes"] == report["classes"]  # report-best/ is what test.py writes, generated counts too
    sizes.clear()
    whole = evaluate_main([*common, "--out", str(tmp_path / "whole"), "--full-decode"])
    assert len(sizes) == drafted["num_test_images"] == whole["num_test_images"] and set(sizes) == {None}
    # A bare state dict, the released result.pth's format: its run was the official code's.
    torch.save(load_checkpoint(out / "best.pth")["state_dict"], tmp_path / "result.pth")
    sizes.clear()
    common[common.index("--ckpt") + 1] = str(tmp_path / "result.pth")
    evaluate_main([*common, "--out", str(tmp_path / "bare"), "--image-size", "16"])
    assert len(sizes) == whole["num_test_images"] and set(sizes) == {None}


def test_test_py_checks_a_runs_split_against_the_counts_it_listed_not_those_it_skipped(tmp_path, capsys):
    """A run with --split and --skip-bad-images trained on fewer images than the split
    counts: scored later on data that grew, its split still groups it (with a warning)."""
    data = write_dataset(tmp_path / "data", COUNTS)
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    (data / "train" / "3" / "img 1.jpg").write_bytes(b"not an image")
    train_main(["--data-root", str(data), "--split", str(tmp_path / "split"), "--out", str(tmp_path / "cls"),
                "--device", "cpu", "--skip-bad-images", "--epochs", "1", *TINY])
    anno = data / "anno" / "TOY_train.txt"
    shutil.copy(data / "train" / "4" / "img 0.jpg", data / "train" / "4" / "new.jpg")
    anno.write_text(anno.read_text() + "4/new.jpg 4\n")
    capsys.readouterr()
    report = evaluate_main(["--ckpt", str(tmp_path / "cls" / "best.pth"), "--workers", "0", "--device", "cpu",
                            "--skip-bad-images"])
    assert "has other training images per class than" in capsys.readouterr().err
    assert report["head"] == load_split(tmp_path / "split").head


def test_each_epochs_head_and_tail_accuracy_are_of_the_head_and_the_tail(tmp_path, monkeypatch):
    """metrics.jsonl's head_accuracy and tail_accuracy are the means over the run's head and
    tail classes (output indices), as the report groups them."""
    import tgn.engine

    data = write_dataset(tmp_path / "data", COUNTS)
    groups, real_evaluate = [], tgn.engine.evaluate
    monkeypatch.setattr(tgn.engine, "evaluate", lambda *args, **kwargs: groups.append(
        (list(kwargs["head"]), list(kwargs["tail"]))) or real_evaluate(*args, **kwargs))
    report = train_main(["--data-root", str(data), "--out", str(tmp_path / "cls"), "--device", "cpu",
                         "--epochs", "1", *TINY])
    assert report["head"] == [0, 1] and report["tail"] == [2, 3, 4]
    assert groups[0] == ([0, 1], [2, 3, 4])


def test_full_decode_trains_on_jpegs_decoded_as_the_official_code_does(tmp_path, monkeypatch, capsys):
    """train.py --full-decode decodes its training and test JPEGs whole, its --cache keeps
    them apart from drafted ones, and a --resume takes it as the run was started."""
    data = write_dataset(tmp_path / "data", {0: 6, 1: 4})
    sizes = decode_sizes(monkeypatch)
    common = ["--data-root", str(data), "--out", str(tmp_path / "cls"), "--device", "cpu", *TINY]
    train_main([*common, "--epochs", "1", "--full-decode", "--cache", str(tmp_path / "cache")])
    assert len(sizes) >= 10 + 6 and set(sizes) == {None}
    assert [folder.name for folder in (tmp_path / "cache").iterdir()] == ["16px-full"]
    sizes.clear()
    capsys.readouterr()
    train_main([*common[:4], "--epochs", "2", "--resume", "--workers", "0"])
    assert "--full-decode" in capsys.readouterr().out and sizes and set(sizes) == {None}
    sizes.clear()
    evaluate_main(["--ckpt", str(tmp_path / "cls" / "best.pth"), "--workers", "0", "--device", "cpu"])  # as its run
    assert len(sizes) == 6 and set(sizes) == {None}


def test_a_split_groups_the_classes_of_data_whose_test_list_changed_since(trained, tmp_path):
    """Classification reads a split for its groups alone, which the training counts decide:
    a test list changed since (KMDN and CDTG refuse that) is scored, grouped by the split."""
    data, out, _ = trained
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    fewer = tmp_path / "fewer"
    shutil.copytree(data, fewer)
    anno = fewer / "anno" / "TOY_test.txt"
    anno.write_text("".join(anno.read_text().splitlines(keepends=True)[1:]))
    report = evaluate_main(["--data-root", str(fewer), "--ckpt", str(out / "best.pth"), "--split",
                            str(tmp_path / "split"), "--out", str(tmp_path / "r"), "--workers", "0", "--device", "cpu"])
    assert report["head"] == load_split(tmp_path / "split").head and "split" in report["grouping"]
    assert report["num_test_images"] == len(anno.read_text().splitlines())


def test_a_resume_leaves_a_recorded_baseline_report_out_with_none(trained, tmp_path, capsys):
    """--resume takes the run's --baseline-report when left out; one since deleted is left out
    with 'none' (recorded so), not only by editing options.json."""
    data, out, _ = trained
    shutil.copytree(out / "report-best", tmp_path / "baseline")
    resume = ["--out", str(tmp_path / "cls"), "--resume", "--epochs", "2", "--device", "cpu", "--workers", "0"]
    train_main(["--data-root", str(data), "--device", "cpu", *TINY, "--out", str(tmp_path / "cls"), "--epochs", "1",
                "--baseline-report", str(tmp_path / "baseline")])
    shutil.rmtree(tmp_path / "baseline")
    capsys.readouterr()
    assert str(tmp_path / "baseline") in exit_message(capsys, train_main, resume)
    train_main([*resume, "--baseline-report", "none"])
    assert json.loads((tmp_path / "cls" / "options.json").read_text())["baseline_report"] is None
    assert len((tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()) == 2


def test_test_py_draws_the_baseline_the_checkpoints_run_drew(trained, tmp_path, monkeypatch, capsys):
    """report-best/ is what test.py --ckpt best.pth writes: its long_tail.png too, with the
    baseline line the run recorded; 'none' leaves it out, and one gone is passed over."""
    import Classification.scoring

    data, out, _ = trained
    shutil.copytree(out / "report-best", tmp_path / "baseline")
    train_main(["--data-root", str(data), "--device", "cpu", *TINY, "--out", str(tmp_path / "cls"), "--epochs", "1",
                "--baseline-report", str(tmp_path / "baseline")])
    drawn, real = [], Classification.scoring.report_and_figures
    monkeypatch.setattr(Classification.scoring, "report_and_figures",
                        lambda *args, **kwargs: drawn.append(kwargs["baseline"]) or real(*args, **kwargs))
    common = ["--ckpt", str(tmp_path / "cls" / "best.pth"), "--workers", "0", "--device", "cpu", "--overwrite"]
    evaluate_main(common)
    evaluate_main([*common, "--baseline-report", "none"])
    shutil.rmtree(tmp_path / "baseline")
    capsys.readouterr()
    evaluate_main(common)
    assert "warning: the baseline report the checkpoint's run drew is passed over" in capsys.readouterr().err
    assert drawn[0]["overall_accuracy"] == read_report(out / "report-best")["overall_accuracy"]
    assert drawn[1:] == [None, None]


def test_a_baseline_report_of_other_data_is_refused_before_any_work(trained, tmp_path, capsys):
    data, out, _ = trained
    other = json.loads((out / "report-best" / "report.json").read_text())
    other["dataset"] = "OTHER"
    (tmp_path / "other.json").write_text(json.dumps(other))
    for main, argv in ((evaluate_main, ["--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "r")]),
                       (train_main, ["--out", str(tmp_path / "cls"), "--epochs", "1", *TINY])):
        with pytest.raises(SystemExit):
            main(["--data-root", str(data), "--baseline-report", str(tmp_path / "other.json"), "--device", "cpu",
                  "--workers", "0", *argv])
        assert "is a report on OTHER with classes [0, 1, 2, 3, 4]; DATA is TOY" in capsys.readouterr().err
    renamed = {**other, "dataset": "TOY"}
    renamed["classes"][0]["name"] = "class 9"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    with pytest.raises(SystemExit):
        evaluate_main(["--data-root", str(data), "--baseline-report", str(tmp_path / "renamed.json"), "--device",
                       "cpu", "--workers", "0", "--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "r")])
    assert "names class 0 'class 9', DATA names it 'class 0'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "cls").exists()


def test_test_py_replaces_a_report_only_with_overwrite(trained, tmp_path, capsys):
    data, out, _ = trained
    common = ["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "report"),
              "--workers", "0", "--device", "cpu"]
    evaluate_main([*common, "--name", "first"])
    capsys.readouterr()
    err = exit_message(capsys, evaluate_main, [*common, "--name", "second"])
    assert err == (f"error: {tmp_path / 'report'} already holds results (report.json); "
                   "pass --overwrite to replace them or choose another --out")
    assert read_report(tmp_path / "report")["method"] == "first"
    assert evaluate_main([*common, "--name", "second", "--overwrite"])["method"] == "second"
    assert read_report(tmp_path / "report")["method"] == "second"


def test_a_report_stopped_midway_is_written_whole_by_its_rerun(trained, tmp_path, capsys, monkeypatch):
    import Classification.stage

    data, out, _ = trained
    common = ["--data-root", str(data), "--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "report"),
              "--workers", "0", "--device", "cpu"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or a full disk, while the figures are drawn

    monkeypatch.setattr(Classification.stage, "plot_long_tail", stopped)
    with pytest.raises(SystemExit):
        evaluate_main(common)
    assert not (tmp_path / "report" / "report.json").exists()  # it marks a whole report
    monkeypatch.undo()
    capsys.readouterr()
    evaluate_main(common)  # no --overwrite needed: nothing whole was there
    names = {path.name for path in (tmp_path / "report").iterdir()}
    assert {"report.json", "report.md", "report.csv", "confusion_matrix.png", "long_tail.png"} <= names


def test_loading_errors_are_one_line(trained, tmp_path, capsys):
    _, out, _ = trained
    test_py = ["--ckpt", str(out / "best.pth"), "--out", str(tmp_path / "report")]
    other = write_dataset(tmp_path / "other", {0: 1, 1: 1, 2: 1, 3: 1, 5: 1})
    err = exit_message(capsys, evaluate_main, ["--data-root", str(other), *test_py])
    assert "trained on classes [0, 1, 2, 3, 4]" in err
    data = write_dataset(tmp_path / "data", COUNTS)
    (data / "test" / "2" / "img 1.jpg").unlink()
    err = exit_message(capsys, evaluate_main, ["--data-root", str(data), *test_py])
    assert "img 1.jpg does not exist" in err
    shutil.rmtree(data / "test")
    err = exit_message(capsys, evaluate_main, ["--data-root", str(data), *test_py])
    assert err == f"error: test folder not found: {data / 'test'}"


class TrainingStopped(Exception):
    """Raised by a stand-in for fit once it has seen what training would get."""


def spy_on_fit(monkeypatch, train=True):
    """Record the training set and keyword arguments Classification/train.py passes to fit;
    without `train`, stop there."""
    import Classification.training

    calls, real_fit = [], Classification.training.fit

    def spy(model, train_set, *args, **kwargs):
        calls.append({"train_set": train_set, **kwargs})
        if not train:
            raise TrainingStopped
        return real_fit(model, train_set, *args, **kwargs)

    monkeypatch.setattr(Classification.training, "fit", spy)
    return calls


def balanced_softmax_of(counts, logits, labels):
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    return torch.nn.functional.cross_entropy(logits + prior.log(), labels).item()


def test_long_tail_baselines_run_in_the_same_harness(toy_data, tmp_path, monkeypatch):
    calls = spy_on_fit(monkeypatch)

    def first_epoch_loss(name, *flags):
        report = train_main(["--data-root", str(toy_data), "--out", str(tmp_path / name), "--epochs", "1",
                             "--device", "cpu", *TINY, *flags])
        metrics = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        return report, metrics["train_loss"]

    report, both = first_epoch_loss("both", "--sampler", "class-balanced", "--loss", "balanced-softmax")
    assert report["method"] == "re-sampling + balanced softmax"
    assert all(row["generated_count"] == 0 for row in report["classes"])
    labels = np.array(calls[0]["train_set"].targets())
    weights = calls[0]["train_weights"]
    assert len(weights) == len(labels) and np.bincount(labels).tolist() == [12, 10, 8, 4, 3]
    assert [float(weights[labels == c].sum()) for c in range(5)] == pytest.approx([1] * 5)  # classes equally likely
    logits, targets = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 4])
    loss, returned = calls[0]["loss_fn"](torch.nn.Identity(), logits, targets)
    assert loss.item() == pytest.approx(balanced_softmax_of([12, 10, 8, 4, 3], logits, targets), rel=1e-6)
    assert torch.equal(returned, logits)
    # Each flag reaches training: the same seed gives another first epoch with it than without.
    _, plain = first_epoch_loss("plain")
    assert calls[1]["train_weights"] is None and calls[1]["loss_fn"] is cross_entropy_loss
    _, resampled = first_epoch_loss("resampled", "--sampler", "class-balanced")
    _, balanced = first_epoch_loss("balanced", "--loss", "balanced-softmax")
    assert len({plain, resampled, balanced, both}) == 4


def test_generated_images_are_trained_on_with_their_class(toy_data, tmp_path, monkeypatch):
    """fit gets every --extra image, labelled with the output index of its class; the
    balanced-softmax prior counts the images trained on, generated ones included."""
    calls = spy_on_fit(monkeypatch, train=False)
    generated = write_generated(tmp_path / "generated", {3: 5, 4: 6})
    with pytest.raises(TrainingStopped):
        train_main(["--data-root", str(toy_data), "--extra", str(generated), "--out", str(tmp_path / "cls"),
                    "--loss", "balanced-softmax", "--device", "cpu", *TINY])
    samples = calls[0]["train_set"].samples
    listed = [line.rsplit(" ", 1) for line in (generated / "anno.txt").read_text().splitlines()]
    from_extra = sorted((Path(path).relative_to(generated).as_posix(), label) for path, label in samples
                        if Path(path).is_relative_to(generated))
    assert from_extra == sorted((relpath, int(cid)) for relpath, cid in listed)  # class ids 3, 4 = outputs 3, 4
    assert len(from_extra) == 11 and len(samples) == 37 + 11
    logits, targets = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 4])
    loss, _ = calls[0]["loss_fn"](torch.nn.Identity(), logits, targets)
    assert loss.item() == pytest.approx(balanced_softmax_of([12, 10, 8, 4 + 5, 3 + 6], logits, targets), rel=1e-6)


def test_class_balanced_sampling_evens_out_the_classes():
    from tgn.sampling import EpochSampler

    labels = [0] * 90 + [1] * 10
    sampler = EpochSampler(100, shuffle=True, seed=0, weights=class_balanced_weights(labels, 2))
    drawn = [labels[index] for index, _ in sampler]
    assert len(drawn) == 100 and 0.35 < np.mean(drawn) < 0.65  # 0.1 without the weights


@pytest.mark.parametrize("main", [train_main, evaluate_main, compare_main])
def test_help_shows_the_defaults(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "default" in capsys.readouterr().out


def test_training_help_shows_the_official_settings(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    for option in ("--epochs EPOCHS training epochs (default: 50)", "takes 1/N of it (default: 32)",
                   "--lr LR Adam learning rate (default: 0.001)", "Adam weight decay (default: 0.0001)",
                   "divided by 10 (the flag alone: never) (default: [30, 60, 90, 120, 150, 180])", "resized to this square size (default: 224)",
                   "--arch {resnet50,resnet18} resnet50 is the paper's; resnet18 for quick runs (default: resnet50)"):
        assert option in shown


# --- hand-made reports: n/a groups, figures, comparison ------------------------------------------

def hand_report(method, cm, generated=None, ids=(0, 1, 5, 7), train=(50, 30, 5, 2)):
    ids = list(ids)
    return build_report(np.array(cm), method=method, source=f"{method}.pth", dataset="TOY", class_ids=ids,
                        class_names=["a", "b", "c", "d"], train_counts=list(train), generated_counts=generated,
                        head=ids[:2], tail=ids[2:], grouping="hand")


BASELINE_CM = [[4, 0, 0, 0], [1, 3, 0, 0], [2, 0, 2, 0], [1, 0, 0, 0]]
AUGMENTED_CM = [[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]]


def test_the_report_csvs_summary_rows_hold_each_figure_in_its_column():
    report = hand_report("baseline", BASELINE_CM)
    rows = {row["id"]: row for row in csv.DictReader(report_csv(report).splitlines())}
    assert rows["f1"]["accuracy"] == "" and float(rows["f1"]["f1"]) == pytest.approx(report["macro_f1"])
    assert rows["all"]["f1"] == "" and float(rows["all"]["accuracy"]) == pytest.approx(9 / 13)


def test_a_report_path_holding_an_equals_sign_is_a_path_not_a_row_name(tmp_path):
    write_report(hand_report("baseline", BASELINE_CM), tmp_path / "lr=0.01")
    rows = compare_main([str(tmp_path / "lr=0.01"), "--out", str(tmp_path / "table")])
    assert [row["method"] for row in rows] == ["baseline"]
    rows = compare_main([f"tgn={tmp_path / 'lr=0.01'}", "--out", str(tmp_path / "named")])  # the first '=' names it
    assert [row["method"] for row in rows] == ["tgn"]


def test_the_per_class_rows_hold_accuracy_then_f1_and_n_a_for_no_generated_images():
    report = hand_report("baseline", BASELINE_CM)  # class 0: 4 of 4 right, precision 4/8: F1 2/3
    markdown = report_markdown(report)
    assert "| 0 | a | head | 50 | n/a | 4 | 100.00 | 66.67 |" in markdown
    assert "head/tail from hand." in markdown
    assert "0,a,head,50,n/a,4,1.0000000000,0.6666666667" in report_csv(report).splitlines()


def test_a_folder_with_its_own_report_is_read_before_its_report_best(tmp_path):
    write_report(hand_report("top", BASELINE_CM), tmp_path / "x")
    write_report(hand_report("inner", BASELINE_CM), tmp_path / "x" / "report-best")
    assert read_report(tmp_path / "x")["method"] == "top"


def test_the_report_lists_head_and_tail_by_class_id(toy_data):
    """Whatever the training counts' order (class 2 leads here), report.json's head and tail
    lists are in ascending id."""
    from argparse import Namespace

    from Classification.stage import describe_classes

    classes = describe_classes(open_dataset(toy_data), Namespace(threshold=None), [0, 1, 2, 3, 4], [3, 10, 12, 4, 8],
                               None)
    assert (classes.head, classes.tail) == ([1, 2], [0, 3, 4])


def test_a_baseline_report_of_other_class_ids_is_refused_before_any_work(toy_data, tmp_path):
    """A baseline report of the same dataset name but other classes would join the chart
    only at the end of training, where it fails: refused up front."""
    from argparse import Namespace

    from Classification.stage import read_baseline

    write_report(hand_report("baseline", BASELINE_CM), tmp_path / "baseline")  # TOY's classes 0, 1, 5, 7
    info = open_dataset(toy_data)
    assert info.name == "TOY"
    with pytest.raises(UserError, match=r"with classes \[0, 1, 5, 7\]; DATA is TOY with \[0, 1, 2, 3, 4\]"):
        read_baseline(Namespace(baseline_report=tmp_path / "baseline"), info, [0, 1, 2, 3, 4])


def test_test_images_are_read_alike_every_time_unflipped(toy_data):
    """Flips are training's augmentation: a test image read twice is the same tensor, or the
    epoch of best test accuracy (best.pth) would be chosen by chance."""
    from Classification.samples import class_order
    from Classification.stage import evaluation_set

    info = open_dataset(toy_data)
    _, label_of = class_order(info)
    test = evaluation_set(info, label_of, 16)
    reads = []
    for seed in range(8):
        torch.manual_seed(seed)
        reads.append(test[0][0])
    assert all(torch.equal(read, reads[0]) for read in reads)


def test_an_empty_group_is_n_a_not_zero():
    report = hand_report("absent tail", [[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert report["tail_accuracy"] is None and report["head_accuracy"] == pytest.approx((0.75 + 1) / 2)
    assert "| tail-class mean accuracy (0 of 2 classes) | n/a |" in report_markdown(report)  # none tested
    assert "| head-class mean accuracy (2 classes) | 87.50 |" in report_markdown(report)
    one_tested = hand_report("one", [[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    assert "| tail-class mean accuracy (1 of 2 classes) | 100.00 |" in report_markdown(one_tested)
    assert "| mean per-class accuracy (3 of 4 classes) | 91.67 |" in report_markdown(one_tested)
    assert "| mean per-class accuracy | " in report_markdown(hand_report("all", BASELINE_CM))  # all tested
    assert "tail,tail-class mean accuracy,,,,,n/a," in report_csv(report)
    assert "| 7 | d | tail | 2 | n/a | 0 | n/a | n/a |" in report_markdown(report)


def test_markdown_tables_keep_their_columns_whatever_the_names():
    import re

    from Classification.report import comparison, comparison_markdown

    report = build_report(np.array(BASELINE_CM), method="TGN | r=0.05", source="x.pth", dataset="TOY",
                          class_ids=[0, 1, 5, 7], class_names=["a|b", "line\nbreak", "c", "d"],
                          train_counts=[50, 30, 5, 2], generated_counts=None, head=[0, 1], tail=[5, 7],
                          grouping="hand")
    for markdown in (report_markdown(report), comparison_markdown(comparison([report]))):
        rows = [line for line in markdown.splitlines() if line.startswith("|")]
        columns = {len(re.split(r"(?<!\\)\|", row)) for row in rows[-4:]}  # unescaped bars only
        assert len(columns) == 1, rows
    assert "| 0 | a\\|b |" in report_markdown(report) and "| 1 | line break |" in report_markdown(report)


def test_the_report_csv_carries_a_byte_order_mark_so_excel_reads_names_outside_ascii(tmp_path):
    report = build_report(np.array(BASELINE_CM), method="TGN", source="x.pth", dataset="TOY", class_ids=[0, 1, 5, 7],
                          class_names=["飞机", "船只", "储油罐", "café"], train_counts=[50, 30, 5, 2],
                          generated_counts=None, head=[0, 1], tail=[5, 7], grouping="hand")
    write_report(report, tmp_path)
    raw = (tmp_path / "report.csv").read_bytes()
    assert raw.startswith(codecs.BOM_UTF8) and raw.count(codecs.BOM_UTF8) == 1
    rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    assert [row["name"] for row in rows[:4]] == ["飞机", "船只", "储油罐", "café"] and "id" in rows[0]
    assert not (tmp_path / "report.md").read_bytes().startswith(codecs.BOM_UTF8)  # Markdown stays plain


def test_figures_of_hand_made_reports(tmp_path):
    baseline = hand_report("baseline", BASELINE_CM)
    augmented = hand_report("TGN", AUGMENTED_CM, generated=[0, 0, 40, 45])
    assert plot_confusion(hand_report("absent", [[1, 0, 0, 0]] + [[0] * 4] * 3), tmp_path / "cm.png").is_file()
    plot_long_tail([baseline, augmented], tmp_path / "long_tail.png")
    with Image.open(tmp_path / "long_tail.png") as image:
        assert image.format == "PNG"
    with pytest.raises(UserError, match="other classes"):
        other = {**baseline, "classes": baseline["classes"][:3]}
        plot_long_tail([other, augmented], tmp_path / "bad.png")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions draw, kept instead of saved."""
    import Classification.figures as figures

    figures_drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: figures_drawn.append(figure))
    return figures_drawn


def test_figures_show_names_with_dollar_signs_as_written(tmp_path, drawn):
    from matplotlib.text import Text

    name = "coins 50$ & 100$"  # two '$': math to matplotlib, which would drop them
    report = build_report(np.array(BASELINE_CM), method="TGN $2$", source="x.pth", dataset="TOY",
                          class_ids=[0, 1, 5, 7], class_names=[name, "b", "c", "d"], train_counts=[50, 30, 5, 2],
                          generated_counts=None, head=[0, 1], tail=[5, 7], grouping="hand")
    plot_confusion(report, tmp_path / "cm.png")
    plot_long_tail([report], tmp_path / "lt.png")
    for figure in drawn:
        texts = [text for text in figure.findobj(Text) if "$" in text.get_text()]
        assert texts and not any(text.get_parse_math() for text in texts)
        assert name in {text.get_text() for text in texts}


def test_figure_titles_round_as_the_report_does(tmp_path, drawn):

    report = build_report(np.array([[16, 0], [3, 13]]), method="m", source="x.pth", dataset="TOY", class_ids=[0, 1],
                          class_names=["a", "b"], train_counts=[5, 2], generated_counts=None, head=[0], tail=[1],
                          grouping="hand")
    plot_confusion(report, tmp_path / "cm.png")
    assert drawn[0].axes[0].get_title() == "m: OA 90.63%" and "| 90.63 |" in report_markdown(report)  # 29/32


def test_figures_draw_the_row_normalised_matrix_and_the_ranked_counts(tmp_path, drawn):
    import Classification.figures as figures
    from matplotlib.colors import to_rgba

    # listed out of count order: the chart ranks the classes 1, 7, 0, 5 by real training count
    report = build_report(np.array(BASELINE_CM), method="TGN", source="x.pth", dataset="TOY", class_ids=[0, 1, 5, 7],
                          class_names=["a", "b", "c", "d"], train_counts=[5, 50, 2, 30],
                          generated_counts=[40, 0, 45, 0], head=[1, 7], tail=[0, 5], grouping="hand")
    plot_confusion(report, tmp_path / "cm.png")
    plot_long_tail([report], tmp_path / "lt.png")
    confusion, long_tail = drawn
    shown = np.ma.filled(confusion.axes[0].images[0].get_array(), np.nan)
    # rows are the true classes (4, 4, 4 and 1 test images), each summing to 1
    assert shown.tolist() == [[1, 0, 0, 0], [0.25, 0.75, 0, 0], [0.5, 0, 0.5, 0], [1, 0, 0, 0]]
    counts_axes, accuracy_axes = long_tail.axes
    real, generated = counts_axes.containers
    assert [bar.get_height() for bar in real] == [50, 30, 5, 2]
    head, tail = to_rgba(figures.HEAD_COLOUR), to_rgba(figures.TAIL_COLOUR)
    assert [bar.get_facecolor() for bar in real] == [head, head, tail, tail]  # classes 1, 7 are head
    # generated images stacked on the real ones of the classes that have them
    assert [(bar.get_x() + bar.get_width() / 2, bar.get_y(), bar.get_height()) for bar in generated] == [
        (2, 5, 40), (3, 2, 45)]
    assert [label.get_text() for label in counts_axes.get_xticklabels()] == ["b", "d", "a", "c"]
    assert accuracy_axes.lines[0].get_ydata().tolist() == [75, 0, 100, 50]


def test_the_confusion_figure_labels_each_cell_by_its_row_share(tmp_path, drawn):

    plot_confusion(hand_report("TGN", BASELINE_CM), tmp_path / "cm.png")
    axes = drawn[0].axes[0]
    assert axes.get_title() == "TGN: OA 69.23%"  # 9 of 13, not the mean class accuracy
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted class", "true class")
    # (column, row) = (predicted, true); whole percents; white on the dark cells; none on empty ones
    assert {(text.get_position(), text.get_text(), text.get_color()) for text in axes.texts} == {
        ((0, 0), "100", "white"), ((0, 1), "25", "black"), ((1, 1), "75", "white"), ((0, 2), "50", "black"),
        ((2, 2), "50", "black"), ((0, 3), "100", "white")}
    plot_confusion(hand_report("even", [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]), tmp_path / "e.png")
    assert drawn[1].axes[0].images[0].get_clim() == (0, 1)  # shares on one scale, not stretched to the largest
    plot_confusion(hand_report("none", [[0] * 4] * 4), tmp_path / "n.png")
    assert drawn[2].axes[0].get_title() == "none: OA n/a"


def test_the_long_tail_figure_draws_each_report_as_its_own_line(tmp_path, drawn):
    import Classification.figures as figures
    from matplotlib.colors import to_rgba

    absent = hand_report("absent", [[4, 0, 0, 0], [1, 3, 0, 0], [2, 0, 2, 0], [0, 0, 0, 0]])  # no test image of d
    plot_long_tail([absent, hand_report("TGN", AUGMENTED_CM, generated=[0, 0, 40, 45])], tmp_path / "lt.png")
    _, accuracy = drawn[0].axes
    first = accuracy.lines[0].get_ydata().tolist()
    assert first[:3] == [100, 75, 50] and np.isnan(first[3])  # a gap, never 0
    assert accuracy.lines[1].get_ydata().tolist() == [100, 100, 100, 100]
    assert accuracy.get_ylim() == (0, 105)
    legend = accuracy.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [
        "head classes", "tail classes", "generated images", "absent: OA 75.00%", "TGN: OA 100.00%"]
    handles = getattr(legend, "legend_handles", None) or legend.legendHandles  # (the old name before matplotlib 3.7)
    assert to_rgba(handles[0].get_facecolor()) == to_rgba(figures.HEAD_COLOUR)


def test_compare_prints_and_writes_the_side_by_side_table(tmp_path, capsys):
    write_report(hand_report("baseline", BASELINE_CM), tmp_path / "baseline")
    write_report(hand_report("TGN", AUGMENTED_CM, generated=[0, 0, 40, 45]), tmp_path / "tgn")
    rows = compare_main(["plain CE=" + str(tmp_path / "baseline" / "report.json"), str(tmp_path / "tgn"),
                         "--out", str(tmp_path / "comparison")])
    assert [row["method"] for row in rows] == ["plain CE", "TGN"]
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert table.splitlines()[0] == "| method | head acc % | tail acc % | OA % | macro-F1 % |"
    # baseline: head (1 + 0.75) / 2, tail (0.5 + 0) / 2, OA 9 / 13
    assert "| plain CE | 87.50 | 25.00 | 69.23 |" in table
    assert "| TGN | 100.00 | 100.00 | 100.00 | 100.00 |" in table
    assert table in capsys.readouterr().out
    assert (tmp_path / "comparison" / "comparison.csv").read_bytes().startswith(codecs.BOM_UTF8)
    rows = list(csv.reader((tmp_path / "comparison" / "comparison.csv").open(encoding="utf-8-sig")))
    assert rows[0] == ["method", "head_accuracy", "tail_accuracy", "overall_accuracy", "macro_f1"]
    assert rows[1][:4] == ["plain CE", "0.8750000000", "0.2500000000", f"{9 / 13:.10f}"]
    # a second table goes to the same folder only when asked
    again = [str(tmp_path / "tgn"), "--out", str(tmp_path / "comparison")]
    assert "--overwrite" in exit_message(capsys, compare_main, again)
    assert (tmp_path / "comparison" / "comparison.md").read_text() == table
    compare_main([*again, "--overwrite"])
    assert "plain CE" not in (tmp_path / "comparison" / "comparison.md").read_text()


def test_a_training_run_folder_given_for_a_report_names_its_report_folder(trained, capsys):
    _, out, _ = trained
    message = exit_message(capsys, compare_main, [str(out), str(out / "report-best")])
    assert message == (f"error: {out} is a training run folder, which holds no report.json itself; pass "
                       f"{out / 'report-best'}, the report of its best.pth")


def test_compare_notes_other_groups_but_not_another_listing_order(tmp_path):
    baseline = hand_report("baseline", BASELINE_CM)
    reordered = {**hand_report("TGN", AUGMENTED_CM), "head": baseline["head"][::-1]}  # the same head classes
    regrouped = {**hand_report("other", AUGMENTED_CM), "head": baseline["head"][:1],
                 "tail": baseline["head"][1:] + baseline["tail"]}
    for name, report in (("baseline", baseline), ("tgn", reordered), ("other", regrouped)):
        write_report(report, tmp_path / name)
    note = "different head/tail groups"
    compare_main([str(tmp_path / "baseline"), str(tmp_path / "tgn"), "--out", str(tmp_path / "same")])
    assert note not in (tmp_path / "same" / "comparison.md").read_text()
    compare_main([str(tmp_path / "baseline"), str(tmp_path / "other"), "--out", str(tmp_path / "differ")])
    assert note in (tmp_path / "differ" / "comparison.md").read_text()


def test_compare_notes_each_difference_once_in_order_and_joins_them(tmp_path):
    from Classification.compare import comparison_notes

    baseline = hand_report("baseline", BASELINE_CM)
    fewer = hand_report("fewer", [[4, 0, 0, 0], [1, 3, 0, 0], [2, 0, 2, 0], [0, 0, 0, 0]])
    # other totals: not also "other test images per class"; the totals in ascending order
    assert comparison_notes([baseline, fewer]) == ["the reports count different numbers of test images (12, 13)."]
    assert comparison_notes([{**baseline, "num_test_images": 1000}, baseline])[0].endswith("(13, 1000).")
    grown = hand_report("grown", BASELINE_CM, train=(50, 30, 5, 7))
    assert len(comparison_notes([baseline, baseline, grown])) == 1  # the third report differs
    regrouped = {**grown, "head": [0], "tail": [1, 5, 7]}
    write_report(baseline, tmp_path / "baseline")
    write_report(regrouped, tmp_path / "regrouped")
    compare_main([str(tmp_path / "baseline"), str(tmp_path / "regrouped"), "--out", str(tmp_path / "table")])
    table = (tmp_path / "table" / "comparison.md").read_text()
    assert ("|\n\nNote: the reports use different head/tail groups. Also, the models trained on different real "
            "images per class") in table  # a blank line first: GitHub would read a note line as a table row


def test_compare_removes_what_a_killed_run_left_in_its_folder(tmp_path):
    write_report(hand_report("baseline", BASELINE_CM), tmp_path / "baseline")
    (tmp_path / "table").mkdir()
    left = tmp_path / "table" / ".comparison.md.abc123.tmp"
    left.write_text("half")
    compare_main([str(tmp_path / "baseline"), "--out", str(tmp_path / "table")])
    assert not left.exists() and (tmp_path / "table" / "comparison.md").is_file()


def test_reports_on_as_many_but_other_classes_are_not_compared(tmp_path):
    from Classification.report import comparison

    with pytest.raises(UserError, match="different classes"):
        comparison([hand_report("a", BASELINE_CM), hand_report("b", BASELINE_CM, ids=(0, 1, 5, 8))])
    with pytest.raises(UserError, match="other classes"):
        plot_long_tail([hand_report("x", BASELINE_CM, ids=(0, 1, 5, 8)), hand_report("y", BASELINE_CM)],
                       tmp_path / "lt.png")


def test_compare_notes_other_test_images_per_class_and_other_real_training_images(tmp_path):
    """Runs on data that changed between them: as many test images in all but spread
    otherwise, or other real training images, are noted; other generated images are not."""
    from Classification.compare import comparison_notes

    baseline = hand_report("baseline", BASELINE_CM)
    assert comparison_notes([baseline, hand_report("TGN", AUGMENTED_CM, generated=[0, 0, 40, 45])]) == []
    moved = hand_report("moved", [[4, 0, 0, 0], [1, 3, 0, 0], [2, 0, 1, 0], [1, 0, 0, 1]])  # 13 test images too
    assert comparison_notes([baseline, moved]) == ["the reports count different test images per class."]
    grown = build_report(np.array(BASELINE_CM), method="grown", source="g.pth", dataset="TOY", class_ids=[0, 1, 5, 7],
                         class_names=["a", "b", "c", "d"], train_counts=[50, 30, 5, 7], generated_counts=None,
                         head=[0, 1], tail=[5, 7], grouping="hand")
    write_report(baseline, tmp_path / "baseline")
    write_report(grown, tmp_path / "grown")
    compare_main([str(tmp_path / "baseline"), str(tmp_path / "grown"), "--out", str(tmp_path / "table")])
    assert "Note: the models trained on different real images per class (train_count" in \
        (tmp_path / "table" / "comparison.md").read_text()


def test_a_damaged_report_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    """A report.json with the right format tag but a field lost or mistyped (edited by hand,
    cut short) stopped compare.py, and train.py --baseline-report after every epoch, with a
    traceback."""
    write_report(hand_report("baseline", BASELINE_CM), tmp_path / "good")
    good = json.loads((tmp_path / "good" / "report.json").read_text())
    for name, damage, message in (
            ("no-oa", lambda r: r.pop("overall_accuracy"), "its 'overall_accuracy' is missing or not a number"),
            ("text-oa", lambda r: r.update(overall_accuracy="abc"), "its 'overall_accuracy' is missing or not"),
            ("no-accuracy", lambda r: r["classes"][2].pop("accuracy"), "class 5's accuracy is missing"),
            ("no-rows", lambda r: r.update(classes=[]), "it has no class rows"),
            ("no-head", lambda r: r.pop("head"), "its 'head' class ids are missing"),
            ("no-count", lambda r: r.pop("num_test_images"), "its 'num_test_images' is missing"),
            ("no-method", lambda r: r.pop("method"), "it has no method name"),
            ("flag-oa", lambda r: r.update(overall_accuracy=True), "its 'overall_accuracy' is missing"),
            ("text-head", lambda r: r.update(head_accuracy="x"), "its 'head_accuracy' is missing"),
            ("no-tail", lambda r: r.pop("tail"), "its 'tail' class ids are missing"),
            ("no-name", lambda r: r["classes"][0].pop("name"), "a class row has no id or name"),
            ("format", lambda r: r.update(format="other/1"), "is not a report written by")):
        damaged = json.loads(json.dumps(good))
        damage(damaged)
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(damaged))
        err = exit_message(capsys, compare_main, [str(tmp_path / "good"), str(tmp_path / name), "--out",
                                                  str(tmp_path / "table")])
        if name == "format":  # not a report of ours at all
            assert err.startswith(f"error: {tmp_path / name / 'report.json'} {message}"), err
        else:
            assert err.startswith(f"error: {tmp_path / name / 'report.json'}: {message}") and "damaged" in err, err
    assert not (tmp_path / "table").exists()


def test_compare_refuses_reports_on_other_classes(tmp_path, capsys):
    write_report(hand_report("baseline", BASELINE_CM), tmp_path / "a")
    other = hand_report("other", BASELINE_CM)
    other["classes"] = other["classes"][:3]
    write_report(other, tmp_path / "b")
    err = exit_message(capsys, compare_main, [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path)])
    assert "different classes" in err
    write_report({**hand_report("baseline", BASELINE_CM), "dataset": "DIOR"}, tmp_path / "c")
    err = exit_message(capsys, compare_main, [str(tmp_path / "a"), f"dior={tmp_path / 'c'}", "--out", str(tmp_path)])
    # Named as given: both are 'baseline' runs.
    assert f"reports '{tmp_path / 'a'}' and 'dior={tmp_path / 'c'}' are on different datasets (TOY, DIOR)" in err
    renumbered = hand_report("renumbered", BASELINE_CM)  # the same ids, numbered from other class names
    renumbered["classes"][0]["name"], renumbered["classes"][1]["name"] = (renumbered["classes"][1]["name"],
                                                                          renumbered["classes"][0]["name"])
    write_report(renumbered, tmp_path / "f")
    err = exit_message(capsys, compare_main, [str(tmp_path / "a"), str(tmp_path / "f"), "--out", str(tmp_path)])
    assert "name class 0 'a' and 'b': another dataset or class numbering" in err
    respelled = hand_report("respelled", BASELINE_CM)  # as an earlier version, or macOS, spelled the names
    respelled["classes"][0]["name"] = "A_"
    write_report(respelled, tmp_path / "g")
    compare_main([str(tmp_path / "a"), str(tmp_path / "g"), "--out", str(tmp_path / "respelled")])
    by_id = hand_report("by id", BASELINE_CM)  # an earlier version, on DIOR without classes.json, named them so
    for row in by_id["classes"]:
        row["name"] = str(row["id"])
    write_report(by_id, tmp_path / "h")
    compare_main([str(tmp_path / "a"), str(tmp_path / "h"), "--out", str(tmp_path / "by-id")])
    write_report(hand_report("baseline", AUGMENTED_CM), tmp_path / "d")  # both named 'baseline'
    err = exit_message(capsys, compare_main, [str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path)])
    assert "two reports are named 'baseline': name each row, NAME=REPORT" in err
    compare_main(["a=" + str(tmp_path / "a"), "d=" + str(tmp_path / "d"), "--out", str(tmp_path / "named")])
    fewer = hand_report("fewer", [[4, 0, 0, 0], [1, 3, 0, 0], [2, 0, 2, 0], [0, 0, 0, 0]])
    write_report(fewer, tmp_path / "e")
    compare_main([str(tmp_path / "a"), str(tmp_path / "e"), "--out", str(tmp_path / "counts")])
    assert "different numbers of test images (12, 13)" in (tmp_path / "counts" / "comparison.md").read_text()


def test_pretrained_file_initialises_all_but_fc(tmp_path):
    source = build_classifier("resnet18", 7)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = initialise_backbone(build_classifier("resnet18", 5), str(tmp_path / "weights.pth"))
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc[0].weight.shape == (5, 512)
    with pytest.raises(UserError, match="does not fit --arch resnet50"):
        initialise_backbone(build_classifier("resnet50", 5), str(tmp_path / "weights.pth"))


def test_a_kmdn_model_initialises_the_classifier_with_its_shortcuts(tmp_path):
    """M_T.pth and the official KMDN files name the projection branch shortcut.*, the
    classifier (torchvision's ResNet) downsample.*: the same weights under other names."""
    from tgn.io import atomic_torch_save
    from tgn.resnet import FeatureResNet

    kmdn = FeatureResNet("resnet18", num_classes=3)
    atomic_torch_save(tmp_path / "M_T.pth", {"state_dict": kmdn.state_dict(), "model_config": kmdn.config})
    model = initialise_backbone(build_classifier("resnet18", 5), str(tmp_path / "M_T.pth"))
    assert torch.equal(model.layer2[0].downsample[0].weight, kmdn.layer2[0].shortcut[0].weight)
    assert torch.equal(model.layer4[0].downsample[1].running_var, kmdn.layer4[0].shortcut[1].running_var)
    assert torch.equal(model.layer3[1].conv1.weight, kmdn.layer3[1].conv1.weight)


def test_generated_images_and_checkpoints_of_another_class_numbering_are_refused(trained, tmp_path, capsys):
    """Class ids follow the folders' order, so adding a class folder renumbers the rest:
    --extra folders and checkpoints are checked by the class names they were made for."""
    data, out, _ = trained
    generated = write_generated(tmp_path / "gen", {3: 2})
    (generated / "generation.json").write_text(json.dumps({"r": 0.05, "class_names": {"3": "dam"}}))
    common = ["--data-root", str(data), "--epochs", "1", "--device", "cpu", *TINY]
    err = exit_message(capsys, train_main, [*common, "--extra", str(generated), "--out", str(tmp_path / "a")])
    assert err.startswith(f"error: --extra {generated}: its class 3 is 'dam', the dataset's class 3 is 'class 3'")
    assert not (tmp_path / "a").exists()
    tail_data = tmp_path / "tail"  # a folder of an earlier version: the names of the tail data it names
    tail_data.mkdir()
    (tail_data / "tail_classes.json").write_text(json.dumps({"classes": [{"id": 3, "name": "class 3"}]}))
    (generated / "generation.json").write_text(json.dumps({"r": 0.05, "data": str(tail_data)}))
    train_main([*common, "--extra", str(generated), "--out", str(tmp_path / "b")])
    capsys.readouterr()

    checkpoint = torch.load(out / "best.pth", weights_only=False)
    checkpoint["class_names"][1] = "harbour"
    torch.save(checkpoint, tmp_path / "renamed.pth")
    err = exit_message(capsys, evaluate_main, ["--data-root", str(data), "--ckpt", str(tmp_path / "renamed.pth"),
                                               "--workers", "0", "--device", "cpu"])
    assert "was trained with class 1 named 'harbour'" in err and "names it 'class 1'" in err
    # Spelled otherwise, as the releases and earlier preparers spell names: the same classes.
    (tail_data / "tail_classes.json").write_text(json.dumps({"classes": [{"id": 3, "name": "Class_3"}]}))
    train_main([*common, "--extra", str(generated), "--out", str(tmp_path / "c")])
    checkpoint["class_names"][1] = "CLASS-1"
    torch.save(checkpoint, tmp_path / "respelled.pth")
    evaluate_main(["--data-root", str(data), "--ckpt", str(tmp_path / "respelled.pth"), "--workers", "0",
                   "--device", "cpu", "--out", str(tmp_path / "respelled-report")])


def test_output_order_is_the_rank_of_the_class_id_whatever_the_order_of_classes_json(tmp_path):
    """A classes.json listing its classes out of id order must not renumber the outputs (the
    released result.pth's output k is class k)."""
    from Classification.samples import class_order, training_images
    from tgn.data import open_dataset

    data = write_dataset(tmp_path / "data", {2: 3, 5: 2, 9: 4})
    listing = json.loads((data / "classes.json").read_text())
    listing["classes"].reverse()
    (data / "classes.json").write_text(json.dumps(listing))
    info = open_dataset(data)
    assert class_order(info) == ([2, 5, 9], {2: 0, 5: 1, 9: 2})
    images = training_images(info)
    assert images.real_counts == [3, 2, 4]
    assert {(Path(path).parent.name, label) for path, label in images.samples} == {("2", 0), ("5", 1), ("9", 2)}


def test_the_training_report_is_of_the_best_epoch_when_a_later_one_is_worse(tmp_path, monkeypatch, capsys):
    """report-best/ scores best.pth's weights, not the last epoch's: scripted accuracies make
    the first of three epochs the best, also when the third is trained by a --resume."""
    import Classification.stage
    import tgn.engine

    script_accuracies(monkeypatch, [0.9, 0.1, 0.2], tgn.engine)
    reported = []
    stage_evaluate = Classification.stage.evaluate
    monkeypatch.setattr(Classification.stage, "evaluate", lambda model, *args, **kwargs: reported.append(
        {k: v.detach().clone() for k, v in model.state_dict().items()}) or stage_evaluate(model, *args, **kwargs))
    data = write_dataset(tmp_path / "data", COUNTS)
    out = tmp_path / "cls"
    common = ["--data-root", str(data), "--out", str(out), "--lr", "0.01", "--device", "cpu", *TINY]
    train_main([*common, "--epochs", "2"])
    capsys.readouterr()
    train_main([*common, "--epochs", "3", "--resume"])
    best = load_checkpoint(out / "best.pth")
    assert best["epoch"] == 0 and load_checkpoint(out / "last.pth")["best_epoch"] == 0
    assert "% at epoch 1; report of" in capsys.readouterr().out
    assert all(torch.equal(reported[-1][k], v) for k, v in best["state_dict"].items())


def test_the_epochs_are_scored_with_head_and_tail_of_the_real_counts(toy_data, tmp_path, monkeypatch):
    """The per-epoch head and tail accuracies of metrics.jsonl come from the head and tail
    groups of the real counts, not from each other's."""
    import Classification.training
    from Classification.train import main as train_main

    class Captured(Exception):
        pass

    def fake_fit(*args, **kwargs):
        raise Captured(kwargs["head"], kwargs["tail"])

    monkeypatch.setattr(Classification.training, "fit", fake_fit)
    with pytest.raises(Captured) as captured:
        train_main(["--data-root", str(toy_data), "--out", str(tmp_path / "cls"), "--epochs", "1", "--device", "cpu",
                    *TINY])
    assert captured.value.args == ([0, 1], [2, 3, 4])  # output indices; classes 0, 1 have the most images


def test_a_classifier_resumes_only_on_the_real_images_it_started_with(toy_data, tmp_path, capsys):
    """A --resume after DATA's training list changed is refused (the --extra images have
    their own test)."""
    from Classification.train import main as train_main

    common = ["--data-root", str(toy_data), "--out", str(tmp_path / "cls"), "--device", "cpu", *TINY]
    train_main([*common, "--epochs", "1"])
    annotation = toy_data / "anno" / "TOY_train.txt"
    lines = annotation.read_text().splitlines(keepends=True)
    annotation.write_text("".join(lines[1:]))  # one class-0 training image fewer
    with pytest.raises(SystemExit) as exit_info:
        train_main([*common, "--epochs", "2", "--resume"])
    assert exit_info.value.code == 2 and "other real images" in capsys.readouterr().err


def test_a_checkpoint_naming_more_classes_than_the_data_is_refused_by_its_output_count():
    """Names recorded without ids (a hand-made checkpoint) whose first ones match DATA's: the
    output count decides, with its one line (the name comparison used to stop with a
    StopIteration there)."""
    from types import SimpleNamespace

    from Classification.model import check_classes

    model = SimpleNamespace(config={"num_classes": 3})
    with pytest.raises(UserError, match="ckpt.pth has 3 outputs but DATA has 2 classes"):
        check_classes({"class_names": ["dam", "bridge", "harbor"]}, model, [0, 1], "ckpt.pth", "DATA",
                      ["dam", "bridge"])
